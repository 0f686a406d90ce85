"""Trials: free credits once per person, limited in time, tokens and requests.

A user who signs up through POST /auth gets one trial (TRIAL_ON_SIGNUP) unless one of their
identities already had one: 'privy:<Privy id>' and, when Privy verified one, 'email:<normalised
e-mail>'. Those identities go into `trial_claims`, which outlives account deletion; the trial is
granted only if every identity is new, and the table's primary key decides between concurrent
sign-ups. Accounts made by POST /admin/users get a trial only when the operator asks for one, and
an operator can grant or extend anyone's trial (audited); operator trials record the account's
identities too but are not refused when they were already claimed.

A trial is a 'trial' credit grant (reference 'trial:<user id>') that expires at the trial's end,
plus the `trials` row with its limits. Settlement counts every request's tokens against the row
and, at a limit, marks it 'used_up' and expires what is left of the trial grants (see the grants
migration). Conversion (the first payment after a trial) is recorded once, by the payment code.

E-mail normalisation for the dedupe, so one mailbox is one identity: lower-case and trimmed; the
local part loses a '+tag' suffix (every major provider delivers 'ada+x@' to 'ada@'); for Gmail
('gmail.com', 'googlemail.com', which is the same service) dots in the local part are dropped too,
since Gmail ignores them, and the domain is read as 'gmail.com'. Other providers keep their dots:
for them 'a.da@' and 'ada@' may be different people.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from src.config import Settings
from src.db import grants as grants_db
from src.db import trials as trials_db
from src.db import users as users_db
from src.db.trials import Trial
from src.errors import Conflict, InvalidRequest, NotFound
from src.security.deps import Principal, RequestMeta
from src.services import audit, grants

logger = logging.getLogger("gatewayz.trials")

GMAIL_DOMAINS = {"gmail.com", "googlemail.com"}
# NUMERIC(20, 10)'s zero, so an empty amount renders like every other one.
ZERO = Decimal("0E-10")


@dataclass(frozen=True)
class TrialStatus:
    has_trial: bool
    status: str | None
    active: bool
    credits_granted: Decimal
    credits_remaining: Decimal
    started_at: datetime | None
    ends_at: datetime | None
    ended_at: datetime | None
    used_tokens: int
    max_tokens: int | None
    used_requests: int
    max_requests: int | None
    converted: bool
    converted_at: datetime | None


def normalise_email(email: str) -> str:
    """One form per mailbox: see the module docstring."""
    local, at, domain = email.strip().lower().rpartition("@")
    if not at or not local or not domain:
        return email.strip().lower()
    local = local.split("+", 1)[0] or local
    if domain in GMAIL_DOMAINS:
        local = local.replace(".", "") or local
        domain = "gmail.com"
    return f"{local}@{domain}"


def identities(*, privy_id: str | None, email: str | None) -> list[str]:
    """The identities a trial is claimed under."""
    found = []
    if privy_id:
        found.append(f"privy:{privy_id}")
    if email:
        found.append(f"email:{normalise_email(email)}")
    return found


async def record_conversion(conn: asyncpg.Connection, *, user_id: UUID, payment_reference: str) -> None:
    """Record a user's first payment after a trial, once; nothing for users who never had a trial.

    Called by the payment code in the transaction that grants the purchase or invoice.
    """
    if await trials_db.record_conversion(conn, user_id=user_id, reference=payment_reference):
        logger.info("trial of %s converted by %s", user_id, payment_reference)


class _AlreadyClaimed(Exception):
    """Rolls back the claims savepoint."""


async def start_signup_trial(
    conn: asyncpg.Connection, settings: Settings, *, user_id: UUID, privy_id: str | None, email: str | None
) -> bool:
    """Start the sign-up trial of a new user, once per person; False when none is granted.

    Runs inside the sign-up transaction: the claims, the trials row and the grant commit with the
    account or not at all.
    """
    if not settings.trial_on_signup or settings.trial_credits <= 0:
        return False
    claimed = identities(privy_id=privy_id, email=email)
    if not claimed:
        return False
    try:
        # A savepoint: if any identity already had a trial, none of this sign-up's claims stay.
        async with conn.transaction():
            inserted = await trials_db.claim_identities(conn, identities=claimed, user_id=user_id)
            if inserted != len(set(claimed)):
                raise _AlreadyClaimed
    except _AlreadyClaimed:
        logger.info("no sign-up trial for %s: an identity already had one", user_id)
        return False
    await _start(
        conn,
        user_id=user_id,
        credits=settings.trial_credits,
        days=settings.trial_days,
        max_tokens=settings.trial_max_tokens,
        max_requests=settings.trial_max_requests,
        actor="system:signup",
        reason="sign-up trial",
    )
    return True


async def _start(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    credits: Decimal,
    days: int,
    max_tokens: int,
    max_requests: int,
    actor: str,
    reason: str,
) -> Trial:
    """The trials row and its grant, expiring at the trial's end; the caller owns the transaction."""
    started = await trials_db.now(conn)
    trial = await trials_db.insert_trial(
        conn,
        user_id=user_id,
        credits=credits,
        max_tokens=max_tokens,
        max_requests=max_requests,
        ends_at=started + timedelta(days=days),
        granted_by=actor,
    )
    if trial is None:
        raise Conflict(
            "This user already has or had a trial; extend it instead.",
            param="user_id",
            code="trial_exists",
        )
    if credits > 0:
        granted = await grants.grant(
            conn,
            user_id=user_id,
            amount=credits,
            source="trial",
            reference=f"trial:{user_id}",
            actor=actor,
            expires_at=trial.ends_at,
            reason=reason,
        )
        if granted is None:
            raise Conflict("This user's trial credits were already granted.", code="trial_exists")
    return trial


async def grant_trial(
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    user_id: UUID,
    credits: Decimal | None,
    days: int | None,
    max_tokens: int | None,
    max_requests: int | None,
    reason: str,
    actor: Principal | None,
    meta: RequestMeta | None,
) -> TrialStatus:
    """An operator-given trial (settings defaults for what is not given), audited.

    Runs in its own transaction, or as part of the caller's (a savepoint) when one is open.
    """
    async with conn.transaction():
        user = await users_db.get_user(conn, user_id=user_id, for_update=True)
        if user is None or user.deleted_at is not None:
            raise NotFound("No such user.", param="user_id", code="user_not_found")
        # Recorded so a later sign-up by the same person gets no second trial.
        await trials_db.claim_identities(
            conn, identities=identities(privy_id=user.privy_id, email=user.email), user_id=user_id
        )
        actor_name = actor.actor if actor else "system"
        trial = await _start(
            conn,
            user_id=user_id,
            credits=settings.trial_credits if credits is None else credits,
            days=settings.trial_days if days is None else days,
            max_tokens=settings.trial_max_tokens if max_tokens is None else max_tokens,
            max_requests=settings.trial_max_requests if max_requests is None else max_requests,
            actor=actor_name,
            reason=reason,
        )
        await audit.record(
            conn,
            action="trial.grant",
            actor=actor,
            meta=meta,
            user_id=user_id,
            subject_type="trial",
            subject_id=user_id,
            after=_audit_view(trial),
            metadata={"reason": reason},
            actor_type="system" if actor is None else None,
        )
        return await _status(conn, trial)


async def extend_trial(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    days: int,
    credits: Decimal,
    max_tokens: int,
    max_requests: int,
    reason: str,
    actor: Principal,
    meta: RequestMeta,
) -> TrialStatus:
    """Push a trial's end by `days` (from now if it is over) and add credits and limits, audited.

    Credits that already expired stay expired (they are on the ledger); new ones are a grant of
    their own that expires at the new end, as do the trial credits still left.
    """
    if days == 0 and credits == 0 and max_tokens == 0 and max_requests == 0:
        raise InvalidRequest(
            "Nothing to extend: send 'days', 'credits', 'max_tokens' or 'max_requests'.",
            code="empty_extension",
        )
    async with conn.transaction():
        # The user's row lock first, as settlement takes it, then the trial's.
        user = await users_db.get_user(conn, user_id=user_id, for_update=True)
        if user is None or user.deleted_at is not None:
            raise NotFound("No such user.", param="user_id", code="user_not_found")
        before = await trials_db.get_trial(conn, user_id=user_id, for_update=True)
        if before is None:
            raise NotFound(
                "This user has no trial; grant one first.", param="user_id", code="trial_not_found"
            )
        await grants_db.expire_user(conn, user_id=user_id)
        now = await trials_db.now(conn)
        ends_at = max(before.ends_at, now) + timedelta(days=days)
        trial = await trials_db.extend_trial(
            conn,
            user_id=user_id,
            ends_at=ends_at,
            add_credits=credits,
            add_tokens=max_tokens,
            add_requests=max_requests,
        )
        assert trial is not None
        if trial.status != "active" or trial.ends_at <= now:
            raise Conflict(
                "The trial would still be over after this extension: give it more days, tokens or requests.",
                code="trial_still_over",
            )
        await grants_db.set_expiry(conn, user_id=user_id, source="trial", reference=None, expires_at=ends_at)
        if credits > 0:
            await grants.grant(
                conn,
                user_id=user_id,
                amount=credits,
                source="trial",
                reference=f"trial:{user_id}:extension:{uuid4()}",
                actor=actor.actor,
                expires_at=ends_at,
                reason=reason,
                request_id=meta.request_id,
            )
        await audit.record(
            conn,
            action="trial.extend",
            actor=actor,
            meta=meta,
            user_id=user_id,
            subject_type="trial",
            subject_id=user_id,
            before=_audit_view(before),
            after=_audit_view(trial),
            metadata={
                "reason": reason,
                "days": days,
                "credits": str(credits),
                "max_tokens": max_tokens,
                "max_requests": max_requests,
            },
        )
        return await _status(conn, trial)


async def get_status(conn: asyncpg.Connection, *, user_id: UUID) -> TrialStatus:
    """The user's trial as they see it, read in one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        trial = await trials_db.get_trial(conn, user_id=user_id)
        if trial is None:
            return TrialStatus(
                has_trial=False,
                status=None,
                active=False,
                credits_granted=ZERO,
                credits_remaining=ZERO,
                started_at=None,
                ends_at=None,
                ended_at=None,
                used_tokens=0,
                max_tokens=None,
                used_requests=0,
                max_requests=None,
                converted=False,
                converted_at=None,
            )
        return await _status(conn, trial)


def effective_status(trial: Trial, now: datetime) -> str:
    """'active', 'ended' (past its end) or 'used_up' (a limit reached before its end)."""
    # The stored status turns 'used_up' only at a limit; the end in time needs no write to apply
    # (the grant's expiry already stops its credits counting), so it is read from ends_at.
    if trial.ends_at <= now and (
        trial.status == "active" or (trial.ended_at is not None and trial.ended_at > trial.ends_at)
    ):
        return "ended"
    return trial.status


async def _status(conn: asyncpg.Connection, trial: Trial) -> TrialStatus:
    now = await trials_db.now(conn)
    status = effective_status(trial, now)
    credits = await trials_db.trial_credits(conn, user_id=trial.user_id)
    return TrialStatus(
        has_trial=True,
        status=status,
        active=status == "active",
        credits_granted=credits.granted,
        credits_remaining=credits.remaining,
        started_at=trial.started_at,
        ends_at=trial.ends_at,
        ended_at=None if status == "active" else trial.ends_at if status == "ended" else trial.ended_at,
        used_tokens=trial.used_tokens,
        max_tokens=trial.max_tokens,
        used_requests=trial.used_requests,
        max_requests=trial.max_requests,
        converted=trial.converted_at is not None,
        converted_at=trial.converted_at,
    )


def _audit_view(trial: Trial) -> dict[str, Any]:
    return {
        "credits": str(trial.credits),
        "ends_at": trial.ends_at.isoformat(),
        "max_tokens": trial.max_tokens,
        "max_requests": trial.max_requests,
        "status": trial.status,
    }
