"""The plan service against a real database: what the Stripe code calls (apply_subscription,
set_status, current_plan, plan_for_stripe_price), the one-current-plan rule under races, the
authentication record carrying the plan's limits, and how the ceiling is decided."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from fastapi import FastAPI

from src.config import Settings
from src.db import api_keys as keys_db
from src.db import plans as plans_db
from src.errors import InvalidRequest, NotFound
from src.security.security import key_digest
from src.services import limits as limits_service
from src.services import plans as plans_service
from src.services.limits import Limits
from tests.conftest import TEST_SECRET_KEY
from tests.factories import TestUser, app_state, create_user

NOW = datetime(2026, 11, 1, tzinfo=UTC)
LATER = NOW + timedelta(days=30)


async def make_plan(db: asyncpg.Connection, **values: Any) -> plans_service.Plan:
    return await plans_db.insert_plan(db, values={"name": f"plan-{uuid4().hex[:8]}", **values})


async def subscribe(
    app: FastAPI,
    user_id: UUID,
    plan_id: int,
    *,
    sub: str = "sub_1",
    status: str = "active",
    period_start: datetime | None = NOW,
    period_end: datetime | None = LATER,
    customer: str | None = "cus_1",
    with_state: bool = True,
) -> None:
    state = app_state(app)
    async with state.pool.acquire() as conn:
        await plans_service.apply_subscription(
            conn,
            state if with_state else None,
            user_id=user_id,
            plan_id=plan_id,
            status=status,
            period_start=period_start,
            period_end=period_end,
            stripe_subscription_id=sub,
            stripe_customer_id=customer,
            auto_renew=True,
        )


async def rows(db: asyncpg.Connection, user_id: UUID) -> list[dict[str, Any]]:
    found = await db.fetch(
        """SELECT plan_id, status, stripe_subscription_id, stripe_customer_id, current_period_start,
                  current_period_end FROM user_plans WHERE user_id = $1 ORDER BY id""",
        user_id,
    )
    return [dict(row) for row in found]


async def auth_record(db: asyncpg.Connection, user: TestUser) -> keys_db.AuthRecord:
    record = await keys_db.get_auth_record(db, key_hash=key_digest(TEST_SECRET_KEY, user.api_key))
    assert record is not None
    return record


class TestReading:
    async def test_get_plan_and_the_stripe_price_lookup(self, db: asyncpg.Connection) -> None:
        plan = await make_plan(db, stripe_price_id="price_pro", credits_included=Decimal("20"))
        assert await plans_service.get_plan(db, plan_id=plan.id) == plan
        assert await plans_service.plan_for_stripe_price(db, price_id="price_pro") == plan
        assert await plans_service.plan_for_stripe_price(db, price_id="price_other") is None
        with pytest.raises(NotFound):
            await plans_service.get_plan(db, plan_id=plan.id + 1000)
        # A retired plan is still found: subscriptions already on it keep it.
        await plans_db.update_plan(db, plan_id=plan.id, changes={"is_active": False})
        assert (await plans_service.plan_for_stripe_price(db, price_id="price_pro")) is not None

    async def test_a_user_without_a_plan_is_on_the_free_default(
        self, app: FastAPI, db: asyncpg.Connection, settings: Settings
    ) -> None:
        user = await create_user(app)
        view = await plans_service.current_plan(db, settings, user_id=user.id)
        assert view.plan.is_default and view.plan.name == "Free"
        assert view.subscription is None and view.source == "default" and view.status == "active"
        assert view.plan.limits == dict.fromkeys(plans_db.LIMIT_COLUMNS)
        assert view.limits == limits_service.default_limits(settings)
        assert view.current_period_end is None and view.auto_renew is False


class TestApplySubscription:
    async def test_creates_then_updates_one_row_keyed_by_the_subscription(
        self, app: FastAPI, db: asyncpg.Connection, settings: Settings
    ) -> None:
        user = await create_user(app)
        small = await make_plan(db, rpm_limit=10)
        large = await make_plan(db, rpm_limit=20)

        await subscribe(app, user.id, small.id)
        view = await plans_service.current_plan(db, settings, user_id=user.id)
        assert view.plan == small and view.source == "stripe" and view.status == "active"
        assert view.limits.rpm_limit == 10 and view.limits.rpd_limit == settings.default_rpd
        assert view.current_period_start == NOW and view.current_period_end == LATER
        assert view.subscription is not None and view.subscription.stripe_customer_id == "cus_1"
        assert view.auto_renew is True

        # The same subscription again (a replayed or later event): the same row, brought up to date;
        # bounds and customer not given keep what the row has.
        await subscribe(app, user.id, large.id, period_start=None, period_end=None, customer=None)
        await subscribe(app, user.id, large.id, period_start=None, period_end=None, customer=None)
        (row,) = await rows(db, user.id)
        assert row["plan_id"] == large.id and row["status"] == "active"
        assert row["current_period_start"] == NOW and row["current_period_end"] == LATER
        assert row["stripe_customer_id"] == "cus_1"
        new_end = LATER + timedelta(days=30)
        await subscribe(app, user.id, large.id, period_start=LATER, period_end=new_end)
        (row,) = await rows(db, user.id)
        assert (row["current_period_start"], row["current_period_end"]) == (LATER, new_end)

        audited = await db.fetch(
            "SELECT actor_type, action FROM audit_logs WHERE user_id = $1 AND action LIKE 'plan.%'", user.id
        )
        # Recorded when something changed: the replayed event added no row.
        assert [(r["actor_type"], r["action"]) for r in audited] == [("system", "plan.subscription")] * 3

    async def test_a_current_subscription_ends_the_other_current_plan(
        self, app: FastAPI, db: asyncpg.Connection, settings: Settings
    ) -> None:
        user = await create_user(app)
        assigned = await make_plan(db)
        paid = await make_plan(db)
        await plans_db.insert_user_plan(
            db, user_id=user.id, plan_id=assigned.id, status="active", period_end=None, auto_renew=False
        )
        await subscribe(app, user.id, paid.id, sub="sub_a")
        await subscribe(app, user.id, paid.id, sub="sub_b")
        assert [(r["stripe_subscription_id"], r["status"]) for r in await rows(db, user.id)] == [
            (None, "cancelled"),
            ("sub_a", "cancelled"),
            ("sub_b", "active"),
        ]
        # A status that is not current does not touch the current plan.
        await subscribe(app, user.id, paid.id, sub="sub_c", status="expired")
        view = await plans_service.current_plan(db, settings, user_id=user.id)
        assert view.subscription is not None and view.subscription.stripe_subscription_id == "sub_b"

    async def test_never_moves_a_subscription_to_another_user(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        owner = await create_user(app)
        other = await create_user(app)
        plan = await make_plan(db)
        await subscribe(app, owner.id, plan.id, sub="sub_x")
        await subscribe(app, other.id, plan.id, sub="sub_x", status="past_due")
        assert [r["status"] for r in await rows(db, owner.id)] == ["past_due"]
        assert await rows(db, other.id) == []

    async def test_refusals_write_nothing(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        plan = await make_plan(db)
        with pytest.raises(NotFound):
            await subscribe(app, user.id, plan.id + 1000)
        with pytest.raises(InvalidRequest):
            await subscribe(app, user.id, plan.id, status="trialing")
        assert await rows(db, user.id) == []

    async def test_runs_inside_the_callers_transaction(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        plan = await make_plan(db)
        state = app_state(app)
        async with state.pool.acquire() as conn:
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await plans_service.apply_subscription(
                        conn,
                        state,
                        user_id=user.id,
                        plan_id=plan.id,
                        status="active",
                        period_start=None,
                        period_end=None,
                        stripe_subscription_id="sub_rolled_back",
                        stripe_customer_id=None,
                        auto_renew=True,
                    )
                    raise RuntimeError("the event's handling failed later")
        assert await rows(db, user.id) == []

    async def test_racing_subscriptions_leave_exactly_one_current_plan(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(db)
        await asyncio.gather(*(subscribe(app, user.id, plan.id, sub=f"sub_{i}") for i in range(10)))
        found = await rows(db, user.id)
        assert len(found) == 10
        assert [r["status"] for r in found].count("active") == 1

    async def test_the_users_cached_keys_are_dropped(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        plan = await make_plan(db, rpm_limit=7)
        state = app_state(app)
        digest = key_digest(TEST_SECRET_KEY, user.api_key)
        state.auth_cache.set(digest, await auth_record(db, user))
        await subscribe(app, user.id, plan.id, with_state=False)
        assert state.auth_cache.get(digest) is not None  # without the state, the TTL bounds it
        await subscribe(app, user.id, plan.id)
        assert state.auth_cache.get(digest) is None


class TestSetStatus:
    async def test_sets_the_status_and_returns_the_user(
        self, app: FastAPI, db: asyncpg.Connection, settings: Settings
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(db, rpm_limit=5)
        await subscribe(app, user.id, plan.id, sub="sub_s")
        state = app_state(app)
        digest = key_digest(TEST_SECRET_KEY, user.api_key)
        state.auth_cache.set(digest, await auth_record(db, user))

        assert (
            await plans_service.set_status(db, state, stripe_subscription_id="sub_s", status="past_due")
            == user.id
        )
        assert state.auth_cache.get(digest) is None
        view = await plans_service.current_plan(db, settings, user_id=user.id)
        assert view.plan == plan and view.status == "past_due" and view.limits.rpm_limit == 5

        assert (
            await plans_service.set_status(db, None, stripe_subscription_id="sub_s", status="cancelled")
            == user.id
        )
        view = await plans_service.current_plan(db, settings, user_id=user.id)
        assert view.plan.is_default and view.source == "default"
        assert (
            await plans_service.set_status(db, None, stripe_subscription_id="sub_none", status="expired")
            is None
        )
        with pytest.raises(InvalidRequest):
            await plans_service.set_status(db, None, stripe_subscription_id="sub_s", status="unpaid")

        statuses = await db.fetch(
            "SELECT before, after FROM audit_logs WHERE action = 'plan.subscription_status' ORDER BY id"
        )
        assert [(r["before"]["status"], r["after"]["status"]) for r in statuses] == [
            ("active", "past_due"),
            ("past_due", "cancelled"),
        ]

    async def test_reactivating_ends_the_plan_that_replaced_it(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(db)
        await subscribe(app, user.id, plan.id, sub="sub_old")
        await subscribe(app, user.id, plan.id, sub="sub_new")
        await plans_service.set_status(db, None, stripe_subscription_id="sub_old", status="active")
        assert [(r["stripe_subscription_id"], r["status"]) for r in await rows(db, user.id)] == [
            ("sub_old", "active"),
            ("sub_new", "cancelled"),
        ]


class TestAuthRecordCarriesThePlan:
    async def test_plan_limits_come_with_the_key_lookup(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        assert (await auth_record(db, user)).plan_limits == dict.fromkeys(plans_db.LIMIT_COLUMNS)
        plan = await make_plan(db, rpm_limit=3, tpm_limit=1000)
        await subscribe(app, user.id, plan.id, status="past_due")
        record = await auth_record(db, user)
        assert record.plan_limits == {
            "rpm_limit": 3,
            "rpd_limit": None,
            "tpm_limit": 1000,
            "tpd_limit": None,
            "concurrency_limit": None,
        }
        await plans_service.set_status(db, None, stripe_subscription_id="sub_1", status="expired")
        assert (await auth_record(db, user)).plan_limits["rpm_limit"] is None

    async def test_an_assigned_plan_lapses_at_its_period_end_but_a_subscription_does_not(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        assigned_user = await create_user(app)
        subscriber = await create_user(app)
        plan = await make_plan(db, rpm_limit=3)
        await plans_db.insert_user_plan(
            db,
            user_id=assigned_user.id,
            plan_id=plan.id,
            status="active",
            period_end=datetime.now(UTC) + timedelta(hours=1),
            auto_renew=False,
        )
        await subscribe(app, subscriber.id, plan.id)
        await db.execute("UPDATE user_plans SET current_period_end = now() - interval '1 second'")
        # Stripe moves or ends its subscription's period by its events; an assigned plan just ends.
        assert (await auth_record(db, assigned_user)).plan_limits["rpm_limit"] is None
        assert (await auth_record(db, subscriber)).plan_limits["rpm_limit"] == 3

    async def test_the_default_plans_own_limits_apply_without_a_plan(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        await db.execute("UPDATE plans SET concurrency_limit = 9 WHERE is_default")
        assert (await auth_record(db, user)).plan_limits["concurrency_limit"] == 9


class TestCeiling:
    def test_admin_set_then_plan_then_settings_defaults(self, settings: Settings) -> None:
        defaults = limits_service.default_limits(settings)
        plan = {
            "rpm_limit": 30,
            "rpd_limit": 300,
            "tpm_limit": None,
            "tpd_limit": None,
            "concurrency_limit": 3,
        }
        admin_set = {
            "rpm_limit": 500,
            "rpd_limit": None,
            "tpm_limit": None,
            "tpd_limit": None,
            "concurrency_limit": None,
        }
        assert limits_service.ceiling(settings, admin_set, plan) == Limits(
            rpm_limit=500,  # an admin may set a user's ceiling above the plan
            rpd_limit=300,
            tpm_limit=defaults.tpm_limit,
            tpd_limit=defaults.tpd_limit,
            concurrency_limit=3,
        )
        assert limits_service.ceiling(settings, None, None) == defaults
        assert limits_service.ceiling(settings, None, plan).rpm_limit == 30
