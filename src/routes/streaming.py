"""The streaming response of inference routes: settles the request even if it never started."""

from __future__ import annotations

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from src.services.chat import StreamStart


class SettledStream(StreamingResponse):
    """Server-sent events from a started upstream stream.

    If the client leaves before the first byte is sent, Starlette never starts the body iterator,
    so its own cleanup never runs; `abandon` then settles the request and frees its slot instead.
    """

    def __init__(self, start: StreamStart, headers: dict[str, str] | None = None) -> None:
        super().__init__(
            start.chunks,
            media_type="text/event-stream",
            headers={
                "X-Gateway-Provider": start.provider,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **(headers or {}),
            },
        )
        self._abandon = start.abandon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._abandon()
