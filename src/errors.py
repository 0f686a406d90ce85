"""Domain errors and the one place that renders every error in OpenAI's shape.

Every error body is `{"error": {"message", "type", "param", "code"}}`:

    GatewayError                 500 server_error
    ├── InvalidRequest           400 invalid_request_error
    │   └── ModelNotPriced       400 model_not_priced
    ├── AuthenticationFailed     401 invalid_api_key
    ├── InsufficientCredits      402 insufficient_quota
    ├── PermissionDenied         403 permission_denied
    ├── NotFound                 404 not_found
    │   └── ModelNotFound        404 model_not_found
    ├── Conflict                 409 conflict
    ├── PayloadTooLarge          413 request_too_large
    ├── RateLimited              429 rate_limit_exceeded
    ├── UpstreamError            502 bad_gateway
    ├── ServiceUnavailable       503 service_unavailable
    └── UpstreamTimeout          504 upstream_timeout

Services and db code raise these; HTTPException never appears below the routes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from src.logging_config import request_id_var

logger = logging.getLogger("gatewayz.errors")

REQUEST_ID_HEADER = "X-Request-ID"


class GatewayError(Exception):
    """An error the client is meant to see, with its HTTP status and OpenAI error fields."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    default_message: ClassVar[str] = "The server had an error while processing your request."

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.param = param
        self.code = code or self.default_code
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    default_message = "The request is invalid."


class ModelNotPriced(InvalidRequest):
    default_code = "model_not_priced"
    default_message = "This model has no price configured and cannot be used."


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"
    default_message = "Invalid or missing credentials."


class InsufficientCredits(GatewayError):
    status_code = 402
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"
    default_message = "Not enough credits for this request."


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"
    default_message = "You are not allowed to do this."


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"
    default_message = "Not found."


class ModelNotFound(NotFound):
    default_code = "model_not_found"
    default_message = "The model does not exist or is not available."


class Conflict(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"
    default_message = "The request conflicts with the current state."


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"
    default_message = "The request body is too large."


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    default_message = "Rate limit exceeded."


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "api_error"
    default_code = "bad_gateway"
    default_message = "The upstream provider returned an invalid response."


class ServiceUnavailable(GatewayError):
    status_code = 503
    error_type = "api_error"
    default_code = "service_unavailable"
    default_message = "The service is temporarily unavailable."


class UpstreamTimeout(GatewayError):
    status_code = 504
    error_type = "api_error"
    default_code = "upstream_timeout"
    default_message = "The upstream provider did not answer in time."


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status_code: int,
    body: dict[str, Any],
    headers: Mapping[str, str] | None = None,
) -> Response:
    all_headers = dict(headers or {})
    request_id = request_id_var.get()
    if request_id:
        all_headers.setdefault(REQUEST_ID_HEADER, request_id)
    return Response(
        orjson.dumps(body),
        status_code=status_code,
        headers=all_headers,
        media_type="application/json",
    )


def internal_error_body() -> dict[str, Any]:
    request_id = request_id_var.get()
    suffix = f" (request id {request_id})" if request_id else ""
    return error_body(
        "The server had an error while processing your request" + suffix + ".",
        "server_error",
    )


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    # FastAPI prefixes the location with "body", "query", "path" or "header"; OpenAI names the
    # field itself, with dots for nesting ("messages.0.role").
    parts = (
        [str(part) for part in loc[1:]]
        if loc and loc[0] in {"body", "query", "path", "header", "cookie"}
        else [str(part) for part in loc]
    )
    return ".".join(parts) or None


def validation_error_response(exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(
            400,
            error_body(
                "The request body is not valid JSON.",
                "invalid_request_error",
                code="invalid_json",
            ),
        )
    param = _param_from_loc(first.get("loc", ()))
    if first.get("type") == "missing" and param is None:
        message = "The request body is missing or empty."
    else:
        message = (
            f"Invalid value for '{param}': {first.get('msg', 'invalid value')}."
            if param
            else str(first.get("msg", "Invalid request."))
        )
    return error_response(
        400,
        error_body(message, "invalid_request_error", param=param, code="invalid_value"),
    )


def http_error_response(status_code: int, headers: Mapping[str, str] | None = None) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    try:
        phrase = HTTPStatus(status_code).phrase
    except ValueError:
        phrase = "Error"
    error_type = "invalid_request_error" if status_code < 500 else "server_error"
    message = {404: "Unknown route.", 405: "Method not allowed for this route."}.get(
        status_code, phrase + "."
    )
    return error_response(
        status_code,
        error_body(message, error_type, code=codes.get(status_code)),
        headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the app can raise in OpenAI's shape."""

    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc.status_code, exc.body(), exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # Starlette raises a bare 400 when the body cannot be parsed at all.
            return error_response(
                400,
                error_body(
                    "The request body could not be parsed.",
                    "invalid_request_error",
                    code="invalid_body",
                ),
            )
        return http_error_response(exc.status_code, exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error", exc_info=exc)
        return error_response(500, internal_error_body())

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
