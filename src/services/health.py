"""Readiness checks and ping statistics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from src import redis_config
from src.db import ping as ping_db
from src.state import AppState

logger = logging.getLogger("gatewayz.health")

CHECK_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Readiness:
    database: bool
    redis: bool | None

    @property
    def ready(self) -> bool:
        # Redis is optional: without it the gateway degrades to per-process limits but still serves.
        return self.database

    def as_dict(self) -> dict[str, str]:
        redis = "disabled" if self.redis is None else ("ok" if self.redis else "unavailable")
        return {"database": "ok" if self.database else "unavailable", "redis": redis}


async def database_ok(pool: asyncpg.Pool) -> bool:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            async with pool.acquire() as conn:
                return bool(await conn.fetchval("SELECT 1") == 1)
    except Exception as exc:  # any failure means "not reachable"; the reason goes to the log
        logger.warning("database unreachable: %s", type(exc).__name__)
        return False


async def readiness(state: AppState) -> Readiness:
    database, redis = await asyncio.gather(database_ok(state.pool), redis_config.redis_ok(state.redis))
    return Readiness(database=database, redis=redis)


async def ping(conn: asyncpg.Connection) -> ping_db.PingStats:
    return await ping_db.record_ping(conn)


def providers_report(state: AppState) -> list[dict[str, object]]:
    return [{"provider": name, **state.health.report(name)} for name in sorted(state.providers)]
