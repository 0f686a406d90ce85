"""Stripe top-ups through the API: packages, checkout creation against the fake Stripe (the real
`stripe` SDK over HTTP), the owner's reconciliation, payments lists, and admin refunds.

After every test, for every user, the balance is the sum of the ledger and no grant was applied twice.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from src.config import Settings
from src.services import payments as payments_service
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import TestUser, create_user
from tests.fakes import stripe_api
from tests.fakes.stripe_api import FakeStripe, post_event
from tests.money import assert_money_invariants

stripe_fake_server = stripe_api.stripe_fake_server
stripe_fake = stripe_api.stripe_fake

ORIGIN = "https://app.example.com"
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
PACKAGES = [
    {"id": "starter", "name": "Starter", "amount_cents": 500, "credits": "5"},
    {"id": "bulk", "name": "Bulk", "amount_cents": 9_000, "credits": "100"},
]


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest, stripe_fake_server: FakeStripe) -> dict[str, Any]:
    """The fake Stripe, ORIGIN as the allowed checkout origin; indirect parametrisation adds more."""
    extra: dict[str, Any] = getattr(request, "param", {})
    return stripe_fake_server.settings_overrides(
        checkout_allowed_origins=f"{ORIGIN}, http://localhost:3000/", **extra
    )


def with_settings(**overrides: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("settings_overrides", [overrides], indirect=True, ids=[""])


@pytest.fixture(autouse=True)
async def _money_invariants(db: asyncpg.Connection, stripe_fake: FakeStripe) -> AsyncIterator[None]:
    yield
    await assert_money_invariants(db)


def body(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "package_id": "credits_10",
        "success_url": f"{ORIGIN}/ok",
        "cancel_url": f"{ORIGIN}/no",
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


async def start(client: httpx.AsyncClient, user: TestUser, **changes: Any) -> httpx.Response:
    return await client.post("/api/stripe/checkout-session", json=body(**changes), headers=user.headers)


async def balance(db: asyncpg.Connection, user_id: UUID) -> Decimal:
    value: Decimal = await db.fetchval("SELECT credits FROM users WHERE id = $1", user_id)
    return value


async def deliver_payment(client: httpx.AsyncClient, fake: FakeStripe, session_id: str) -> dict[str, Any]:
    """The customer pays and Stripe's events arrive; returns the charge."""
    before = len(fake.events)
    fake.pay_session(session_id)
    events = fake.events[before:]
    for event in events:
        assert (await post_event(client, event)).status_code == 200
    charge: dict[str, Any] = next(e for e in events if e["type"] == "charge.succeeded")["data"]["object"]
    return charge


class TestCreditPackages:
    async def test_the_built_in_packages(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/api/stripe/credit-packages")
        assert response.status_code == 200
        listed = response.json()
        assert [(p["id"], p["amount_cents"], p["credits"]) for p in listed["data"]] == [
            ("credits_10", 1_000, "10"),
            ("credits_25", 2_500, "25"),
            ("credits_50", 5_000, "50"),
            ("credits_100", 10_000, "100"),
        ]
        assert (listed["currency"], listed["min_amount_cents"], listed["max_amount_cents"]) == (
            "usd",
            500,
            1_000_000,
        )

    @with_settings(credit_packages=json.dumps(PACKAGES), stripe_currency="EUR")
    async def test_configured_packages_are_what_is_sold(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        listed = (await client.get("/api/stripe/credit-packages")).json()
        assert [(p["id"], p["amount_cents"], p["credits"], p["currency"]) for p in listed["data"]] == [
            ("starter", 500, "5", "eur"),
            ("bulk", 9_000, "100", "eur"),
        ]
        user = await create_user(app)
        assert (await start(client, user, package_id="credits_10")).status_code == 400
        created = await start(client, user, package_id="bulk")
        assert created.status_code == 200, created.text
        sent = stripe_fake.requests_to("POST", "/v1/checkout/sessions")[-1].params
        assert sent["line_items"][0]["price_data"] == {
            "currency": "eur",
            "unit_amount": "9000",
            "product_data": {"name": "Gatewayz Bulk"},
        }
        assert Decimal(created.json()["payment"]["credits"]) == 100

    def test_a_malformed_package_setting_is_refused_loudly(self, settings: Settings) -> None:
        for raw in (
            "{",
            "[]",
            '[{"id": "a", "amount_cents": 10, "credits": 1}]',
            '[{"id": "a", "amount_cents": 500}]',
        ):
            with pytest.raises(ValueError, match="CREDIT_PACKAGES"):
                payments_service.credit_packages(settings.model_copy(update={"credit_packages": raw}))


class TestCreateCheckout:
    async def test_the_server_decides_price_credits_and_metadata(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        response = await start(client, user, package_id="credits_25")

        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["id"].startswith("cs_test_")
        assert answer["url"] == stripe_fake.get(answer["id"])["url"]
        assert answer["granted"] is False
        assert answer["payment"]["status"] == "pending"
        assert (answer["payment"]["amount_paid_cents"], answer["payment"]["credits"]) == (
            2_500,
            "25.0000000000",
        )
        row = await db.fetchrow(
            "SELECT user_id, kind, package_id, amount_cents, credits, status, stripe_customer_id"
            " FROM payments WHERE stripe_checkout_session_id = $1",
            answer["id"],
        )
        assert (row["user_id"], row["kind"], row["package_id"], row["amount_cents"], row["credits"]) == (
            user.id,
            "topup",
            "credits_25",
            2_500,
            Decimal(25),
        )
        [sent] = stripe_fake.requests_to("POST", "/v1/checkout/sessions")
        metadata = {"kind": "topup", "user_id": str(user.id), "payment_id": answer["payment_id"]}
        assert sent.params["mode"] == "payment"
        assert sent.params["metadata"] == metadata
        assert sent.params["payment_intent_data"] == {"metadata": metadata}
        assert sent.params["invoice_creation"]["enabled"] == "true"
        assert sent.params["customer"] == row["stripe_customer_id"]
        assert sent.params["line_items"] == [
            {
                "quantity": "1",
                "price_data": {
                    "currency": "usd",
                    "unit_amount": "2500",
                    "product_data": {"name": "Gatewayz 25 credits"},
                },
            }
        ]
        assert sent.idempotency_key == f"gatewayz-checkout:{answer['payment_id']}"
        assert await balance(db, user.id) == 0

    async def test_a_custom_amount_buys_one_credit_per_dollar_within_the_bounds(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        created = await start(client, user, package_id=None, amount_cents=1_234)
        assert created.status_code == 200, created.text
        assert created.json()["payment"]["credits"] == "12.3400000000"
        for amount in (499, 1_000_001):
            refused = await start(client, user, package_id=None, amount_cents=amount)
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "amount_out_of_range"
        for changes in ({"package_id": None}, {"amount_cents": 1_000}, {"package_id": "nope"}):
            assert (await start(client, user, **changes)).status_code == 400
        for wrong in ("1000", 10.5, True):
            assert (await start(client, user, package_id=None, amount_cents=wrong)).status_code == 400
        assert len(stripe_fake.requests_to("POST", "/v1/checkout/sessions")) == 1

    @pytest.mark.parametrize(
        "extra",
        [
            {"credits": 10_000},
            {"credit_value": 10_000},
            {"metadata": {"user_id": "someone-else", "payment_id": "x"}},
            {"amount": 1},
            {"user_id": str(uuid.uuid4())},
        ],
    )
    async def test_the_client_cannot_choose_credits_or_metadata(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        stripe_fake: FakeStripe,
        extra: dict[str, Any],
    ) -> None:
        user = await create_user(app)
        response = await start(client, user, **extra)

        assert response.status_code == 400
        assert response.json()["error"]["param"] == next(iter(extra))
        assert stripe_fake.requests == []
        assert await db.fetchval("SELECT count(*) FROM payments") == 0

    @pytest.mark.parametrize(
        "url",
        [
            "https://evil.example.com/ok",
            "https://app.example.com.evil.com/ok",
            "http://app.example.com/ok",
            "https://app.example.com:8443/ok",
            "https://app.example.com@evil.com/ok",
            "https://evil.com\\@app.example.com/ok",
            "javascript:alert(1)//app.example.com",
            "//app.example.com/ok",
            "/ok",
            "https://app.example.com /ok",
        ],
    )
    async def test_a_return_url_on_another_origin_is_refused(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        stripe_fake: FakeStripe,
        url: str,
    ) -> None:
        user = await create_user(app)
        for field in ("success_url", "cancel_url"):
            response = await start(client, user, **{field: url})
            assert response.status_code == 400, (field, response.text)
            assert response.json()["error"] | {"message": None} == {
                "message": None,
                "type": "invalid_request_error",
                "param": field,
                "code": "url_not_allowed",
            }
        assert stripe_fake.requests == []
        assert await db.fetchval("SELECT count(*) FROM payments") == 0

    async def test_allowed_origins_match_with_default_ports_and_any_case(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        for url in (
            "https://APP.example.com:443/ok?session_id={CHECKOUT_SESSION_ID}",
            "http://localhost:3000/billing",
        ):
            response = await start(client, user, success_url=url)
            assert response.status_code == 200, (url, response.text)
        sent = stripe_fake.requests_to("POST", "/v1/checkout/sessions")[0].params
        assert sent["success_url"] == "https://APP.example.com:443/ok?session_id={CHECKOUT_SESSION_ID}"

    async def test_an_idempotency_key_replay_returns_the_same_session(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        headers = {**user.headers, "Idempotency-Key": "topup-1"}
        first = await client.post("/api/stripe/checkout-session", json=body(), headers=headers)
        again = await asyncio.gather(
            *(client.post("/api/stripe/checkout-session", json=body(), headers=headers) for _ in range(3))
        )

        assert first.status_code == 200
        for response in again:
            assert response.status_code in (200, 409)
            if response.status_code == 200:
                assert response.json() == first.json()
        assert len(stripe_fake.requests_to("POST", "/v1/checkout/sessions")) == 1
        assert await db.fetchval("SELECT count(*) FROM payments") == 1

        other = await client.post(
            "/api/stripe/checkout-session", json=body(package_id="credits_50"), headers=headers
        )
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        # The same key from another user is that user's own.
        someone = await create_user(app)
        theirs = await client.post(
            "/api/stripe/checkout-session",
            json=body(),
            headers={**someone.headers, "Idempotency-Key": "topup-1"},
        )
        assert theirs.status_code == 200 and theirs.json()["id"] != first.json()["id"]

    async def test_one_customer_per_user(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        responses = await asyncio.gather(*(start(client, user) for _ in range(3)))
        assert [r.status_code for r in responses] == [200] * 3
        customers = {r.params["customer"] for r in stripe_fake.requests_to("POST", "/v1/checkout/sessions")}
        assert len(customers) == 1
        assert len(stripe_fake.objects_of("customer")) == 1
        assert stripe_fake.objects_of("customer")[0]["email"] == user.email
        assert await db.fetchval("SELECT customer_id FROM stripe_customers WHERE user_id = $1", user.id) == (
            customers.pop()
        )

    async def test_a_discount_lowers_the_price_not_the_credits(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        created = await client.post(
            "/admin/coupons",
            headers=ADMIN,
            json={"code": "SAVE3", "kind": "discount", "discount_type": "fixed", "value": "300"},
        )
        assert created.status_code == 201, created.text
        user = await create_user(app)

        response = await start(client, user, coupon_code=" save3 ")

        assert response.status_code == 200, response.text
        payment = response.json()["payment"]
        assert (payment["amount_cents"], payment["discount_cents"], payment["amount_paid_cents"]) == (
            1_000,
            300,
            700,
        )
        assert (payment["coupon_code"], payment["credits"]) == ("SAVE3", "10.0000000000")
        sent = stripe_fake.requests_to("POST", "/v1/checkout/sessions")[0].params
        assert sent["line_items"][0]["price_data"]["unit_amount"] == "700"
        await deliver_payment(client, stripe_fake, response.json()["id"])
        assert await balance(db, user.id) == 10
        # A used-up code refuses the next checkout before Stripe is asked.
        again = await start(client, user, coupon_code="SAVE3")
        assert again.status_code == 409
        assert len(stripe_fake.requests_to("POST", "/v1/checkout/sessions")) == 1

    async def test_an_unusable_coupon_creates_nothing(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        response = await start(client, user, coupon_code="NO-SUCH-CODE")
        assert response.status_code == 400
        assert await db.fetchval("SELECT count(*) FROM payments") == 0
        assert stripe_fake.requests_to("POST", "/v1/checkout/sessions") == []

    async def test_stripe_refusing_the_checkout_fails_it_and_gives_the_coupon_back(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        created = await client.post(
            "/admin/coupons",
            headers=ADMIN,
            json={
                "code": "ONCE",
                "kind": "discount",
                "discount_type": "percent",
                "value": "10",
                "max_uses": 1,
            },
        )
        coupon_id = created.json()["id"]
        user = await create_user(app)
        stripe_fake.fail(
            status=400, type="invalid_request_error", message="Nope.", path="/v1/checkout/sessions"
        )

        refused = await start(client, user, coupon_code="ONCE")

        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == "Nope."
        assert await db.fetchval("SELECT status FROM payments") == "failed"
        assert await db.fetchval("SELECT uses FROM coupons WHERE id = $1", coupon_id) == 0
        assert (await start(client, user, coupon_code="ONCE")).status_code == 200

    async def test_stripe_down_answers_502(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        stripe_fake.fail(status=500, times=10, path="/v1/checkout/sessions")

        response = await start(client, user)

        assert response.status_code == 502
        assert response.json()["error"]["code"] == "stripe_error"
        # The SDK retried with the same Idempotency-Key.
        keys = {r.idempotency_key for r in stripe_fake.requests_to("POST", "/v1/checkout/sessions")}
        assert len(keys) == 1
        assert await db.fetchval("SELECT status FROM payments") == "failed"

    @with_settings(stripe_secret_key=None)
    async def test_without_a_stripe_key_checkout_is_503(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        user = await create_user(app)
        response = await start(client, user)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "payments_not_configured"

    async def test_only_users_start_checkouts(self, client: httpx.AsyncClient) -> None:
        assert (await client.post("/api/stripe/checkout-session", json=body())).status_code == 401
        operator = await client.post("/api/stripe/checkout-session", json=body(), headers=ADMIN)
        assert operator.status_code == 403


class TestReconcile:
    async def test_a_paid_checkout_is_granted_on_the_owners_read_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session = (await start(client, user)).json()
        before = len(stripe_fake.events)
        stripe_fake.pay_session(session["id"])  # no webhook has arrived yet
        events = stripe_fake.events[before:]

        reads = await asyncio.gather(
            *(
                client.get(f"/api/stripe/checkout-session/{session['id']}", headers=user.headers)
                for _ in range(3)
            )
        )

        for read in reads:
            assert read.status_code == 200, read.text
        assert any(read.json()["granted"] for read in reads)
        assert await balance(db, user.id) == 10
        final = (
            await client.get(f"/api/stripe/checkout-session/{session['id']}", headers=user.headers)
        ).json()
        assert final["granted"] is True and final["url"] is None and final["payment"]["status"] == "paid"
        for event in events:  # the webhook, late: nothing more
            assert (await post_event(client, event)).status_code == 200
        assert await balance(db, user.id) == 10
        actors = await db.fetch("SELECT actor FROM credit_transactions WHERE user_id = $1", user.id)
        assert [row["actor"] for row in actors] == ["stripe:reconcile"]

    async def test_an_open_checkout_is_read_as_it_is(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session = (await start(client, user)).json()
        read = await client.get(f"/api/stripe/checkout-session/{session['id']}", headers=user.headers)
        assert read.json() == session
        assert stripe_fake.requests_to("GET", f"/v1/checkout/sessions/{session['id']}")

    async def test_an_expired_checkout_is_closed_on_read(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session = (await start(client, user)).json()
        stripe_fake.expire_session(session["id"])
        read = (
            await client.get(f"/api/stripe/checkout-session/{session['id']}", headers=user.headers)
        ).json()
        assert (read["payment"]["status"], read["url"]) == ("expired", None)

    async def test_someone_elses_or_unknown_checkout_is_404(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        owner, other = await create_user(app), await create_user(app)
        session = (await start(client, owner)).json()
        stripe_fake.pay_session(session["id"])
        for path in (
            f"/api/stripe/checkout-session/{session['id']}",
            "/api/stripe/checkout-session/cs_test_nope",
        ):
            response = await client.get(path, headers=other.headers)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "checkout_session_not_found"
        assert stripe_fake.requests_to("GET", "/v1/checkout/sessions") == []


class TestPayments:
    async def test_users_see_only_their_own_payments(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        owner, other = await create_user(app), await create_user(app)
        first = (await start(client, owner)).json()
        second = (await start(client, owner, package_id="credits_50")).json()
        await start(client, other)

        listed = await client.get("/api/stripe/payments", headers=owner.headers)
        assert listed.status_code == 200
        assert [p["id"] for p in listed.json()["data"]] == [second["payment_id"], first["payment_id"]]
        assert listed.json()["total"] == 2
        page = (await client.get("/api/stripe/payments?limit=1&offset=1", headers=owner.headers)).json()
        assert [p["id"] for p in page["data"]] == [first["payment_id"]]

        mine = await client.get(f"/api/stripe/payments/{first['payment_id']}", headers=owner.headers)
        assert mine.status_code == 200 and mine.json() == first["payment"]
        for path in (first["payment_id"], str(uuid.uuid4()), "not-a-uuid"):
            response = await client.get(f"/api/stripe/payments/{path}", headers=other.headers)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "payment_not_found"


class TestAdmin:
    async def test_admins_list_and_read_payments(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        buyer, other = await create_user(app), await create_user(app)
        session = (await start(client, buyer)).json()
        await deliver_payment(client, stripe_fake, session["id"])
        await start(client, other)

        everything = (await client.get("/admin/payments", headers=ADMIN)).json()
        assert everything["total"] == 2
        paid = (await client.get("/admin/payments?status=paid", headers=ADMIN)).json()
        assert [p["user_id"] for p in paid["data"]] == [str(buyer.id)]
        assert paid["data"][0]["stripe_charge_id"].startswith("ch_")
        theirs = (await client.get(f"/admin/payments?user_id={other.id}", headers=ADMIN)).json()
        assert [p["status"] for p in theirs["data"]] == ["pending"]
        one = await client.get(f"/admin/payments/{session['payment_id']}", headers=ADMIN)
        assert one.json()["granted_at"] is not None
        for path in ("/admin/payments", f"/admin/payments/{session['payment_id']}"):
            assert (await client.get(path, headers=buyer.headers)).status_code == 403

    async def test_a_refund_goes_through_stripe_and_claws_back_once_with_the_webhook(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session = (await start(client, user, package_id=None, amount_cents=5_000)).json()
        charge = await deliver_payment(client, stripe_fake, session["id"])
        url = f"/admin/payments/{session['payment_id']}/refund"
        assert (await client.post(url, json={"amount_cents": 1_000}, headers=user.headers)).status_code == 403

        before = len(stripe_fake.events)
        refunded = await client.post(
            url, json={"amount_cents": 1_000, "reason": "requested_by_customer"}, headers=ADMIN
        )

        assert refunded.status_code == 200, refunded.text
        answer = refunded.json()
        assert (answer["amount_cents"], answer["status"]) == (1_000, "succeeded")
        assert (answer["payment"]["status"], answer["payment"]["refunded_cents"]) == (
            "partially_refunded",
            1_000,
        )
        [sent] = stripe_fake.requests_to("POST", "/v1/refunds")
        assert (sent.params["charge"], sent.params["amount"], sent.params["reason"]) == (
            charge["id"],
            "1000",
            "requested_by_customer",
        )
        assert await balance(db, user.id) == 40
        for event in stripe_fake.events[before:]:  # Stripe's own report of the same refund
            assert (await post_event(client, event)).status_code == 200
        assert await balance(db, user.id) == 40
        audit = await db.fetchrow(
            "SELECT actor_type, subject_id FROM audit_logs WHERE action = 'payment.refund'"
        )
        assert (audit["actor_type"], audit["subject_id"]) == ("operator", session["payment_id"])

        rest = await client.post(url, json={}, headers=ADMIN)
        assert rest.status_code == 200
        assert rest.json()["amount_cents"] == 4_000 and rest.json()["payment"]["status"] == "refunded"
        assert await balance(db, user.id) == 0
        again = await client.post(url, json={}, headers=ADMIN)
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "payment_already_refunded"
        rows = await db.fetch(
            "SELECT amount FROM credit_transactions WHERE user_id = $1 AND type = 'refund' ORDER BY id",
            user.id,
        )
        assert [row["amount"] for row in rows] == [Decimal(-10), Decimal(-40)]

    async def test_refund_requests_that_cannot_be_made(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session = (await start(client, user)).json()
        url = f"/admin/payments/{session['payment_id']}/refund"
        unpaid = await client.post(url, json={}, headers=ADMIN)
        assert unpaid.status_code == 409 and unpaid.json()["error"]["code"] == "payment_not_refundable"
        await deliver_payment(client, stripe_fake, session["id"])
        too_much = await client.post(url, json={"amount_cents": 1_001}, headers=ADMIN)
        assert too_much.status_code == 400 and too_much.json()["error"]["param"] == "amount_cents"
        assert (await client.post(url, json={"credits": 5}, headers=ADMIN)).status_code == 400
        missing = await client.post(f"/admin/payments/{uuid.uuid4()}/refund", json={}, headers=ADMIN)
        assert missing.status_code == 404
        assert stripe_fake.requests_to("POST", "/v1/refunds") == []

    async def test_a_refund_retried_with_its_idempotency_key_refunds_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session = (await start(client, user)).json()
        await deliver_payment(client, stripe_fake, session["id"])
        url = f"/admin/payments/{session['payment_id']}/refund"
        headers = {**ADMIN, "Idempotency-Key": "refund-1"}

        first = await client.post(url, json={"amount_cents": 500}, headers=headers)
        retry = await client.post(url, json={"amount_cents": 500}, headers=headers)

        assert first.status_code == retry.status_code == 200
        assert retry.json() == first.json()
        assert len(stripe_fake.objects_of("refund")) == 1
        assert await balance(db, user.id) == 5
