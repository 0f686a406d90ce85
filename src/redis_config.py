"""The optional Redis client: created when `REDIS_URL` is set, absent otherwise.

Redis only ever holds what may be lost (rate-limit counters, cache entries, invalidation
messages); money lives in PostgreSQL. So a Redis outage is logged and reported by readiness,
never turned into a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from src.config import Settings

logger = logging.getLogger("gatewayz.redis")


def create_redis(settings: Settings) -> Redis | None:
    if settings.redis_url is None:
        return None
    return Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_connect_timeout=1.0,
        socket_timeout=1.0,
        health_check_interval=30,
        decode_responses=False,
        # One quick retry, not the client's default series: a hanging Redis must cost a request
        # about a second before the callers fall back, not many.
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
    )


async def redis_ok(client: Redis | None) -> bool | None:
    """True when Redis answers a PING, False when it does not, None when none is configured."""
    if client is None:
        return None
    try:
        return bool(await client.ping())
    except Exception as exc:  # any failure means "not reachable"; the reason goes to the log
        logger.warning("redis unreachable: %s", type(exc).__name__)
        return False


class Subscriber:
    """A task that applies every message of one Redis channel, reconnecting with backoff.

    `on_subscribed` runs after each (re)subscription: messages may have been missed meanwhile.
    """

    def __init__(
        self,
        channel: str,
        handle: Callable[[bytes], None],
        *,
        on_subscribed: Callable[[], None] | None = None,
    ) -> None:
        self.channel = channel
        self.handle = handle
        self.on_subscribed = on_subscribed
        self._task: asyncio.Task[None] | None = None

    def start(self, client: Redis) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(client))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, client: Redis) -> None:
        backoff = 0.5
        while True:
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    if self.on_subscribed is not None:
                        self.on_subscribed()
                    backoff = 0.5
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.handle(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("subscription to %s lost Redis: %s", self.channel, type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
