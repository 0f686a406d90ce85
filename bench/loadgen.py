"""A closed-loop HTTP/1.1 load generator in separate processes, for when wrk is missing (and for streams).

Each process runs one event loop (uvloop when installed) with raw keep-alive connections: a
connection sends its precomputed request, reads the whole response (Content-Length or chunked),
records the latency (and, for chunked responses, the time to the first body chunk), and sends the
next one until the deadline. A request in flight at the deadline is always finished and counted,
never abandoned, so every answer the server produced is in the counts (the ledger check relies on
it). `python -m bench.run` measures this generator against the fake upstream before anything else:
it must be far faster than the gateway for the gateway's figures to mean anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from typing import Any, cast

DONE_FRAME = b"data: [DONE]\n\n"
ERROR_EVENT = b"event: error"


@dataclass(frozen=True)
class Template:
    """One request to send over and over, and how to tell a good answer."""

    raw: bytes
    stream: bool


def http_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class LoadResult:
    """What a load run measured; latencies in milliseconds, for successful requests only."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    generator: str = "python"
    # wrk reports percentiles, not samples: they land here instead of `latencies_ms`.
    fixed_ms: dict[str, float] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def latency(self, pct: float) -> float | None:
        if self.latencies_ms:
            return percentile(self.latencies_ms, pct)
        return self.fixed_ms.get(f"p{pct:g}")

    def ttfb(self, pct: float) -> float | None:
        return percentile(self.ttfb_ms, pct)

    def merge(self, other: LoadResult) -> None:
        self.ok += other.ok
        for name, count in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + count
        self.latencies_ms.extend(other.latencies_ms)
        self.ttfb_ms.extend(other.ttfb_ms)
        self.cpu_seconds += other.cpu_seconds


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class _Connection(asyncio.Protocol):
    """One keep-alive client connection that parses exactly one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bool, float, float]] | None = None
        self.stream = False
        self._reset()

    def _reset(self) -> None:
        self.buffer.clear()
        self.body_start = -1
        self.status = 0
        self.length = -1
        self.chunked = False
        self.cursor = 0
        self.first_byte = 0.0
        self.chunks = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("connection closed"))

    def send(self, template: Template) -> asyncio.Future[tuple[int, bool, float, float]]:
        assert self.transport is not None
        self._reset()
        self.stream = template.stream
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(template.raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self.buffer
        buffer += data
        if self.body_start < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            try:
                self.status = int(head[9:12])
            except ValueError:
                self._finish(0, False, now)
                return
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                self.length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.chunked = True
            else:
                self._finish(self.status, False, now)
                return
            self.body_start = self.cursor = end + 4
        if not self.chunked:
            if len(buffer) - self.body_start >= self.length:
                body = bytes(buffer[self.body_start : self.body_start + self.length])
                self._finish(self.status, self.status == 200 and b'"choices"' in body, now)
            return
        self._read_chunks(now)

    def _read_chunks(self, now: float) -> None:
        buffer, cursor = self.buffer, self.cursor
        while True:
            line_end = buffer.find(b"\r\n", cursor)
            if line_end < 0:
                break
            size = int(bytes(buffer[cursor:line_end]).split(b";")[0], 16)
            if size == 0:
                if len(buffer) >= line_end + 4:
                    body = bytes(self.chunks)
                    good = self.status == 200 and body.endswith(DONE_FRAME) and ERROR_EVENT not in body
                    self._finish(self.status, good, now)
                    return
                break
            if len(buffer) < line_end + 2 + size + 2:
                break
            if not self.first_byte:
                self.first_byte = now
            self.chunks += buffer[line_end + 2 : line_end + 2 + size]
            cursor = line_end + 2 + size + 2
        self.cursor = cursor

    def _finish(self, status: int, good: bool, now: float) -> None:
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, good, self.first_byte or now, now))


@dataclass
class _Worker:
    host: str
    port: int
    templates: list[Template]
    indices: list[int]
    timeout: float
    result: LoadResult = field(default_factory=LoadResult)

    async def connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Connection, self.host, self.port)
        return protocol

    async def run_connection(self, conn: _Connection, index: int, deadline: float) -> None:
        template = self.templates[index % len(self.templates)]
        result = self.result
        while True:
            started = time.perf_counter()
            if started >= deadline:
                break
            try:
                if conn.transport is None:
                    conn = await self.connect()
                async with asyncio.timeout(self.timeout):
                    status, good, first, end = await conn.send(template)
            except TimeoutError:
                result.errors["timeout"] = result.errors.get("timeout", 0) + 1
                if conn.transport is not None:
                    conn.transport.abort()
                continue
            except OSError:
                result.errors["connection"] = result.errors.get("connection", 0) + 1
                await asyncio.sleep(0.01)
                continue
            if good:
                result.ok += 1
                result.latencies_ms.append((end - started) * 1000)
                if template.stream:
                    result.ttfb_ms.append((first - started) * 1000)
            else:
                name = f"status_{status}" if status != 200 else "invalid_body"
                result.errors[name] = result.errors.get(name, 0) + 1
        if conn.transport is not None:
            conn.transport.close()

    async def run(self, ready: Any, go: EventType, start_at: Any, duration: float) -> float:
        connections = [await self.connect() for _ in self.indices]
        ready.put("ready")
        go.wait()  # nothing else runs on this loop until the start
        begin = float(start_at.value)
        await asyncio.sleep(max(0.0, begin - time.time()))
        deadline = time.perf_counter() + (begin + duration - time.time())
        await asyncio.gather(
            *(
                self.run_connection(conn, index, deadline)
                for conn, index in zip(connections, self.indices, strict=True)
            )
        )
        return time.time() - begin


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _process_main(
    host: str,
    port: int,
    templates: list[Template],
    indices: list[int],
    duration: float,
    timeout: float,
    ready: Any,
    go: EventType,
    start_at: Any,
    results: Any,
) -> None:
    _install_uvloop()
    cpu = time.process_time()
    worker = _Worker(host=host, port=port, templates=templates, indices=indices, timeout=timeout)
    try:
        elapsed = asyncio.run(worker.run(ready, go, start_at, duration))
    except Exception as exc:
        ready.put(f"failed: {exc!r}")
        results.put(None)
        return
    worker.result.elapsed = elapsed
    worker.result.cpu_seconds = time.process_time() - cpu
    results.put(worker.result)


def run_load(
    host: str,
    port: int,
    templates: list[Template],
    *,
    connections: int,
    duration: float,
    processes: int = 0,
    timeout: float = 60.0,
) -> LoadResult:
    """Drive `connections` closed-loop connections for `duration` s; connection i sends templates[i % n]."""
    processes = processes or min(connections, 2)
    processes = max(1, min(processes, connections))
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    go = context.Event()
    start_at = context.Value("d", 0.0)
    shares = [list(range(connections))[p::processes] for p in range(processes)]
    children = [
        context.Process(
            target=_process_main,
            args=(host, port, templates, share, duration, timeout, ready, go, start_at, results),
            daemon=True,
        )
        for share in shares
    ]
    for child in children:
        child.start()
    try:
        waiting, limit = len(children), time.monotonic() + 60
        while waiting:
            try:
                message = ready.get(timeout=0.5)
            except queue.Empty:
                if any(child.exitcode is not None for child in children) or time.monotonic() > limit:
                    raise RuntimeError("a load generator process did not start") from None
                continue
            if message != "ready":
                raise RuntimeError(f"load generator process {message}")
            waiting -= 1
        start_at.value = time.time() + 0.05
        go.set()
        total = LoadResult()
        for _ in children:
            part = results.get(timeout=duration + timeout + 60)
            if part is None:
                raise RuntimeError("a load generator process failed")
            total.merge(part)
            total.elapsed = max(total.elapsed, part.elapsed)
    except queue.Empty as exc:
        raise RuntimeError("the load generator did not answer in time") from exc
    finally:
        for child in children:
            child.join(10)
            if child.is_alive():
                child.terminate()
    total.errors = dict(Counter(total.errors))
    return total
