"""The optional Redis client: created when `REDIS_URL` is set, absent otherwise.

Redis only ever holds what may be lost (rate-limit counters, cache entries, invalidation
messages); money lives in PostgreSQL. So a Redis outage is logged and reported by readiness,
never turned into a 500.
"""

from __future__ import annotations

import logging

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
