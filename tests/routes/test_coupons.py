"""The coupon routes: redemption exactly once, the refusals, the failure throttle, administration."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import TEST_ADMIN_KEY
from tests.factories import TestUser, app_state, create_user
from tests.money import assert_money_invariants

OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
REDEEM = "/coupons/redeem"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # Functional tests fail codes on purpose; the throttle has tests of its own below.
    return {"coupon_failures_per_minute": 10_000}


@pytest.fixture(autouse=True)
async def _money_invariants(db: asyncpg.Connection) -> AsyncIterator[None]:
    """After every test: balance = sum of the ledger for every user, and no grant applied twice."""
    yield
    await assert_money_invariants(db)
    # One coupon grant per credits redemption, and one credits redemption per coupon grant.
    mismatched = await db.fetch(
        """SELECT r.id, g.id FROM coupon_redemptions r
            FULL JOIN (SELECT * FROM credit_grants WHERE source = 'coupon') g
              ON g.reference = r.coupon_id || ':' || r.user_id || ':' || r.use_number
            WHERE (r.kind = 'credits' OR r.id IS NULL) AND (r.id IS NULL OR g.id IS NULL
                  OR g.amount <> r.credits_granted OR g.user_id <> r.user_id)"""
    )
    assert [dict(row) for row in mismatched] == []
    # Every coupon's use count is its live redemptions.
    drift = await db.fetch(
        """SELECT c.id FROM coupons c
            WHERE c.uses <> (SELECT count(*) FROM coupon_redemptions r
                              WHERE r.coupon_id = c.id AND r.released_at IS NULL)"""
    )
    assert drift == []


def when(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


async def make_coupon(client: httpx.AsyncClient, code: str, **fields: Any) -> dict[str, Any]:
    body = {"code": code, "kind": "credits", "value": "5", **fields}
    response = await client.post("/admin/coupons", headers=OPERATOR, json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def redeem(
    client: httpx.AsyncClient, user: TestUser, code: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(REDEEM, headers={**user.headers, **(headers or {})}, json={"code": code})


async def credits_of(db: asyncpg.Connection, user: TestUser) -> Decimal:
    value: Decimal = await db.fetchval("SELECT credits FROM users WHERE id = $1", user.id)
    return value


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


class TestRedeem:
    async def test_credits_coupon_adds_its_credits_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "WELCOME5", value="5")
        user = await create_user(app, credits="1")

        response = await redeem(client, user, "WELCOME5")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "coupon_redemption"
        assert body["code"] == "WELCOME5"
        assert body["kind"] == "credits"
        assert body["use_number"] == 1
        assert Decimal(body["credits_granted"]) == Decimal("5")
        assert Decimal(body["balance"]) == Decimal("6")
        assert body["discount_cents"] is None

        again = await redeem(client, user, "WELCOME5")
        assert again.status_code == 409
        assert error_code(again) == "coupon_already_redeemed"
        assert await credits_of(db, user) == Decimal("6")
        rows = await db.fetch(
            "SELECT amount, type FROM credit_transactions WHERE user_id = $1 AND type = 'coupon'", user.id
        )
        assert [(row["amount"], row["type"]) for row in rows] == [(Decimal("5"), "coupon")]

    async def test_case_and_whitespace_variants_are_one_code(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        created = await make_coupon(client, "  save10 ")
        assert created["code"] == "SAVE10"
        taken = await client.post(
            "/admin/coupons", headers=OPERATOR, json={"code": "Save10", "kind": "credits", "value": "1"}
        )
        assert taken.status_code == 409
        assert error_code(taken) == "coupon_code_taken"

        user = await create_user(app)
        assert (await redeem(client, user, " save10 ")).status_code == 200
        second = await redeem(client, user, "SAVE10")
        assert second.status_code == 409
        assert error_code(second) == "coupon_already_redeemed"
        assert await credits_of(db, user) == Decimal("5")

    async def test_refusals_have_distinct_messages(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        owner = await create_user(app)
        await make_coupon(client, "EXPIRED", valid_from=when(days=-2), valid_until=when(days=-1))
        await make_coupon(client, "INACTIVE", is_active=False)
        await make_coupon(client, "LATER", valid_from=when(days=1))
        await make_coupon(client, "NOTYOURS", assigned_user_id=str(owner.id))
        await make_coupon(client, "TENOFF", kind="discount", discount_type="percent", value="10")
        user = await create_user(app)

        expected = {
            "EXPIRED": (400, "coupon_expired"),
            "INACTIVE": (400, "coupon_inactive"),
            "LATER": (400, "coupon_not_yet_valid"),
            "NOTYOURS": (400, "coupon_assigned_to_other_user"),
            "NOSUCHCODE": (400, "coupon_not_found"),
            "TENOFF": (400, "coupon_requires_checkout"),
            "not a code!": (400, "coupon_not_found"),
        }
        messages = set()
        for code, (status, name) in expected.items():
            response = await redeem(client, user, code)
            assert (response.status_code, error_code(response)) == (status, name), code
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["param"] == "code"
            messages.add(error["message"])
        assert len(messages) == len(expected) - 1  # the two unknown codes share their message
        assert await credits_of(db, user) == Decimal("0")
        assert await db.fetchval("SELECT sum(uses) FROM coupons") == 0

        # The user it is assigned to may use it.
        assert (await redeem(client, owner, "notyours")).status_code == 200

    async def test_per_user_limit(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "TWICE", value="2", max_uses_per_user=2)
        user, other = await create_user(app), await create_user(app)

        first, second = await redeem(client, user, "TWICE"), await redeem(client, user, "twice")
        assert [first.json()["use_number"], second.json()["use_number"]] == [1, 2]
        third = await redeem(client, user, "TWICE")
        assert third.status_code == 409
        assert error_code(third) == "coupon_already_redeemed"
        assert "2 times" in third.json()["error"]["message"]
        assert (await redeem(client, other, "TWICE")).status_code == 200
        assert await credits_of(db, user) == Decimal("4")
        assert await db.fetchval("SELECT uses FROM coupons WHERE code = 'TWICE'") == 3

    async def test_fully_used(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        await make_coupon(client, "ONLYONE", max_uses=1)
        first, second = await create_user(app), await create_user(app)
        assert (await redeem(client, first, "ONLYONE")).status_code == 200
        response = await redeem(client, second, "ONLYONE")
        assert response.status_code == 409
        assert error_code(response) == "coupon_exhausted"

    async def test_operator_key_cannot_redeem(self, client: httpx.AsyncClient) -> None:
        await make_coupon(client, "OPS")
        response = await client.post(REDEEM, headers=OPERATOR, json={"code": "OPS"})
        assert response.status_code == 403

    async def test_bad_body_is_a_400(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        response = await client.post(REDEEM, headers=user.headers, json={"code": "X", "credits": "100"})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "credits"


class TestConcurrency:
    async def test_single_use_coupon_by_one_user_twenty_times_at_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "RACE1", value="3", max_uses=1)
        user = await create_user(app)

        responses = await asyncio.gather(*(redeem(client, user, "race1") for _ in range(20)))

        statuses = Counter(r.status_code for r in responses)
        assert statuses == {200: 1, 409: 19}
        assert {error_code(r) for r in responses if r.status_code == 409} == {"coupon_already_redeemed"}
        assert await credits_of(db, user) == Decimal("3")
        assert await db.fetchval("SELECT uses FROM coupons WHERE code = 'RACE1'") == 1
        assert await db.fetchval("SELECT count(*) FROM coupon_redemptions") == 1

    async def test_per_user_coupon_without_total_limit_by_one_user_at_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "RACE2", value="3")
        user = await create_user(app)

        responses = await asyncio.gather(*(redeem(client, user, "RACE2") for _ in range(20)))

        assert Counter(r.status_code for r in responses) == {200: 1, 409: 19}
        assert await credits_of(db, user) == Decimal("3")
        assert await db.fetchval("SELECT uses FROM coupons WHERE code = 'RACE2'") == 1

    async def test_single_use_coupon_by_twenty_users_at_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "RACE3", value="7", max_uses=1)
        users = [await create_user(app) for _ in range(20)]

        responses = await asyncio.gather(*(redeem(client, user, "RACE3") for user in users))

        assert Counter(r.status_code for r in responses) == {200: 1, 409: 19}
        assert {error_code(r) for r in responses if r.status_code == 409} == {"coupon_exhausted"}
        winner = next(u for u, r in zip(users, responses, strict=True) if r.status_code == 200)
        balances = {u.id: await credits_of(db, u) for u in users}
        assert balances[winner.id] == Decimal("7")
        assert sum(balances.values()) == Decimal("7")
        assert await db.fetchval("SELECT uses FROM coupons WHERE code = 'RACE3'") == 1

    async def test_limited_coupon_by_many_users_at_once_stops_at_its_limit(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "FIVE", value="1", max_uses=5)
        users = [await create_user(app) for _ in range(20)]

        responses = await asyncio.gather(*(redeem(client, user, "FIVE") for user in users))

        assert Counter(r.status_code for r in responses) == {200: 5, 409: 15}
        assert await db.fetchval("SELECT sum(credits) FROM users") == Decimal("5")
        assert await db.fetchval("SELECT uses FROM coupons WHERE code = 'FIVE'") == 5


class TestIdempotency:
    async def test_retry_with_the_same_key_redeems_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "ONCE", value="4", max_uses_per_user=5)
        user = await create_user(app)
        key = {"Idempotency-Key": "redeem-1"}

        first = await redeem(client, user, "ONCE", key)
        retry = await redeem(client, user, " once", key)

        assert first.status_code == retry.status_code == 200
        assert retry.json() == first.json()
        assert await credits_of(db, user) == Decimal("4")
        other = await redeem(client, user, "OTHER", key)
        assert other.status_code == 409
        assert error_code(other) == "idempotency_key_reused"
        # A new key is a new redemption.
        assert (await redeem(client, user, "ONCE", {"Idempotency-Key": "redeem-2"})).status_code == 200
        assert await credits_of(db, user) == Decimal("8")

    async def test_concurrent_duplicates_redeem_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "DUP", value="2", max_uses_per_user=20)
        user = await create_user(app)

        responses = await asyncio.gather(
            *(redeem(client, user, "DUP", {"Idempotency-Key": "dup"}) for _ in range(10))
        )

        assert {r.status_code for r in responses} <= {200, 409}
        assert any(r.status_code == 200 for r in responses)
        assert await credits_of(db, user) == Decimal("2")


class TestAvailableAndHistory:
    async def test_available_lists_what_the_caller_may_use(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        user, other = await create_user(app), await create_user(app)
        await make_coupon(client, "PUBLIC", description="for everyone", valid_until=when(days=3))
        await make_coupon(client, "MINE", assigned_user_id=str(user.id))
        await make_coupon(client, "THEIRS", assigned_user_id=str(other.id))
        await make_coupon(client, "OLD", valid_from=when(days=-2), valid_until=when(days=-1))
        await make_coupon(client, "SOON", valid_from=when(days=1))
        await make_coupon(client, "OFF", is_active=False)
        await make_coupon(client, "GONE", max_uses=1)
        await make_coupon(client, "USED")
        await make_coupon(client, "DISC", kind="discount", discount_type="fixed", value="250")
        assert (await redeem(client, other, "GONE")).status_code == 200
        assert (await redeem(client, user, "USED")).status_code == 200

        response = await client.get("/coupons/available", headers=user.headers)

        assert response.status_code == 200
        data = response.json()["data"]
        assert sorted(c["code"] for c in data) == ["DISC", "MINE", "PUBLIC"]
        public = next(c for c in data if c["code"] == "PUBLIC")
        assert public["description"] == "for everyone"
        assert public["value"] == "5"
        assert public["valid_until"] is not None
        assert "uses" not in public and "assigned_user_id" not in public
        disc = next(c for c in data if c["code"] == "DISC")
        assert (disc["kind"], disc["discount_type"], disc["value"]) == ("discount", "fixed", "250")

    async def test_history_is_the_callers_own(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        await make_coupon(client, "FIRST", value="1")
        await make_coupon(client, "SECOND", value="2")
        user, other = await create_user(app), await create_user(app)
        await redeem(client, user, "FIRST")
        await redeem(client, user, "SECOND")
        await redeem(client, other, "FIRST")

        response = await client.get("/coupons/history", headers=user.headers)
        assert response.status_code == 200
        body = response.json()
        assert body["total"] == 2
        assert [r["code"] for r in body["data"]] == ["SECOND", "FIRST"]
        assert [Decimal(r["credits_granted"]) for r in body["data"]] == [Decimal("2"), Decimal("1")]
        page = (await client.get("/coupons/history?limit=1&offset=1", headers=user.headers)).json()
        assert [r["code"] for r in page["data"]] == ["FIRST"]
        assert page["total"] == 2
        empty = await create_user(app)
        assert (await client.get("/coupons/history", headers=empty.headers)).json()["total"] == 0


def random_ip() -> str:
    # Redis is shared by every test: fresh addresses keep one test's counts out of the next.
    return f"10.{random.randint(0, 255)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


class TestFailureThrottle:
    LIMIT = 3

    @pytest.fixture(params=["memory", "redis"])
    def settings_overrides(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        overrides: dict[str, Any] = {
            "coupon_failures_per_minute": self.LIMIT,
            # The test client connects from 127.0.0.1: as a trusted proxy, its X-Forwarded-For
            # names the client's address, so each request can come from an address of its own.
            "trusted_proxies": "127.0.0.1",
        }
        if request.param == "redis":
            overrides["redis_url"] = request.getfixturevalue("redis_url")
        return overrides

    @staticmethod
    def from_ip(ip: str) -> dict[str, str]:
        return {"X-Forwarded-For": ip}

    async def test_a_user_with_too_many_failures_is_throttled_even_for_a_valid_code(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "GOOD")
        user, bystander = await create_user(app), await create_user(app)
        for attempt in range(self.LIMIT):
            response = await redeem(client, user, f"GUESS{attempt}", self.from_ip(random_ip()))
            assert response.status_code == 400

        # Another address does not help the user.
        throttled = await redeem(client, user, "GOOD", self.from_ip(random_ip()))
        assert throttled.status_code == 429
        assert error_code(throttled) == "too_many_coupon_failures"
        assert 1 <= int(throttled.headers["Retry-After"]) <= 60
        assert await credits_of(db, user) == Decimal("0")
        assert await db.fetchval("SELECT uses FROM coupons WHERE code = 'GOOD'") == 0
        # Someone else is not affected.
        assert (await redeem(client, bystander, "GOOD", self.from_ip(random_ip()))).status_code == 200
        state = app_state(app)
        if state.redis is not None:
            assert await state.redis.keys(f"gatewayz:rl:coupon:u:{user.id}:*")

    async def test_an_address_with_too_many_failures_is_throttled_for_every_user(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await make_coupon(client, "GOOD")
        guessers = [await create_user(app) for _ in range(self.LIMIT)]
        victim = await create_user(app)
        ip = random_ip()
        for guesser in guessers:  # one failure per user: only the address reaches the limit
            assert (await redeem(client, guesser, "NOPE", self.from_ip(ip))).status_code == 400

        throttled = await redeem(client, victim, "GOOD", self.from_ip(ip))
        assert throttled.status_code == 429
        assert "Retry-After" in throttled.headers
        assert (await redeem(client, victim, "GOOD", self.from_ip(random_ip()))).status_code == 200
        assert await credits_of(db, victim) == Decimal("5")

    async def test_successes_do_not_count(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        await make_coupon(client, "MANY", value="1", max_uses_per_user=10)
        user = await create_user(app)
        ip = random_ip()
        for _ in range(self.LIMIT + 2):
            assert (await redeem(client, user, "MANY", self.from_ip(ip))).status_code == 200


class TestAdmin:
    async def test_create_read_update_deactivate(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        target = await create_user(app)
        response = await client.post(
            "/admin/coupons",
            headers=OPERATOR,
            json={
                "code": "launch-2026",
                "kind": "discount",
                "discount_type": "percent",
                "value": "15",
                "max_uses": 100,
                "max_uses_per_user": 2,
                "valid_until": when(days=30),
                "assigned_user_id": str(target.id),
                "description": "launch week",
            },
        )
        assert response.status_code == 201, response.text
        coupon = response.json()
        assert coupon["code"] == "LAUNCH-2026"
        assert (coupon["kind"], coupon["discount_type"], coupon["value"]) == ("discount", "percent", "15")
        assert (coupon["max_uses"], coupon["max_uses_per_user"], coupon["uses"]) == (100, 2, 0)
        assert coupon["is_active"] is True
        assert coupon["created_by"] == "operator"
        coupon_id = coupon["id"]

        got = await client.get(f"/admin/coupons/{coupon_id}", headers=OPERATOR)
        assert got.status_code == 200
        assert got.json() == coupon

        changed = await client.put(
            f"/admin/coupons/{coupon_id}",
            headers=OPERATOR,
            json={"value": "20", "max_uses": None, "assigned_user_id": None, "code": "launch"},
        )
        assert changed.status_code == 200, changed.text
        after = changed.json()
        assert (after["value"], after["max_uses"], after["assigned_user_id"], after["code"]) == (
            "20",
            None,
            None,
            "LAUNCH",
        )
        assert after["description"] == "launch week"

        deleted = await client.delete(f"/admin/coupons/{coupon_id}", headers=OPERATOR)
        assert deleted.status_code == 200
        assert deleted.json()["is_active"] is False

        actions = await db.fetch(
            """SELECT action, actor_type, subject_type, subject_id, before, after FROM audit_logs
                WHERE action LIKE 'coupon.%' ORDER BY id"""
        )
        assert [row["action"] for row in actions] == ["coupon.create", "coupon.update", "coupon.deactivate"]
        assert {row["subject_id"] for row in actions} == {str(coupon_id)}
        assert {row["actor_type"] for row in actions} == {"operator"}
        assert actions[1]["before"]["value"] == "15.0000000000"
        assert actions[1]["after"]["value"] == "20.0000000000"
        assert actions[2]["after"]["is_active"] is False

    async def test_deactivated_coupon_is_refused(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        coupon = await make_coupon(client, "STOPME")
        assert (await client.delete(f"/admin/coupons/{coupon['id']}", headers=OPERATOR)).status_code == 200
        user = await create_user(app)
        response = await redeem(client, user, "STOPME")
        assert response.status_code == 400
        assert error_code(response) == "coupon_inactive"

    async def test_list_is_paged_newest_first(self, client: httpx.AsyncClient) -> None:
        for code in ("A1", "A2", "A3"):
            await make_coupon(client, code)
        page = (await client.get("/admin/coupons?limit=2", headers=OPERATOR)).json()
        assert page["total"] == 3
        assert [c["code"] for c in page["data"]] == ["A3", "A2"]
        rest = (await client.get("/admin/coupons?limit=2&offset=2", headers=OPERATOR)).json()
        assert [c["code"] for c in rest["data"]] == ["A1"]

    async def test_redemptions_of_a_coupon(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        coupon = await make_coupon(client, "LISTED", value="1")
        users = [await create_user(app) for _ in range(3)]
        for user in users:
            assert (await redeem(client, user, "LISTED")).status_code == 200

        response = await client.get(f"/admin/coupons/{coupon['id']}/redemptions?limit=2", headers=OPERATOR)
        assert response.status_code == 200
        body = response.json()
        assert body["total"] == 3
        assert [r["user_id"] for r in body["data"]] == [str(users[2].id), str(users[1].id)]
        assert (await client.get("/admin/coupons/999999/redemptions", headers=OPERATOR)).status_code == 404

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"code": "D1", "kind": "discount", "value": "10"}, "discount_type"),
            ({"code": "D2", "kind": "discount", "discount_type": "percent", "value": "101"}, "value"),
            ({"code": "D3", "kind": "discount", "discount_type": "fixed", "value": "10.5"}, "value"),
            ({"code": "C1", "kind": "credits", "discount_type": "fixed", "value": "10"}, "discount_type"),
            ({"code": "C2", "kind": "credits", "value": "0"}, "value"),
            ({"code": "C3", "kind": "credits", "value": "-1"}, "value"),
            ({"code": "bad code", "kind": "credits", "value": "1"}, "code"),
            ({"code": "", "kind": "credits", "value": "1"}, "code"),
            ({"code": "C4", "kind": "gift", "value": "1"}, "kind"),
            ({"code": "C5", "kind": "credits", "value": "1", "max_uses": 0}, "max_uses"),
            ({"code": "C6", "kind": "credits", "value": "1", "uses": 5}, "uses"),
            (
                {
                    "code": "C7",
                    "kind": "credits",
                    "value": "1",
                    "valid_from": "2030-01-02T00:00:00Z",
                    "valid_until": "2030-01-01T00:00:00Z",
                },
                "valid_until",
            ),
            (
                {"code": "C9", "kind": "credits", "value": "1", "valid_until": "2020-01-01T00:00:00Z"},
                "valid_until",
            ),
            (
                {"code": "C8", "kind": "credits", "value": "1", "assigned_user_id": "someone"},
                "assigned_user_id",
            ),
        ],
    )
    async def test_invalid_coupons_are_refused(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, body: dict[str, Any], param: str | None
    ) -> None:
        response = await client.post("/admin/coupons", headers=OPERATOR, json=body)
        assert response.status_code == 400, response.text
        if param is not None:
            assert response.json()["error"]["param"] == param
        assert await db.fetchval("SELECT count(*) FROM coupons") == 0

    async def test_assigned_to_unknown_user_is_refused(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/admin/coupons",
            headers=OPERATOR,
            json={
                "code": "GHOST",
                "kind": "credits",
                "value": "1",
                "assigned_user_id": "00000000-0000-0000-0000-000000000001",
            },
        )
        assert response.status_code == 400
        assert error_code(response) == "user_not_found"

    async def test_invalid_updates_are_refused(self, client: httpx.AsyncClient) -> None:
        await make_coupon(client, "TAKEN")
        coupon = await make_coupon(client, "PCT", kind="discount", discount_type="percent", value="50")
        path = f"/admin/coupons/{coupon['id']}"
        cases = [
            ({"kind": "credits"}, 400, "kind"),
            ({"value": "150"}, 400, "value"),
            ({"discount_type": None}, 400, "discount_type"),
            ({"valid_from": None}, 400, None),
            ({"code": "taken"}, 409, "code"),
        ]
        for body, status, param in cases:
            response = await client.put(path, headers=OPERATOR, json=body)
            assert response.status_code == status, (body, response.text)
            if param is not None:
                assert response.json()["error"]["param"] == param, body
        assert (await client.put("/admin/coupons/424242", headers=OPERATOR, json={})).status_code == 404
        assert (await client.get("/admin/coupons/nope", headers=OPERATOR)).status_code == 404
        unchanged = (await client.get(path, headers=OPERATOR)).json()
        assert (unchanged["code"], unchanged["value"], unchanged["discount_type"]) == ("PCT", "50", "percent")

    async def test_permissions(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        coupon = await make_coupon(client, "PERM")
        plain = await create_user(app)
        assert (await client.get("/admin/coupons", headers=plain.headers)).status_code == 403
        created = await client.post(
            "/admin/roles",
            headers=OPERATOR,
            json={"name": "coupon-reader", "description": "reads coupons", "permissions": ["coupons.read"]},
        )
        assert created.status_code == 201, created.text
        reader = await create_user(app)
        assigned = await client.post(
            "/admin/roles/assign", headers=OPERATOR, json={"user_id": str(reader.id), "role": "coupon-reader"}
        )
        assert assigned.status_code == 200, assigned.text

        assert (await client.get("/admin/coupons", headers=reader.headers)).status_code == 200
        assert (await client.get(f"/admin/coupons/{coupon['id']}", headers=reader.headers)).status_code == 200
        for method, path, body in [
            ("POST", "/admin/coupons", {"code": "NEW", "kind": "credits", "value": "1"}),
            ("PUT", f"/admin/coupons/{coupon['id']}", {"value": "100"}),
            ("DELETE", f"/admin/coupons/{coupon['id']}", None),
        ]:
            response = await client.request(method, path, headers=reader.headers, json=body)
            assert response.status_code == 403, (method, path)
            assert response.json()["error"]["code"] == "permission_denied"
        for method, path in [("GET", "/admin/coupons"), ("POST", "/admin/coupons")]:
            assert (await client.request(method, path)).status_code == 401
        still = (await client.get(f"/admin/coupons/{coupon['id']}", headers=OPERATOR)).json()
        assert (still["value"], still["is_active"]) == ("5", True)
