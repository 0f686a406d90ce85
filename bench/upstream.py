"""A fast fake OpenAI-compatible upstream for the benchmark: raw asyncio, keep-alive, canned bytes.

It must never be the bottleneck, so it does as little as possible per request: find the end of
the headers, read Content-Length, pick one of a few precomputed responses by searching the body
bytes, and write it. Two models are listed with prices: `bench/fast` answers at once and
`bench/slow` after `--slow-ms` (50 ms by default); `"stream":true` in the body selects the SSE
answer (10 content chunks, a usage chunk, then [DONE]).

Run it on its own: `python -m bench.upstream --port 0` prints `ready <port>` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import Any, cast

import orjson

FAST_MODEL = "bench/fast"
SLOW_MODEL = "bench/slow"
PROMPT_TOKENS = 14
COMPLETION_TOKENS = 10
STREAM_CHUNKS = 10
CREATED = 1_732_000_000

MODELS: list[dict[str, Any]] = [
    {
        "id": model,
        "object": "model",
        "created": CREATED,
        "owned_by": "bench",
        "name": model,
        "context_length": 8192,
        "pricing": {"prompt": "0.000001", "completion": "0.000002", "image": "0", "request": "0"},
        "top_provider": {"max_completion_tokens": 1024},
    }
    for model in (FAST_MODEL, SLOW_MODEL)
]


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: ".encode()
        + content_type
        + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode()
    )
    return head + body


def completion_body(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! This is the benchmark upstream."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
            },
        }
    )


def stream_events(model: str) -> list[bytes]:
    """The SSE events of one streamed answer, each a complete `data: ...\\n\\n` frame."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": CREATED, "model": model}
    events = []
    for index in range(STREAM_CHUNKS):
        delta: dict[str, Any] = {"content": f"word{index} "}
        if index == 0:
            delta["role"] = "assistant"
        finish = "stop" if index == STREAM_CHUNKS - 1 else None
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    usage = {
        **base,
        "choices": [],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        },
    }
    events.append(b"data: " + orjson.dumps(usage) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def stream_response(model: str) -> bytes:
    """The whole SSE answer as chunked HTTP, one HTTP chunk per event, written in one go."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    body = b"".join(b"%x\r\n%b\r\n" % (len(event), event) for event in stream_events(model))
    return head + body + b"0\r\n\r\n"


JSON = b"application/json"
RESPONSES: dict[tuple[bool, bool], bytes] = {
    (slow, stream): (
        stream_response(SLOW_MODEL if slow else FAST_MODEL)
        if stream
        else _response("200 OK", JSON, completion_body(SLOW_MODEL if slow else FAST_MODEL))
    )
    for slow in (False, True)
    for stream in (False, True)
}
MODELS_RESPONSE = _response("200 OK", JSON, orjson.dumps({"object": "list", "data": MODELS}))
NOT_FOUND = _response(
    "404 Not Found", JSON, b'{"error":{"message":"not found","type":"invalid_request_error"}}'
)
BAD_REQUEST = _response(
    "400 Bad Request", JSON, b'{"error":{"message":"bad request","type":"invalid_request_error"}}'
)
SLOW_MARKER = b'"model":"' + SLOW_MODEL.encode() + b'"'
STREAM_MARKER = b'"stream":true'


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in order."""

    def __init__(self, slow_seconds: float) -> None:
        self.slow_seconds = slow_seconds
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                try:
                    length = int(head[at + 17 : stop if stop >= 0 else len(head)])
                except ValueError:
                    self._write(BAD_REQUEST, close=True)
                    return
            total = end + 4 + length
            if len(buffer) < total:
                return
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        close = b"\r\nconnection: close" in head
        if head.startswith(b"post /v1/chat/completions "):
            slow = SLOW_MARKER in body
            response = RESPONSES[(slow, STREAM_MARKER in body)]
            if slow and self.slow_seconds > 0:
                self.loop.call_later(self.slow_seconds, self._write, response, close)
                return
        elif head.startswith(b"get /v1/models "):
            response = MODELS_RESPONSE
        else:
            response = NOT_FOUND
        self._write(response, close)

    def _write(self, response: bytes, close: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(response)
        if close:
            transport.close()


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def serve(host: str, port: int, slow_seconds: float, *, reuse_port: bool, announce: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(slow_seconds), host, port, reuse_port=reuse_port, backlog=4096
    )
    if announce:
        bound = server.sockets[0].getsockname()[1]
        print(f"ready {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _serve_process(host: str, port: int, slow_seconds: float, announce: bool) -> None:
    _install_uvloop()
    asyncio.run(serve(host, port, slow_seconds, reuse_port=True, announce=announce))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--slow-ms", type=float, default=50.0, help=f"latency of {SLOW_MODEL}")
    parser.add_argument("--processes", type=int, default=1, help="server processes (SO_REUSEPORT)")
    args = parser.parse_args()
    slow = args.slow_ms / 1000
    if args.processes <= 1:
        loop_name = _install_uvloop()
        print(f"bench upstream on {loop_name}, pid {os.getpid()}", file=sys.stderr)
        asyncio.run(serve(args.host, args.port, slow, reuse_port=False, announce=True))
        return 0
    import multiprocessing

    port = args.port or free_port(args.host)
    children = [
        multiprocessing.Process(target=_serve_process, args=(args.host, port, slow, False), daemon=True)
        for _ in range(args.processes)
    ]
    for child in children:
        child.start()
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    print(f"ready {port}", flush=True)
    signal.sigwait(signals)
    for child in children:
        child.terminate()
    for child in children:
        child.join(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
