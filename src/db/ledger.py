"""SQL for the credit ledger: every change of users.credits is one credit_transactions row."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

import asyncpg

TRANSACTION_COLUMNS = (
    "id, user_id, amount, balance_after, type, reason, actor, reference, request_id, created_at"
)


@dataclass(frozen=True)
class CreditTransaction:
    id: int
    user_id: UUID
    amount: Decimal
    balance_after: Decimal
    type: str
    reason: str | None
    actor: str
    reference: str | None
    request_id: str | None
    created_at: datetime


async def change_credits(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    amount: Decimal,
    type: str,
    actor: str,
    reason: str | None = None,
    reference: str | None = None,
    request_id: str | None = None,
    require_available: bool = True,
) -> CreditTransaction | None:
    """Add (or remove) credits and write the ledger row in one statement.

    With `require_available`, a removal larger than the available balance (credits - held)
    changes nothing and returns None. Must run inside the caller's transaction.
    """
    row = await conn.fetchrow(
        # $2 is cast everywhere: left to inference, `$2 >= 0` makes it an integer and truncates.
        f"""WITH changed AS (
                UPDATE users SET credits = credits + $2::numeric, updated_at = now()
                WHERE id = $1 AND ($2::numeric >= 0 OR NOT $8 OR credits - held + $2::numeric >= 0)
                RETURNING id, credits
            )
            INSERT INTO credit_transactions
                (user_id, amount, balance_after, type, reason, actor, reference, request_id)
            SELECT id, $2::numeric, credits, $3, $4, $5, $6, $7 FROM changed
            RETURNING {TRANSACTION_COLUMNS}""",
        user_id,
        amount,
        type,
        reason,
        actor,
        reference,
        request_id,
        require_available,
    )
    return CreditTransaction(**dict(row)) if row else None


async def list_transactions(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    limit: int,
    offset: int,
    type: str | None = None,
) -> tuple[list[CreditTransaction], int]:
    rows = await conn.fetch(
        f"""SELECT {TRANSACTION_COLUMNS}, count(*) OVER () AS total FROM credit_transactions
            WHERE user_id = $1 AND ($2::text IS NULL OR type = $2)
            ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4""",
        user_id,
        type,
        limit,
        offset,
    )
    total = rows[0]["total"] if rows else 0
    return [CreditTransaction(**{k: v for k, v in dict(r).items() if k != "total"}) for r in rows], total


async def ledger_sum(conn: asyncpg.Connection, *, user_id: UUID) -> Decimal:
    value = await conn.fetchval(
        "SELECT COALESCE(sum(amount), 0) FROM credit_transactions WHERE user_id = $1", user_id
    )
    return Decimal(value)
