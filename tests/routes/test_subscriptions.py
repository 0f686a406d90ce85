"""Subscriptions over HTTP: checkout in subscription mode, the webhook events that drive the plan and
the allowance, and plan changes and cancellations through Stripe.

Stripe is the fake of tests/fakes/stripe_api.py, called by the real SDK; its events are signed by the
fake's helper and verified by the real `stripe` library in the webhook route. After every test, for
every user, balance = sum of the ledger and no grant is applied twice.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from src.services import grants as grants_service
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import TestUser, app_state, create_user
from tests.fakes import stripe_api
from tests.fakes.stripe_api import FakeStripe, post_event
from tests.money import assert_money_invariants

OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
ORIGIN = "https://app.example.com"
CHECKOUT = "/api/stripe/subscription-checkout"
SUBSCRIPTION = "/api/stripe/subscription"

# The fake Stripe's fixtures (a session-wide server, reset around each test).
stripe_fake_server = stripe_api.stripe_fake_server
stripe_fake = stripe_api.stripe_fake


@pytest.fixture
def settings_overrides(stripe_fake_server: FakeStripe) -> dict[str, Any]:
    return stripe_fake_server.settings_overrides(checkout_allowed_origins=ORIGIN)


@pytest.fixture(autouse=True)
async def _money_invariants(db: asyncpg.Connection) -> AsyncIterator[None]:
    yield
    await assert_money_invariants(db)


# -- helpers ---------------------------------------------------------------------------------


class Events:
    """Delivers the fake's events to the webhook in Stripe's order, each once, answered 2xx."""

    def __init__(self, client: httpx.AsyncClient, fake: FakeStripe) -> None:
        self.client = client
        self.fake = fake
        self.sent = 0

    async def deliver(self) -> list[dict[str, Any]]:
        events = self.fake.events[self.sent :]
        for event in events:
            response = await post_event(self.client, event)
            assert response.status_code == 200, (event["type"], response.text)
        self.sent += len(events)
        return events


async def make_plan(
    client: httpx.AsyncClient,
    fake: FakeStripe,
    *,
    credits: str = "100",
    price_cents: int = 2000,
    rpm_limit: int | None = None,
) -> dict[str, Any]:
    price = fake.add_price(unit_amount=price_cents)
    body = {
        "name": f"plan-{uuid4().hex[:8]}",
        "price_cents": price_cents,
        "credits_included": credits,
        "stripe_price_id": price["id"],
        "rpm_limit": rpm_limit,
    }
    response = await client.post("/admin/plans", json=body, headers=OPERATOR)
    assert response.status_code == 201, response.text
    plan: dict[str, Any] = response.json()
    return plan


def checkout_body(plan: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "plan_id": plan["id"],
        "success_url": f"{ORIGIN}/billing/done",
        "cancel_url": f"{ORIGIN}/billing",
        **extra,
    }


async def subscribe(
    client: httpx.AsyncClient, fake: FakeStripe, events: Events, user: TestUser, plan: dict[str, Any]
) -> dict[str, Any]:
    """Check out, pay, deliver Stripe's events; the subscription as Stripe shows it."""
    response = await client.post(CHECKOUT, json=checkout_body(plan), headers=user.headers)
    assert response.status_code == 200, response.text
    session = fake.pay_session(response.json()["id"])
    await events.deliver()
    return fake.get(session["subscription"])


def only(events: list[dict[str, Any]], type: str) -> dict[str, Any]:
    found = [event for event in events if event["type"] == type]
    assert len(found) == 1, [event["type"] for event in events]
    return found[0]


def event_at(fake: FakeStripe, type: str, obj: dict[str, Any], created: int) -> dict[str, Any]:
    event = fake.make_event(type, obj)
    event["created"] = created
    return event


async def grants_of(db: asyncpg.Connection, user: TestUser) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        """SELECT source, reference, amount, remaining, expires_at, expired_at FROM credit_grants
            WHERE user_id = $1 ORDER BY id""",
        user.id,
    )
    return rows


async def user_plan_row(db: asyncpg.Connection, subscription_id: str) -> asyncpg.Record:
    row = await db.fetchrow(
        """SELECT user_id, plan_id, status, auto_renew, current_period_start, current_period_end
            FROM user_plans WHERE stripe_subscription_id = $1""",
        subscription_id,
    )
    assert row is not None
    return row


async def my_plan(client: httpx.AsyncClient, user: TestUser) -> dict[str, Any]:
    response = await client.get("/user/plan", headers=user.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def events(client: httpx.AsyncClient, stripe_fake: FakeStripe) -> Events:
    return Events(client, stripe_fake)


# -- checkout --------------------------------------------------------------------------------


class TestCheckout:
    async def test_session_for_the_plans_price_with_server_metadata(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        response = await client.post(CHECKOUT, json=checkout_body(plan), headers=user.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "checkout.session" and body["plan_id"] == plan["id"] and body["url"]
        [request] = stripe_fake.requests_to("POST", "/v1/checkout/sessions")
        params = request.params
        metadata = {"kind": "subscription", "user_id": str(user.id), "plan_id": str(plan["id"])}
        assert params["mode"] == "subscription"
        assert params["line_items"] == [{"price": plan["stripe_price_id"], "quantity": "1"}]
        assert params["metadata"] == metadata
        assert params["subscription_data"] == {"metadata": metadata}
        assert params["client_reference_id"] == str(user.id)
        assert params["success_url"] == f"{ORIGIN}/billing/done"
        assert params["customer"].startswith("cus_")
        session = stripe_fake.get(body["id"])
        assert session["mode"] == "subscription" and session["metadata"] == metadata

    @pytest.mark.parametrize(
        "extra",
        [
            {"metadata": {"user_id": "someone-else"}},
            {"price": "price_cheap"},
            {"credits_included": "100000"},
        ],
    )
    async def test_client_cannot_set_metadata_price_or_credits(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, extra: dict[str, Any]
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        response = await client.post(CHECKOUT, json=checkout_body(plan, **extra), headers=user.headers)
        assert response.status_code == 400, response.text
        assert stripe_fake.requests_to("POST", "/v1/checkout/sessions") == []

    @pytest.mark.parametrize(
        ("field", "url"),
        [
            ("success_url", "https://evil.example.net/done"),
            ("cancel_url", "https://app.example.com.evil.net/"),
            ("success_url", "https://app.example.com@evil.net/"),
            ("success_url", "javascript:alert(1)"),
        ],
    )
    async def test_return_url_on_another_origin_refused(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, field: str, url: str
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        response = await client.post(CHECKOUT, json=checkout_body(plan, **{field: url}), headers=user.headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field
        assert stripe_fake.requests_to("POST", "/v1/checkout/sessions") == []

    async def test_idempotency_key_gives_the_same_session(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        headers = {**user.headers, "Idempotency-Key": "subscribe-1"}
        first = await client.post(CHECKOUT, json=checkout_body(plan), headers=headers)
        second = await client.post(CHECKOUT, json=checkout_body(plan), headers=headers)
        assert first.status_code == second.status_code == 200
        assert first.json() == second.json()
        assert len(stripe_fake.objects_of("checkout.session")) == 1
        other = await client.post(
            CHECKOUT, json=checkout_body(plan, cancel_url=f"{ORIGIN}/other"), headers=headers
        )
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "idempotency_key_reused"

    async def test_default_plan_and_plan_without_price_refused(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        free = (await my_plan(client, user))["plan"]
        unpriced = await client.post("/admin/plans", json={"name": "No price"}, headers=OPERATOR)
        for plan_id in (free["id"], unpriced.json()["id"]):
            response = await client.post(CHECKOUT, json=checkout_body({"id": plan_id}), headers=user.headers)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "plan_not_subscribable"
        missing = await client.post(CHECKOUT, json=checkout_body({"id": 999_999}), headers=user.headers)
        assert missing.status_code == 404
        assert stripe_fake.requests_to("POST", "/v1/checkout/sessions") == []

    async def test_a_second_subscription_is_refused(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, events: Events
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        await subscribe(client, stripe_fake, events, user, plan)
        response = await client.post(CHECKOUT, json=checkout_body(plan), headers=user.headers)
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "subscription_exists"


# -- subscription events ---------------------------------------------------------------------


class TestSubscriptionEvents:
    async def test_subscribing_sets_the_plan_its_limits_and_the_allowance(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake, credits="100", rpm_limit=77)
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        item = subscription["items"]["data"][0]

        row = await user_plan_row(db, subscription["id"])
        assert (row["user_id"], row["plan_id"], row["status"], row["auto_renew"]) == (
            user.id,
            plan["id"],
            "active",
            True,
        )
        assert row["current_period_end"] == datetime.fromtimestamp(item["current_period_end"], UTC)
        mine = await my_plan(client, user)
        assert mine["plan"]["id"] == plan["id"] and mine["source"] == "stripe"
        assert mine["ceiling"]["rpm_limit"] == 77

        # One grant: the allowance. The subscription's charge and payment intent granted nothing.
        invoice_id = subscription["latest_invoice"]
        [grant] = await grants_of(db, user)
        assert (grant["source"], grant["reference"], grant["amount"]) == (
            "subscription",
            invoice_id,
            Decimal("100"),
        )
        assert grant["expires_at"] == datetime.fromtimestamp(item["current_period_end"], UTC)

        response = await client.get(SUBSCRIPTION, headers=user.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == subscription["id"] and body["status"] == "active"
        assert body["plan"]["id"] == plan["id"] and body["cancel_at_period_end"] is False
        assert [(a["invoice"], Decimal(a["remaining"])) for a in body["allowances"]] == [
            (invoice_id, Decimal("100"))
        ]
        balance = (await client.get("/user/balance", headers=user.headers)).json()
        assert Decimal(balance["available"]) == Decimal("100")

    async def test_deleted_returns_the_user_to_the_default_plan(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake, rpm_limit=77)
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        response = await client.post(
            f"{SUBSCRIPTION}/cancel", json={"immediately": True}, headers=user.headers
        )
        assert response.status_code == 200, response.text
        only(await events.deliver(), "customer.subscription.deleted")

        assert (await user_plan_row(db, subscription["id"]))["status"] == "cancelled"
        mine = await my_plan(client, user)
        assert mine["plan"]["is_default"] is True and mine["source"] == "default"
        assert mine["ceiling"]["rpm_limit"] == app_state(app).settings.default_rpm
        body = (await client.get(SUBSCRIPTION, headers=user.headers)).json()
        assert body["status"] == "cancelled" and body["cancel_at_period_end"] is False

    async def test_a_late_older_event_changes_nothing(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        other = await make_plan(client, stripe_fake)
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        created = only(stripe_fake.events, "customer.subscription.created")["created"]
        # An update to the other plan, applied; then an older update (back to the first plan) arrives.
        moved = copy.deepcopy(subscription)
        moved["items"]["data"][0]["price"] = stripe_fake.get(other["stripe_price_id"])
        newer = event_at(stripe_fake, "customer.subscription.updated", moved, created + 20)
        older = event_at(stripe_fake, "customer.subscription.updated", subscription, created + 10)
        for event in (newer, older):
            assert (await post_event(client, event)).status_code == 200
        assert (await user_plan_row(db, subscription["id"]))["plan_id"] == other["id"]

        # A cancelled subscription is never brought back, even by an event of the same second.
        ended = {**copy.deepcopy(moved), "status": "canceled"}
        same_second = {**copy.deepcopy(moved), "status": "active"}
        for event in (
            event_at(stripe_fake, "customer.subscription.deleted", ended, created + 30),
            event_at(stripe_fake, "customer.subscription.updated", same_second, created + 30),
        ):
            assert (await post_event(client, event)).status_code == 200
        assert (await user_plan_row(db, subscription["id"]))["status"] == "cancelled"
        assert (await my_plan(client, user))["plan"]["is_default"] is True

    @pytest.mark.parametrize(
        ("stripe_status", "status", "on_plan"),
        [
            ("trialing", "active", True),
            ("past_due", "past_due", True),
            ("unpaid", "past_due", True),
            ("canceled", "cancelled", False),
            ("incomplete_expired", "expired", False),
        ],
    )
    async def test_status_mapping(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
        stripe_status: str,
        status: str,
        on_plan: bool,
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        later = only(stripe_fake.events, "customer.subscription.created")["created"] + 1
        changed = {**subscription, "status": stripe_status}
        event = event_at(stripe_fake, "customer.subscription.updated", changed, later)
        assert (await post_event(client, event)).status_code == 200
        assert (await user_plan_row(db, subscription["id"]))["status"] == status
        assert ((await my_plan(client, user))["plan"]["id"] == plan["id"]) is on_plan

    async def test_incomplete_subscription_gives_no_plan_until_active(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        subscription = self._subscription(stripe_fake, user, plan, status="incomplete")
        created = event_at(stripe_fake, "customer.subscription.created", subscription, 1_900_000_000)
        assert (await post_event(client, created)).status_code == 200
        assert await db.fetchval("SELECT count(*) FROM user_plans WHERE user_id = $1", user.id) == 0
        # Waiting for its first payment, it still counts: no second subscription meanwhile.
        again = await client.post(CHECKOUT, json=checkout_body(plan), headers=user.headers)
        assert again.status_code == 409 and again.json()["error"]["code"] == "subscription_exists"
        active = {**subscription, "status": "active"}
        updated = event_at(stripe_fake, "customer.subscription.updated", active, 1_900_000_001)
        assert (await post_event(client, updated)).status_code == 200
        assert (await user_plan_row(db, subscription["id"]))["status"] == "active"

    async def test_subscription_that_is_not_ours_is_ignored(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        subscription = self._subscription(stripe_fake, user, plan, metadata={"user_id": str(user.id)})
        event = stripe_fake.make_event("customer.subscription.created", subscription)
        assert (await post_event(client, event)).status_code == 200
        assert await db.fetchval("SELECT count(*) FROM user_plans WHERE user_id = $1", user.id) == 0

    @staticmethod
    def _subscription(
        fake: FakeStripe,
        user: TestUser,
        plan: dict[str, Any],
        *,
        status: str = "active",
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        now = int(datetime.now(UTC).timestamp())
        return {
            "id": f"sub_{uuid4().hex[:24]}",
            "object": "subscription",
            "customer": "cus_elsewhere",
            "status": status,
            "items": {
                "object": "list",
                "data": [
                    {
                        "id": f"si_{uuid4().hex[:14]}",
                        "object": "subscription_item",
                        "price": fake.get(plan["stripe_price_id"]),
                        "quantity": 1,
                        "current_period_start": now,
                        "current_period_end": now + 30 * 86400,
                    }
                ],
            },
            "metadata": metadata
            if metadata is not None
            else {"kind": "subscription", "user_id": str(user.id), "plan_id": str(plan["id"])},
            "cancel_at_period_end": False,
            "cancel_at": None,
            "livemode": False,
        }


# -- invoices --------------------------------------------------------------------------------


class TestInvoices:
    async def test_invoice_paid_grants_once_when_replayed(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake, credits="100")
        await subscribe(client, stripe_fake, events, user, plan)
        paid = only(stripe_fake.events, "invoice.paid")
        # The same delivery again, and the same invoice in another event.
        again = stripe_fake.make_event("invoice.paid", paid["data"]["object"])
        for event in (paid, paid, again):
            assert (await post_event(client, event)).status_code == 200
        assert [g["source"] for g in await grants_of(db, user)] == ["subscription"]
        assert await db.fetchval("SELECT credits FROM users WHERE id = $1", user.id) == Decimal("100")
        # One receipt for the invoice, however often it is reported.
        receipts = await db.fetch(
            "SELECT dedupe_key FROM notification_outbox WHERE user_id = $1 AND type = 'payment_confirmation'",
            user.id,
        )
        assert [r["dedupe_key"] for r in receipts] == [f"payment:{paid['data']['object']['id']}"]

    async def test_concurrent_duplicates_grant_once(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake, credits="100")
        response = await client.post(CHECKOUT, json=checkout_body(plan), headers=user.headers)
        stripe_fake.pay_session(response.json()["id"])
        # invoice.paid before customer.subscription.created: the invoice names its subscriber.
        paid = only(stripe_fake.events, "invoice.paid")
        invoice = paid["data"]["object"]
        deliveries = [paid] * 5 + [stripe_fake.make_event("invoice.paid", invoice) for _ in range(5)]
        answers = await asyncio.gather(*(post_event(client, event) for event in deliveries))
        assert [answer.status_code for answer in answers] == [200] * 10
        [grant] = await grants_of(db, user)
        assert (grant["reference"], grant["amount"]) == (invoice["id"], Decimal("100"))
        assert (
            await db.fetchval(
                "SELECT count(*) FROM credit_transactions WHERE user_id = $1 AND type = 'subscription'",
                user.id,
            )
            == 1
        )

    async def test_proration_invoice_grants_nothing(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app)
        basic = await make_plan(client, stripe_fake, credits="100", price_cents=1000)
        pro = await make_plan(client, stripe_fake, credits="500", price_cents=5000)
        subscription = await subscribe(client, stripe_fake, events, user, basic)
        response = await client.post(
            f"{SUBSCRIPTION}/change", json={"plan_id": pro["id"]}, headers=user.headers
        )
        assert response.status_code == 200, response.text
        delivered = await events.deliver()
        proration = only(delivered, "invoice.paid")["data"]["object"]
        assert proration["billing_reason"] == "subscription_update"
        assert (await user_plan_row(db, subscription["id"]))["plan_id"] == pro["id"]
        assert [g["amount"] for g in await grants_of(db, user)] == [Decimal("100")]
        assert await grants_service.get_grant(db, source="subscription", reference=proration["id"]) is None

    async def test_payment_failed_marks_past_due(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake, rpm_limit=77)
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        stripe_fake.fail_subscription_payment(subscription["id"])
        failed = only(stripe_fake.events[events.sent :], "invoice.payment_failed")
        assert (await post_event(client, failed)).status_code == 200
        events.sent = len(stripe_fake.events)
        assert (await user_plan_row(db, subscription["id"]))["status"] == "past_due"
        # Past due keeps the plan's limits while Stripe retries; the failed invoice granted nothing.
        assert (await my_plan(client, user))["ceiling"]["rpm_limit"] == 77
        assert len(await grants_of(db, user)) == 1

    async def test_payment_failed_does_not_revive_a_cancelled_plan(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        invoice = stripe_fake.fail_subscription_payment(subscription["id"])
        await client.post(f"{SUBSCRIPTION}/cancel", json={"immediately": True}, headers=user.headers)
        deleted = only(stripe_fake.events[events.sent :], "customer.subscription.deleted")
        assert (await post_event(client, deleted)).status_code == 200
        late = event_at(stripe_fake, "invoice.payment_failed", invoice, deleted["created"] + 1)
        assert (await post_event(client, late)).status_code == 200
        assert (await user_plan_row(db, subscription["id"]))["status"] == "cancelled"

    async def test_renewal_ends_the_previous_allowance(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app, credits="7")
        plan = await make_plan(client, stripe_fake, credits="100")
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        first = subscription["latest_invoice"]
        # Spend 30 of the allowance (it expires before the purchased credits, so it goes first).
        await grants_service.debit(
            db, user_id=user.id, amount=Decimal("30"), type="usage", once_key=None, actor="test"
        )
        renewal = stripe_fake.renew_subscription(subscription["id"])
        await events.deliver()

        rows = {g["reference"]: g for g in await grants_of(db, user)}
        assert rows[first]["remaining"] == 0 and rows[first]["expired_at"] is not None
        assert rows[renewal["id"]]["remaining"] == Decimal("100")
        expiry = await db.fetchval(
            "SELECT amount FROM credit_transactions WHERE user_id = $1 AND type = 'expiry'", user.id
        )
        assert expiry == Decimal("-70")  # no carry-over
        assert await db.fetchval("SELECT credits FROM users WHERE id = $1", user.id) == Decimal("107")
        row = await user_plan_row(db, subscription["id"])
        renewed = renewal["lines"]["data"][0]["period"]
        assert row["current_period_end"] == datetime.fromtimestamp(renewed["end"], UTC)

    async def test_allowance_expires_at_the_period_end(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app, credits="5")
        plan = await make_plan(client, stripe_fake, credits="100")
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        invoice = subscription["latest_invoice"]
        # The period is over: move its end (the grant's expiry) into the past.
        await db.execute(
            """UPDATE credit_grants SET expires_at = now() - interval '1 second'
                WHERE source = 'subscription' AND reference = $1""",
            invoice,
        )
        balance = (await client.get("/user/balance", headers=user.headers)).json()
        assert Decimal(balance["available"]) == Decimal("5")
        assert [g["source"] for g in balance["grants"]] == ["admin"]
        assert (await client.get(SUBSCRIPTION, headers=user.headers)).json()["allowances"] == []

        assert await grants_service.expire_due(app_state(app).pool) == 1
        expiry = await db.fetchrow(
            "SELECT amount, reference FROM credit_transactions WHERE user_id = $1 AND type = 'expiry'",
            user.id,
        )
        grant = await grants_service.get_grant(db, source="subscription", reference=invoice)
        assert grant is not None and grant.remaining == 0
        assert expiry is not None and (expiry["amount"], expiry["reference"]) == (
            Decimal("-100"),
            str(grant.id),
        )
        assert await db.fetchval("SELECT credits FROM users WHERE id = $1", user.id) == Decimal("5")

    async def test_invoice_before_its_subscriber_is_known_is_retried(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake, credits="100")
        response = await client.post(CHECKOUT, json=checkout_body(plan), headers=user.headers)
        stripe_fake.pay_session(response.json()["id"])
        paid = only(stripe_fake.events, "invoice.paid")
        # An invoice that does not carry the subscription's metadata, before the subscription's event.
        paid["data"]["object"]["parent"]["subscription_details"]["metadata"] = {}
        failed = await post_event(client, paid)
        assert failed.status_code >= 500
        assert await grants_of(db, user) == []
        created = only(stripe_fake.events, "customer.subscription.created")
        assert (await post_event(client, created)).status_code == 200
        assert (await post_event(client, paid)).status_code == 200
        assert [g["reference"] for g in await grants_of(db, user)] == [paid["data"]["object"]["id"]]

    async def test_first_paid_invoice_converts_a_trial(
        self, client: httpx.AsyncClient, stripe_fake: FakeStripe, events: Events, db: asyncpg.Connection
    ) -> None:
        created = await client.post(
            "/admin/users",
            json={"email": f"t-{uuid4().hex[:8]}@example.com", "trial": True},
            headers=OPERATOR,
        )
        assert created.status_code == 201, created.text
        body = created.json()
        user = TestUser(id=UUID(body["user_id"]), email=body["email"], api_key=body["api_key"])
        plan = await make_plan(client, stripe_fake)
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        trial = await db.fetchrow(
            "SELECT converted_at, conversion_reference FROM trials WHERE user_id = $1", user.id
        )
        assert trial is not None and trial["converted_at"] is not None
        assert trial["conversion_reference"] == subscription["latest_invoice"]


# -- changes and cancellation ----------------------------------------------------------------


class TestChanges:
    async def test_upgrade_is_invoiced_now_with_proration(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, events: Events
    ) -> None:
        user = await create_user(app)
        basic = await make_plan(client, stripe_fake, price_cents=1000)
        pro = await make_plan(client, stripe_fake, price_cents=5000)
        subscription = await subscribe(client, stripe_fake, events, user, basic)
        response = await client.post(
            f"{SUBSCRIPTION}/change", json={"plan_id": pro["id"]}, headers=user.headers
        )
        assert response.status_code == 200, response.text
        assert response.json()["plan"]["id"] == pro["id"]
        [update] = stripe_fake.requests_to("POST", f"/v1/subscriptions/{subscription['id']}")
        item = subscription["items"]["data"][0]["id"]
        assert update.params["items"] == [{"id": item, "price": pro["stripe_price_id"]}]
        assert update.params["proration_behavior"] == "always_invoice"
        assert update.params["payment_behavior"] == "pending_if_incomplete"

    async def test_downgrade_prorates_to_the_next_invoice(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app)
        pro = await make_plan(client, stripe_fake, price_cents=5000, rpm_limit=500)
        basic = await make_plan(client, stripe_fake, price_cents=1000, rpm_limit=50)
        subscription = await subscribe(client, stripe_fake, events, user, pro)
        response = await client.post(
            f"{SUBSCRIPTION}/change", json={"plan_id": basic["id"]}, headers=user.headers
        )
        assert response.status_code == 200, response.text
        [update] = stripe_fake.requests_to("POST", f"/v1/subscriptions/{subscription['id']}")
        assert update.params["proration_behavior"] == "create_prorations"
        assert "payment_behavior" not in update.params
        await events.deliver()
        assert (await user_plan_row(db, subscription["id"]))["plan_id"] == basic["id"]
        assert (await my_plan(client, user))["ceiling"]["rpm_limit"] == 50

    async def test_change_to_the_current_plan_is_refused(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, events: Events
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        await subscribe(client, stripe_fake, events, user, plan)
        response = await client.post(
            f"{SUBSCRIPTION}/change", json={"plan_id": plan["id"]}, headers=user.headers
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "same_plan"
        assert stripe_fake.requests_to("POST", "/v1/subscriptions") == []

    async def test_cancel_at_period_end(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        stripe_fake: FakeStripe,
        events: Events,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        response = await client.post(f"{SUBSCRIPTION}/cancel", headers=user.headers)
        assert response.status_code == 200, response.text
        assert response.json()["cancel_at_period_end"] is True
        [update] = stripe_fake.requests_to("POST", f"/v1/subscriptions/{subscription['id']}")
        assert update.params == {"cancel_at_period_end": "true"}
        assert stripe_fake.requests_to("DELETE", "/v1/subscriptions") == []
        await events.deliver()
        row = await user_plan_row(db, subscription["id"])
        assert (row["status"], row["auto_renew"]) == ("active", False)
        body = (await client.get(SUBSCRIPTION, headers=user.headers)).json()
        assert body["status"] == "active" and body["cancel_at_period_end"] is True

    async def test_cancel_immediately(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe, events: Events
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        subscription = await subscribe(client, stripe_fake, events, user, plan)
        response = await client.post(
            f"{SUBSCRIPTION}/cancel", json={"immediately": True}, headers=user.headers
        )
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"
        assert len(stripe_fake.requests_to("DELETE", f"/v1/subscriptions/{subscription['id']}")) == 1

    async def test_without_a_subscription(
        self, app: FastAPI, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        plan = await make_plan(client, stripe_fake)
        for method, path, body in (
            ("GET", SUBSCRIPTION, None),
            ("POST", f"{SUBSCRIPTION}/cancel", {}),
            ("POST", f"{SUBSCRIPTION}/change", {"plan_id": plan["id"]}),
        ):
            response = await client.request(method, path, json=body, headers=user.headers)
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"]["code"] == "no_subscription"
        assert stripe_fake.requests == []
