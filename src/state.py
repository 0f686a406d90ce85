"""What the app holds for its lifetime: settings, the pool, Redis, the HTTP client.

The lifespan opens it; on serverless platforms, where a lifespan may never run, the first request
opens it instead (`get_state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import httpx
from fastapi import FastAPI, Request
from redis.asyncio import Redis

from src import db_config, redis_config
from src.cache import TTLCache
from src.config import Settings
from src.security.auth_cache import AuthCache
from src.security.client_ip import Network, parse_networks
from src.security.failures import AuthFailureCounter
from src.services import credits, notifications
from src.services.catalog import Catalog
from src.services.provider_health import ProviderHealth
from src.services.providers import ProviderClient, Timeouts, build_profiles
from src.services.rate_limit import RateLimiter

logger = logging.getLogger("gatewayz.state")

# uvicorn has already given in-flight requests SHUTDOWN_GRACE_SECONDS before the lifespan ends;
# what remains (settlement transactions) takes milliseconds, so this bound stays short.
BACKGROUND_DRAIN_SECONDS = 10.0


@dataclass
class AppState:
    settings: Settings
    pool: asyncpg.Pool
    redis: Redis | None
    http: httpx.AsyncClient
    # The upstream providers' pooled client (aiohttp: far cheaper per call than httpx).
    upstream_http: aiohttp.ClientSession
    database_url: str
    auth_cache: AuthCache
    auth_failures: AuthFailureCounter
    trusted_proxies: list[Network]
    providers: dict[str, ProviderClient]
    catalog: Catalog
    limiter: RateLimiter
    health: ProviderHealth
    # IPs throttled for failed authentications, until their window ends (checked before lookups).
    auth_blocked: TTLCache[str, float] = field(default_factory=lambda: TTLCache(ttl=60, max_size=100_000))
    started_at: float = field(default_factory=time.time)
    # Work that outlives its request (stream settlement, for one) and must finish before exit.
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    sweeper: asyncio.Task[None] | None = None
    # E-mail: the backend the outbox worker delivers through, and the worker itself.
    mailer: notifications.Backend = field(default_factory=notifications.LogBackend)
    notifier: asyncio.Task[None] | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


async def open_state(settings: Settings) -> AppState:
    database_url = await db_config.resolve_database_url(settings)
    await db_config.migrate(database_url)
    pool = await db_config.create_pool(settings, database_url)
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=60.0, write=30.0, pool=5.0),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
        follow_redirects=False,
    )
    redis = redis_config.create_redis(settings)
    auth_cache = AuthCache(ttl=settings.auth_cache_ttl_seconds)
    if redis is not None:
        auth_cache.start_listener(redis)
    timeouts = Timeouts(
        connect=settings.upstream_connect_timeout_seconds,
        first_byte=settings.upstream_first_byte_timeout_seconds,
        total=settings.upstream_total_timeout_seconds,
    )
    upstream_http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30),
        auto_decompress=True,
        raise_for_status=False,
    )
    providers = {
        name: ProviderClient(p, upstream_http, timeouts) for name, p in build_profiles(settings).items()
    }
    catalog = Catalog(pool=pool, redis=redis, clients=providers, markup=settings.pricing_markup)
    processes = settings.web_concurrency * settings.rate_limit_instances
    if redis is None and processes > 1:
        logger.warning(
            "no REDIS_URL: each of %d processes enforces 1/%d of every rate limit", processes, processes
        )
    limiter = RateLimiter(
        redis=redis,
        divisor=processes,
        # A concurrency slot outlives the longest request a little, then frees itself.
        lease_seconds=settings.upstream_total_timeout_seconds + 120,
        redis_retry_seconds=settings.rate_limit_redis_retry_seconds,
        ip_failure_limit=settings.auth_failure_limit_per_minute,
    )
    health = ProviderHealth(
        redis=redis,
        failure_threshold=settings.breaker_failure_threshold,
        open_seconds=settings.breaker_open_seconds,
        cooldown_cap_seconds=settings.provider_cooldown_max_seconds,
    )
    if redis is not None:
        health.start_listener(redis)
    state = AppState(
        settings=settings,
        pool=pool,
        redis=redis,
        http=http,
        upstream_http=upstream_http,
        database_url=database_url,
        auth_cache=auth_cache,
        auth_failures=AuthFailureCounter(),
        trusted_proxies=parse_networks(settings.trusted_proxy_list),
        providers=providers,
        catalog=catalog,
        limiter=limiter,
        health=health,
    )
    state.sweeper = asyncio.get_running_loop().create_task(
        credits.sweep_forever(pool, interval=settings.hold_sweep_interval_seconds)
    )
    state.mailer = notifications.backend_for(settings)
    state.notifier = asyncio.get_running_loop().create_task(
        notifications.run_worker(pool, state.mailer, settings)
    )
    return state


async def close_state(state: AppState) -> None:
    for task in (state.sweeper, state.notifier):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    # In-flight settlements get a deadline to finish; money is never left half-done because each
    # settlement is one statement. Tasks may spawn more (a cancelled stream spawns its settlement),
    # so drain until nothing is left or the deadline passes.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BACKGROUND_DRAIN_SECONDS
    while state.background and loop.time() < deadline:
        await asyncio.wait(set(state.background), timeout=deadline - loop.time())
        await asyncio.sleep(0)
    if state.background:
        logger.warning("cancelled %d background tasks at shutdown", len(state.background))
        for task in list(state.background):
            task.cancel()
    await state.auth_cache.stop_listener()
    await state.health.stop_listener()
    await state.http.aclose()
    await state.upstream_http.close()
    if state.redis is not None:
        await state.redis.aclose()
    await state.pool.close()


async def ensure_state(app: FastAPI) -> AppState:
    state: AppState | None = getattr(app.state, "gateway", None)
    if state is not None:
        return state
    async with app.state.open_lock:
        state = getattr(app.state, "gateway", None)
        if state is None:
            state = await open_state(app.state.settings)
            app.state.gateway = state
    return state


async def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "gateway", None)
    if state is not None:
        return state
    return await ensure_state(request.app)
