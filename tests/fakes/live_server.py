"""The gateway itself on a real socket: uvicorn in a thread with its own event loop.

For tests that need real HTTP between client and gateway: the `openai` SDK, streaming, client
disconnects. The app's lifespan (pool, HTTP client) runs on the server's loop, so the test's own
loop stays free to drive concurrent clients.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn
from fastapi import FastAPI


class LiveServer:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> LiveServer:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
        )
        self._server = uvicorn.Server(config)
        sock = self._sock
        server = self._server

        def run() -> None:
            asyncio.run(server.serve(sockets=[sock]))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._sock is not None:
            self._sock.close()

    @property
    def state(self):  # type: ignore[no-untyped-def]
        """The running app's AppState (pool, catalog, ...)."""
        return self.app.state.gateway

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ServedFake:
    """A fake outside service served by a LiveServer: `start`/`stop`, a context manager, its `url`.

    Subclasses are dataclasses with a `_server: LiveServer | None = None` field and build their
    FastAPI app in `_app`.
    """

    _server: LiveServer | None

    def _app(self) -> FastAPI:
        raise NotImplementedError

    def start(self) -> Self:
        self._server = LiveServer(self._app()).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Where the fake answers: what the gateway's setting for the service points to."""
        assert self._server is not None, f"{type(self).__name__} not started"
        return self._server.url
