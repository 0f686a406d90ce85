"""SQL for what operators watch: open holds, the e-mail outbox, request figures over a window."""

from __future__ import annotations

from decimal import Decimal

import asyncpg


async def open_holds(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM credit_holds"))


async def outbox_depth(conn: asyncpg.Connection) -> int:
    """Messages waiting for delivery (0 where the notification tables do not exist)."""
    if await conn.fetchval("SELECT to_regclass('notification_outbox')") is None:
        return 0
    return int(
        await conn.fetchval("SELECT count(*) FROM notification_outbox WHERE status IN ('queued', 'sending')")
    )


async def request_window(conn: asyncpg.Connection, *, seconds: int) -> asyncpg.Record:
    """Inference requests settled in the last `seconds`: count, errors, latency percentiles (ms)."""
    row = await conn.fetchrow(
        """SELECT count(*) AS requests,
                  count(*) FILTER (WHERE error_code IS NOT NULL OR status = 'upstream_error') AS errors,
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
                  percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95,
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99
            FROM usage_records WHERE created_at >= now() - make_interval(secs => $1)""",
        seconds,
    )
    assert row is not None
    return row


# Today (UTC) in usage_daily, the rollup the settlement keeps.
_TODAY = "(now() AT TIME ZONE 'UTC')::date"


async def spent_today(conn: asyncpg.Connection) -> Decimal:
    value = await conn.fetchval(f"SELECT COALESCE(sum(spent), 0) FROM usage_daily WHERE day = {_TODAY}")
    return Decimal(value)


async def top_users_today(conn: asyncpg.Connection, *, limit: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT d.user_id, u.email, d.requests, d.spent FROM (
                SELECT user_id, sum(requests)::bigint AS requests, sum(spent) AS spent FROM usage_daily
                WHERE day = {_TODAY} GROUP BY user_id ORDER BY spent DESC, requests DESC LIMIT $1
            ) d JOIN users u ON u.id = d.user_id
            ORDER BY d.spent DESC, d.requests DESC""",
        limit,
    )
    return rows


async def top_models_today(conn: asyncpg.Connection, *, limit: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT model, sum(requests)::bigint AS requests, sum(spent) AS spent FROM usage_daily
            WHERE day = {_TODAY} GROUP BY model ORDER BY requests DESC, spent DESC LIMIT $1""",
        limit,
    )
    return rows
