"""SQL for the operator's views of every account: users, the ledger and usage across users.

Each list is one indexed range scan at millions of rows: credit_transactions by (created_at, id),
usage_records by (user_id, created_at); usage reports add up the daily rollup (usage_daily).
"""

from __future__ import annotations

from datetime import date, datetime
from uuid import UUID

import asyncpg

from src.db.users import USER_COLUMNS


async def search_users(
    conn: asyncpg.Connection,
    *,
    email: str | None,
    role: str | None,
    active: bool | None,
    limit: int,
    offset: int,
) -> tuple[list[asyncpg.Record], int]:
    """Users whose verified e-mail starts with `email` (case-insensitive), newest first."""
    pattern = (
        None
        if email is None
        else email.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    )
    rows = await conn.fetch(
        f"""SELECT {USER_COLUMNS}, count(*) OVER () AS total FROM users
            WHERE deleted_at IS NULL
              AND ($1::text IS NULL OR lower(email) LIKE $1)
              AND ($2::text IS NULL OR role = $2)
              AND ($3::boolean IS NULL OR (is_active AND banned_at IS NULL) = $3)
            ORDER BY created_at DESC, id DESC LIMIT $4 OFFSET $5""",
        pattern,
        role,
        active,
        limit,
        offset,
    )
    return rows, int(rows[0]["total"]) if rows else 0


async def set_standing(
    conn: asyncpg.Connection, *, user_id: UUID, is_active: bool | None, banned: bool | None
) -> bool:
    result = await conn.execute(
        """UPDATE users SET is_active = COALESCE($2, is_active),
                banned_at = CASE WHEN $3::boolean IS NULL THEN banned_at
                                 WHEN $3 THEN COALESCE(banned_at, now()) ELSE NULL END,
                updated_at = now()
            WHERE id = $1 AND deleted_at IS NULL""",
        user_id,
        is_active,
        banned,
    )
    return bool(result.endswith(" 1"))


async def credit_transactions(
    conn: asyncpg.Connection,
    *,
    user_id: UUID | None,
    type: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> list[asyncpg.Record]:
    """Newest first; `limit + 1` rows are read so the caller knows whether there is a next page."""
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT id, user_id, amount, balance_after, type, reason, actor, reference, request_id, created_at
            FROM credit_transactions
            WHERE ($1::uuid IS NULL OR user_id = $1) AND ($2::text IS NULL OR type = $2)
              AND ($3::timestamptz IS NULL OR created_at >= $3) AND ($4::timestamptz IS NULL OR created_at < $4)
            ORDER BY created_at DESC, id DESC LIMIT $5 OFFSET $6""",
        user_id,
        type,
        since,
        until,
        limit + 1,
        offset,
    )
    return rows


USAGE_GROUPS = {
    "user": "user_id::text",
    "key": "NULLIF(api_key_id, '00000000-0000-0000-0000-000000000000')::text",
    "model": "model",
    "provider": "provider",
    "day": "to_char(day, 'YYYY-MM-DD')",
}


async def usage_summary(
    conn: asyncpg.Connection,
    *,
    group_by: str,
    since: date,
    until: date,
    user_id: UUID | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Requests, tokens, spend and shortfall per group over the days [since, until] (UTC).

    Read from usage_daily, which the settlement keeps, so a year of traffic is thousands of rows
    to add up, not millions.
    """
    group = USAGE_GROUPS[group_by]  # a fixed expression from the table above, never the caller's text
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {group} AS key, sum(requests)::bigint AS requests, sum(input_tokens)::bigint AS input_tokens,
                   sum(output_tokens)::bigint AS output_tokens, sum(spent) AS spent, sum(shortfall) AS shortfall,
                   sum(errors)::bigint AS errors
            FROM usage_daily
            WHERE day >= $1 AND day <= $2 AND ($3::uuid IS NULL OR user_id = $3)
            GROUP BY 1 ORDER BY {"1" if group_by == "day" else "spent DESC, requests DESC"} LIMIT $4""",
        since,
        until,
        user_id,
        limit,
    )
    return rows


async def recent_usage(conn: asyncpg.Connection, *, user_id: UUID, limit: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """SELECT request_id, model, provider, request_type, input_tokens, output_tokens, charged, status,
                  latency_ms, created_at
            FROM usage_records WHERE user_id = $1 ORDER BY created_at DESC LIMIT $2""",
        user_id,
        limit,
    )
    return rows
