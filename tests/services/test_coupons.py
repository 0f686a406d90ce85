"""Discount coupons as the Stripe checkout code uses them: apply_discount takes one use inside the
caller's transaction, never below Stripe's minimum charge, and release_discount gives it back once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from fastapi import FastAPI

from src.db import coupons as coupons_db
from src.errors import Conflict, GatewayError, InvalidRequest
from src.services import coupons
from src.services.coupons import STRIPE_MINIMUM_CHARGE_CENTS, AppliedDiscount
from tests.factories import app_state, create_user
from tests.money import assert_money_invariants


@pytest.fixture(autouse=True)
async def _money_invariants(db: asyncpg.Connection) -> AsyncIterator[None]:
    yield
    await assert_money_invariants(db)
    drift = await db.fetch(
        """SELECT c.id FROM coupons c
            WHERE c.uses <> (SELECT count(*) FROM coupon_redemptions r
                              WHERE r.coupon_id = c.id AND r.released_at IS NULL)"""
    )
    assert drift == []


async def make_coupon(app: FastAPI, code: str, **values: Any) -> coupons_db.Coupon:
    fields: dict[str, Any] = {
        "code": code,
        "kind": "discount",
        "discount_type": "percent",
        "value": Decimal("10"),
    }
    fields.update(values)
    async with app_state(app).pool.acquire() as conn:
        coupon = await coupons_db.insert_coupon(conn, values={**fields, "created_by": "test"})
    assert coupon is not None
    return coupon


async def apply(app: FastAPI, user_id: UUID, code: str, amount_cents: int, reference: str) -> AppliedDiscount:
    async with app_state(app).pool.acquire() as conn, conn.transaction():
        return await coupons.apply_discount(
            conn, user_id=user_id, code=code, amount_cents=amount_cents, reference=reference
        )


async def release(app: FastAPI, reference: str) -> None:
    async with app_state(app).pool.acquire() as conn:
        await coupons.release_discount(conn, reference=reference)


async def uses(db: asyncpg.Connection, code: str) -> int:
    value: int = await db.fetchval("SELECT uses FROM coupons WHERE code = $1", code)
    return value


def refusal(exc: pytest.ExceptionInfo[GatewayError]) -> str | None:
    return exc.value.code


class TestApplyDiscount:
    async def test_percent_discount_takes_one_use(self, app: FastAPI, db: asyncpg.Connection) -> None:
        await make_coupon(app, "TENPCT", value=Decimal("10"))
        user = await create_user(app)

        applied = await apply(app, user.id, " tenpct ", 1999, "chk_1")

        # 10% of $19.99 is 199.9 cents: rounded half up to 200.
        assert applied == AppliedDiscount(coupon_id=applied.coupon_id, code="TENPCT", discount_cents=200)
        assert await uses(db, "TENPCT") == 1
        row = await db.fetchrow(
            "SELECT user_id, kind, discount_cents, credits_granted, reference, use_number"
            " FROM coupon_redemptions"
        )
        assert dict(row) == {
            "user_id": user.id,
            "kind": "discount",
            "discount_cents": 200,
            "credits_granted": None,
            "reference": "chk_1",
            "use_number": 1,
        }
        # A discount changes a price, never the balance.
        assert await db.fetchval("SELECT credits FROM users WHERE id = $1", user.id) == 0

    async def test_fixed_discount_never_goes_below_the_minimum_charge(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        await make_coupon(app, "FIVEOFF", discount_type="fixed", value=Decimal("500"), max_uses_per_user=5)
        await make_coupon(app, "ALLFREE", value=Decimal("100"))
        user = await create_user(app)

        assert (await apply(app, user.id, "FIVEOFF", 2000, "chk_a")).discount_cents == 500
        assert (
            await apply(app, user.id, "FIVEOFF", 520, "chk_b")
        ).discount_cents == 520 - STRIPE_MINIMUM_CHARGE_CENTS
        assert (await apply(app, user.id, "ALLFREE", 1000, "chk_c")).discount_cents == 950

        with pytest.raises(InvalidRequest) as exc:
            await apply(app, user.id, "FIVEOFF", STRIPE_MINIMUM_CHARGE_CENTS, "chk_d")
        assert refusal(exc) == "coupon_not_applicable"
        assert await uses(db, "FIVEOFF") == 2  # the refused one took nothing

    async def test_a_percentage_that_rounds_to_nothing_is_refused(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        await make_coupon(app, "TINY", value=Decimal("0.1"))
        user = await create_user(app)
        with pytest.raises(InvalidRequest) as exc:
            await apply(app, user.id, "TINY", 100, "chk_tiny")
        assert refusal(exc) == "coupon_not_applicable"
        assert await uses(db, "TINY") == 0

    async def test_refusals(self, app: FastAPI, db: asyncpg.Connection) -> None:
        owner, user = await create_user(app), await create_user(app)
        await make_coupon(app, "CREDITS", kind="credits", discount_type=None, value=Decimal("5"))
        await make_coupon(app, "OFF", is_active=False)
        await make_coupon(app, "THEIRS", assigned_user_id=owner.id)
        expected = {
            "CREDITS": "coupon_not_a_discount",
            "OFF": "coupon_inactive",
            "THEIRS": "coupon_assigned_to_other_user",
            "MISSING": "coupon_not_found",
            "": "coupon_not_found",
        }
        for code, name in expected.items():
            with pytest.raises(InvalidRequest) as exc:
                await apply(app, user.id, code, 1000, f"chk_{code}")
            assert refusal(exc) == name, code
        assert await db.fetchval("SELECT count(*) FROM coupon_redemptions") == 0
        assert await db.fetchval("SELECT sum(uses) FROM coupons") == 0

    async def test_per_user_and_total_limits(self, app: FastAPI, db: asyncpg.Connection) -> None:
        await make_coupon(app, "LIMITED", max_uses=2)
        first, second, third = [await create_user(app) for _ in range(3)]

        await apply(app, first.id, "LIMITED", 1000, "chk_1")
        with pytest.raises(Conflict) as exc:
            await apply(app, first.id, "LIMITED", 1000, "chk_2")
        assert refusal(exc) == "coupon_already_redeemed"
        await apply(app, second.id, "LIMITED", 1000, "chk_3")
        with pytest.raises(Conflict) as exc:
            await apply(app, third.id, "LIMITED", 1000, "chk_4")
        assert refusal(exc) == "coupon_exhausted"
        assert await uses(db, "LIMITED") == 2

    async def test_one_discount_per_checkout(self, app: FastAPI, db: asyncpg.Connection) -> None:
        await make_coupon(app, "FIRST")
        await make_coupon(app, "SECOND")
        user = await create_user(app)
        await apply(app, user.id, "FIRST", 1000, "chk_same")
        with pytest.raises(Conflict) as exc:
            await apply(app, user.id, "SECOND", 1000, "chk_same")
        assert refusal(exc) == "coupon_already_applied"
        assert (await uses(db, "FIRST"), await uses(db, "SECOND")) == (1, 0)

    async def test_a_refusal_leaves_the_callers_transaction_usable(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        await make_coupon(app, "ONE", max_uses=1)
        user, other = await create_user(app), await create_user(app)
        await apply(app, other.id, "ONE", 1000, "chk_other")
        async with app_state(app).pool.acquire() as conn, conn.transaction():
            with pytest.raises(Conflict):
                await coupons.apply_discount(
                    conn, user_id=user.id, code="ONE", amount_cents=1000, reference="chk_x"
                )
            # The checkout goes on without the discount in the same transaction.
            assert await conn.fetchval("SELECT 1") == 1
        assert await uses(db, "ONE") == 1

    async def test_the_use_is_undone_with_the_callers_transaction(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        await make_coupon(app, "ROLLBACK", max_uses=1)
        user = await create_user(app)

        class CheckoutFailed(Exception):
            pass

        with pytest.raises(CheckoutFailed):
            async with app_state(app).pool.acquire() as conn, conn.transaction():
                await coupons.apply_discount(
                    conn, user_id=user.id, code="ROLLBACK", amount_cents=1000, reference="chk_rb"
                )
                raise CheckoutFailed
        assert await uses(db, "ROLLBACK") == 0
        assert (await apply(app, user.id, "ROLLBACK", 1000, "chk_rb")).discount_cents == 100

    async def test_twenty_checkouts_at_once_take_a_single_use_coupon_once(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        await make_coupon(app, "RACE", max_uses=1)
        users = [await create_user(app) for _ in range(20)]

        results = await asyncio.gather(
            *(apply(app, user.id, "RACE", 1000, f"chk_{i}") for i, user in enumerate(users)),
            return_exceptions=True,
        )

        applied = [r for r in results if isinstance(r, AppliedDiscount)]
        refused = [r for r in results if isinstance(r, Conflict)]
        assert (len(applied), len(refused)) == (1, 19)
        assert {r.code for r in refused} == {"coupon_exhausted"}
        assert await uses(db, "RACE") == 1
        assert await db.fetchval("SELECT count(*) FROM coupon_redemptions") == 1


class TestReleaseDiscount:
    async def test_release_gives_the_use_back_once(self, app: FastAPI, db: asyncpg.Connection) -> None:
        await make_coupon(app, "BACK", max_uses=2)
        user, other = await create_user(app), await create_user(app)
        await apply(app, user.id, "BACK", 1000, "chk_1")
        await apply(app, other.id, "BACK", 1000, "chk_2")
        assert await uses(db, "BACK") == 2

        await release(app, "chk_1")
        await release(app, "chk_1")
        await asyncio.gather(*(release(app, "chk_1") for _ in range(10)))

        assert await uses(db, "BACK") == 1
        released = await db.fetchval("SELECT released_at FROM coupon_redemptions WHERE reference = 'chk_1'")
        assert released is not None
        # The user has the use back, under a new checkout.
        assert (await apply(app, user.id, "BACK", 1000, "chk_3")).discount_cents == 100
        assert await uses(db, "BACK") == 2
        numbers = await db.fetch(
            "SELECT use_number, released_at IS NOT NULL AS released FROM coupon_redemptions"
            " WHERE user_id = $1 ORDER BY id",
            user.id,
        )
        assert [(r["use_number"], r["released"]) for r in numbers] == [(1, True), (1, False)]
        # A released checkout's reference stays spent, even for someone with a use to take.
        await release(app, "chk_2")
        third = await create_user(app)
        with pytest.raises(Conflict) as exc:
            await apply(app, third.id, "BACK", 1000, "chk_1")
        assert refusal(exc) == "coupon_already_applied"
        assert await uses(db, "BACK") == 1

    async def test_concurrent_releases_give_back_one_use(self, app: FastAPI, db: asyncpg.Connection) -> None:
        await make_coupon(app, "MANY", max_uses=None)
        users = [await create_user(app) for _ in range(3)]
        for i, user in enumerate(users):
            await apply(app, user.id, "MANY", 1000, f"chk_{i}")

        await asyncio.gather(*(release(app, "chk_1") for _ in range(10)))

        assert await uses(db, "MANY") == 2

    async def test_unknown_reference_changes_nothing(self, app: FastAPI, db: asyncpg.Connection) -> None:
        await make_coupon(app, "KEEP")
        user = await create_user(app)
        await apply(app, user.id, "KEEP", 1000, "chk_keep")
        await release(app, "chk_nothing")
        assert await uses(db, "KEEP") == 1

    async def test_redeemed_credits_are_not_released(self, app: FastAPI, db: asyncpg.Connection) -> None:
        await make_coupon(app, "GIFT", kind="credits", discount_type=None, value=Decimal("3"))
        user = await create_user(app)
        state = app_state(app)
        redeemed = await coupons.redeem(
            state.pool, state.limiter, state.settings, user_id=user.id, code="gift", ip=None
        )
        assert redeemed.balance_after == Decimal("3")
        # Credits redemptions have no checkout reference: nothing to release.
        assert redeemed.redemption.reference is None
        assert await uses(db, "GIFT") == 1


@pytest.mark.parametrize(
    ("code", "normalised"),
    [
        ("save10", "SAVE10"),
        ("  Save10\t", "SAVE10"),
        ("black-friday_2026", "BLACK-FRIDAY_2026"),
        ("", None),
        ("-LEADING", None),
        ("two words", None),
        ("ſave10", None),  # upper-cases to ASCII, but is not ASCII
        ("X" * 65, None),
    ],
)
def test_normalise_code(code: str, normalised: str | None) -> None:
    assert coupons.normalise_code(code) == normalised
