"""SQL for referral codes, referrals and the Stripe customers seen paying for each user."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

import asyncpg

REFERRAL_COLUMNS = (
    "id, referrer_id, referred_id, code, status, refusal_reason, created_at, rewarded_at, reversed_at,"
    " refused_at, purchase_reference, referrer_amount, referred_amount"
)


@dataclass(frozen=True)
class Referral:
    id: int
    referrer_id: UUID
    referred_id: UUID
    code: str
    status: str
    refusal_reason: str | None
    created_at: datetime
    rewarded_at: datetime | None
    reversed_at: datetime | None
    refused_at: datetime | None
    purchase_reference: str | None
    referrer_amount: Decimal | None
    referred_amount: Decimal | None


@dataclass(frozen=True)
class CodeOwner:
    user_id: UUID
    code: str
    privy_id: str | None
    # The owner's verified e-mail, as stored (lower-cased).
    email: str | None
    # Active, not banned, not deleted: only such an account's code can be used.
    usable: bool


@dataclass(frozen=True)
class ReferralStats:
    referred: int
    pending: int
    rewarded: int
    reversed: int
    refused: int
    rewards_earned: Decimal


def _referral(row: asyncpg.Record | None) -> Referral | None:
    return Referral(**dict(row)) if row is not None else None


async def get_code(conn: asyncpg.Connection, *, user_id: UUID) -> str | None:
    code: str | None = await conn.fetchval("SELECT code FROM referral_codes WHERE user_id = $1", user_id)
    return code


async def insert_code(conn: asyncpg.Connection, *, user_id: UUID, code: str) -> bool:
    """False, and nothing written, when the user has a code already or the code is taken."""
    inserted = await conn.fetchval(
        "INSERT INTO referral_codes (user_id, code) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
        user_id,
        code,
    )
    return bool(inserted)


async def set_user_code(conn: asyncpg.Connection, *, user_id: UUID, code: str) -> None:
    """Show the code on the user's profile (users.referral_code mirrors referral_codes)."""
    await conn.execute("UPDATE users SET referral_code = $2, updated_at = now() WHERE id = $1", user_id, code)


async def get_code_owner(
    conn: asyncpg.Connection, *, code: str, for_update: bool = False
) -> CodeOwner | None:
    """The code's owner; with for_update, the code row is locked so its uses are counted safely."""
    lock = " FOR UPDATE OF c" if for_update else ""
    row = await conn.fetchrow(
        f"""SELECT c.user_id, c.code, u.privy_id, u.email,
                   (u.is_active AND u.banned_at IS NULL AND u.deleted_at IS NULL) AS usable
            FROM referral_codes c JOIN users u ON u.id = c.user_id
            WHERE c.code = $1{lock}""",
        code,
    )
    return CodeOwner(**dict(row)) if row is not None else None


async def count_uses(conn: asyncpg.Connection, *, code: str) -> int:
    """Users referred through this code (every referral attached to it, whatever became of it)."""
    count: int = await conn.fetchval("SELECT count(*) FROM referrals WHERE code = $1", code)
    return count


async def insert_referral(
    conn: asyncpg.Connection, *, referrer_id: UUID, referred_id: UUID, code: str
) -> Referral | None:
    """None when the referred user already has a referral."""
    row = await conn.fetchrow(
        f"""INSERT INTO referrals (referrer_id, referred_id, code) VALUES ($1, $2, $3)
            ON CONFLICT (referred_id) DO NOTHING RETURNING {REFERRAL_COLUMNS}""",
        referrer_id,
        referred_id,
        code,
    )
    return _referral(row)


async def set_referred_by(conn: asyncpg.Connection, *, user_id: UUID, referrer_id: UUID) -> None:
    await conn.execute(
        "UPDATE users SET referred_by = $2, updated_at = now() WHERE id = $1", user_id, referrer_id
    )


async def lock_user(conn: asyncpg.Connection, *, user_id: UUID) -> None:
    """The user's balance row lock, taken first so referral work orders its locks like money moves."""
    await conn.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)


async def lock_pending(conn: asyncpg.Connection, *, referred_id: UUID) -> Referral | None:
    """The referred user's referral if still pending, locked; a racing caller waits, then sees none."""
    row = await conn.fetchrow(
        f"""SELECT {REFERRAL_COLUMNS} FROM referrals
            WHERE referred_id = $1 AND status = 'pending' FOR UPDATE""",
        referred_id,
    )
    return _referral(row)


async def mark_rewarded(
    conn: asyncpg.Connection,
    *,
    referral_id: int,
    purchase_reference: str,
    referrer_amount: Decimal,
    referred_amount: Decimal,
) -> Referral | None:
    """pending -> rewarded; None when the referral is no longer pending (another purchase won)."""
    row = await conn.fetchrow(
        f"""UPDATE referrals SET status = 'rewarded', rewarded_at = now(), purchase_reference = $2,
                referrer_amount = $3, referred_amount = $4
            WHERE id = $1 AND status = 'pending' RETURNING {REFERRAL_COLUMNS}""",
        referral_id,
        purchase_reference,
        referrer_amount,
        referred_amount,
    )
    return _referral(row)


async def mark_refused(
    conn: asyncpg.Connection, *, referral_id: int, reason: str, purchase_reference: str
) -> Referral | None:
    """pending -> refused; None when the referral is no longer pending."""
    row = await conn.fetchrow(
        f"""UPDATE referrals SET status = 'refused', refused_at = now(), refusal_reason = $2,
                purchase_reference = $3
            WHERE id = $1 AND status = 'pending' RETURNING {REFERRAL_COLUMNS}""",
        referral_id,
        reason,
        purchase_reference,
    )
    return _referral(row)


async def get_by_purchase(conn: asyncpg.Connection, *, purchase_reference: str) -> Referral | None:
    row = await conn.fetchrow(
        f"SELECT {REFERRAL_COLUMNS} FROM referrals WHERE purchase_reference = $1", purchase_reference
    )
    return _referral(row)


async def mark_reversed(conn: asyncpg.Connection, *, referral_id: int) -> Referral | None:
    """rewarded -> reversed; None when it is not (or no longer) rewarded."""
    row = await conn.fetchrow(
        f"""UPDATE referrals SET status = 'reversed', reversed_at = now()
            WHERE id = $1 AND status = 'rewarded' RETURNING {REFERRAL_COLUMNS}""",
        referral_id,
    )
    return _referral(row)


async def record_customer(conn: asyncpg.Connection, *, user_id: UUID, stripe_customer_id: str) -> None:
    await conn.execute(
        "INSERT INTO referral_customers (stripe_customer_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        stripe_customer_id,
        user_id,
    )


async def customer_paid_for(conn: asyncpg.Connection, *, user_id: UUID, stripe_customer_id: str) -> bool:
    """Whether this Stripe customer has paid for the user's top-ups or subscriptions."""
    found = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM referral_customers WHERE stripe_customer_id = $1 AND user_id = $2)
               OR EXISTS (SELECT 1 FROM user_plans WHERE stripe_customer_id = $1 AND user_id = $2)""",
        stripe_customer_id,
        user_id,
    )
    return bool(found)


async def get_user_identity(conn: asyncpg.Connection, *, user_id: UUID) -> asyncpg.Record | None:
    """privy_id, email (verified) and whether the account can still act."""
    return await conn.fetchrow(
        """SELECT privy_id, email, (is_active AND banned_at IS NULL AND deleted_at IS NULL) AS usable
            FROM users WHERE id = $1""",
        user_id,
    )


async def stats(conn: asyncpg.Connection, *, referrer_id: UUID) -> ReferralStats:
    row = await conn.fetchrow(
        """SELECT count(*) AS referred,
                  count(*) FILTER (WHERE status = 'pending') AS pending,
                  count(*) FILTER (WHERE status = 'rewarded') AS rewarded,
                  count(*) FILTER (WHERE status = 'reversed') AS reversed,
                  count(*) FILTER (WHERE status = 'refused') AS refused,
                  COALESCE(sum(referrer_amount) FILTER (WHERE status = 'rewarded'), 0)::numeric(20, 10)
                      AS rewards_earned
            FROM referrals WHERE referrer_id = $1""",
        referrer_id,
    )
    assert row is not None
    return ReferralStats(**dict(row))
