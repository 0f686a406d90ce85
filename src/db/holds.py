"""SQL for credit holds and their settlement: each is one statement, so each is atomic.

A hold raises users.held only when the available balance (credits - held) covers it. Settlement
removes the hold, charges the real cost (beyond the hold only from what is still available, never
below zero), and writes the usage record and the ledger row, all in one statement.
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
                WHERE id = $2 AND credits - held >= $4
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
    value = await conn.fetchval("SELECT credits - held FROM users WHERE id = $1", user_id)
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
    row = await conn.fetchrow(
        """WITH hold AS (
                DELETE FROM credit_holds WHERE id = $1
                RETURNING id, user_id, api_key_id, amount, model, request_type
            ),
            owner AS (
                SELECT u.id, u.credits, u.held, hold.amount AS hold_amount,
                       LEAST($2::numeric, GREATEST(u.credits - u.held + hold.amount, 0)) AS charge
                FROM users u JOIN hold ON u.id = hold.user_id
                FOR UPDATE OF u
            ),
            charged AS (
                UPDATE users u SET held = u.held - owner.hold_amount, credits = u.credits - owner.charge,
                    updated_at = CASE WHEN owner.charge > 0 THEN now() ELSE u.updated_at END
                FROM owner WHERE u.id = owner.id
                RETURNING u.id, u.credits AS balance_after, owner.charge
            ),
            usage AS (
                INSERT INTO usage_records (request_id, user_id, api_key_id, model, provider, request_type,
                    input_tokens, output_tokens, input_cost, output_cost, cost, charged, shortfall, held,
                    estimated, status, error_code, latency_ms, client_request_id)
                SELECT hold.id, hold.user_id, hold.api_key_id, hold.model, $3, hold.request_type, $4, $5, $6, $7,
                    $2, charged.charge, $2 - charged.charge, hold.amount, $8, $9, $10, $11, $12
                FROM hold JOIN charged ON charged.id = hold.user_id
                ON CONFLICT (request_id) DO NOTHING
                RETURNING request_id
            ),
            ledger AS (
                INSERT INTO credit_transactions (user_id, amount, balance_after, type, reason, actor, reference)
                SELECT charged.id, -charged.charge, charged.balance_after, 'usage', hold.model, $13, hold.id::text
                FROM charged JOIN hold ON hold.user_id = charged.id
                WHERE charged.charge > 0
                RETURNING id
            )
            SELECT charged.charge, $2 - charged.charge AS shortfall, charged.balance_after FROM charged""",
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
