"""Coupons: codes that grant credits or take money off a top-up, each use taken exactly once.

Kinds:
    credits    redeemed with POST /coupons/redeem for `value` credits: a 'coupon' grant (never
               expiring) with its ledger row.
    discount   applied to a top-up checkout by the Stripe code (`apply_discount`): `value` percent
               (discount_type 'percent', 0-100) or `value` cents (discount_type 'fixed') off the
               price. It changes what the checkout costs, never the credits it grants.

A use, in one transaction:
    1. `take_use`: one conditional UPDATE adds 1 to coupons.uses only if the coupon is active, in its
       validity window, assigned to nobody or to the caller, of the expected kind and not exhausted.
       Concurrent uses queue on the coupon's row lock and each re-checks the committed count.
    2. the redemption row under the caller's lowest free use number (1..max_uses_per_user): the
       partial unique index (coupon_id, user_id, use_number) decides the per-user limit; a refusal
       rolls the transaction back, which gives the use back.
    3. credits: grants.grant(source='coupon', reference='<coupon>:<user>:<use number>'), unique.
When step 1 changes nothing, the coupon is read once more to say why (unknown, assigned to another
account, inactive, not yet valid, expired, the other kind, used up by the caller, fully used).

Codes are compared normalised: trimmed and upper-cased (' save10 ' is SAVE10). Failed redemptions
are counted per user and per IP (COUPON_FAILURES_PER_MINUTE each); over either, redemption answers
429 with Retry-After, even for a valid code, until the minute is over.

Coupon (src.db.coupons.Coupon): id, code, kind, value, discount_type, max_uses (None: unlimited),
max_uses_per_user, uses (live uses: a released discount is given back), valid_from, valid_until
(None: never expires), is_active, assigned_user_id, description, created_by, created_at, updated_at.
Redemption (src.db.coupons.Redemption): id, coupon_id, code, user_id, use_number, kind,
credits_granted, discount_cents, reference (the checkout of a discount), released_at, created_at.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg

from src.config import Settings
from src.db import coupons as coupons_db
from src.db.coupons import Coupon, Redemption
from src.errors import Conflict, GatewayError, InvalidRequest, NotFound, RateLimited
from src.services import audit, grants
from src.services.rate_limit import RateLimiter

if TYPE_CHECKING:
    from src.security.deps import Principal, RequestMeta

__all__ = [
    "STRIPE_MINIMUM_CHARGE_CENTS",
    "AppliedDiscount",
    "Coupon",
    "Redeemed",
    "Redemption",
    "apply_discount",
    "available",
    "create_coupon",
    "deactivate_coupon",
    "ensure_not_throttled",
    "get_coupon",
    "history",
    "list_coupons",
    "normalise_code",
    "record_failure",
    "redeem",
    "redemptions_of",
    "release_discount",
    "update_coupon",
]

logger = logging.getLogger("gatewayz.coupons")

# Stripe refuses a charge below 50 cents (USD): a discount never takes a price under it.
STRIPE_MINIMUM_CHARGE_CENTS = 50
CODE_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9_-]{0,63}")
# A redemption row is retried this many times when a concurrent one took the same use number.
_RECORD_ATTEMPTS = 3


@dataclass(frozen=True)
class AppliedDiscount:
    """A discount taken for one checkout: what comes off its price, in cents."""

    coupon_id: int
    code: str
    discount_cents: int


@dataclass(frozen=True)
class Redeemed:
    """A credits coupon redeemed: the redemption and the balance right after its grant."""

    redemption: Redemption
    balance_after: Decimal


def normalise_code(code: str) -> str | None:
    """The code as stored (trimmed, upper-case), or None when it cannot be a coupon code."""
    code = code.strip()
    if not code.isascii():
        return None
    code = code.upper()
    return code if CODE_PATTERN.fullmatch(code) else None


# -- refusals --------------------------------------------------------------------------------


def _unknown() -> InvalidRequest:
    return InvalidRequest("Unknown coupon code.", param="code", code="coupon_not_found")


def _already_redeemed(coupon: Coupon) -> Conflict:
    if coupon.max_uses_per_user == 1:
        message = "You have already redeemed this coupon."
    else:
        message = f"You have already used this coupon the maximum of {coupon.max_uses_per_user} times."
    return Conflict(message, param="code", code="coupon_already_redeemed")


async def _refusal(conn: asyncpg.Connection, *, code: str, kind: str, user_id: UUID) -> GatewayError:
    """Why `take_use` changed nothing for this user and code."""
    found = await coupons_db.coupon_state(conn, code=code, user_id=user_id)
    if found is None:
        return _unknown()
    coupon = found.coupon
    if coupon.assigned_user_id is not None and coupon.assigned_user_id != user_id:
        return InvalidRequest(
            "This coupon is assigned to another account.", param="code", code="coupon_assigned_to_other_user"
        )
    if not coupon.is_active:
        return InvalidRequest("This coupon is no longer active.", param="code", code="coupon_inactive")
    if found.not_yet_valid:
        return InvalidRequest(
            f"This coupon is not valid until {coupon.valid_from.isoformat()}.",
            param="code",
            code="coupon_not_yet_valid",
        )
    if found.expired:
        return InvalidRequest("This coupon has expired.", param="code", code="coupon_expired")
    if coupon.kind != kind:
        if coupon.kind == "discount":
            return InvalidRequest(
                "This is a discount coupon: apply it to a top-up checkout instead of redeeming it.",
                param="code",
                code="coupon_requires_checkout",
            )
        return InvalidRequest(
            "This coupon grants credits: redeem it with POST /coupons/redeem; it does not discount"
            " a checkout.",
            param="code",
            code="coupon_not_a_discount",
        )
    if found.live_uses_by_user >= coupon.max_uses_per_user:
        return _already_redeemed(coupon)
    if coupon.max_uses is not None and coupon.uses >= coupon.max_uses:
        return Conflict("This coupon has been fully used.", param="code", code="coupon_exhausted")
    # Everything allows it now: it changed between the two statements (an admin edit).
    return Conflict("This coupon could not be used just now; retry.", param="code", code="coupon_busy")


async def _take_use(conn: asyncpg.Connection, *, code: str | None, kind: str, user_id: UUID) -> Coupon:
    if code is None:
        raise _unknown()
    coupon = await coupons_db.take_use(conn, code=code, kind=kind, user_id=user_id)
    if coupon is None:
        raise await _refusal(conn, code=code, kind=kind, user_id=user_id)
    return coupon


async def _record_use(
    conn: asyncpg.Connection,
    *,
    coupon: Coupon,
    user_id: UUID,
    credits_granted: Decimal | None = None,
    discount_cents: int | None = None,
    reference: str | None = None,
) -> Redemption:
    for _ in range(_RECORD_ATTEMPTS):
        redemption = await coupons_db.insert_redemption(
            conn,
            coupon=coupon,
            user_id=user_id,
            credits_granted=credits_granted,
            discount_cents=discount_cents,
            reference=reference,
        )
        if redemption is not None:
            return redemption
        if reference is not None and await coupons_db.reference_taken(conn, reference=reference):
            raise Conflict(
                "A coupon was already applied to this checkout.",
                param="reference",
                code="coupon_already_applied",
            )
        found = await coupons_db.coupon_state(conn, code=coupon.code, user_id=user_id)
        if found is None or found.live_uses_by_user >= coupon.max_uses_per_user:
            break
    raise _already_redeemed(coupon)


# -- failed codes: per user and per IP --------------------------------------------------------


def _failure_names(user_id: UUID, ip: str | None) -> list[str]:
    names = [f"coupon:u:{user_id}"]
    if ip:
        names.append(f"coupon:ip:{ip}")
    return names


async def ensure_not_throttled(
    limiter: RateLimiter, settings: Settings, *, user_id: UUID, ip: str | None
) -> None:
    """429 (with Retry-After) while this user or this IP has too many failed codes this minute."""
    waits = [
        await limiter.failures_throttled(name, limit=settings.coupon_failures_per_minute)
        for name in _failure_names(user_id, ip)
    ]
    wait = max((w for w in waits if w is not None), default=None)
    if wait is not None:
        raise RateLimited(
            "Too many invalid coupon codes; retry later.",
            code="too_many_coupon_failures",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


async def record_failure(limiter: RateLimiter, settings: Settings, *, user_id: UUID, ip: str | None) -> None:
    """Count a refused code against this user and this IP."""
    for name in _failure_names(user_id, ip):
        await limiter.record_failure(name, limit=settings.coupon_failures_per_minute)


# -- credits coupons ---------------------------------------------------------------------------


async def redeem(
    pool: asyncpg.Pool,
    limiter: RateLimiter,
    settings: Settings,
    *,
    user_id: UUID,
    code: str,
    ip: str | None,
    request_id: str | None = None,
) -> Redeemed:
    """Redeem a credits coupon for the user, exactly once per use; refusals count as failures."""
    await ensure_not_throttled(limiter, settings, user_id=user_id, ip=ip)
    try:
        async with pool.acquire() as conn:
            return await _redeem_credits(
                conn, user_id=user_id, code=normalise_code(code), request_id=request_id
            )
    except (InvalidRequest, Conflict):
        await record_failure(limiter, settings, user_id=user_id, ip=ip)
        raise


async def _redeem_credits(
    conn: asyncpg.Connection, *, user_id: UUID, code: str | None, request_id: str | None
) -> Redeemed:
    async with conn.transaction():
        coupon = await _take_use(conn, code=code, kind="credits", user_id=user_id)
        redemption = await _record_use(conn, coupon=coupon, user_id=user_id, credits_granted=coupon.value)
        granted = await grants.grant(
            conn,
            user_id=user_id,
            amount=coupon.value,
            source="coupon",
            reference=f"{coupon.id}:{user_id}:{redemption.use_number}",
            actor=f"user:{user_id}",
            reason=f"coupon {coupon.code}",
            request_id=request_id,
        )
        if granted is None:
            # This use was granted before: refuse (rolling the use back) rather than count it twice.
            raise _already_redeemed(coupon)
    logger.info("coupon %s redeemed for %s credits", coupon.id, coupon.value)
    return Redeemed(redemption=redemption, balance_after=granted.balance_after)


# -- discount coupons (called by the Stripe checkout code) --------------------------------------


def discount_for(coupon: Coupon, amount_cents: int) -> int:
    """Cents off `amount_cents`: percent rounded half up to a cent, or fixed; capped at the minimum."""
    if coupon.discount_type == "percent":
        off = int((Decimal(amount_cents) * coupon.value / 100).to_integral_value(rounding=ROUND_HALF_UP))
    else:
        off = int(coupon.value)
    return max(0, min(off, amount_cents - STRIPE_MINIMUM_CHARGE_CENTS))


async def apply_discount(
    conn: asyncpg.Connection, *, user_id: UUID, code: str, amount_cents: int, reference: str
) -> AppliedDiscount:
    """Take one use of a discount coupon for the checkout `reference` (the checkout's own id).

    Runs in the caller's transaction (as a savepoint of it, so a refusal undoes only its own
    work); the use is final when the caller commits. The discount is `value` percent of
    `amount_cents` rounded half up to a cent, or `value` cents, and never more than
    `amount_cents - 50`: the price charged stays at or above Stripe's 50-cent minimum. A coupon
    that would take nothing off (the amount is already at the minimum, or the percentage rounds
    to zero) is refused and no use is taken. Raises InvalidRequest (unknown, assigned to another
    account, inactive, not yet valid, expired, a credits coupon, not applicable) or Conflict
    (used up by this user, fully used, a coupon already applied to this `reference`). The
    coupon's row stays locked until the caller's transaction ends: commit before calling Stripe,
    and call `release_discount` if the checkout is then not created. A reference is used once,
    even after a release.
    """
    if isinstance(amount_cents, bool) or not isinstance(amount_cents, int) or amount_cents < 0:
        raise ValueError("amount_cents must be a non-negative integer")
    normalised = normalise_code(code)
    not_applicable = InvalidRequest(
        f"This coupon cannot lower this amount: a checkout is at least {STRIPE_MINIMUM_CHARGE_CENTS} cents.",
        param="code",
        code="coupon_not_applicable",
    )
    async with conn.transaction():
        coupon = await _take_use(conn, code=normalised, kind="discount", user_id=user_id)
        off = discount_for(coupon, amount_cents)
        if off <= 0:
            raise not_applicable
        await _record_use(conn, coupon=coupon, user_id=user_id, discount_cents=off, reference=reference)
    return AppliedDiscount(coupon_id=coupon.id, code=coupon.code, discount_cents=off)


async def release_discount(conn: asyncpg.Connection, *, reference: str) -> None:
    """Give back the use taken for the checkout `reference` (once; a second call does nothing)."""
    coupon_id = await coupons_db.release(conn, reference=reference)
    if coupon_id is not None:
        logger.info("discount of coupon %s released", coupon_id)


# -- what users see ------------------------------------------------------------------------------


async def available(conn: asyncpg.Connection, *, user_id: UUID) -> list[Coupon]:
    """Coupons the user may use now (public or assigned to them, not exhausted, not used up)."""
    return await coupons_db.available_for(conn, user_id=user_id)


async def history(
    conn: asyncpg.Connection, *, user_id: UUID, limit: int, offset: int
) -> tuple[list[Redemption], int]:
    return await coupons_db.user_redemptions(conn, user_id=user_id, limit=limit, offset=offset)


# -- administration ------------------------------------------------------------------------------


def _not_found() -> NotFound:
    return NotFound("No such coupon.", param="coupon_id", code="coupon_not_found")


def _snapshot(coupon: Coupon) -> dict[str, Any]:
    return {
        "code": coupon.code,
        "kind": coupon.kind,
        "value": str(coupon.value),
        "discount_type": coupon.discount_type,
        "max_uses": coupon.max_uses,
        "max_uses_per_user": coupon.max_uses_per_user,
        "valid_from": coupon.valid_from.isoformat(),
        "valid_until": coupon.valid_until.isoformat() if coupon.valid_until else None,
        "is_active": coupon.is_active,
        "assigned_user_id": str(coupon.assigned_user_id) if coupon.assigned_user_id else None,
        "description": coupon.description,
    }


def _check(values: dict[str, Any]) -> None:
    """The rules that tie a coupon's fields together (each field alone is checked by its schema)."""
    kind, value, discount_type = values["kind"], values["value"], values.get("discount_type")
    if kind == "credits" and discount_type is not None:
        raise InvalidRequest(
            "A credits coupon has no discount_type.", param="discount_type", code="invalid_coupon"
        )
    if kind == "discount" and discount_type is None:
        raise InvalidRequest(
            "A discount coupon needs discount_type 'percent' or 'fixed'.",
            param="discount_type",
            code="invalid_coupon",
        )
    if discount_type == "percent" and value > 100:
        raise InvalidRequest("A percentage is at most 100.", param="value", code="invalid_coupon")
    if discount_type == "fixed" and value != value.to_integral_value():
        raise InvalidRequest(
            "A fixed discount is a whole number of cents.", param="value", code="invalid_coupon"
        )
    valid_from, valid_until = values.get("valid_from"), values.get("valid_until")
    if valid_from is not None and valid_until is not None and valid_until <= valid_from:
        raise InvalidRequest(
            "valid_until must be after valid_from.", param="valid_until", code="invalid_coupon"
        )


def _code_taken() -> Conflict:
    return Conflict("Another coupon has this code.", param="code", code="coupon_code_taken")


def _invalid() -> InvalidRequest:
    # The database's own checks, for what changed between the checks above and the write.
    return InvalidRequest("These coupon settings are not consistent.", code="invalid_coupon")


def _no_such_user() -> InvalidRequest:
    return InvalidRequest("No such user.", param="assigned_user_id", code="user_not_found")


async def create_coupon(
    conn: asyncpg.Connection, *, values: dict[str, Any], actor: Principal, meta: RequestMeta | None
) -> Coupon:
    """Create a coupon; audited. 409 when the (normalised) code is taken."""
    if values.get("valid_from") is None:
        values = {name: value for name, value in values.items() if name != "valid_from"}  # from now
        _check({**values, "valid_from": datetime.now(UTC)})
    else:
        _check(values)
    try:
        async with conn.transaction():
            coupon = await coupons_db.insert_coupon(conn, values={**values, "created_by": actor.actor})
            if coupon is None:
                raise _code_taken()
            await audit.record(
                conn,
                action="coupon.create",
                actor=actor,
                meta=meta,
                user_id=coupon.assigned_user_id,
                subject_type="coupon",
                subject_id=str(coupon.id),
                after=_snapshot(coupon),
            )
    except asyncpg.ForeignKeyViolationError:
        raise _no_such_user() from None
    except asyncpg.CheckViolationError:
        raise _invalid() from None
    return coupon


async def get_coupon(conn: asyncpg.Connection, *, coupon_id: int) -> Coupon:
    coupon = await coupons_db.get_coupon(conn, coupon_id=coupon_id)
    if coupon is None:
        raise _not_found()
    return coupon


async def list_coupons(conn: asyncpg.Connection, *, limit: int, offset: int) -> tuple[list[Coupon], int]:
    return await coupons_db.list_coupons(conn, limit=limit, offset=offset)


async def redemptions_of(
    conn: asyncpg.Connection, *, coupon_id: int, limit: int, offset: int
) -> tuple[list[Redemption], int]:
    await get_coupon(conn, coupon_id=coupon_id)
    return await coupons_db.coupon_redemptions(conn, coupon_id=coupon_id, limit=limit, offset=offset)


async def update_coupon(
    conn: asyncpg.Connection,
    *,
    coupon_id: int,
    changes: dict[str, Any],
    actor: Principal,
    meta: RequestMeta | None,
    action: str = "coupon.update",
) -> Coupon:
    """Change a coupon (its kind stays); audited. Uses already taken stay taken."""
    try:
        async with conn.transaction():
            before = await coupons_db.get_coupon(conn, coupon_id=coupon_id, for_update=True)
            if before is None:
                raise _not_found()
            _check({**asdict(before), **changes})
            if not changes:
                return before
            coupon = await coupons_db.update_coupon(conn, coupon_id=coupon_id, changes=changes)
            assert coupon is not None
            if _snapshot(coupon) == _snapshot(before):
                return coupon
            await audit.record(
                conn,
                action=action,
                actor=actor,
                meta=meta,
                user_id=coupon.assigned_user_id,
                subject_type="coupon",
                subject_id=str(coupon.id),
                before=_snapshot(before),
                after=_snapshot(coupon),
            )
    except asyncpg.UniqueViolationError:
        raise _code_taken() from None
    except asyncpg.ForeignKeyViolationError:
        raise _no_such_user() from None
    except asyncpg.CheckViolationError:
        raise _invalid() from None
    return coupon


async def deactivate_coupon(
    conn: asyncpg.Connection, *, coupon_id: int, actor: Principal, meta: RequestMeta | None
) -> Coupon:
    """Stop a coupon from being used (its history stays); audited."""
    return await update_coupon(
        conn,
        coupon_id=coupon_id,
        changes={"is_active": False},
        actor=actor,
        meta=meta,
        action="coupon.deactivate",
    )
