"""Revocation is seen by a second app instance on the same database (and Redis, when set) within the
documented bound: at once with Redis, within AUTH_CACHE_TTL_SECONDS without it.

Two instances are two real uvicorn processes; the in-process `app` only arranges the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from src.config import Settings
from src.security.auth_cache import CHANNEL
from tests.conftest import REPO_ROOT, TEST_ADMIN_KEY, TEST_SECRET_KEY
from tests.factories import create_key, create_user

pytestmark = pytest.mark.slow

STARTUP_SECONDS = 30.0


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
    count: int, *, settings: Settings, tmp_path: Path, ttl: float, redis_url: str | None
) -> AsyncIterator[list[Instance]]:
    assert settings.database_url is not None and settings.encryption_keys is not None
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "SECRET_KEY": TEST_SECRET_KEY,
        "ENCRYPTION_KEYS": settings.encryption_keys.get_secret_value(),
        "ADMIN_API_KEY": TEST_ADMIN_KEY,
        "AUTH_CACHE_TTL_SECONDS": str(ttl),
        "LOG_LEVEL": "WARNING",
        "DATABASE_POOL_MAX_SIZE": "5",
    }
    env.pop("REDIS_URL", None)
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    started: list[Instance] = []
    try:
        for number in range(count):
            port = _free_port()
            log = tmp_path / f"instance-{number}.log"
            env["GATEWAY_DATA_DIR"] = str(tmp_path / f"instance-{number}")
            with log.open("wb") as handle:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "src.main:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
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


async def _status(http: httpx.AsyncClient, instance: Instance, key: str) -> int:
    response = await http.get(instance.url + "/user/balance", headers={"Authorization": f"Bearer {key}"})
    return response.status_code


async def _first_refusal(
    http: httpx.AsyncClient, instance: Instance, key: str, *, within: float
) -> float | None:
    """Seconds until `instance` answers 401 for `key`, or None if it still accepts after `within`."""
    started = time.monotonic()
    while True:
        status = await _status(http, instance, key)
        elapsed = time.monotonic() - started
        if status == 401:
            return elapsed
        assert status == 200, status
        if elapsed > within:
            return None
        await asyncio.sleep(0.05)


async def _arrange(app: FastAPI) -> tuple[dict[str, str], str, str]:
    owner = await create_user(app)
    key_id, key = await create_key(app, owner, name="to revoke")
    return owner.headers, str(key_id), key


async def _subscribers(redis_url: str) -> int:
    client = Redis.from_url(redis_url)
    try:
        counts = await client.pubsub_numsub(CHANNEL)
        return int(counts[0][1]) if counts else 0
    finally:
        await client.aclose()


class TestRevocationAcrossInstances:
    async def test_without_redis_within_the_cache_ttl(
        self, app: FastAPI, settings: Settings, tmp_path: Path
    ) -> None:
        ttl = 2.0
        owner_headers, key_id, key = await _arrange(app)
        async with (
            instances(2, settings=settings, tmp_path=tmp_path, ttl=ttl, redis_url=None) as (a, b),
            httpx.AsyncClient(timeout=5) as http,
        ):
            # Both instances have the key in their caches.
            assert await _status(http, a, key) == 200
            assert await _status(http, b, key) == 200
            revoked = await http.delete(f"{a.url}/user/api-keys/{key_id}", headers=owner_headers)
            assert revoked.status_code == 200, revoked.text
            # The instance that revoked it refuses at once; the other within the TTL.
            assert await _status(http, a, key) == 401
            waited = await _first_refusal(http, b, key, within=ttl + 1.0)
            assert waited is not None, f"instance B still accepted a revoked key after {ttl + 1.0} s"
            # B refuses that key, not everything: the owner's other key still works there.
            assert (await http.get(b.url + "/user/balance", headers=owner_headers)).status_code == 200

    @pytest.mark.redis
    async def test_with_redis_at_once(
        self, app: FastAPI, settings: Settings, tmp_path: Path, redis_url: str
    ) -> None:
        # A TTL far beyond the bound asserted below: only the published invalidation can explain
        # instance B refusing within half a second.
        ttl = 30.0
        owner_headers, key_id, key = await _arrange(app)
        async with (
            instances(2, settings=settings, tmp_path=tmp_path, ttl=ttl, redis_url=redis_url) as (a, b),
            httpx.AsyncClient(timeout=5) as http,
        ):
            deadline = time.monotonic() + 10
            while await _subscribers(redis_url) < 2:
                assert time.monotonic() < deadline, "the instances never subscribed to invalidations"
                await asyncio.sleep(0.05)
            assert await _status(http, a, key) == 200
            assert await _status(http, b, key) == 200
            revoked = await http.delete(f"{a.url}/user/api-keys/{key_id}", headers=owner_headers)
            assert revoked.status_code == 200, revoked.text
            waited = await _first_refusal(http, b, key, within=0.5)
            assert waited is not None, "instance B still accepted a revoked key 0.5 s after revocation"
            assert await _status(http, a, key) == 401
            assert (await http.get(b.url + "/user/balance", headers=owner_headers)).status_code == 200
