"""SQL for credit grants: every addition of credits, its source, what is left of it and its expiry.

The money moves themselves are database functions (migrations 20261126000700_grants.sql and
20261126001800_settlement.sql), so each is one round trip and runs under the user's row lock:
gw_grant, gw_debit, gw_expire_due, gw_settle.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

import asyncpg

GRANT_COLUMNS = "id, user_id, source, reference, amount, remaining, expires_at, expired_at, created_at"


@dataclass(frozen=True)
class Grant:
    id: int
    user_id: UUID
    source: str
    reference: str
    amount: Decimal
    remaining: Decimal
    expires_at: datetime | None
    expired_at: datetime | None
    created_at: datetime


async def add_grant(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    amount: Decimal,
    source: str,
    reference: str,
    expires_at: datetime | None,
    type: str,
    reason: str | None,
    actor: str,
    request_id: str | None,
) -> asyncpg.Record | None:
    """grant_id, balance_after, transaction_id; None when (source, reference) exists or no such user."""
    return await conn.fetchrow(
        "SELECT grant_id, balance_after, transaction_id"
        " FROM gw_grant($1, $2::numeric, $3, $4, $5, $6, $7, $8, $9)",
        user_id,
        amount,
        source,
        reference,
        expires_at,
        type,
        reason,
        actor,
        request_id,
    )


async def debit(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    amount: Decimal,
    type: str,
    once_key: str | None,
    actor: str,
    reason: str | None,
    reference: str | None,
    request_id: str | None,
    from_source: str | None,
    from_reference: str | None,
    require_available: bool,
) -> asyncpg.Record | None:
    """balance_after, transaction_id; None when once_key was used, the balance is short, or no user."""
    return await conn.fetchrow(
        "SELECT balance_after, transaction_id"
        " FROM gw_debit($1, $2::numeric, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        user_id,
        amount,
        type,
        once_key,
        actor,
        reason,
        reference,
        request_id,
        from_source,
        from_reference,
        require_available,
    )


async def expire_user(conn: asyncpg.Connection, *, user_id: UUID) -> Decimal:
    """Write off the user's due grants now (locks the user's row; run inside a transaction)."""
    await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
    return Decimal(await conn.fetchval("SELECT gw_expire_due($1)", user_id))


async def set_expiry(
    conn: asyncpg.Connection, *, user_id: UUID, source: str, reference: str | None, expires_at: datetime
) -> int:
    """Move the expiry of a user's live grants of `source` (one of them, with `reference`)."""
    result = await conn.execute(
        """UPDATE credit_grants SET expires_at = $4
            WHERE user_id = $1 AND source = $2 AND ($3::text IS NULL OR reference = $3) AND live""",
        user_id,
        source,
        reference,
        expires_at,
    )
    return int(result.split()[-1])


async def users_with_due_grants(conn: asyncpg.Connection, *, limit: int = 500) -> list[UUID]:
    rows = await conn.fetch(
        """SELECT DISTINCT user_id FROM (
                SELECT user_id FROM credit_grants
                WHERE live AND expires_at <= now() ORDER BY expires_at LIMIT $1
            ) due""",
        limit,
    )
    return [row["user_id"] for row in rows]


async def get_grant(conn: asyncpg.Connection, *, source: str, reference: str) -> Grant | None:
    row = await conn.fetchrow(
        f"SELECT {GRANT_COLUMNS} FROM credit_grants WHERE source = $1 AND reference = $2", source, reference
    )
    return Grant(**dict(row)) if row else None


async def live_grants(conn: asyncpg.Connection, *, user_id: UUID) -> list[Grant]:
    """Grants with credits left that have not reached their expiry, soonest-expiring first."""
    rows = await conn.fetch(
        f"""SELECT {GRANT_COLUMNS} FROM credit_grants
            WHERE user_id = $1 AND live AND (expires_at IS NULL OR expires_at > now())
            ORDER BY expires_at ASC NULLS LAST, id""",
        user_id,
    )
    return [Grant(**dict(row)) for row in rows]
