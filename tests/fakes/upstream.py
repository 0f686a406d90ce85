"""A fake OpenAI-compatible upstream provider for the gateway's tests.

`FakeUpstream` is a real HTTP server (uvicorn, HTTP/1.1) on 127.0.0.1 with a
random free port, running in a background thread with its own event loop, so
it keeps answering while the test's own loop is busy or blocked::

    with FakeUpstream() as up:
        client = openai.OpenAI(base_url=up.base_url, api_key="x")
        up.reply.content = "Hi!"           # reply knobs (see `Reply`)
        up.set_fault(status=429, retry_after=2, times=1)   # fault knobs (see `Fault`)
        ...
        assert up.requests[-1].body["model"] == "openai/gpt-4o-mini"

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions`` (JSON or SSE when ``stream: true``),
``POST /v1/images/generations`` and ``GET /files/{name}.png`` (serves the
PNG that image ``url`` replies point to).

Reply knobs (`up.reply`, a mutable `Reply`; or `up.set_reply(**changes)`):
``content``, ``chunks`` (number of content chunks), ``chunk_delay``
(seconds between stream frames), ``prompt_tokens`` / ``completion_tokens``
(usage overrides), ``model`` (echoed model id), ``finish_reason``,
``tool_call`` / ``tool_name`` / ``tool_arguments`` (answer with a tool call
when the request carries ``tools``).

Fault knobs (`up.set_fault(...)`, one `Fault`; combine freely, except that
at most one of ``status``, ``html``, ``malformed_json``, ``no_choices``,
``cut_after``, ``error_frame_after`` may be set): ``status`` (+
``retry_after``, ``error_type``, ``error_code``, ``error_message``),
``delay`` (before headers), ``cut_after`` (drop the TCP connection after N
SSE frames), ``error_frame_after`` (``data: {"error": ...}`` after N frames),
``malformed_json``, ``html``, ``no_choices``, ``no_usage``, ``times`` (apply
to the next K matching requests only: "fail the first K then succeed"),
``endpoints`` ("chat" or "all"), ``model`` (only requests for that model).

Connection refused is simulated with `up.stop()`; `up.start()` again
re-binds the same port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import itertools
import json
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import uvicorn

__all__ = [
    "DEFAULT_CONTENT",
    "DEFAULT_MODELS",
    "TINY_PNG",
    "FakeUpstream",
    "Fault",
    "RecordedRequest",
    "Reply",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Endpoint = Literal["models", "chat", "images"]


def _tiny_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1, 8-bit RGBA
    pixels = zlib.compress(b"\x00\x00\x00\x00\x00")  # filter byte + one transparent pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


TINY_PNG: bytes = _tiny_png()
DEFAULT_CONTENT = "Hello from the fake upstream."
DEFAULT_TOOL_ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'

# Round per-token prices so tests can compute expected costs by hand.
DEFAULT_MODELS: list[dict[str, Any]] = [
    {
        "id": "openai/gpt-4o-mini",
        "object": "model",
        "created": 1721260800,
        "owned_by": "openai",
        "name": "OpenAI: GPT-4o-mini",
        "context_length": 128000,
        "pricing": {"prompt": "0.000001", "completion": "0.000002", "image": "0", "request": "0"},
        "top_provider": {"max_completion_tokens": 16384},
    },
    {
        "id": "meta-llama/llama-3.1-8b-instruct",
        "object": "model",
        "created": 1721692800,
        "owned_by": "meta-llama",
        "name": "Meta: Llama 3.1 8B Instruct",
        "context_length": 131072,
        "pricing": {"prompt": "0.0000001", "completion": "0.0000002", "image": "0", "request": "0"},
        "top_provider": {"max_completion_tokens": 8192},
    },
]

_ERROR_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to access this resource."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("timeout", None, "Request timed out."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", "bad_gateway", "Bad gateway."),
    503: ("server_error", "service_unavailable", "The engine is currently overloaded."),
    504: ("server_error", "gateway_timeout", "Gateway timeout."),
}

_HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>502 Bad Gateway</h1><p>cloudflare</p></body></html>"
)


@dataclass
class Reply:
    """What a successful chat completion answers. Mutable: `up.reply.content = "x"`.

    - ``content``: assistant text.
    - ``chunks``: number of content chunks in a stream (``None``: one chunk
      per word). Non-streaming replies use the same split for usage.
    - ``chunk_delay``: seconds slept before each stream frame after the first.
    - ``prompt_tokens``: usage override (``None``: total characters of all
      message text // 4, at least 1).
    - ``completion_tokens``: usage override (``None``: number of content
      chunks, or of argument chunks for a tool call).
    - ``model``: model id to echo (``None``: the request's model).
    - ``finish_reason``: finish reason of a text reply.
    - ``tool_call``: answer with a tool call when the request has ``tools``.
    - ``tool_name``: called function (``None``: the first tool's name).
    - ``tool_arguments``: JSON text of the arguments; split into ``chunks``
      (default 3) fragments when streaming.
    """

    content: str = DEFAULT_CONTENT
    chunks: int | None = None
    chunk_delay: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    finish_reason: str = "stop"
    tool_call: bool = False
    tool_name: str | None = None
    tool_arguments: str = DEFAULT_TOOL_ARGUMENTS


@dataclass(frozen=True)
class Fault:
    """One switchable misbehaviour, installed with `FakeUpstream.set_fault`.

    - ``status``: answer this HTTP status with an OpenAI error body
      ``{"error": {"message", "type", "param", "code"}}`` (stream or not).
      ``retry_after`` adds a ``Retry-After`` header; ``error_type``,
      ``error_code``, ``error_message`` override the body's fields.
    - ``delay``: seconds to wait before sending the status line and headers
      (combines with every other knob).
    - ``cut_after``: stream: send N SSE frames (the role chunk is frame 1),
      then drop the TCP connection without the chunked terminator and without
      ``[DONE]``; non-stream: send half of the JSON body, then drop.
    - ``error_frame_after``: stream: after N frames send
      ``data: {"error": {...}}`` and end the stream cleanly, without
      ``[DONE]``; non-stream: 200 with an ``{"error": {...}}`` body.
    - ``malformed_json``: 200 with truncated JSON (stream: the first content
      frame is truncated JSON, then ``[DONE]``).
    - ``html``: 200 with an HTML page (``text/html``).
    - ``no_choices``: the completion (or every chunk) lacks ``choices``.
    - ``no_usage``: no ``usage`` key; no usage chunk even when asked for.
    - ``times``: apply to the next K matching requests only, then vanish
      (``None``: until cleared).
    - ``endpoints``: ``"chat"`` (chat completions only) or ``"all"`` (also
      models and images; the chat-only knobs are ignored there).
    - ``model``: only requests whose body ``model`` equals this id. A
      model-specific fault wins over a global one.
    """

    status: int | None = None
    retry_after: int | str | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    delay: float = 0.0
    cut_after: int | None = None
    error_frame_after: int | None = None
    malformed_json: bool = False
    html: bool = False
    no_choices: bool = False
    no_usage: bool = False
    times: int | None = None
    endpoints: Literal["chat", "all"] = "chat"
    model: str | None = None

    def __post_init__(self) -> None:
        exclusive = [
            self.status is not None,
            self.html,
            self.malformed_json,
            self.no_choices,
            self.cut_after is not None,
            self.error_frame_after is not None,
        ]
        if sum(exclusive) > 1:
            raise ValueError(
                "at most one of status, html, malformed_json, no_choices, cut_after, error_frame_after"
            )
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError("status must be a 4xx or 5xx code")
        if self.retry_after is not None and self.status is None:
            raise ValueError("retry_after needs status")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be >= 1")
        if self.endpoints not in ("chat", "all"):
            raise ValueError('endpoints must be "chat" or "all"')

    def applies_to(self, endpoint: Endpoint, model: str | None) -> bool:
        if self.endpoints == "chat" and endpoint != "chat":
            return False
        return self.model is None or self.model == model

    def error_body(self, status: int) -> dict[str, Any]:
        default_type, default_code, default_message = _ERROR_DEFAULTS.get(
            status,
            ("server_error" if status >= 500 else "invalid_request_error", None, f"Fake error {status}."),
        )
        return _error_body(
            self.error_message or default_message,
            self.error_type or default_type,
            self.error_code if self.error_code is not None else default_code,
        )


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received: lower-case header names, JSON body parsed (or None)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    raw_body: bytes
    received_at: float


@dataclass
class _ArmedFault:
    fault: Fault
    remaining: int | None


@dataclass
class _Exchange:
    """Per-request state shared by the handlers."""

    scope: Scope
    receive: Receive
    send: Send
    request_id: str
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the server itself drops the connection, so that is not
    # counted as the client going away.
    server_closed: bool = False
    complete: bool = False
    _watcher: asyncio.Task[None] | None = None

    def watch(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        # The body has been fully read, so the next message uvicorn delivers
        # is http.disconnect: that is how a client cancelling its request
        # becomes visible while we sleep or stream.
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                return

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def sleep(self, seconds: float) -> bool:
        """Sleep, waking early if the client leaves; True if it is still there."""
        if seconds <= 0:
            # Still yield, so the watcher notices a disconnect between frames.
            await asyncio.sleep(0)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.disconnected.wait(), seconds)
        return not self.disconnected.is_set()

    async def start(self, status: int, content_type: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        raw = [(b"content-type", content_type.encode()), (b"x-request-id", self.request_id.encode())]
        raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        await self.send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, data: bytes, *, more: bool = False) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})
        if not more:
            self.complete = True

    async def respond(
        self, status: int, data: bytes, content_type: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        await self.start(status, content_type, [("content-length", str(len(data))), *headers])
        await self.body(data)

    async def respond_json(self, status: int, payload: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        await self.respond(status, _dumps(payload), "application/json", headers)


class _Server(uvicorn.Server):
    """uvicorn.Server that starts and stops without its 100 ms polling ticks."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run_in_thread(self, sock: socket.socket) -> None:
        try:
            self.run(sockets=[sock])
        except BaseException as exc:  # uvicorn reports startup failures with sys.exit
            self.error = exc
        finally:
            self.ready.set()
            sock.close()

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        await self.on_tick(0)  # fills the Date header
        self.ready.set()
        if not self.should_exit:
            await self._stop_event.wait()

    def request_stop(self) -> None:
        self.should_exit = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        connections = list(self.server_state.connections)
        for connection in connections:
            connection.shutdown()  # closes idle keep-alive connections gracefully
        for connection in connections:
            # Requests still running are cut like a crashing provider would.
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.abort()
        tasks = list(self.server_state.tasks)
        if tasks:
            # Handlers return promptly once they see the disconnect.
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
        for server in self.servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def drop_connection(self, client: Any) -> bool:
        """Close the TCP connection of the request made from `client` (host, port)."""
        wanted = tuple(client) if client else None
        for connection in list(self.server_state.connections):
            if getattr(connection, "client", None) == wanted:
                connection.transport.close()  # flushes what was sent, then FIN
                return True
        return False


class FakeUpstream:
    """Fake OpenAI-compatible provider on 127.0.0.1 with switchable faults.

    Construction: ``FakeUpstream(reply=None, models=None, api_key=None)``;
    with ``api_key`` set, requests without ``Authorization: Bearer <api_key>``
    get 401. Lifecycle: `start`, `stop` (idempotent; restart keeps the port),
    or ``with FakeUpstream() as up``. `base_url` is ``http://127.0.0.1:PORT/v1``.

    Knobs: ``up.reply`` (a mutable `Reply`, see there) or `set_reply`;
    ``up.models`` (mutable list of model dicts for ``GET /v1/models``; missing
    ``object``/``created``/``owned_by`` are filled in); faults via
    `set_fault` (one `Fault` per ``model`` key, see `Fault`), `clear_fault`,
    `clear_faults`, `faults`.

    Observation: `requests` (snapshot list of `RecordedRequest`, every
    request including failed ones), `chat_requests`, `last_request`,
    `in_flight` (requests being handled right now; it drops just after the
    client has read the last byte, so poll it with `wait_until`), `disconnects` (requests
    whose client went away before the response was complete), `wait_until`
    / `wait_until_async`. `reset` clears faults, records and counters and
    restores reply, models and api_key to the constructor's values.
    """

    def __init__(
        self,
        *,
        reply: Reply | None = None,
        models: list[dict[str, Any]] | None = None,
        api_key: str | None = None,
    ) -> None:
        self._initial_reply = dataclasses.replace(reply) if reply is not None else Reply()
        self._initial_models = copy.deepcopy(models if models is not None else DEFAULT_MODELS)
        self._initial_api_key = api_key
        self.reply: Reply = dataclasses.replace(self._initial_reply)
        self.models: list[dict[str, Any]] = copy.deepcopy(self._initial_models)
        self.api_key: str | None = api_key
        self._lock = threading.Lock()
        self._faults: list[_ArmedFault] = []
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self._disconnects = 0
        self._ids = itertools.count(1)
        self._port: int | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("FakeUpstream already started")
        # An explicit IPPROTO_TCP makes asyncio set TCP_NODELAY on accepted
        # connections; with proto 0 it skips that, and Nagle plus delayed ACKs
        # add ~40 ms to every keep-alive response.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # A restart re-binds the previous port, which may still have
        # connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self._port or 0))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._asgi,
            interface="asgi3",
            http="auto",
            ws="none",
            lifespan="off",
            loop="asyncio",
            log_config=None,
            log_level="warning",
            access_log=False,
            proxy_headers=False,  # keeps scope["client"] equal to the socket peer
            server_header=False,
        )
        server = _Server(config)
        thread = threading.Thread(
            target=server.run_in_thread, args=(sock,), name=f"fake-upstream:{self._port}", daemon=True
        )
        self._stopping = False
        self._server, self._thread = server, thread
        thread.start()
        if not server.ready.wait(10) or server.error is not None or not server.started:
            self.stop()
            raise RuntimeError(f"FakeUpstream failed to start: {server.error!r}")
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping = True
        server.request_stop()
        thread.join(10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeUpstream not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    # -- knobs -----------------------------------------------------------

    def set_reply(self, **changes: Any) -> Reply:
        """Replace fields of `reply` (e.g. ``content=``, ``chunks=``)."""
        self.reply = dataclasses.replace(self.reply, **changes)
        return self.reply

    def set_fault(self, fault: Fault | None = None, /, **fields: Any) -> Fault:
        """Install a fault (a `Fault` or its fields as keywords).

        Replaces the fault installed for the same ``model`` (``None`` = global).
        """
        if fault is None:
            fault = Fault(**fields)
        elif fields:
            fault = dataclasses.replace(fault, **fields)
        with self._lock:
            self._faults = [a for a in self._faults if a.fault.model != fault.model]
            self._faults.append(_ArmedFault(fault, fault.times))
        return fault

    def clear_faults(self) -> None:
        """Remove every installed fault."""
        with self._lock:
            self._faults = []

    def clear_fault(self, model: str | None = None) -> None:
        """Remove the fault installed for ``model`` (``None``: the global one)."""
        with self._lock:
            self._faults = [a for a in self._faults if a.fault.model != model]

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return [a.fault for a in self._faults]

    def reset(self) -> None:
        with self._lock:
            self._faults = []
            self._requests = []
            self._disconnects = 0
        self.reply = dataclasses.replace(self._initial_reply)
        self.models = copy.deepcopy(self._initial_models)
        self.api_key = self._initial_api_key

    # -- observation -----------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    @property
    def last_request(self) -> RecordedRequest:
        with self._lock:
            if not self._requests:
                raise LookupError("no request received")
            return self._requests[-1]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def disconnects(self) -> int:
        with self._lock:
            return self._disconnects

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
        """Poll `predicate` (blocking) until true or `timeout`; returns its last value."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return predicate()
            time.sleep(0.005)
        return True

    async def wait_until_async(self, predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
        """Like `wait_until`, without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return predicate()
            await asyncio.sleep(0.005)
        return True

    # -- ASGI ------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            await self._handle(scope, receive, send)
        except asyncio.CancelledError:
            # Only stragglers cancelled by stop() get here; uvicorn would log
            # them as application errors.
            return

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw_body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            name, text = key.decode("latin-1").lower(), value.decode("latin-1")
            headers[name] = f"{headers[name]}, {text}" if name in headers else text
        body: Any = None
        if raw_body:
            with contextlib.suppress(ValueError):
                body = json.loads(raw_body)
        record = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            body=body,
            raw_body=bytes(raw_body),
            received_at=time.time(),
        )
        with self._lock:
            self._requests.append(record)
            self._in_flight += 1
        ex = _Exchange(scope, receive, send, request_id=f"req_fake_{next(self._ids):06d}")
        ex.watch()
        try:
            await self._route(ex, record)
        finally:
            await ex.stop_watching()
            with self._lock:
                self._in_flight -= 1
                if ex.disconnected.is_set() and not (ex.complete or ex.server_closed or self._stopping):
                    self._disconnects += 1

    async def _route(self, ex: _Exchange, request: RecordedRequest) -> None:
        method, path = request.method, request.path
        if method == "GET" and path.startswith("/files/"):
            await ex.respond(200, TINY_PNG, "image/png")
            return
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            await ex.respond_json(401, Fault().error_body(401))
            return
        if method == "GET" and path == "/v1/models":
            await self._models(ex, request, None)
        elif method == "GET" and path.startswith("/v1/models/"):
            await self._models(ex, request, path.removeprefix("/v1/models/"))
        elif method == "POST" and path == "/v1/chat/completions":
            await self._chat(ex, request)
        elif method == "POST" and path == "/v1/images/generations":
            await self._images(ex, request)
        else:
            body = _error_body(
                f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url"
            )
            await ex.respond_json(404, body)

    # -- faults ----------------------------------------------------------

    def _take_fault(self, endpoint: Endpoint, model: str | None) -> Fault | None:
        with self._lock:
            matching = [a for a in self._faults if a.fault.applies_to(endpoint, model)]
            if not matching:
                return None
            armed = next((a for a in matching if a.fault.model is not None), matching[0])
            if armed.remaining is not None:
                armed.remaining -= 1
                if armed.remaining <= 0:
                    self._faults.remove(armed)
            return armed.fault

    async def _answer_early_fault(self, ex: _Exchange, fault: Fault | None) -> bool:
        """Apply faults that replace the whole response; True when handled."""
        if fault is None:
            return False
        if fault.delay > 0 and not await ex.sleep(fault.delay):
            return True
        if fault.status is not None:
            extra = [("retry-after", str(fault.retry_after))] if fault.retry_after is not None else []
            await ex.respond_json(fault.status, fault.error_body(fault.status), extra)
            return True
        if fault.html:
            await ex.respond(200, _HTML_PAGE, "text/html; charset=utf-8")
            return True
        return False

    async def _deliver_json(self, ex: _Exchange, payload: dict[str, Any], fault: Fault | None) -> None:
        """Send a non-streaming 200 JSON reply, bent by the body faults."""
        if fault is not None:
            if fault.no_choices:
                payload.pop("choices", None)
            if fault.no_usage:
                payload.pop("usage", None)
            if fault.error_frame_after is not None:
                payload = _stream_error_body()
        data = _dumps(payload)
        if fault is not None and fault.malformed_json:
            data = data[: len(data) // 2]
        if fault is not None and fault.cut_after is not None:
            await ex.start(200, "application/json", [("content-length", str(len(data)))])
            await ex.body(data[: len(data) // 2], more=True)
            await self._drop(ex)
            return
        await ex.respond(200, data, "application/json")

    async def _drop(self, ex: _Exchange) -> None:
        ex.server_closed = True
        server = self._server
        if server is None or not server.drop_connection(ex.scope.get("client")):
            raise RuntimeError("connection to drop not found")
        # Return only once uvicorn has seen the connection go, otherwise it
        # logs "ASGI callable returned without completing response".
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ex.disconnected.wait(), 2.0)

    # -- endpoints -------------------------------------------------------

    async def _models(self, ex: _Exchange, request: RecordedRequest, model_id: str | None) -> None:
        fault = self._take_fault("models", None)
        if await self._answer_early_fault(ex, fault):
            return
        models = [_complete_model(m) for m in list(self.models)]
        if model_id is None:
            await self._deliver_json(ex, {"object": "list", "data": models}, fault)
            return
        found = next((m for m in models if m["id"] == model_id), None)
        if found is None:
            message = f"The model `{model_id}` does not exist."
            await ex.respond_json(404, _error_body(message, "invalid_request_error", "model_not_found"))
            return
        await self._deliver_json(ex, found, fault)

    async def _images(self, ex: _Exchange, request: RecordedRequest) -> None:
        req = request.body
        if not isinstance(req, dict) or not isinstance(req.get("prompt"), str):
            await ex.respond_json(
                400, _error_body("'prompt' is required.", "invalid_request_error", None, "prompt")
            )
            return
        fault = self._take_fault("images", req.get("model"))
        if await self._answer_early_fault(ex, fault):
            return
        count = int(req.get("n") or 1)
        as_b64 = req.get("response_format") == "b64_json"
        png_b64 = base64.b64encode(TINY_PNG).decode()
        data = [
            {"b64_json": png_b64, "revised_prompt": req["prompt"]}
            if as_b64
            else {"url": f"{self.url}/files/image-{i}.png", "revised_prompt": req["prompt"]}
            for i in range(count)
        ]
        await self._deliver_json(ex, {"created": int(time.time()), "data": data}, fault)

    async def _chat(self, ex: _Exchange, request: RecordedRequest) -> None:
        req = request.body
        if not isinstance(req, dict):
            await ex.respond_json(400, _error_body("Invalid JSON body.", "invalid_request_error", None))
            return
        messages = req.get("messages")
        if not isinstance(req.get("model"), str) or not isinstance(messages, list) or not messages:
            body = _error_body(
                "'model' and non-empty 'messages' are required.", "invalid_request_error", None
            )
            await ex.respond_json(400, body)
            return
        reply = dataclasses.replace(self.reply)
        fault = self._take_fault("chat", req["model"])
        if await self._answer_early_fault(ex, fault):
            return

        tools = req.get("tools")
        tool_call = bool(reply.tool_call and isinstance(tools, list) and tools)
        if tool_call:
            pieces = _split(reply.tool_arguments, reply.chunks or 3)
        else:
            pieces = _split(reply.content, reply.chunks)
        prompt_tokens = (
            reply.prompt_tokens if reply.prompt_tokens is not None else _count_prompt_tokens(messages)
        )
        completion_tokens = reply.completion_tokens if reply.completion_tokens is not None else len(pieces)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        number = ex.request_id.removeprefix("req_fake_")
        common: dict[str, Any] = {
            "id": f"chatcmpl-fake{number}",
            "created": int(time.time()),
            "model": reply.model or req["model"],
        }
        call: dict[str, Any] | None = None
        if tool_call:
            call = {
                "id": f"call_fake{number}",
                "type": "function",
                "function": {
                    "name": reply.tool_name or _first_tool_name(tools),
                    "arguments": reply.tool_arguments,
                },
            }

        if not req.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
            if call is not None:
                message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
            payload = {
                **common,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "tool_calls" if call is not None else reply.finish_reason,
                    }
                ],
                "usage": usage,
            }
            await self._deliver_json(ex, payload, fault)
            return

        stream_options = req.get("stream_options") or {}
        include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
        frames = _chat_frames(common, pieces, call, reply.finish_reason, usage, include_usage, fault)
        await self._stream(ex, frames, reply.chunk_delay, fault)

    async def _stream(
        self, ex: _Exchange, frames: list[bytes], chunk_delay: float, fault: Fault | None
    ) -> None:
        await ex.start(200, "text/event-stream; charset=utf-8", [("cache-control", "no-cache")])
        cut_after = fault.cut_after if fault is not None else None
        error_after = fault.error_frame_after if fault is not None else None
        for sent in range(len(frames) + 1):
            if sent == cut_after:
                await self._drop(ex)
                return
            if sent == error_after:
                await ex.body(_sse(_stream_error_body()), more=True)
                break
            if sent == len(frames):
                break
            if not await ex.sleep(chunk_delay if sent > 0 else 0):
                return
            await ex.body(frames[sent], more=True)
        await ex.body(b"")


def _chat_frames(
    common: dict[str, Any],
    pieces: list[str],
    call: dict[str, Any] | None,
    finish_reason: str,
    usage: dict[str, int],
    include_usage: bool,
    fault: Fault | None,
) -> list[bytes]:
    """SSE frames of a streamed chat completion, ending with ``data: [DONE]``."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            **common,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return body

    chunks: list[dict[str, Any]]
    if call is None:
        chunks = [chunk({"role": "assistant", "content": ""})]
        chunks += [chunk({"content": piece}) for piece in pieces]
        chunks.append(chunk({}, finish_reason))
    else:
        head = {**call, "index": 0, "function": {"name": call["function"]["name"], "arguments": ""}}
        chunks = [chunk({"role": "assistant", "content": None, "tool_calls": [head]})]
        chunks += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
        chunks.append(chunk({}, "tool_calls"))
    if include_usage and not (fault is not None and fault.no_usage):
        chunks.append({**common, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    if fault is not None and fault.no_choices:
        for body in chunks:
            body.pop("choices", None)
    frames = [_sse(body) for body in chunks]
    if fault is not None and fault.malformed_json:
        broken = _dumps(chunks[1])
        frames[1] = b"data: " + broken[: len(broken) // 2] + b"\n\n"
    frames.append(b"data: [DONE]\n\n")
    return frames


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _sse(payload: Any) -> bytes:
    return b"data: " + _dumps(payload) + b"\n\n"


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _stream_error_body() -> dict[str, Any]:
    return _error_body("The upstream failed mid-stream.", "server_error", "stream_error")


def _complete_model(model: dict[str, Any]) -> dict[str, Any]:
    return {"object": "model", "created": 1700000000, "owned_by": "fake-upstream", **model}


def _first_tool_name(tools: Any) -> str:
    first = tools[0] if isinstance(tools, list) and tools else {}
    if isinstance(first, dict):
        for key in ("function", "custom"):
            spec = first.get(key)
            name = spec.get("name") if isinstance(spec, dict) else None
            if isinstance(name, str):
                return name
    return "tool"


def _split(text: str, parts: int | None) -> list[str]:
    """Split text into `parts` pieces of near-equal length (None: per word).

    Joining the pieces always gives back `text`; with more parts than
    characters some pieces are empty, so the piece count is exact.
    """
    if parts is None:
        return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])
    if parts < 1:
        raise ValueError("chunks must be >= 1")
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def _count_prompt_tokens(messages: list[Any]) -> int:
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
    return max(1, chars // 4)
