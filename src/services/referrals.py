"""Referrals: codes, attachment at sign-up, rewards on the first paid purchase, reversals.

- Every user gets one code, created on their first `GET /referral/code`.
- A code is attached to an account only when `POST /auth` creates it (never on a later login),
  inside the sign-up transaction. It is refused for a self-referral (the same user, Privy id or
  normalised verified e-mail as the code's owner), an unknown code or one of an account that can no
  longer act, and a code that has reached REFERRAL_MAX_USES referrals.
- The referral is decided by the referred user's FIRST paid top-up (`reward_on_purchase`, called by
  the payment code in the transaction that grants it): if it is at least REFERRAL_MIN_PURCHASE
  credits, both sides get their reward (REFERRAL_REWARD_REFERRER / _REFERRED) as 'referral' grants;
  otherwise the referral is refused for good. A purchase paid by a Stripe customer that has paid
  for the referrer is a self-referral and refused too.
- A refund or dispute of that purchase (`reverse_on_refund`) takes both rewards back, once.

Exactly-once: the referral's pending -> rewarded (or refused) step is one conditional update under
the row lock, so of concurrent purchases one resolves it; the grants are keyed
'referral:<id>:referrer' / ':referred' (UNIQUE (source, reference)); the reversal's ledger rows
carry the once_keys 'referral-reversal:<id>:referrer' / ':referred'.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal
from uuid import UUID

import asyncpg

from src.config import Settings
from src.db import referrals as referrals_db
from src.db.referrals import CodeOwner, Referral
from src.errors import ServiceUnavailable
from src.security.deps import RequestMeta
from src.services import audit, grants
from src.services.trials import normalise_email

logger = logging.getLogger("gatewayz.referrals")

# No 0/O or 1/I: codes are read aloud and typed by hand.
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 8
# 32**8 codes make a collision rare; each one is retried with a fresh code.
MAX_CODE_ATTEMPTS = 10
ACTOR = "system:referral"
MONEY_STEP = Decimal("1E-10")

SignupOutcome = Literal["attached", "unknown_code", "self_referral", "max_uses_reached", "existing_account"]
InvalidReason = Literal["not_found", "max_uses_reached"]


@dataclass(frozen=True)
class CodeCheck:
    valid: bool
    reason: InvalidReason | None
    reward: Decimal
    min_purchase: Decimal


@dataclass(frozen=True)
class Stats:
    code: str | None
    referred: int
    pending: int
    rewarded: int
    reversed: int
    refused: int
    rewards_earned: Decimal
    max_uses: int
    remaining_uses: int
    reward_referrer: Decimal
    reward_referred: Decimal
    min_purchase: Decimal


def _money(value: Decimal) -> Decimal:
    """A settings amount in the ledger's precision, so it reads like every other amount."""
    return value.quantize(MONEY_STEP)


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalise_code(code: str) -> str:
    return code.strip().upper()


async def get_or_create_code(
    conn: asyncpg.Connection, *, user_id: UUID, generate: Callable[[], str] = new_code
) -> str:
    """The user's code, created on first use; concurrent first requests all get the same one."""
    existing = await referrals_db.get_code(conn, user_id=user_id)
    if existing is not None:
        return existing
    for _ in range(MAX_CODE_ATTEMPTS):
        candidate = generate()
        async with conn.transaction():
            if await referrals_db.insert_code(conn, user_id=user_id, code=candidate):
                await referrals_db.set_user_code(conn, user_id=user_id, code=candidate)
                return candidate
        # Either a concurrent first request created the user's code (waited for, then visible),
        # or the candidate belongs to someone else: then try another.
        existing = await referrals_db.get_code(conn, user_id=user_id)
        if existing is not None:
            return existing
    logger.error("no free referral code after %d attempts", MAX_CODE_ATTEMPTS)
    raise ServiceUnavailable("Could not create a referral code; try again.", code="referral_code_unavailable")


async def _uses_left(conn: asyncpg.Connection, settings: Settings, *, code: str) -> int:
    return max(settings.referral_max_uses - await referrals_db.count_uses(conn, code=code), 0)


async def validate(conn: asyncpg.Connection, settings: Settings, *, code: str) -> CodeCheck:
    """Whether a code can be used at sign-up; says nothing about who owns it."""
    owner = await referrals_db.get_code_owner(conn, code=normalise_code(code))
    reason: InvalidReason | None = None
    if owner is None or not owner.usable:
        reason = "not_found"
    elif await _uses_left(conn, settings, code=owner.code) == 0:
        reason = "max_uses_reached"
    return CodeCheck(
        valid=reason is None,
        reason=reason,
        reward=_money(settings.referral_reward_referred),
        min_purchase=_money(settings.referral_min_purchase),
    )


def _same_person(owner: CodeOwner, *, user_id: UUID, privy_id: str | None, email: str | None) -> str | None:
    """Which identity the new account shares with the code's owner, if any."""
    if owner.user_id == user_id:
        return "same_user"
    if privy_id and owner.privy_id == privy_id:
        return "same_privy_id"
    if email and owner.email and normalise_email(owner.email) == normalise_email(email):
        return "same_email"
    return None


async def attach_at_signup(
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    user_id: UUID,
    code: str,
    privy_id: str | None,
    email: str | None,
    meta: RequestMeta | None,
) -> SignupOutcome:
    """Attach a code to an account being created; run inside the sign-up transaction.

    `email` is the verified e-mail of the sign-up (from Privy), attached to the account or not.
    A refused code does not fail the sign-up: the outcome says what happened, and it is audited.
    """
    normalised = normalise_code(code)
    # The code row stays locked until the sign-up commits, so concurrent sign-ups count uses right.
    owner = await referrals_db.get_code_owner(conn, code=normalised, for_update=True)
    outcome: SignupOutcome
    detail: str | None = None
    if owner is None or not owner.usable:
        outcome = "unknown_code"
    elif (detail := _same_person(owner, user_id=user_id, privy_id=privy_id, email=email)) is not None:
        outcome = "self_referral"
    elif await _uses_left(conn, settings, code=owner.code) == 0:
        outcome = "max_uses_reached"
    else:
        referral = await referrals_db.insert_referral(
            conn, referrer_id=owner.user_id, referred_id=user_id, code=owner.code
        )
        if referral is None:
            outcome = "existing_account"
        else:
            await referrals_db.set_referred_by(conn, user_id=user_id, referrer_id=owner.user_id)
            await audit.record(
                conn,
                action="referral.attached",
                actor=None,
                meta=meta,
                user_id=user_id,
                subject_type="referral",
                subject_id=str(referral.id),
                after={"referrer_id": str(owner.user_id), "code": owner.code},
                actor_type="system",
            )
            return "attached"
    await audit.record(
        conn,
        action="referral.refused",
        actor=None,
        meta=meta,
        user_id=user_id,
        subject_type="user",
        subject_id=user_id,
        metadata={"stage": "signup", "reason": outcome, "detail": detail, "code": normalised[:32]},
        actor_type="system",
    )
    return outcome


async def _refusal_at_purchase(
    conn: asyncpg.Connection,
    settings: Settings,
    referral: Referral,
    *,
    amount: Decimal,
    stripe_customer_id: str | None,
) -> str | None:
    if amount < settings.referral_min_purchase:
        return "first_purchase_below_minimum"
    if stripe_customer_id and await referrals_db.customer_paid_for(
        conn, user_id=referral.referrer_id, stripe_customer_id=stripe_customer_id
    ):
        return "same_stripe_customer"
    referrer = await referrals_db.get_user_identity(conn, user_id=referral.referrer_id)
    referred = await referrals_db.get_user_identity(conn, user_id=referral.referred_id)
    if referrer is None or not referrer["usable"]:
        return "referrer_inactive"
    # Identities may have been added to the referred account since sign-up.
    if referred is not None:
        if referred["privy_id"] and referred["privy_id"] == referrer["privy_id"]:
            return "same_privy_id"
        if (
            referred["email"]
            and referrer["email"]
            and normalise_email(referred["email"]) == normalise_email(referrer["email"])
        ):
            return "same_email"
    return None


async def reward_on_purchase(
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    user_id: UUID,
    amount: Decimal,
    payment_reference: str,
    stripe_customer_id: str | None,
) -> None:
    """Grant the referral rewards once, if this is the referred user's first qualifying purchase.

    Called by the payment code in the transaction of every top-up grant (amount = the credits
    purchased). Only the first paid purchase decides: a smaller one refuses the referral for good.
    """
    async with conn.transaction():
        if stripe_customer_id:
            await referrals_db.record_customer(conn, user_id=user_id, stripe_customer_id=stripe_customer_id)
        # Lock order: the referred user's row, then the referral, then the referrer's row (an older
        # account, so no cycle is possible between two referral transactions).
        await referrals_db.lock_user(conn, user_id=user_id)
        referral = await referrals_db.lock_pending(conn, referred_id=user_id)
        if referral is None:
            return
        reason = await _refusal_at_purchase(
            conn, settings, referral, amount=amount, stripe_customer_id=stripe_customer_id
        )
        if reason is not None:
            if await referrals_db.mark_refused(
                conn, referral_id=referral.id, reason=reason, purchase_reference=payment_reference
            ):
                await _audit(conn, "referral.refused", referral, {"stage": "purchase", "reason": reason})
                logger.info("referral %s refused at purchase: %s", referral.id, reason)
            return
        rewarded = await referrals_db.mark_rewarded(
            conn,
            referral_id=referral.id,
            purchase_reference=payment_reference,
            referrer_amount=settings.referral_reward_referrer,
            referred_amount=settings.referral_reward_referred,
        )
        if rewarded is None:
            return
        for side, beneficiary, reward in (
            ("referred", rewarded.referred_id, settings.referral_reward_referred),
            ("referrer", rewarded.referrer_id, settings.referral_reward_referrer),
        ):
            if reward > 0:
                await grants.grant(
                    conn,
                    user_id=beneficiary,
                    amount=reward,
                    source="referral",
                    reference=f"referral:{rewarded.id}:{side}",
                    actor=ACTOR,
                    reason=f"referral reward ({side})",
                )
        await _audit(
            conn,
            "referral.rewarded",
            rewarded,
            {
                "purchase_reference": payment_reference,
                "referrer_amount": str(settings.referral_reward_referrer),
                "referred_amount": str(settings.referral_reward_referred),
            },
        )


async def reverse_on_refund(conn: asyncpg.Connection, *, payment_reference: str, actor: str) -> None:
    """Take back the rewards paid for this purchase, once; nothing if it rewarded no referral.

    Called by the payment code in the refund or dispute claw-back transaction of that purchase.
    The rewards are removed whole, even for a partial refund, and may take a balance below zero.
    """
    async with conn.transaction():
        found = await referrals_db.get_by_purchase(conn, purchase_reference=payment_reference)
        if found is None or found.status != "rewarded":
            return
        await referrals_db.lock_user(conn, user_id=found.referred_id)
        referral = await referrals_db.mark_reversed(conn, referral_id=found.id)
        if referral is None:
            return
        for side, beneficiary, reward in (
            ("referred", referral.referred_id, referral.referred_amount),
            ("referrer", referral.referrer_id, referral.referrer_amount),
        ):
            if reward:
                await grants.debit(
                    conn,
                    user_id=beneficiary,
                    amount=reward,
                    type="referral_reversal",
                    once_key=f"referral-reversal:{referral.id}:{side}",
                    actor=actor,
                    reason=f"referral reward reversed ({side}): purchase refunded",
                    reference=payment_reference,
                    from_grant=("referral", f"referral:{referral.id}:{side}"),
                )
        await _audit(
            conn, "referral.reversed", referral, {"purchase_reference": payment_reference, "by": actor}
        )


async def _audit(conn: asyncpg.Connection, action: str, referral: Referral, metadata: dict[str, str]) -> None:
    await audit.record(
        conn,
        action=action,
        actor=None,
        meta=None,
        user_id=referral.referred_id,
        subject_type="referral",
        subject_id=str(referral.id),
        metadata={"referrer_id": str(referral.referrer_id), **metadata},
        actor_type="system",
    )


async def get_stats(conn: asyncpg.Connection, settings: Settings, *, user_id: UUID) -> Stats:
    """The caller's referrals: how many, in which state, and the rewards they earned."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        code = await referrals_db.get_code(conn, user_id=user_id)
        counts = await referrals_db.stats(conn, referrer_id=user_id)
    return Stats(
        code=code,
        referred=counts.referred,
        pending=counts.pending,
        rewarded=counts.rewarded,
        reversed=counts.reversed,
        refused=counts.refused,
        rewards_earned=counts.rewards_earned,
        max_uses=settings.referral_max_uses,
        remaining_uses=max(settings.referral_max_uses - counts.referred, 0),
        reward_referrer=_money(settings.referral_reward_referrer),
        reward_referred=_money(settings.referral_reward_referred),
        min_purchase=_money(settings.referral_min_purchase),
    )
