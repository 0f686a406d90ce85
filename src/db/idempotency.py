"""SQL for Idempotency-Key records: one row per (caller, key), claimed by the first request."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson


async def claim(conn: asyncpg.Connection, *, scope: str, key: str, fingerprint: str, ttl_hours: int) -> bool:
    """True when this request is the first with the key (a stale record is replaced)."""
    claimed = await conn.fetchval(
        """WITH stale AS (
                DELETE FROM idempotency_keys
                WHERE scope = $1 AND key = $2 AND created_at < now() - make_interval(hours => $4)
            )
            INSERT INTO idempotency_keys (scope, key, fingerprint) VALUES ($1, $2, $3)
            ON CONFLICT (scope, key) DO NOTHING
            RETURNING true""",
        scope,
        key,
        fingerprint,
        ttl_hours,
    )
    return bool(claimed)


async def get(conn: asyncpg.Connection, *, scope: str, key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT fingerprint, status_code, body FROM idempotency_keys WHERE scope = $1 AND key = $2",
        scope,
        key,
    )


async def complete(conn: asyncpg.Connection, *, scope: str, key: str, status_code: int, body: Any) -> None:
    await conn.execute(
        """UPDATE idempotency_keys SET status_code = $3, body = $4::jsonb, completed_at = now()
            WHERE scope = $1 AND key = $2""",
        scope,
        key,
        status_code,
        orjson.dumps(body).decode(),
    )


async def release(conn: asyncpg.Connection, *, scope: str, key: str) -> None:
    await conn.execute(
        "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND completed_at IS NULL", scope, key
    )


async def sweep(conn: asyncpg.Connection, *, ttl_hours: int) -> int:
    result = await conn.execute(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1)", ttl_hours
    )
    return int(result.split()[-1])
