"""SQL for credit holds and their settlement: each is one statement, so each is atomic.

A hold raises users.held only when the available balance (credits - held - credits past their
expiry) covers it. Settlement removes the hold, writes off expired grants, charges the real cost
(beyond the hold only from what is still available, never below zero) from the grants that expire
soonest, and writes the usage record and the ledger row, all in one database function call.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

import asyncpg


@dataclass(frozen=True)
class Settlement:
    charged: Decimal
    shortfall: Decimal
    balance_after: Decimal


async def place_hold(
    conn: asyncpg.Connection,
    *,
    hold_id: UUID,
    user_id: UUID,
    api_key_id: UUID | None,
    amount: Decimal,
    model: str,
    request_type: str,
    ttl_seconds: float,
) -> bool:
    """Hold `amount` if the available balance covers it; False (and nothing written) otherwise."""
    placed = await conn.fetchval(
        """WITH held AS (
                UPDATE users SET held = held + $4
                WHERE id = $2 AND credits - held - gw_due_expiry($2) >= $4
                RETURNING id
            )
            INSERT INTO credit_holds (id, user_id, api_key_id, amount, model, request_type, expires_at)
            SELECT $1, id, $3, $4, $5, $6, now() + make_interval(secs => $7) FROM held
            RETURNING true""",
        hold_id,
        user_id,
        api_key_id,
        amount,
        model,
        request_type,
        ttl_seconds,
    )
    return bool(placed)


async def available(conn: asyncpg.Connection, *, user_id: UUID) -> Decimal:
    value = await conn.fetchval("SELECT credits - held - gw_due_expiry(id) FROM users WHERE id = $1", user_id)
    return Decimal(value if value is not None else 0)


async def settle(
    conn: asyncpg.Connection,
    *,
    hold_id: UUID,
    cost: Decimal,
    provider: str | None,
    input_tokens: int,
    output_tokens: int,
    input_cost: Decimal,
    output_cost: Decimal,
    estimated: bool,
    status: str,
    error_code: str | None,
    latency_ms: int | None,
    client_request_id: str | None,
    actor: str,
) -> Settlement | None:
    """Release the hold and charge `cost`, once; None when the hold was already settled or swept."""
    # One round trip: gw_settle (migration 20261126001800_settlement.sql) runs every step under the
    # user's row lock.
    row = await conn.fetchrow(
        "SELECT charge, shortfall, balance_after FROM gw_settle($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        hold_id,
        cost,
        provider,
        input_tokens,
        output_tokens,
        input_cost,
        output_cost,
        estimated,
        status,
        error_code,
        latency_ms,
        client_request_id,
        actor,
    )
    if row is None:
        return None
    return Settlement(charged=row["charge"], shortfall=row["shortfall"], balance_after=row["balance_after"])


async def expired_holds(conn: asyncpg.Connection, *, limit: int = 500) -> list[UUID]:
    rows = await conn.fetch(
        "SELECT id FROM credit_holds WHERE expires_at < now() ORDER BY expires_at LIMIT $1", limit
    )
    return [row["id"] for row in rows]


async def open_holds(conn: asyncpg.Connection, *, user_id: UUID) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM credit_holds WHERE user_id = $1", user_id))
