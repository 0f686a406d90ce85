"""A TCP proxy on 127.0.0.1 that a test can cut, to simulate a database or Redis outage.

It runs in its own thread and event loop, so it keeps forwarding whatever the test's loop does.
`cut()` drops every open connection and refuses new ones; `restore()` accepts again. The target
may be a Unix socket (the embedded PostgreSQL listens on one).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from types import TracebackType


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, unix_path: str | None = None) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.unix_path = unix_path
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._sock: socket.socket | None = None

    def start(self) -> TcpProxy:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore()`."""
        self._call(self._close(close_listener=True))

    def restore(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._call(self._listen())

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: object) -> None:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        future.result(timeout=5)

    async def _listen(self) -> None:
        assert self._sock is not None
        self._server = await asyncio.start_server(self._handle, sock=self._sock)

    async def _shutdown(self) -> None:
        await self._close(close_listener=True)
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _close(self, *, close_listener: bool) -> None:
        if close_listener and self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            if self.unix_path:
                upstream_reader, upstream_writer = await asyncio.open_unix_connection(self.unix_path)
            else:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.update({client_writer, upstream_writer})
        if self._server is None:  # cut while this connection was being opened
            await self._close(close_listener=False)
            return

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()
                self._writers.discard(writer)

        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))


def proxy_for_dsn(dsn: str) -> tuple[TcpProxy, str]:
    """A started proxy in front of the PostgreSQL server of `dsn`, and the DSN that goes through it."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    socket_dir = query.pop("host", None)
    port = parts.port or 5432
    if socket_dir:
        proxy = TcpProxy("", 0, unix_path=f"{socket_dir}/.s.PGSQL.{port}")
    else:
        proxy = TcpProxy(parts.hostname or "127.0.0.1", port)
    proxy.start()
    user = parts.username or "postgres"
    password = f":{parts.password}" if parts.password else ""
    netloc = f"{user}{password}@127.0.0.1:{proxy.port}"
    return proxy, urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))
