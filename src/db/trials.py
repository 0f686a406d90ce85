"""SQL for trials (one row per user who had one) and trial_claims (the identities that had one)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

import asyncpg

TRIAL_COLUMNS = (
    "user_id, credits, max_tokens, max_requests, started_at, ends_at, used_tokens, used_requests,"
    " status, ended_at, converted_at, conversion_reference, granted_by"
)


@dataclass(frozen=True)
class Trial:
    user_id: UUID
    credits: Decimal
    max_tokens: int
    max_requests: int
    started_at: datetime
    ends_at: datetime
    used_tokens: int
    used_requests: int
    # As stored: 'active' until settlement finds a limit reached ('used_up'); a trial past its
    # end that nothing has touched since still reads 'active' here (see src/services/trials.py).
    status: str
    ended_at: datetime | None
    converted_at: datetime | None
    conversion_reference: str | None
    granted_by: str


@dataclass(frozen=True)
class TrialCredits:
    granted: Decimal
    remaining: Decimal


def _trial(row: asyncpg.Record | None) -> Trial | None:
    return Trial(**dict(row)) if row is not None else None


async def now(conn: asyncpg.Connection) -> datetime:
    """The database's clock (the transaction's start time inside a transaction)."""
    value: datetime = await conn.fetchval("SELECT now()")
    return value


async def claim_identities(conn: asyncpg.Connection, *, identities: list[str], user_id: UUID) -> int:
    """Record that these identities had a trial; returns how many were new (the rest were taken)."""
    # Sorted, so two sign-ups sharing identities wait on them in the same order (no deadlock).
    result = await conn.execute(
        """INSERT INTO trial_claims (identity, user_id)
            SELECT identity, $2 FROM unnest($1::text[]) AS identity ORDER BY identity
            ON CONFLICT (identity) DO NOTHING""",
        sorted(set(identities)),
        user_id,
    )
    return int(result.split()[-1])


async def insert_trial(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    credits: Decimal,
    max_tokens: int,
    max_requests: int,
    ends_at: datetime,
    granted_by: str,
) -> Trial | None:
    """The user's trial, starting now; None when the user already has (or had) one."""
    return _trial(
        await conn.fetchrow(
            f"""INSERT INTO trials (user_id, credits, max_tokens, max_requests, ends_at, granted_by)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (user_id) DO NOTHING
                RETURNING {TRIAL_COLUMNS}""",
            user_id,
            credits,
            max_tokens,
            max_requests,
            ends_at,
            granted_by,
        )
    )


async def get_trial(conn: asyncpg.Connection, *, user_id: UUID, for_update: bool = False) -> Trial | None:
    lock = " FOR UPDATE" if for_update else ""
    return _trial(
        await conn.fetchrow(f"SELECT {TRIAL_COLUMNS} FROM trials WHERE user_id = $1{lock}", user_id)
    )


async def extend_trial(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    ends_at: datetime,
    add_credits: Decimal,
    add_tokens: int,
    add_requests: int,
) -> Trial | None:
    """Move the end and raise the limits; the trial is active again if it is now within all of them."""
    return _trial(
        await conn.fetchrow(
            f"""UPDATE trials SET
                    ends_at = $2,
                    credits = credits + $3,
                    max_tokens = max_tokens + $4,
                    max_requests = max_requests + $5,
                    status = CASE WHEN $2 > now() AND used_tokens < max_tokens + $4
                                       AND used_requests < max_requests + $5
                                  THEN 'active' ELSE status END,
                    ended_at = CASE WHEN $2 > now() AND used_tokens < max_tokens + $4
                                         AND used_requests < max_requests + $5
                                    THEN NULL ELSE ended_at END
                WHERE user_id = $1
                RETURNING {TRIAL_COLUMNS}""",
            user_id,
            ends_at,
            add_credits,
            add_tokens,
            add_requests,
        )
    )


async def trial_credits(conn: asyncpg.Connection, *, user_id: UUID) -> TrialCredits:
    """Credits the user's trial grants added, and what is left of them that has not expired."""
    row = await conn.fetchrow(
        """SELECT COALESCE(sum(amount), 0)::numeric(20, 10) AS granted,
                COALESCE(sum(remaining) FILTER (WHERE expires_at IS NULL OR expires_at > now()), 0)
                    ::numeric(20, 10) AS remaining
            FROM credit_grants WHERE user_id = $1 AND source = 'trial'""",
        user_id,
    )
    assert row is not None
    return TrialCredits(granted=row["granted"], remaining=row["remaining"])


async def record_conversion(conn: asyncpg.Connection, *, user_id: UUID, reference: str) -> bool:
    """Mark the user's trial converted by this payment; False if there is none or it already was."""
    result = await conn.execute(
        """UPDATE trials SET converted_at = now(), conversion_reference = $2
            WHERE user_id = $1 AND converted_at IS NULL""",
        user_id,
        reference,
    )
    return bool(result.split()[-1] == "1")
