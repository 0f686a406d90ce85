"""Plans over HTTP: the public list, the caller's plan with its usage, admin CRUD and assignment,
and plan limits as the rate limiter enforces them (at once after a change, even on a cached key).

The limiter's clock is frozen in the middle of a minute, so no burst straddles a window boundary.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from src.services import plans as plans_service
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import TestUser, app_state, create_user
from tests.fakes.upstream import FakeUpstream

OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
FROZEN_AT = 1_800_000_030.0
# A cheap route behind the rate limiter that needs no upstream.
LIMITED = "/v1/chat/sessions"
CHAT = "/v1/chat/completions"
CHAT_BODY: dict[str, Any] = {
    "model": "openai/gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 20,
}
# The test settings' defaults (tests/conftest.py): what the free plan's NULL limits mean there.
DEFAULTS = {
    "rpm_limit": 100_000,
    "rpd_limit": 10_000_000,
    "tpm_limit": 10**12,
    "tpd_limit": 10**13,
    "concurrency_limit": 10_000,
}


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest, upstream_server: FakeUpstream) -> dict[str, Any]:
    """The fake upstream as the only provider; a long auth cache, so "at once" is not the TTL's doing."""
    extra: dict[str, Any] = getattr(request, "param", {})
    return {
        "custom_provider_base_url": upstream_server.base_url,
        "custom_provider_name": "fake",
        "auth_cache_ttl_seconds": 60,
        **extra,
    }


def freeze(app: FastAPI) -> None:
    app_state(app).limiter.clock = lambda: FROZEN_AT


async def create_plan(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"name": f"plan-{uuid4().hex[:8]}", **fields}
    response = await client.post("/admin/plans", json=body, headers=OPERATOR)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def assign(client: httpx.AsyncClient, user: TestUser, plan_id: int, **extra: Any) -> httpx.Response:
    return await client.post(
        "/admin/plans/assign", json={"user_id": str(user.id), "plan_id": plan_id, **extra}, headers=OPERATOR
    )


async def my_plan(client: httpx.AsyncClient, user: TestUser) -> dict[str, Any]:
    response = await client.get("/user/plan", headers=user.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def statuses(client: httpx.AsyncClient, user: TestUser, n: int) -> list[int]:
    return [(await client.get(LIMITED, headers=user.headers)).status_code for _ in range(n)]


async def default_plan_id(client: httpx.AsyncClient) -> int:
    plans = (await client.get("/plans")).json()["data"]
    (free,) = [plan for plan in plans if plan["is_default"]]
    plan_id: int = free["id"]
    return plan_id


async def audit_rows(db: asyncpg.Connection, action: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT actor_type, user_id, subject_type, subject_id, before, after
           FROM audit_logs WHERE action = $1 ORDER BY id""",
        action,
    )
    return [
        {k: orjson.loads(v) if k in {"before", "after"} and isinstance(v, str) else v for k, v in row.items()}
        for row in rows
    ]


class TestPublicPlans:
    async def test_the_free_plan_is_listed_without_credentials_at_the_settings_defaults(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.get("/plans")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list"
        (free,) = body["data"]
        assert free["is_default"] is True and free["name"] == "Free"
        assert free["price_cents"] == 0 and free["credits_included"] == "0.0000000000"
        assert free["limits"] == DEFAULTS
        assert "stripe_price_id" not in free and "is_active" not in free
        one = await client.get(f"/plans/{free['id']}")
        assert one.status_code == 200 and one.json() == free

    async def test_only_active_plans_are_offered(self, client: httpx.AsyncClient) -> None:
        pro = await create_plan(
            client, name="Pro", price_cents=2000, rpm_limit=60, features={"support": "email"}
        )
        retired = await create_plan(client, name="Legacy")
        assert (await client.delete(f"/admin/plans/{retired['id']}", headers=OPERATOR)).status_code == 200

        listed = (await client.get("/plans")).json()["data"]
        assert [plan["name"] for plan in listed] == ["Free", "Pro"]
        shown = (await client.get(f"/plans/{pro['id']}")).json()
        assert shown["limits"] == {**DEFAULTS, "rpm_limit": 60}
        assert shown["features"] == {"support": "email"}
        for path in (
            f"/plans/{retired['id']}",
            "/plans/999999",
            "/plans/abc",
            "/plans/-1",
            f"/plans/{2**70}",
        ):
            response = await client.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "plan_not_found"


class TestAdminPlans:
    async def test_create_read_update_and_retire(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        created = await create_plan(
            client,
            name="  Team ",
            description="For teams",
            price_cents=9900,
            currency="EUR",
            credits_included="50.5",
            rpm_limit=100,
            tpd_limit=2**40,
            stripe_price_id="price_team",
        )
        assert created["name"] == "Team" and created["currency"] == "eur"
        assert created["credits_included"] == "50.5000000000"
        assert created["limit_settings"] == {
            "rpm_limit": 100,
            "rpd_limit": None,
            "tpm_limit": None,
            "tpd_limit": 2**40,
            "concurrency_limit": None,
        }
        assert created["limits"] == {**DEFAULTS, "rpm_limit": 100, "tpd_limit": 2**40}
        assert created["is_active"] is True and created["is_default"] is False
        path = f"/admin/plans/{created['id']}"
        assert (await client.get(path, headers=OPERATOR)).json() == created

        updated = await client.put(path, json={"rpm_limit": None, "price_cents": 12000}, headers=OPERATOR)
        assert updated.status_code == 200, updated.text
        assert updated.json()["limit_settings"]["rpm_limit"] is None
        assert updated.json()["limits"]["rpm_limit"] == DEFAULTS["rpm_limit"]
        assert updated.json()["price_cents"] == 12000 and updated.json()["name"] == "Team"

        retired = await client.delete(path, headers=OPERATOR)
        assert retired.status_code == 200 and retired.json()["is_active"] is False
        listed = (await client.get("/admin/plans", headers=OPERATOR)).json()["data"]
        assert [plan["name"] for plan in listed] == ["Free", "Team"]

        actions = [row["action"] for row in await db.fetch("SELECT action FROM audit_logs ORDER BY id")]
        assert actions == ["plan.create", "plan.update", "plan.deactivate"]
        (update,) = await audit_rows(db, "plan.update")
        assert update["actor_type"] == "operator" and update["subject_id"] == str(created["id"])
        assert update["before"]["rpm_limit"] == 100 and update["after"]["rpm_limit"] is None

    async def test_names_and_stripe_prices_are_unique(self, client: httpx.AsyncClient) -> None:
        first = await create_plan(client, name="Pro", stripe_price_id="price_1")
        other = await create_plan(client, name="Max")
        for body, param in (
            ({"name": "Pro"}, "name"),
            ({"name": "X", "stripe_price_id": "price_1"}, "stripe_price_id"),
        ):
            response = await client.post("/admin/plans", json=body, headers=OPERATOR)
            assert response.status_code == 409, response.text
            assert response.json()["error"]["param"] == param
        renamed = await client.put(f"/admin/plans/{other['id']}", json={"name": "Pro"}, headers=OPERATOR)
        assert renamed.status_code == 409
        assert (await client.get(f"/admin/plans/{first['id']}", headers=OPERATOR)).json() == first

    async def test_invalid_bodies_are_400(self, client: httpx.AsyncClient) -> None:
        plan = await create_plan(client)
        bad_creates = [
            {},
            {"name": ""},
            {"name": "a", "rpm_limit": 0},
            {"name": "a", "rpm_limit": "5"},
            {"name": "a", "price_cents": -1},
            {"name": "a", "currency": "dollars"},
            {"name": "a", "billing_interval": "week"},
            {"name": "a", "credits_included": "-1"},
            {"name": "a", "features": ["not", "an", "object"]},
            {"name": "a", "is_default": "yes"},
            {"name": "a", "unknown": 1},
        ]
        for body in bad_creates:
            response = await client.post("/admin/plans", json=body, headers=OPERATOR)
            assert response.status_code == 400, body
        for body in ({"name": None}, {"price_cents": None}, {"is_active": None}, {"tpm_limit": -5}):
            response = await client.put(f"/admin/plans/{plan['id']}", json=body, headers=OPERATOR)
            assert response.status_code == 400, body

    async def test_the_default_plan_cannot_be_retired_and_moves_only_to_another_plan(
        self, client: httpx.AsyncClient
    ) -> None:
        free_id = await default_plan_id(client)
        for method, body in (("DELETE", None), ("PUT", {"is_active": False}), ("PUT", {"is_default": False})):
            response = await client.request(method, f"/admin/plans/{free_id}", json=body, headers=OPERATOR)
            assert response.status_code == 409, (method, body)
            assert response.json()["error"]["code"] == "default_plan"

        starter = await create_plan(client, name="Starter", rpm_limit=42)
        moved = await client.put(f"/admin/plans/{starter['id']}", json={"is_default": True}, headers=OPERATOR)
        assert moved.status_code == 200 and moved.json()["is_default"] is True
        old = (await client.get(f"/admin/plans/{free_id}", headers=OPERATOR)).json()
        assert old["is_default"] is False
        assert (await client.delete(f"/admin/plans/{free_id}", headers=OPERATOR)).status_code == 200
        # A new default made at creation takes over from the old one as well.
        newest = await create_plan(client, name="Newest", is_default=True)
        defaults = [
            p["name"]
            for p in (await client.get("/admin/plans", headers=OPERATOR)).json()["data"]
            if p["is_default"]
        ]
        assert defaults == [newest["name"]]

    async def test_permissions_read_and_write_are_separate(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        role = {"name": "plans-viewer", "description": "reads plans", "permissions": ["plans.read"]}
        assert (await client.post("/admin/roles", json=role, headers=OPERATOR)).status_code == 201
        viewer = await create_user(app)
        plain = await create_user(app)
        body = {"user_id": str(viewer.id), "role": "plans-viewer"}
        assert (await client.post("/admin/roles/assign", json=body, headers=OPERATOR)).status_code == 200
        plan = await create_plan(client)
        path = f"/admin/plans/{plan['id']}"

        assert (await client.get("/admin/plans", headers=viewer.headers)).status_code == 200
        assert (await client.get(path, headers=viewer.headers)).status_code == 200
        writes = [
            ("POST", "/admin/plans", {"name": "nope"}),
            ("PUT", path, {"price_cents": 1}),
            ("DELETE", path, None),
            ("POST", "/admin/plans/assign", {"user_id": str(plain.id), "plan_id": plan["id"]}),
        ]
        for method, url, json in writes:
            refused = await client.request(method, url, json=json, headers=viewer.headers)
            assert refused.status_code == 403, (method, url)
            assert refused.json()["error"]["code"] == "permission_denied"
        for method, url in (("GET", "/admin/plans"), ("GET", path)):
            assert (await client.request(method, url, headers=plain.headers)).status_code == 403
            assert (await client.request(method, url)).status_code == 401
        assert (await client.get(path, headers=OPERATOR)).json() == plan  # nothing changed
        assert (await my_plan(client, plain))["source"] == "default"


class TestAssignment:
    async def test_assignment_is_audited_and_shown_to_the_user(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        pro = await create_plan(client, name="Pro", rpm_limit=77)
        ends = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)

        response = await assign(client, user, pro["id"], current_period_end=ends.isoformat())
        assert response.status_code == 200, response.text
        view = response.json()
        assert view["user_id"] == str(user.id) and view["plan"]["id"] == pro["id"]
        assert view["status"] == "active" and view["source"] == "assigned"
        assert datetime.fromisoformat(view["current_period_end"]) == ends

        mine = await my_plan(client, user)
        assert mine["plan"]["name"] == "Pro" and mine["ceiling"]["rpm_limit"] == 77
        assert datetime.fromisoformat(mine["current_period_end"]) == ends

        (row,) = await audit_rows(db, "plan.assign")
        assert row["actor_type"] == "operator" and row["user_id"] == user.id
        assert (row["subject_type"], row["subject_id"]) == ("user", str(user.id))
        assert row["before"]["plan_name"] == "Free" and row["before"]["source"] == "default"
        assert row["after"]["plan_id"] == pro["id"] and row["after"]["source"] == "assigned"

        # Back to the free plan: the user's plan ends, and that is audited too.
        back = await assign(client, user, await default_plan_id(client))
        assert back.status_code == 200 and back.json()["source"] == "default"
        statuses_ = await db.fetch("SELECT status FROM user_plans WHERE user_id = $1", user.id)
        assert [r["status"] for r in statuses_] == ["cancelled"]
        assert len(await audit_rows(db, "plan.assign")) == 2

    async def test_refusals(self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        pro = await create_plan(client)
        retired = await create_plan(client)
        await client.delete(f"/admin/plans/{retired['id']}", headers=OPERATOR)
        past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()

        cases = [
            ({"user_id": str(uuid4()), "plan_id": pro["id"]}, 404, "user_not_found"),
            ({"user_id": str(user.id), "plan_id": 999_999}, 404, "plan_not_found"),
            ({"user_id": str(user.id), "plan_id": retired["id"]}, 400, "plan_inactive"),
            (
                {"user_id": str(user.id), "plan_id": pro["id"], "current_period_end": past},
                400,
                "invalid_period_end",
            ),
            ({"user_id": str(user.id), "plan_id": str(pro["id"])}, 400, None),
        ]
        for body, status, code in cases:
            response = await client.post("/admin/plans/assign", json=body, headers=OPERATOR)
            assert response.status_code == status, body
            if code:
                assert response.json()["error"]["code"] == code
        assert await db.fetchval("SELECT count(*) FROM user_plans") == 0

        # A plan paid by a Stripe subscription is changed through Stripe, not by assignment.
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await plans_service.apply_subscription(
                conn,
                state,
                user_id=user.id,
                plan_id=pro["id"],
                status="active",
                period_start=None,
                period_end=None,
                stripe_subscription_id="sub_1",
                stripe_customer_id="cus_1",
                auto_renew=True,
            )
        refused = await assign(client, user, pro["id"])
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "plan_managed_by_subscription"
        assert (await my_plan(client, user))["source"] == "stripe"


class TestPlanLimitsAreEnforced:
    async def test_the_plans_rpm_applies_at_once_after_assignment(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        freeze(app)
        user = await create_user(app)
        # Cached now, on the free plan (the auth cache keeps it for 60 s).
        assert await statuses(client, user, 1) == [200]
        plan = await create_plan(client, rpm_limit=4)
        assert (await assign(client, user, plan["id"])).status_code == 200

        results = await statuses(client, user, 4)
        assert results == [200, 200, 200, 429]
        refused = await client.get(LIMITED, headers=user.headers)
        assert refused.status_code == 429
        assert refused.json()["error"]["param"] == "rpm"
        assert refused.headers["x-ratelimit-limit-requests"] == "4"

    async def test_plan_rpm_3_refuses_the_fourth_request_and_an_admin_ceiling_overrides_it(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        freeze(app)
        user = await create_user(app)
        plan = await create_plan(client, rpm_limit=3)
        assert (await assign(client, user, plan["id"])).status_code == 200
        assert await statuses(client, user, 4) == [200, 200, 200, 429]

        # An admin-set ceiling wins over the plan, above it too.
        raised = await client.put(
            f"/admin/rate-limits/users/{user.id}", json={"rpm_limit": 5}, headers=OPERATOR
        )
        assert raised.status_code == 200, raised.text
        assert raised.json()["plan"]["rpm_limit"] == 3
        assert raised.json()["ceiling"]["rpm_limit"] == 5
        # The refused request consumed nothing: 3 counted, 2 more fit under 5.
        assert await statuses(client, user, 3) == [200, 200, 429]

    async def test_a_plan_limit_change_applies_to_its_users_at_once(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        freeze(app)
        user = await create_user(app)
        plan = await create_plan(client, rpm_limit=100)
        assert (await assign(client, user, plan["id"])).status_code == 200
        assert await statuses(client, user, 2) == [200, 200]  # cached with rpm 100
        lowered = await client.put(f"/admin/plans/{plan['id']}", json={"rpm_limit": 3}, headers=OPERATOR)
        assert lowered.status_code == 200
        assert await statuses(client, user, 2) == [200, 429]

    async def test_the_default_plans_limits_apply_to_users_without_a_plan(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        freeze(app)
        user = await create_user(app)
        assert await statuses(client, user, 1) == [200]
        free_id = await default_plan_id(client)
        changed = await client.put(f"/admin/plans/{free_id}", json={"rpm_limit": 2}, headers=OPERATOR)
        assert changed.status_code == 200
        assert await statuses(client, user, 2) == [200, 429]
        assert (await my_plan(client, user))["plan"]["limits"]["rpm_limit"] == 2

    async def test_a_user_cannot_set_a_key_limit_above_the_plan(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        user = await create_user(app)
        plan = await create_plan(client, rpm_limit=10, concurrency_limit=2)
        assert (await assign(client, user, plan["id"])).status_code == 200
        for body in ({"name": "fast", "rpm_limit": 11}, {"name": "wide", "concurrency_limit": 3}):
            response = await client.post("/user/api-keys", json=body, headers=user.headers)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "limit_above_ceiling"
        at_the_plan = await client.post(
            "/user/api-keys", json={"name": "ok", "rpm_limit": 10}, headers=user.headers
        )
        assert at_the_plan.status_code == 201, at_the_plan.text
        key_id = at_the_plan.json()["id"]
        raised = await client.put(f"/user/api-keys/{key_id}", json={"rpm_limit": 11}, headers=user.headers)
        assert raised.status_code == 400
        assert raised.json()["error"]["code"] == "limit_above_ceiling"

    async def test_cancelled_past_due_and_lapsed_plans(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        freeze(app)
        state = app_state(app)
        user = await create_user(app)
        plan = await create_plan(client, rpm_limit=3, stripe_price_id="price_small")

        async def subscribe(status: str) -> None:
            async with state.pool.acquire() as conn:
                await plans_service.apply_subscription(
                    conn,
                    state,
                    user_id=user.id,
                    plan_id=plan["id"],
                    status=status,
                    period_start=datetime.now(UTC),
                    period_end=datetime.now(UTC) + timedelta(days=30),
                    stripe_subscription_id="sub_small",
                    stripe_customer_id="cus_small",
                    auto_renew=True,
                )

        await subscribe("active")
        assert await statuses(client, user, 4) == [200, 200, 200, 429]
        # past_due keeps the plan's limits.
        async with state.pool.acquire() as conn:
            assert (
                await plans_service.set_status(
                    conn, state, stripe_subscription_id="sub_small", status="past_due"
                )
                == user.id
            )
        assert await statuses(client, user, 1) == [429]
        assert (await my_plan(client, user))["status"] == "past_due"
        # Cancelled: the free plan (the settings defaults) at once.
        async with state.pool.acquire() as conn:
            await plans_service.set_status(
                conn, state, stripe_subscription_id="sub_small", status="cancelled"
            )
        assert await statuses(client, user, 3) == [200, 200, 200]
        mine = await my_plan(client, user)
        assert mine["source"] == "default" and mine["plan"]["name"] == "Free"
        assert mine["ceiling"] == DEFAULTS

        # An assigned plan whose period has ended is over: the free plan again.
        other = await create_user(app)
        assert (await assign(client, other, plan["id"])).status_code == 200
        assert await statuses(client, other, 4) == [200, 200, 200, 429]
        await db.execute(
            "UPDATE user_plans SET current_period_end = now() - interval '1 second' WHERE user_id = $1",
            other.id,
        )
        state.auth_cache.clear()  # the cache would otherwise keep the record for its TTL
        assert await statuses(client, other, 1) == [200]
        assert (await my_plan(client, other))["source"] == "default"
        # And a new assignment replaces the lapsed row (which is recorded as expired).
        assert (await assign(client, other, plan["id"])).status_code == 200
        rows = await db.fetch("SELECT status FROM user_plans WHERE user_id = $1 ORDER BY id", other.id)
        assert [r["status"] for r in rows] == ["expired", "active"]


class TestMyPlan:
    async def test_the_free_plan_with_usage_moving_with_requests(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        freeze(app)
        upstream.set_reply(prompt_tokens=11, completion_tokens=7)
        user = await create_user(app, credits="1")
        mine = await my_plan(client, user)
        assert mine["user_id"] == str(user.id)
        assert mine["plan"]["is_default"] is True and mine["source"] == "default"
        assert mine["status"] == "active" and mine["auto_renew"] is False
        assert mine["current_period_start"] is None and mine["current_period_end"] is None
        assert mine["plan"]["limits"] == DEFAULTS and mine["ceiling"] == DEFAULTS
        assert mine["usage"] == {"rpm": 0, "rpd": 0, "tpm": 0, "tpd": 0, "concurrency": 0}

        assert await statuses(client, user, 2) == [200, 200]
        assert (await my_plan(client, user))["usage"] == {
            "rpm": 2,
            "rpd": 2,
            "tpm": 0,
            "tpd": 0,
            "concurrency": 0,
        }
        chat = await client.post(CHAT, json=CHAT_BODY, headers=user.headers)
        assert chat.status_code == 200, chat.text
        assert (await my_plan(client, user))["usage"] == {
            "rpm": 3,
            "rpd": 3,
            "tpm": 18,
            "tpd": 18,
            "concurrency": 0,
        }

    async def test_needs_a_users_key(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/user/plan")).status_code == 401
        operator = await client.get("/user/plan", headers=OPERATOR)
        assert operator.status_code == 403


class CountingPool:
    """The app's pool, counting the connections taken from it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.acquired = 0

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        self.acquired += 1
        return self.pool.acquire(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


class TestHotPath:
    async def test_a_warm_request_on_a_plan_takes_no_database_connection(
        self, app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        freeze(app)
        user = await create_user(app)
        plan = await create_plan(client, rpm_limit=3)
        assert (await assign(client, user, plan["id"])).status_code == 200
        # Warm: the key's record (with its plan's limits), the catalog, last_used_at.
        assert (await client.get("/v1/models", headers=user.headers)).status_code == 200
        state = app_state(app)
        await asyncio.gather(*list(state.background))

        pool = CountingPool(state.pool)
        monkeypatch.setattr(state, "pool", pool)
        statuses_ = [(await client.get("/v1/models", headers=user.headers)).status_code for _ in range(3)]
        # The plan's limit is enforced from the cached record: no connection, no query.
        assert statuses_ == [200, 200, 429]
        assert pool.acquired == 0
        # The count is real: a route that reads the database is seen taking its connection.
        assert (await client.get("/user/plan", headers=user.headers)).status_code == 200
        assert pool.acquired == 1
