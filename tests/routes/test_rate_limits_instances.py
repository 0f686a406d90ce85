"""Rate limits across instances, and through a Redis outage.

Two instances are two uvicorn processes on one database and one Redis: a key limited to N requests
per minute gets exactly N of 3N concurrent requests spread over both. When Redis becomes
unreachable, an instance keeps serving under its share of each limit (limit / RATE_LIMIT_INSTANCES),
never the whole limit, without a 500 and without touching credits; once Redis is back (after
RATE_LIMIT_REDIS_RETRY_SECONDS) the shared counters are used again.

Counters are keyed by key and user ids, which are new in every test, so tests sharing one Redis
cannot see each other's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from src.config import Settings
from src.services.rate_limit import PREFIX
from tests.conftest import REPO_ROOT, TEST_ADMIN_KEY, TEST_SECRET_KEY
from tests.factories import app_state, create_key, create_user
from tests.fakes.tcp_proxy import TcpProxy
from tests.fakes.upstream import FakeUpstream

pytestmark = [pytest.mark.slow, pytest.mark.redis]

MODEL = "openai/gpt-4o-mini"
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 20,
}
CHAT = "/v1/chat/completions"
STARTUP_SECONDS = 30.0
RETRY_SECONDS = 0.5


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[TcpProxy]:
    """A cuttable TCP proxy in front of the test Redis."""
    parts = urlsplit(redis_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        yield proxy


def through(redis_url: str, proxy: TcpProxy) -> str:
    """`redis_url`, reached through `proxy` (same credentials and database number)."""
    parts = urlsplit(redis_url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def settings_overrides(
    upstream_server: FakeUpstream, redis_url: str, redis_proxy: TcpProxy
) -> dict[str, Any]:
    """The in-process app: the fake provider, Redis through the proxy, and a share of 1/2 when it is cut."""
    return {
        "custom_provider_base_url": upstream_server.base_url,
        "custom_provider_name": "fake",
        "redis_url": through(redis_url, redis_proxy),
        "rate_limit_instances": 2,
        "rate_limit_redis_retry_seconds": RETRY_SECONDS,
    }


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A direct client (not through the proxy), to read the shared counters."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Instance:
    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    async def wait_healthy(self, http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                pytest.fail(
                    f"instance exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}"
                )
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(self.url + "/health")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
        pytest.fail(f"instance did not become healthy:\n{self.log.read_text()[-4000:]}")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), timeout=10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@contextlib.asynccontextmanager
async def instances(
    count: int, *, settings: Settings, tmp_path: Path, redis_url: str, upstream: FakeUpstream
) -> AsyncIterator[list[Instance]]:
    assert settings.database_url is not None and settings.encryption_keys is not None
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "SECRET_KEY": TEST_SECRET_KEY,
        "ENCRYPTION_KEYS": settings.encryption_keys.get_secret_value(),
        "ADMIN_API_KEY": TEST_ADMIN_KEY,
        "REDIS_URL": redis_url,
        "CUSTOM_PROVIDER_BASE_URL": upstream.base_url,
        "CUSTOM_PROVIDER_NAME": "fake",
        "RATE_LIMIT_INSTANCES": str(count),
        # Other tests' failed authentications from 127.0.0.1 share this Redis: not this test's subject.
        "AUTH_FAILURE_LIMIT_PER_MINUTE": "100000",
        "LOG_LEVEL": "WARNING",
        "DATABASE_POOL_MAX_SIZE": "10",
    }
    started: list[Instance] = []
    try:
        for number in range(count):
            port = _free_port()
            log = tmp_path / f"instance-{number}.log"
            env["GATEWAY_DATA_DIR"] = str(tmp_path / f"instance-{number}")
            with log.open("wb") as handle:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "uvicorn", "src.main:app", "--host", "127.0.0.1", "--port", str(port)),
                    *("--log-level", "warning"),
                    cwd=REPO_ROOT,
                    env=dict(env),
                    stdout=handle,
                    stderr=asyncio.subprocess.STDOUT,
                )
            started.append(Instance(process, port, log))
        async with httpx.AsyncClient(timeout=5) as http:
            await asyncio.gather(*(instance.wait_healthy(http) for instance in started))
        yield started
    finally:
        await asyncio.gather(*(instance.stop() for instance in started))


async def clear_of_a_window_edge(margin: float = 3.0) -> None:
    """Let the last seconds of a minute pass: a burst that straddles two windows lets a sliding
    window admit one more (the previous window's count is weighted down), which is the algorithm
    working, not a race. Waits at most `margin` seconds, and only in that part of a minute."""
    left = 60 - time.time() % 60
    if left < margin:
        await asyncio.sleep(left + 0.05)


async def shared_count(redis: Redis, key_id: UUID, metric: str = "rpm") -> int:
    """The key's counter in Redis, summed over its windows."""
    total = 0
    async for name in redis.scan_iter(match=f"{PREFIX}:k:{key_id}:{metric}:*"):
        total += int(await redis.get(name) or 0)
    return total


async def assert_ledger(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        """SELECT u.id, u.credits, u.held,
                  (SELECT coalesce(sum(amount), 0) FROM credit_transactions t
                   WHERE t.user_id = u.id) AS ledger,
                  (SELECT coalesce(sum(amount), 0) FROM credit_holds h WHERE h.user_id = u.id) AS holds
           FROM users u"""
    )
    for row in rows:
        assert row["credits"] == row["ledger"], dict(row)
        assert row["held"] == row["holds"], dict(row)
        assert row["credits"] >= 0, dict(row)


async def usage_count(db: asyncpg.Connection, user_id: UUID) -> int:
    value: int = await db.fetchval("SELECT count(*) FROM usage_records WHERE user_id = $1", user_id)
    return value


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_exactly_n_of_3n_across_two_instances(
    app: FastAPI,
    settings: Settings,
    tmp_path: Path,
    redis_url: str,
    redis: Redis,
    upstream: FakeUpstream,
    db: asyncpg.Connection,
) -> None:
    n = 6
    user = await create_user(app, credits="5")
    key_id, key = await create_key(app, user, limits={"rpm_limit": n})
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with (
        instances(2, settings=settings, tmp_path=tmp_path, redis_url=redis_url, upstream=upstream) as (a, b),
        httpx.AsyncClient(timeout=20, limits=limits) as http,
    ):
        await clear_of_a_window_edge()
        targets = [a, b] * (3 * n // 2)
        responses = await asyncio.gather(
            *(http.post(target.url + CHAT, json=BODY, headers=bearer(key)) for target in targets)
        )

    assert Counter(r.status_code for r in responses) == {200: n, 429: 2 * n}, [r.text for r in responses]
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["param"] == "rpm"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-ratelimit-limit-requests"] == str(n)
    # One shared count, in Redis, of the admitted requests only.
    assert await shared_count(redis, key_id) == n
    assert len(upstream.chat_requests) == n
    assert await usage_count(db, user.id) == n
    assert await db.fetchval("SELECT held FROM users WHERE id = $1", user.id) == 0
    await assert_ledger(db)


class Clock:
    """Real time, shifted so that the test starts 20 s into a minute (no window edge in the test)."""

    def __init__(self) -> None:
        now = time.time()
        self.offset = 20 - now % 60

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_redis_outage_falls_back_to_a_share_then_recovers(
    app: FastAPI,
    client: httpx.AsyncClient,
    redis_proxy: TcpProxy,
    redis: Redis,
    upstream: FakeUpstream,
    db: asyncpg.Connection,
) -> None:
    limiter = app_state(app).limiter
    limiter.clock = Clock()
    n = 10
    user = await create_user(app, credits="5")
    key_id, key = await create_key(app, user, limits={"rpm_limit": n})

    before = [await client.post(CHAT, json=BODY, headers=bearer(key)) for _ in range(2)]
    assert [r.status_code for r in before] == [200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in before] == ["9", "8"]
    assert await shared_count(redis, key_id) == 2

    redis_proxy.cut()
    during = [await client.post(CHAT, json=BODY, headers=bearer(key)) for _ in range(8)]
    # This instance's share of the limit, counted here: 10 / 2 instances.
    assert [r.status_code for r in during] == [200] * 5 + [429] * 3, [r.text for r in during]
    assert {r.headers["x-ratelimit-limit-requests"] for r in during} == {str(n // 2)}
    assert all(int(r.headers["retry-after"]) >= 1 for r in during[5:])
    assert not limiter.redis_healthy
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "redis": "unavailable"}
    # Nothing reached Redis, and money is PostgreSQL's: every admitted request was charged once.
    assert await shared_count(redis, key_id) == 2
    assert await usage_count(db, user.id) == 7
    assert await db.fetchval("SELECT held FROM users WHERE id = $1", user.id) == 0
    await assert_ledger(db)

    redis_proxy.restore()
    await asyncio.sleep(RETRY_SECONDS + 0.1)
    after = await client.post(CHAT, json=BODY, headers=bearer(key))
    assert after.status_code == 200, after.text
    assert limiter.redis_healthy
    # The shared count again: 2 before the outage, now 3; the full limit applies.
    assert await shared_count(redis, key_id) == 3
    assert after.headers["x-ratelimit-limit-requests"] == str(n)
    assert after.headers["x-ratelimit-remaining-requests"] == str(n - 3)
    assert (await client.get("/health/ready")).json()["checks"]["redis"] == "ok"
    assert await usage_count(db, user.id) == 8
    assert await db.fetchval("SELECT credits FROM users WHERE id = $1", user.id) < Decimal(5)
    await assert_ledger(db)
