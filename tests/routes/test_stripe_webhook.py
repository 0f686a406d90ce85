"""POST /api/stripe/webhook: signed events from the fake Stripe, applied once whatever the order,
repeats and races; claw-backs for refunds and disputes; failures answered non-2xx and retried.

After every test, for every user, the balance is the sum of the ledger and no grant was applied twice.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from src.services import grants, referrals, stripe_client, trials
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import TestUser, create_user
from tests.fakes import stripe_api
from tests.fakes.stripe_api import FakeStripe, post_event, signed_event
from tests.fakes.upstream import FakeUpstream
from tests.money import assert_money_invariants

stripe_fake_server = stripe_api.stripe_fake_server
stripe_fake = stripe_api.stripe_fake

ORIGIN = "https://app.example.com"
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def settings_overrides(stripe_fake_server: FakeStripe, upstream_server: FakeUpstream) -> dict[str, Any]:
    return stripe_fake_server.settings_overrides(
        checkout_allowed_origins=ORIGIN,
        custom_provider_base_url=upstream_server.base_url,
        custom_provider_name="fake",
    )


@pytest.fixture(autouse=True)
async def _money_invariants(db: asyncpg.Connection, stripe_fake: FakeStripe) -> AsyncIterator[None]:
    yield
    await assert_money_invariants(db)


# -- helpers ----------------------------------------------------------------------------------


async def checkout(client: httpx.AsyncClient, user: TestUser, **body: Any) -> dict[str, Any]:
    body = {"success_url": f"{ORIGIN}/ok", "cancel_url": f"{ORIGIN}/cancel", **body}
    if "package_id" not in body and "amount_cents" not in body:
        body["package_id"] = "credits_10"
    response = await client.post("/api/stripe/checkout-session", json=body, headers=user.headers)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def new_events(fake: FakeStripe, action: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The events Stripe sends because of `action` (a FakeStripe helper), in Stripe's order."""
    before = len(fake.events)
    action(*args, **kwargs)
    return fake.events[before:]


def of_type(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(event for event in events if event["type"] == kind)


async def deliver_all(client: httpx.AsyncClient, events: list[dict[str, Any]]) -> list[httpx.Response]:
    responses = [await post_event(client, event) for event in events]
    for response in responses:
        assert response.status_code == 200, response.text
    return responses


async def balance(db: asyncpg.Connection, user_id: UUID) -> Decimal:
    value: Decimal = await db.fetchval("SELECT credits FROM users WHERE id = $1", user_id)
    return value


async def purchase_grants(db: asyncpg.Connection, user_id: UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT reference, amount FROM credit_grants WHERE user_id = $1 AND source = 'purchase'", user_id
    )
    return rows


async def ledger(db: asyncpg.Connection, user_id: UUID, type: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT amount, once_key, reference FROM credit_transactions"
        " WHERE user_id = $1 AND type = $2 ORDER BY id",
        user_id,
        type,
    )
    return rows


async def payment_row(db: asyncpg.Connection, session_id: str) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT id, status, credits, refunded_cents, credits_refunded, credits_disputed,"
        " stripe_payment_intent_id, stripe_charge_id, granted_at"
        " FROM payments WHERE stripe_checkout_session_id = $1",
        session_id,
    )
    assert row is not None
    return row


async def paid_checkout(
    client: httpx.AsyncClient, fake: FakeStripe, user: TestUser, **body: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A checkout the customer paid, and the events that says so (not delivered yet)."""
    session = await checkout(client, user, **body)
    return session, new_events(fake, fake.pay_session, session["id"])


async def granted_checkout(
    client: httpx.AsyncClient, fake: FakeStripe, user: TestUser, **body: Any
) -> tuple[dict[str, Any], str]:
    """A paid checkout whose events were delivered; (checkout, its charge id)."""
    session, events = await paid_checkout(client, fake, user, **body)
    await deliver_all(client, events)
    return session, of_type(events, "charge.succeeded")["data"]["object"]["id"]


# -- exactly once -----------------------------------------------------------------------------


class TestExactlyOnce:
    async def test_the_same_event_twice_grants_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session, events = await paid_checkout(client, stripe_fake, user)
        completed = of_type(events, "checkout.session.completed")

        first = await post_event(client, completed)
        second = await post_event(client, completed)

        assert first.status_code == second.status_code == 200
        assert first.json()["outcome"] == "handled"
        assert second.json()["outcome"] == "duplicate"
        assert await balance(db, user.id) == Decimal("10")
        assert [(r["reference"], r["amount"]) for r in await purchase_grants(db, user.id)] == [
            (session["id"], Decimal("10"))
        ]
        row = await payment_row(db, session["id"])
        assert row["status"] == "paid" and row["granted_at"] is not None
        recorded = await db.fetchrow(
            "SELECT type, outcome, processed_at FROM stripe_webhook_events WHERE event_id = $1",
            completed["id"],
        )
        assert recorded["type"] == "checkout.session.completed" and recorded["outcome"] == "handled"

    async def test_ten_concurrent_deliveries_grant_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        _, events = await paid_checkout(client, stripe_fake, user, amount_cents=2_500)
        completed = of_type(events, "checkout.session.completed")

        responses = await asyncio.gather(*(post_event(client, completed) for _ in range(10)))

        assert [r.status_code for r in responses] == [200] * 10
        outcomes = sorted(r.json()["outcome"] for r in responses)
        assert outcomes == ["duplicate"] * 9 + ["handled"]
        assert await balance(db, user.id) == Decimal("25")
        assert len(await purchase_grants(db, user.id)) == 1
        receipts = await db.fetch(
            """SELECT dedupe_key, (context->>'amount_cents')::int AS cents FROM notification_outbox
               WHERE user_id = $1 AND type = 'payment_confirmation'""",
            user.id,
        )
        assert [r["dedupe_key"] for r in receipts] == [f"payment:{completed['data']['object']['id']}"]
        assert receipts[0]["cents"] == 2_500

    async def test_every_event_of_a_payment_ten_times_at_once_grants_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        _, events = await paid_checkout(client, stripe_fake, user)

        responses = await asyncio.gather(*(post_event(client, e) for e in events for _ in range(10)))

        assert {r.status_code for r in responses} == {200}
        assert await balance(db, user.id) == Decimal("10")
        assert len(await purchase_grants(db, user.id)) == 1

    @pytest.mark.parametrize(
        "order",
        [
            ("checkout.session.completed", "payment_intent.succeeded"),
            ("payment_intent.succeeded", "checkout.session.completed"),
            ("charge.succeeded", "payment_intent.succeeded", "checkout.session.completed"),
            ("payment_intent.succeeded", "charge.succeeded"),
        ],
    )
    async def test_each_report_of_one_payment_converges_on_one_grant(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        stripe_fake: FakeStripe,
        order: tuple[str, ...],
    ) -> None:
        user = await create_user(app)
        session, events = await paid_checkout(client, stripe_fake, user)

        first = await post_event(client, of_type(events, order[0]))
        assert first.json()["outcome"] == "handled"
        assert await balance(db, user.id) == Decimal("10")
        for kind in order[1:]:
            response = await post_event(client, of_type(events, kind))
            assert response.status_code == 200
        await deliver_all(client, events)

        assert await balance(db, user.id) == Decimal("10")
        assert len(await purchase_grants(db, user.id)) == 1
        row = await payment_row(db, session["id"])
        intent = of_type(events, "payment_intent.succeeded")["data"]["object"]
        assert row["stripe_payment_intent_id"] == intent["id"]
        assert row["stripe_charge_id"] == intent["latest_charge"]

    async def test_unpaid_completion_grants_nothing_until_the_payment_succeeds(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session = await checkout(client, user)
        pending = new_events(stripe_fake, stripe_fake.pay_session, session["id"], async_payment=True)
        completed = of_type(pending, "checkout.session.completed")
        assert completed["data"]["object"]["payment_status"] == "unpaid"

        await deliver_all(client, pending)
        assert await balance(db, user.id) == 0
        assert await purchase_grants(db, user.id) == []
        assert (await payment_row(db, session["id"]))["status"] == "pending"
        # Nor does the owner's reconciliation grant an unpaid checkout.
        reconciled = await client.get(f"/api/stripe/checkout-session/{session['id']}", headers=user.headers)
        assert reconciled.json()["granted"] is False

        paid = new_events(stripe_fake, stripe_fake.complete_async_payment, session["id"])
        succeeded = of_type(paid, "checkout.session.async_payment_succeeded")
        assert (await post_event(client, succeeded)).json()["outcome"] == "handled"
        assert await balance(db, user.id) == Decimal("10")

        await deliver_all(client, paid + pending)
        assert await balance(db, user.id) == Decimal("10")
        assert len(await purchase_grants(db, user.id)) == 1
        assert (await payment_row(db, session["id"]))["status"] == "paid"

    async def test_livemode_other_than_the_key_is_ignored(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        _, events = await paid_checkout(client, stripe_fake, user)
        live = copy.deepcopy(of_type(events, "checkout.session.completed"))
        live["livemode"] = True

        response = await post_event(client, live)

        assert response.status_code == 200
        assert response.json()["outcome"] == "ignored"
        assert await balance(db, user.id) == 0
        assert await db.fetchval("SELECT count(*) FROM stripe_webhook_events") == 0

    async def test_unknown_event_types_are_acknowledged_and_ignored(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        event = stripe_fake.make_event("customer.created", {"id": "cus_x", "object": "customer"})
        response = await post_event(client, event)
        assert response.status_code == 200
        assert response.json() == {
            "received": True,
            "id": event["id"],
            "type": "customer.created",
            "outcome": "ignored",
        }
        outcome = await db.fetchval(
            "SELECT outcome FROM stripe_webhook_events WHERE event_id = $1", event["id"]
        )
        assert outcome == "ignored"


# -- only what the server tagged ----------------------------------------------------------------


class TestOnlyServerTaggedPayments:
    async def test_a_subscription_payment_never_grants_top_up_credits(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        price = stripe_fake.add_price(unit_amount=2_000)
        state = app.state.gateway
        created = await stripe_client.call(
            state,
            lambda c: c.v1.checkout.sessions.create_async(
                {
                    "mode": "subscription",
                    "success_url": f"{ORIGIN}/ok",
                    "line_items": [{"price": price["id"], "quantity": 1}],
                    "subscription_data": {"metadata": {"kind": "subscription", "user_id": str(user.id)}},
                    "metadata": {"kind": "subscription", "user_id": str(user.id)},
                }
            ),
        )
        events = new_events(stripe_fake, stripe_fake.pay_session, created.id)
        for kind in ("payment_intent.succeeded", "charge.succeeded"):
            response = await post_event(client, of_type(events, kind))
            assert response.status_code == 200
            assert response.json()["outcome"] == "ignored"
        assert await balance(db, user.id) == 0
        assert await db.fetchval("SELECT count(*) FROM credit_grants WHERE source = 'purchase'") == 0

    async def test_forged_or_mismatched_metadata_grants_nothing(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        buyer, other = await create_user(app), await create_user(app)
        session, events = await paid_checkout(client, stripe_fake, buyer)
        intent = of_type(events, "payment_intent.succeeded")
        for metadata in (
            {"kind": "topup", "user_id": str(other.id), "payment_id": session["payment_id"]},
            {"kind": "topup", "user_id": str(buyer.id), "payment_id": str(uuid.uuid4())},
            {"kind": "topup", "user_id": str(buyer.id), "payment_id": "not-a-uuid"},
            {"user_id": str(buyer.id), "payment_id": session["payment_id"]},
        ):
            forged = copy.deepcopy(intent)
            forged["id"] = f"evt_{uuid.uuid4().hex}"
            forged["data"]["object"]["metadata"] = metadata
            response = await post_event(client, forged)
            assert response.status_code == 200
            assert response.json()["outcome"] == "ignored"
        assert await balance(db, buyer.id) == 0
        assert await balance(db, other.id) == 0


# -- signatures -------------------------------------------------------------------------------


class TestSignature:
    @pytest.mark.parametrize(
        "case", ["wrong_secret", "no_signature", "reserialised", "stale", "garbage", "future_only"]
    )
    async def test_refused_with_400_and_nothing_applied(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        stripe_fake: FakeStripe,
        case: str,
    ) -> None:
        user = await create_user(app)
        session, events = await paid_checkout(client, stripe_fake, user)
        event = of_type(events, "checkout.session.completed")
        body, headers = signed_event(event)
        if case == "wrong_secret":
            body, headers = signed_event(event, secret="whsec_other_" + "x" * 32)
        elif case == "no_signature":
            headers.pop("Stripe-Signature")
        elif case == "reserialised":
            body = json.dumps(event, indent=2).encode()  # the same event, not the bytes that were signed
        elif case == "stale":
            body, headers = signed_event(event, timestamp=int(time.time()) - 301)
        elif case == "garbage":
            headers["Stripe-Signature"] = "t=abc,v1=zzz"
        elif case == "future_only":
            headers["Stripe-Signature"] = headers["Stripe-Signature"].replace("v1=", "v0=")

        response = await client.post("/api/stripe/webhook", content=body, headers=headers)

        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_signature"
        assert await balance(db, user.id) == 0
        assert await db.fetchval("SELECT count(*) FROM stripe_webhook_events") == 0
        assert (await payment_row(db, session["id"]))["status"] == "pending"
        # The genuine delivery still works afterwards.
        assert (await post_event(client, event)).json()["outcome"] == "handled"

    async def test_a_signed_body_that_is_not_an_event_is_refused(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        for payload in (b"not json", b"[1, 2]", json.dumps({"id": "evt_1", "type": "x"}).encode()):
            response = await post_event(client, payload)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "invalid_payload"
        assert await db.fetchval("SELECT count(*) FROM stripe_webhook_events") == 0

    @pytest.mark.parametrize("settings_overrides", [{"stripe_webhook_secret": None}], indirect=False)
    async def test_without_a_webhook_secret_every_delivery_is_refused_with_503(
        self, client: httpx.AsyncClient, stripe_fake: FakeStripe
    ) -> None:
        event = stripe_fake.make_event("customer.created", {"id": "cus_x", "object": "customer"})
        response = await post_event(client, event)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "webhooks_not_configured"


# -- failures are retried -----------------------------------------------------------------------

FAIL_GRANTS = """
CREATE FUNCTION test_fail_grant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'injected failure'; END $$;
CREATE TRIGGER test_fail_grant BEFORE INSERT ON credit_grants FOR EACH ROW EXECUTE FUNCTION test_fail_grant();
"""


class TestFailureIsRetried:
    async def test_a_failed_event_answers_500_keeps_nothing_and_its_retry_grants_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session, events = await paid_checkout(client, stripe_fake, user)
        completed = of_type(events, "checkout.session.completed")
        await db.execute(FAIL_GRANTS)

        failed = await post_event(client, completed)

        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "webhook_processing_failed"
        assert "injected" not in failed.text
        assert await db.fetchval("SELECT count(*) FROM stripe_webhook_events") == 0
        row = await payment_row(db, session["id"])
        assert row["status"] == "pending" and row["stripe_payment_intent_id"] is None
        assert await balance(db, user.id) == 0

        await db.execute("DROP TRIGGER test_fail_grant ON credit_grants")
        retried = await asyncio.gather(*(post_event(client, completed) for _ in range(3)))

        assert sorted(r.json()["outcome"] for r in retried) == ["duplicate", "duplicate", "handled"]
        assert await balance(db, user.id) == Decimal("10")
        assert len(await purchase_grants(db, user.id)) == 1

    async def test_an_event_for_a_checkout_not_yet_recorded_is_retried(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session, events = await paid_checkout(client, stripe_fake, user)
        # As if recording the session's id had failed after Stripe created it.
        await db.execute(
            "UPDATE payments SET stripe_checkout_session_id = NULL WHERE id = $1", UUID(session["payment_id"])
        )

        early = await post_event(client, of_type(events, "payment_intent.succeeded"))
        assert early.status_code == 500
        assert await balance(db, user.id) == 0

        # The session's own event names the payment in the metadata this server wrote.
        await deliver_all(client, [of_type(events, "checkout.session.completed")])
        assert await balance(db, user.id) == Decimal("10")
        await deliver_all(client, events)
        assert len(await purchase_grants(db, user.id)) == 1


# -- claw-backs -------------------------------------------------------------------------------


class TestRefunds:
    async def test_a_refund_after_the_grant_claws_back_its_share_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session, charge_id = await granted_checkout(client, stripe_fake, user, amount_cents=4_000)
        assert await balance(db, user.id) == Decimal("40")

        partial = new_events(stripe_fake, stripe_fake.refund, charge_id, 1_000)
        refunded = of_type(partial, "charge.refunded")
        responses = await asyncio.gather(*(post_event(client, refunded) for _ in range(5)))
        assert {r.status_code for r in responses} == {200}
        await deliver_all(client, partial)

        assert await balance(db, user.id) == Decimal("30")
        rows = await ledger(db, user.id, "refund")
        assert [(r["amount"], r["once_key"]) for r in rows] == [(Decimal("-10"), f"refund:{charge_id}:1000")]
        row = await payment_row(db, session["id"])
        assert (row["status"], row["refunded_cents"], row["credits_refunded"]) == (
            "partially_refunded",
            1_000,
            10,
        )

        rest = new_events(stripe_fake, stripe_fake.refund, charge_id)
        # The later refund first, then a repeat of the earlier one: only the increase is clawed back.
        await deliver_all(client, rest + partial)
        assert await balance(db, user.id) == 0
        assert [r["amount"] for r in await ledger(db, user.id, "refund")] == [Decimal("-10"), Decimal("-30")]
        row = await payment_row(db, session["id"])
        assert (row["status"], row["refunded_cents"], row["credits_refunded"]) == ("refunded", 4_000, 40)

    async def test_a_refund_before_the_grant_claws_back_once_and_the_grant_still_lands_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app, credits="3")
        session, paid = await paid_checkout(client, stripe_fake, user)
        charge_id = of_type(paid, "charge.succeeded")["data"]["object"]["id"]
        refund = new_events(stripe_fake, stripe_fake.refund, charge_id)

        await deliver_all(client, refund)  # Stripe's events arrive out of order
        assert await balance(db, user.id) == Decimal("-7")
        await deliver_all(client, paid + refund + paid)

        assert await balance(db, user.id) == Decimal("3")
        assert len(await ledger(db, user.id, "refund")) == 1
        assert len(await purchase_grants(db, user.id)) == 1
        row = await payment_row(db, session["id"])
        assert (row["status"], row["credits_refunded"]) == ("refunded", 10)

    async def test_a_claw_back_may_go_below_zero_and_then_paid_requests_get_402(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        stripe_fake: FakeStripe,
        upstream: FakeUpstream,
    ) -> None:
        user = await create_user(app)
        _, charge_id = await granted_checkout(client, stripe_fake, user)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
        assert (await client.post("/v1/chat/completions", json=body, headers=user.headers)).status_code == 200
        # The user spends most of the credits, then the whole payment is refunded.
        async with app.state.gateway.pool.acquire() as conn:
            await grants.debit(
                conn, user_id=user.id, amount=Decimal("8"), type="usage", once_key=None, actor="test"
            )
        await deliver_all(client, new_events(stripe_fake, stripe_fake.refund, charge_id))

        owed = await balance(db, user.id)
        assert owed < Decimal("-7.99")
        refused = await client.post("/v1/chat/completions", json=body, headers=user.headers)
        assert refused.status_code == 402, refused.text
        assert refused.json()["error"]["code"] == "insufficient_quota"

        # A new top-up first repays what is owed; then requests go through again.
        await granted_checkout(client, stripe_fake, user)
        assert await balance(db, user.id) == owed + 10
        assert (await client.post("/v1/chat/completions", json=body, headers=user.headers)).status_code == 200


class TestDisputes:
    async def test_a_dispute_claws_back_once_and_a_won_dispute_restores_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session, charge_id = await granted_checkout(client, stripe_fake, user, amount_cents=2_000)

        opened = new_events(stripe_fake, stripe_fake.dispute, charge_id, 1_000)
        await deliver_all(client, opened + opened)
        assert await balance(db, user.id) == Decimal("10")
        assert [r["once_key"] for r in await ledger(db, user.id, "dispute")] == [
            f"dispute:{opened[0]['data']['object']['id']}"
        ]
        row = await payment_row(db, session["id"])
        assert (row["status"], row["credits_disputed"]) == ("disputed", 10)

        dispute_id = opened[0]["data"]["object"]["id"]
        won = new_events(stripe_fake, stripe_fake.close_dispute, dispute_id, "won")
        await asyncio.gather(*(post_event(client, won[0]) for _ in range(3)))
        await deliver_all(client, won + opened)

        assert await balance(db, user.id) == Decimal("20")
        restored = await db.fetch(
            "SELECT reference, amount FROM credit_grants WHERE user_id = $1 AND source = 'refund_reversal'",
            user.id,
        )
        assert [(r["reference"], r["amount"]) for r in restored] == [(f"dispute:{dispute_id}", Decimal("10"))]
        row = await payment_row(db, session["id"])
        assert (row["status"], row["credits_disputed"]) == ("paid", 0)

    async def test_a_lost_dispute_keeps_its_claw_back(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session, charge_id = await granted_checkout(client, stripe_fake, user)
        opened = new_events(stripe_fake, stripe_fake.dispute, charge_id)
        lost = new_events(stripe_fake, stripe_fake.close_dispute, opened[0]["data"]["object"]["id"], "lost")

        await deliver_all(client, lost + opened)  # the decision may arrive first

        assert await balance(db, user.id) == 0
        assert len(await ledger(db, user.id, "dispute")) == 1
        assert (await payment_row(db, session["id"]))["status"] == "disputed"

    async def test_a_dispute_won_before_its_opening_arrives_takes_nothing(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session, charge_id = await granted_checkout(client, stripe_fake, user)
        opened = new_events(stripe_fake, stripe_fake.dispute, charge_id)
        won = new_events(stripe_fake, stripe_fake.close_dispute, opened[0]["data"]["object"]["id"], "won")

        await deliver_all(client, won + opened)

        assert await balance(db, user.id) == Decimal("10")
        assert await ledger(db, user.id, "dispute") == []
        assert (await payment_row(db, session["id"]))["status"] == "paid"

    async def test_a_dispute_of_a_charge_not_recorded_yet_is_found_through_stripe(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        session, paid = await paid_checkout(client, stripe_fake, user)
        await deliver_all(client, [of_type(paid, "checkout.session.completed")])
        # The session names its payment intent, not the charge; a dispute names the charge.
        await db.execute(
            "UPDATE payments SET stripe_payment_intent_id = NULL WHERE id = $1", UUID(session["payment_id"])
        )
        charge_id = of_type(paid, "charge.succeeded")["data"]["object"]["id"]

        await deliver_all(client, new_events(stripe_fake, stripe_fake.dispute, charge_id))

        assert await balance(db, user.id) == 0
        assert stripe_fake.requests_to("GET", f"/v1/charges/{charge_id}")
        assert (await payment_row(db, session["id"]))["stripe_charge_id"] == charge_id


class TestCheckoutEnds:
    async def test_an_expired_or_failed_checkout_gives_its_coupon_back(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        user = await create_user(app)
        created = await client.post(
            "/admin/coupons",
            headers=ADMIN,
            json={
                "code": "HALF",
                "kind": "discount",
                "discount_type": "percent",
                "value": "50",
                "max_uses_per_user": 5,
            },
        )
        assert created.status_code == 201, created.text
        coupon_id = created.json()["id"]

        expiring = await checkout(client, user, coupon_code="half")
        failing = await checkout(client, user, coupon_code="HALF")
        assert await db.fetchval("SELECT uses FROM coupons WHERE id = $1", coupon_id) == 2

        await deliver_all(client, new_events(stripe_fake, stripe_fake.expire_session, expiring["id"]))
        new_events(stripe_fake, stripe_fake.pay_session, failing["id"], async_payment=True)
        await deliver_all(client, new_events(stripe_fake, stripe_fake.fail_async_payment, failing["id"]))

        assert (await payment_row(db, expiring["id"]))["status"] == "expired"
        assert (await payment_row(db, failing["id"]))["status"] == "failed"
        assert await db.fetchval("SELECT uses FROM coupons WHERE id = $1", coupon_id) == 0
        assert await balance(db, user.id) == 0

    async def test_subscription_events_go_to_the_subscriptions_service(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        # A subscription nobody here knows: acknowledged, recorded, and nothing granted.
        price = stripe_fake.add_price(unit_amount=1_500)
        subscription = {
            "id": "sub_unknown",
            "object": "subscription",
            "status": "active",
            "customer": "cus_unknown",
            "metadata": {},
            "items": {"object": "list", "data": [{"id": "si_1", "price": price}]},
        }
        event = stripe_fake.make_event("customer.subscription.created", subscription)
        response = await post_event(client, event)
        assert response.status_code == 200
        assert response.json()["outcome"] == "ignored"
        assert await db.fetchval(
            "SELECT type FROM stripe_webhook_events WHERE event_id = $1", event["id"]
        ) == ("customer.subscription.created")


class TestWithThePurchase:
    async def test_a_purchase_converts_the_trial_rewards_the_referral_and_a_refund_reverses_it_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, stripe_fake: FakeStripe
    ) -> None:
        referrer, referred = await create_user(app), await create_user(app)
        state = app.state.gateway
        async with state.pool.acquire() as conn:
            code = await referrals.get_or_create_code(conn, user_id=referrer.id)
            async with conn.transaction():
                attached = await referrals.attach_at_signup(
                    conn, state.settings, user_id=referred.id, code=code, privy_id=None, email=None, meta=None
                )
            assert attached == "attached"
            await trials.grant_trial(
                conn,
                state.settings,
                user_id=referred.id,
                credits=Decimal("5"),
                days=None,
                max_tokens=None,
                max_requests=None,
                reason="test",
                actor=None,
                meta=None,
            )

        session, charge_id = await granted_checkout(client, stripe_fake, referred, package_id="credits_25")

        trial = await db.fetchrow(
            "SELECT converted_at, conversion_reference FROM trials WHERE user_id = $1", referred.id
        )
        assert trial["converted_at"] is not None and trial["conversion_reference"] == session["id"]
        assert await db.fetchval("SELECT count(*) FROM credit_grants WHERE source = 'referral'") == 2
        assert await balance(db, referrer.id) == Decimal("10")
        assert await balance(db, referred.id) == Decimal("40")  # trial 5 + purchase 25 + reward 10

        refund = new_events(stripe_fake, stripe_fake.refund, charge_id, 500)
        await deliver_all(client, refund + refund)

        reversals = await db.fetch("SELECT user_id FROM credit_transactions WHERE type = 'referral_reversal'")
        assert sorted(str(r["user_id"]) for r in reversals) == sorted([str(referrer.id), str(referred.id)])
        assert await balance(db, referrer.id) == 0
        assert await balance(db, referred.id) == Decimal("25")  # less 5 for the refund, 10 for the reward
