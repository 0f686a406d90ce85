"""The HTTP edge: request ids, the access log and metrics, the body-size limit and the last-resort 500.

Written as plain ASGI middleware (no BaseHTTPMiddleware) so streaming responses pass through
untouched and the hot path pays for one function call per message, not a task per request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from src.errors import REQUEST_ID_HEADER, error_body, internal_error_body
from src.logging_config import request_id_var
from src.services import metrics

# No response was sent: the client closed the request first (the status nginx logs for it).
CLIENT_CLOSED_REQUEST = 499

access_logger = logging.getLogger("gatewayz.access")
error_logger = logging.getLogger("gatewayz.errors")

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.lower().encode()


class _BodyTooLarge(Exception):
    pass


def _request_id_from(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == _REQUEST_ID_HEADER_BYTES:
            candidate: str = value.decode("latin-1")
            if _SANE_REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestContextMiddleware:
    """Request id, in-flight count, access log, body limit and the generic 500, per HTTP request."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id_from(scope)
        token = request_id_var.set(request_id)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        request_id_header = (_REQUEST_ID_HEADER_BYTES, request_id.encode("latin-1"))
        started = time.perf_counter()
        status = 0
        response_started = False
        too_large = False
        received = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                if too_large:
                    # The app may have turned the aborted read into its own error: answer 413.
                    return
                status = message["status"]
                response_started = True
                headers = [h for h in message.get("headers", []) if h[0].lower() != _REQUEST_ID_HEADER_BYTES]
                headers.append(request_id_header)
                # Rate-limit headers go on every response of a limited request, errors included.
                limit_headers = state.get("rate_limit_headers")
                if limit_headers:
                    present = {h[0].lower() for h in headers}
                    headers.extend(
                        (name.lower().encode(), value.encode())
                        for name, value in limit_headers.items()
                        if name.lower().encode() not in present
                    )
                message = {**message, "headers": headers}
            elif too_large and not response_started:
                return
            await send(message)

        async def receive_wrapper() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        self.in_flight += 1
        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                too_large = True
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except ClientDisconnect:
            # The client left before its request body arrived: nobody to answer and nothing was
            # started on its behalf. Logged as 499 (the client closed the request), not as a fault.
            if not response_started:
                status = CLIENT_CLOSED_REQUEST
        except Exception as exc:
            if not isinstance(exc, _BodyTooLarge) and not too_large:
                error_logger.error("unhandled error", exc_info=exc)
                if not response_started:
                    status = 500
                    await _send_json(send, 500, internal_error_body(), request_id_header)
                    response_started = True
                # A failure after the response started cannot change the status: the connection
                # is closed by the server, which the client sees as a truncated response.
        finally:
            self.in_flight -= 1
            if too_large and not response_started:
                status = 413
                body = error_body(
                    f"The request body exceeds the limit of {self.max_body_bytes} bytes.",
                    "invalid_request_error",
                    code="request_too_large",
                )
                await _send_json(send, 413, body, request_id_header)
            _log_access(scope, status, started)
            _count(scope, status, started)
            request_id_var.reset(token)


def _count(scope: Scope, status: int, started: float) -> None:
    # By route template (bounded label values), never by raw path.
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    metrics.HTTP_REQUESTS.labels(route, scope["method"], str(status)).inc()
    metrics.HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)


async def _send_json(send: Send, status: int, body: dict[str, Any], *extra: tuple[bytes, bytes]) -> None:
    payload = orjson.dumps(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _log_access(scope: Scope, status: int, started: float) -> None:
    if not access_logger.isEnabledFor(logging.INFO):
        return
    state = scope.get("state", {})
    client = scope.get("client")
    query = scope.get("query_string", b"").decode("latin-1")
    access_logger.info(
        "%s %s %s",
        scope["method"],
        scope["path"],
        status,
        extra={
            "method": scope["method"],
            "path": scope["path"],
            "query": query or None,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "client_ip": client[0] if client else None,
            "user_id": state.get("user_id"),
            "key_id": state.get("key_id"),
        },
    )
