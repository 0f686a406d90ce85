"""Ping statistics: one row, updated atomically."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True)
class PingStats:
    total_pings: int
    last_ping_at: datetime


async def record_ping(conn: asyncpg.Connection) -> PingStats:
    row = await conn.fetchrow(
        "UPDATE ping_stats SET total_pings = total_pings + 1, last_ping_at = now()"
        " WHERE id = 1 RETURNING total_pings, last_ping_at"
    )
    assert row is not None
    return PingStats(total_pings=row["total_pings"], last_ping_at=row["last_ping_at"])
