"""A fake of Resend's send endpoint that the real `resend` SDK talks to, on a real socket.

`FakeResend` serves ``POST /emails`` on 127.0.0.1 (uvicorn in a thread, like the fake upstream):
it wants ``Authorization: Bearer <api key>``, checks the fields Resend requires (from, to,
subject, and html or text), and answers ``{"id": "<uuid>"}``. Like Resend, a repeated
``Idempotency-Key`` gets the first answer again and sends nothing new. Errors use Resend's body
shape ``{"statusCode", "name", "message"}``.

Knobs: ``fail(status, times=None)`` makes the next `times` sends (every send, when None) answer
`status`. Observation: `emails` (every accepted message, once), `requests` (every POST received,
accepted or not). `reset` clears both and the failure mode.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

from tests.fakes.live_server import LiveServer, ServedFake

__all__ = ["API_KEY", "AcceptedEmail", "FakeResend"]

API_KEY = "re_fake_" + "k" * 32


@dataclass(frozen=True)
class AcceptedEmail:
    id: str
    body: dict[str, Any]
    idempotency_key: str | None
    user_agent: str | None

    @property
    def to(self) -> list[str]:
        to = self.body["to"]
        return [to] if isinstance(to, str) else list(to)


def _error(status: int, name: str, message: str) -> JSONResponse:
    return JSONResponse({"statusCode": status, "name": name, "message": message}, status_code=status)


@dataclass
class FakeResend(ServedFake):
    api_key: str = API_KEY
    _emails: list[AcceptedEmail] = field(default_factory=list)
    _requests: int = 0
    _by_key: dict[str, str] = field(default_factory=dict)
    _fail_status: int | None = None
    _fail_times: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: LiveServer | None = None

    @property
    def emails(self) -> list[AcceptedEmail]:
        with self._lock:
            return list(self._emails)

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def fail(self, status: int = 500, *, times: int | None = None) -> None:
        with self._lock:
            self._fail_status, self._fail_times = status, times

    def reset(self) -> None:
        with self._lock:
            self._emails.clear()
            self._by_key.clear()
            self._requests = 0
            self._fail_status = self._fail_times = None

    def _failure(self) -> int | None:
        with self._lock:
            if self._fail_status is None:
                return None
            status = self._fail_status
            if self._fail_times is not None:
                self._fail_times -= 1
                if self._fail_times <= 0:
                    self._fail_status = self._fail_times = None
            return status

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/emails")
        async def send(request: Request) -> JSONResponse:
            with self._lock:
                self._requests += 1
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(403, "invalid_api_key", "API key is invalid")
            status = self._failure()
            if status is not None:
                return _error(status, "application_error", "The fake Resend is failing on purpose")
            body = await request.json()
            missing = [name for name in ("from", "to", "subject") if not body.get(name)]
            if missing or not (body.get("html") or body.get("text")):
                return _error(422, "validation_error", f"Missing `{(missing or ['html'])[0]}` field.")
            key = request.headers.get("idempotency-key")
            with self._lock:
                if key is not None and key in self._by_key:
                    return JSONResponse({"id": self._by_key[key]})
                email_id = str(uuid.uuid4())
                if key is not None:
                    self._by_key[key] = email_id
                self._emails.append(
                    AcceptedEmail(
                        id=email_id,
                        body=body,
                        idempotency_key=key,
                        user_agent=request.headers.get("user-agent"),
                    )
                )
            return JSONResponse({"id": email_id})

        return app
