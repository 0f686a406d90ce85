"""SQL for the credit ledger: every change of users.credits is one credit_transactions row.

Additions are grants (src/db/grants.py); both directions go through the grant functions.
"""

from __future__ import annotations

import uuid
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
    """Add credits (as an 'admin' grant that never expires) or remove them, with the ledger row.

    With `require_available`, a removal larger than the available balance (credits - held)
    changes nothing and returns None. `reference` labels the ledger row.
    """
    if amount > 0:
        # $2 is cast: left to inference, a numeric parameter can be taken for an integer.
        row = await conn.fetchrow(
            "SELECT transaction_id FROM gw_grant($1, $2::numeric, 'admin', $3, NULL, $4, $5, $6, $7)",
            user_id,
            amount,
            f"adjustment:{uuid.uuid4()}",
            type,
            reason,
            actor,
            request_id,
        )
    else:
        row = await conn.fetchrow(
            "SELECT transaction_id FROM gw_debit($1, $2::numeric, $3, NULL, $4, $5, $6, $7, NULL, NULL, $8)",
            user_id,
            -amount,
            type,
            actor,
            reason,
            reference,
            request_id,
            require_available,
        )
    if row is None:
        return None
    found = await conn.fetchrow(
        f"""UPDATE credit_transactions SET reference = COALESCE($2, reference) WHERE id = $1
            RETURNING {TRANSACTION_COLUMNS}""",
        row["transaction_id"],
        reference,
    )
    return CreditTransaction(**dict(found))


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
