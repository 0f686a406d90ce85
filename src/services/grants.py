"""Credit grants: how credits get in, how they expire, and which ones usage spends first.

Every addition of credits is a grant with a source and a reference; UNIQUE (source, reference)
makes each one exactly-once (a checkout session, an invoice, a redemption, a referral reward can
be granted only once, whatever retries or races happen). Removals that must never repeat (refund
and dispute claw-backs, reward reversals) carry a `once_key`, unique in the ledger.

Usage consumes the grant that expires soonest first (never-expiring purchases last). An expiry is
a ledger row of type 'expiry' written with the lowered balance in one transaction, by the sweeper
or by the user's next balance change, whichever comes first; until then every balance read leaves
the expired credits out (see src/db/users.py), so nobody sees or spends them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal
from uuid import UUID

import asyncpg

from src.db import grants as grants_db
from src.db.grants import Grant

logger = logging.getLogger("gatewayz.grants")

GrantSource = Literal["purchase", "subscription", "trial", "coupon", "referral", "admin", "refund_reversal"]

__all__ = ["Debited", "Grant", "GrantSource", "Granted", "debit", "expire_now", "get_grant", "grant"]


@dataclass(frozen=True)
class Granted:
    grant_id: int
    amount: Decimal
    balance_after: Decimal
    transaction_id: int


@dataclass(frozen=True)
class Debited:
    amount: Decimal
    balance_after: Decimal
    transaction_id: int


async def grant(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    amount: Decimal,
    source: GrantSource,
    reference: str,
    actor: str,
    expires_at: datetime | None = None,
    reason: str | None = None,
    request_id: str | None = None,
    transaction_type: str | None = None,
) -> Granted | None:
    """Add `amount` credits as a grant with its ledger row, atomically; None if (source, reference) exists.

    The ledger row's type is the source unless `transaction_type` says otherwise. A negative
    balance (after a claw-back) is repaid from the grant before anything becomes spendable.
    """
    if not amount.is_finite() or amount <= 0:
        raise ValueError("a grant must be a positive amount")
    row = await grants_db.add_grant(
        conn,
        user_id=user_id,
        amount=amount,
        source=source,
        reference=reference,
        expires_at=expires_at,
        type=transaction_type or source,
        reason=reason,
        actor=actor,
        request_id=request_id,
    )
    if row is None:
        return None
    return Granted(
        grant_id=row["grant_id"],
        amount=amount,
        balance_after=row["balance_after"],
        transaction_id=row["transaction_id"],
    )


async def debit(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    amount: Decimal,
    type: str,
    once_key: str | None,
    actor: str,
    reason: str | None = None,
    reference: str | None = None,
    request_id: str | None = None,
    from_grant: tuple[str, str] | None = None,
    require_available: bool = False,
) -> Debited | None:
    """Remove `amount` credits: from the grant `from_grant` first, then soonest-expiring first.

    Without `require_available` the balance may go below zero (a claw-back of credits already
    spent); then paid requests get 402 until it is positive again. None, and nothing written,
    when `once_key` was already used, or when `require_available` and the available balance is
    short.
    """
    if not amount.is_finite() or amount <= 0:
        raise ValueError("a debit must be a positive amount")
    row = await grants_db.debit(
        conn,
        user_id=user_id,
        amount=amount,
        type=type,
        once_key=once_key,
        actor=actor,
        reason=reason,
        reference=reference,
        request_id=request_id,
        from_source=from_grant[0] if from_grant else None,
        from_reference=from_grant[1] if from_grant else None,
        require_available=require_available,
    )
    if row is None:
        return None
    return Debited(amount=amount, balance_after=row["balance_after"], transaction_id=row["transaction_id"])


async def expire_now(
    conn: asyncpg.Connection, *, user_id: UUID, source: str, reference: str | None = None, actor: str
) -> Decimal:
    """End a user's grant (or all their grants of `source`) now; returns the credits written off."""
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
        await grants_db.set_expiry(
            conn, user_id=user_id, source=source, reference=reference, expires_at=await _now(conn)
        )
        expired = await grants_db.expire_user(conn, user_id=user_id)
    if expired:
        logger.info("%s credits of %s expired by %s", expired, source, actor)
    return expired


async def _now(conn: asyncpg.Connection) -> datetime:
    value: datetime = await conn.fetchval("SELECT now()")
    return value


async def get_grant(conn: asyncpg.Connection, *, source: str, reference: str) -> Grant | None:
    return await grants_db.get_grant(conn, source=source, reference=reference)


async def live_grants(conn: asyncpg.Connection, *, user_id: UUID) -> list[Grant]:
    return await grants_db.live_grants(conn, user_id=user_id)


async def expire_due(pool: asyncpg.Pool) -> int:
    """Write off every grant past its expiry; returns the number of users touched."""
    async with pool.acquire() as conn:
        users = await grants_db.users_with_due_grants(conn)
        for user_id in users:
            async with conn.transaction():
                await grants_db.expire_user(conn, user_id=user_id)
    if users:
        logger.info("expired grants of %d users", len(users))
    return len(users)
