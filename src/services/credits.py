"""Holds and settlement: the money side of every inference request.

Hold before the upstream call: the worst case (prompt estimate x 1.25 + an allowance per media part
at the prompt price, plus max output tokens x n at the completion price, plus the per-request
price) at the HIGHEST price among the candidates the request may fail over to. Settle after: the
real cost from the provider's usage (or an offline estimate, flagged), in one statement that also
writes the usage record and the ledger row. No pooled connection is held across the upstream call.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from uuid import UUID

import asyncpg

from src.db import history as history_db
from src.db import holds as holds_db
from src.db.history import Exchange
from src.db.holds import Settlement
from src.errors import InsufficientCredits
from src.services import grants, metrics
from src.services.catalog import Candidate, Price

logger = logging.getLogger("gatewayz.credits")

CREDIT_QUANTUM = Decimal("0.0000000001")  # NUMERIC(20, 10)
MAX_CREDITS = Decimal("9999999999.9999999999")  # the largest NUMERIC(20, 10)
# On top of the prompt bound (services.tokens.estimate_prompt): it covers other models' tokenizers,
# which count more tokens than o200k for some text, and the text the bound under-counts.
PROMPT_MARGIN = Decimal("1.25")
SWEEP_INTERVAL_SECONDS = 60.0


def quantize(value: Decimal) -> Decimal:
    return value.quantize(CREDIT_QUANTUM, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Cost:
    input_cost: Decimal
    output_cost: Decimal
    total: Decimal


def cost_of(price: Price, *, input_tokens: int, output_tokens: int, images: int = 0) -> Cost:
    """tokens x per-token price (markup already in the price), exact to NUMERIC(20, 10)."""
    input_cost = quantize(Decimal(input_tokens) * price.prompt)
    output_cost = quantize(Decimal(output_tokens) * price.completion + Decimal(images) * price.image)
    return Cost(
        input_cost=input_cost,
        output_cost=output_cost,
        total=quantize(input_cost + output_cost + price.request),
    )


def capped(cost: Cost, limit: Decimal) -> Cost:
    """`cost` reduced to at most `limit`, taking the reduction from the output side first."""
    if cost.total <= limit:
        return cost
    input_cost = min(cost.input_cost, limit)
    return Cost(input_cost=input_cost, output_cost=limit - input_cost, total=limit)


def worst_case(
    candidates: list[Candidate],
    *,
    prompt_tokens: int,
    media_parts: int,
    media_allowance: int,
    output_tokens: int,
) -> Decimal:
    """The most this request can cost on any candidate it may be sent to."""
    prompt = Decimal(prompt_tokens) * PROMPT_MARGIN + Decimal(media_parts * media_allowance)
    highest = max(
        prompt * c.price.prompt + Decimal(output_tokens) * c.price.completion + c.price.request
        for c in candidates
    )
    return quantize(highest)


@dataclass(frozen=True)
class Hold:
    id: UUID
    user_id: UUID
    amount: Decimal


async def place_hold(
    pool: asyncpg.Pool,
    *,
    user_id: UUID,
    api_key_id: UUID | None,
    amount: Decimal,
    model: str,
    request_type: str,
    ttl_seconds: float,
) -> Hold:
    """Hold `amount` against the user's available balance, or raise 402 naming both numbers."""
    hold_id = uuid.uuid4()
    async with pool.acquire() as conn:
        # No balance can cover more than the column holds (max_tokens x n can ask for that much).
        placed = amount <= MAX_CREDITS and await holds_db.place_hold(
            conn,
            hold_id=hold_id,
            user_id=user_id,
            api_key_id=api_key_id,
            amount=amount,
            model=model,
            request_type=request_type,
            ttl_seconds=ttl_seconds,
        )
        if not placed:
            available = await holds_db.available(conn, user_id=user_id)
            raise InsufficientCredits(
                f"Insufficient credits: this request needs up to {amount.normalize():f} credits and"
                f" {max(available, Decimal(0)).normalize():f} are available."
            )
    return Hold(id=hold_id, user_id=user_id, amount=amount)


@dataclass(frozen=True)
class Usage:
    provider: str | None
    input_tokens: int
    output_tokens: int
    cost: Cost
    estimated: bool
    status: str
    error_code: str | None = None
    latency_ms: int | None = None
    client_request_id: str | None = None


async def settle(
    pool: asyncpg.Pool, hold: Hold, usage: Usage, *, actor: str, history: Exchange | None = None
) -> Settlement | None:
    """Charge the real cost and release the hold in one statement; safe to call once per hold.

    With `history`, the chat turns are appended in the same transaction, under a savepoint: a
    turn that cannot be saved is logged and dropped, never a reason to lose the settlement.
    """
    async with pool.acquire() as conn:
        if history is None:
            result = await _settle(conn, hold, usage, actor=actor)
        else:
            async with conn.transaction():
                result = await _settle(conn, hold, usage, actor=actor)
                if result is not None:
                    await _save_history(conn, hold, history)
    if result is not None:
        metrics.TOKENS.labels("input").inc(usage.input_tokens)
        metrics.TOKENS.labels("output").inc(usage.output_tokens)
        metrics.CREDITS_CHARGED.inc(float(result.charged))
    if result is not None and result.shortfall > 0:
        metrics.SHORTFALLS.inc()
        metrics.SHORTFALL_CREDITS.inc(float(result.shortfall))
        logger.warning(
            "billing shortfall of %s on request %s (cost above the hold)", result.shortfall, hold.id
        )
    return result


async def _settle(conn: asyncpg.Connection, hold: Hold, usage: Usage, *, actor: str) -> Settlement | None:
    return await holds_db.settle(
        conn,
        hold_id=hold.id,
        cost=usage.cost.total,
        provider=usage.provider,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        input_cost=usage.cost.input_cost,
        output_cost=usage.cost.output_cost,
        estimated=usage.estimated,
        status=usage.status,
        error_code=usage.error_code,
        latency_ms=usage.latency_ms,
        client_request_id=usage.client_request_id,
        actor=actor,
    )


async def _save_history(conn: asyncpg.Connection, hold: Hold, history: Exchange) -> None:
    try:
        async with conn.transaction():
            await history_db.append_messages(
                conn,
                user_id=history.user_id,
                session_id=history.session_id,
                messages=history.messages,
                request_id=hold.id,
            )
    except asyncpg.PostgresError as exc:
        logger.error("chat turn of request %s not saved: %s", hold.id, type(exc).__name__)


NO_COST = Cost(input_cost=Decimal(0), output_cost=Decimal(0), total=Decimal(0))


async def release_expired(pool: asyncpg.Pool) -> int:
    """Release holds whose request outlived the maximum request time (its process died)."""
    released = 0
    async with pool.acquire() as conn:
        expired = await holds_db.expired_holds(conn)
    for hold_id in expired:
        usage = Usage(
            provider=None, input_tokens=0, output_tokens=0, cost=NO_COST, estimated=True, status="expired"
        )
        hold = Hold(id=hold_id, user_id=uuid.UUID(int=0), amount=Decimal(0))
        if await settle(pool, hold, usage, actor="system:sweeper") is not None:
            released += 1
    if released:
        logger.warning("released %d expired holds", released)
    return released


async def sweep_forever(pool: asyncpg.Pool, *, interval: float = SWEEP_INTERVAL_SECONDS) -> None:
    """Release holds of requests that died, and write off grants past their expiry, every round."""
    while True:
        try:
            await release_expired(pool)
            await grants.expire_due(pool)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next round tries again; holds wait, they are never lost
            logger.warning("hold and grant sweep failed: %s", type(exc).__name__)
        await asyncio.sleep(interval)
