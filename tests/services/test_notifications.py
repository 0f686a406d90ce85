"""E-mail notifications against a real database and a real HTTP fake of Resend: each message is
queued by its event exactly once, rendered in both formats, respects preferences (receipts cannot
be turned off) and suppressions, and is delivered by the worker at most once after a success and
never lost on failure (retried with backoff, failed only after its last attempt)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar
from uuid import UUID

import asyncpg
import pytest
from fastapi import FastAPI

from src.config import Settings
from src.db import notifications as notifications_db
from src.services import credits, email_templates, notifications
from src.services.credits import Cost, Usage
from src.services.notifications import LogBackend, OutgoingEmail, ResendBackend
from tests.factories import app_state, create_key, create_user
from tests.fakes.resend_api import API_KEY, FakeResend

D = Decimal


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # The tests drive the worker themselves (deliver_due); the app's own worker stays asleep.
    return {"notify_poll_interval_seconds": 3600}


@pytest.fixture(scope="module")
def resend_server() -> Iterator[FakeResend]:
    with FakeResend() as server:
        yield server


@pytest.fixture
def fake_resend(resend_server: FakeResend) -> Iterator[FakeResend]:
    resend_server.reset()
    yield resend_server
    resend_server.reset()


def resend_backend(fake: FakeResend) -> ResendBackend:
    return ResendBackend(api_key=API_KEY, api_url=fake.url, sender="Gatewayz <noreply@gatewayz.ai>")


async def outbox(db: asyncpg.Connection, **where: Any) -> list[asyncpg.Record]:
    # Column names come from the test's own keyword arguments, never from input.
    clauses = " AND ".join(f"{name} = ${i}" for i, name in enumerate(where, start=1)) or "true"
    return await db.fetch(
        f"""SELECT id, user_id, to_email, type, context, status, attempts, next_attempt_at, last_error,
                provider_message_id, dedupe_key, subject, html, text, sent_at
            FROM notification_outbox WHERE {clauses} ORDER BY id""",  # noqa: S608
        *where.values(),
    )


async def in_transaction(app: FastAPI, call: Any) -> Any:
    async with app_state(app).pool.acquire() as conn, conn.transaction():
        return await call(conn)


class TestTemplates:
    CONTEXTS: ClassVar[dict[str, dict[str, Any]]] = {
        "welcome": {"name": "Ada"},
        "api_key_created": {
            "name": "Ada",
            "key_name": "ci",
            "masked_key": "gw_live_abcd...wxyz",
            "environment": "live",
            "created_at": "2026-03-01T12:00:00+00:00",
            "by_admin": False,
        },
        "low_balance": {"name": None, "balance": "0.4999000000", "threshold": "1.0000000000"},
        "payment_confirmation": {
            "payment_reference": "pi_123",
            "amount_cents": 2500,
            "currency": "usd",
            "credits": "25.0000000000",
            "description": "Credit top-up",
        },
        "trial_expiring": {"ends_at": "2026-03-04T09:30:00+00:00", "credits": "5"},
        "trial_ended": {"ended_at": "2026-03-04T09:30:00+00:00", "reason": "used_up"},
        "announcement": {"subject": "New models", "body": "First paragraph.\n\nSecond paragraph."},
        "test": {"requested_at": "2026-03-01T12:00:00+00:00"},
    }

    @pytest.mark.parametrize("type", notifications.TYPES)
    def test_every_type_renders_both_formats_with_the_product_name(self, type: str) -> None:
        rendered = email_templates.render(type, self.CONTEXTS[type])
        assert rendered.subject and "\n" not in rendered.subject
        assert rendered.html.startswith("<!DOCTYPE html>") and "</html>" in rendered.html
        assert "Gatewayz" in rendered.html and "Gatewayz" in rendered.text
        assert "<" not in rendered.text.replace("<https", "")  # plain text carries no markup
        # The subject is the HTML document's title too.
        assert f"<title>{rendered.subject.replace('&', '&amp;')}</title>" in rendered.html

    def test_amounts_and_dates_read_well(self) -> None:
        low = email_templates.render("low_balance", self.CONTEXTS["low_balance"])
        assert "$0.49" in low.text and "$1.00" in low.text  # cut down, never rounded up past the threshold
        paid = email_templates.render("payment_confirmation", self.CONTEXTS["payment_confirmation"])
        assert paid.subject == "Payment received: $25.00"
        assert "pi_123" in paid.text and "Credit top-up" in paid.html
        yen = email_templates.render(
            "payment_confirmation",
            {**self.CONTEXTS["payment_confirmation"], "amount_cents": 500, "currency": "jpy"},
        )
        assert "500 JPY" in yen.subject
        expiring = email_templates.render("trial_expiring", self.CONTEXTS["trial_expiring"])
        assert "4 March 2026, 09:30 UTC" in expiring.subject

    def test_user_values_are_escaped(self) -> None:
        evil = '<script>alert("x")</script>'
        rendered = email_templates.render(
            "api_key_created", {**self.CONTEXTS["api_key_created"], "name": evil, "key_name": evil}
        )
        assert "<script>" not in rendered.html
        assert "&lt;script&gt;" in rendered.html
        announcement = email_templates.render(
            "announcement", {"subject": "Hi\r\nBcc: victim@example.com", "body": "<b>bold</b> & more"}
        )
        assert announcement.subject == "Hi Bcc: victim@example.com"
        assert (
            "<b>bold</b>" not in announcement.html
            and "&lt;b&gt;bold&lt;/b&gt; &amp; more" in announcement.html
        )
        assert "<b>bold</b> & more" in announcement.text

    def test_an_unrenderable_context_is_a_template_error(self) -> None:
        with pytest.raises(email_templates.TemplateError):
            email_templates.render("low_balance", {"balance": "NaN", "threshold": "1"})
        with pytest.raises(email_templates.TemplateError):
            email_templates.render("payment_confirmation", {})


class TestEvents:
    async def test_api_key_created_once_per_key_and_never_for_the_primary_key(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)  # its primary key comes with the account
        assert await outbox(db, user_id=user.id) == []
        key_id, plaintext = await create_key(app, user, name="ci")
        rows = await outbox(db, user_id=user.id)
        assert [(r["type"], r["dedupe_key"], r["to_email"]) for r in rows] == [
            ("api_key_created", f"api-key:{key_id}", user.email)
        ]
        context = rows[0]["context"]
        assert context["key_name"] == "ci" and context["masked_key"].endswith(plaintext[-4:])
        assert plaintext not in str(context)

    async def test_a_rolled_back_event_queues_nothing(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)

        async def fails(conn: asyncpg.Connection) -> None:
            await notifications.welcome(conn, user_id=user.id)
            raise RuntimeError("the event failed")

        with pytest.raises(RuntimeError):
            await in_transaction(app, fails)
        assert await outbox(db, user_id=user.id) == []

    async def test_payment_confirmation_once_per_payment(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)

        async def confirm(conn: asyncpg.Connection) -> bool:
            return await notifications.payment_confirmed(
                conn,
                user_id=user.id,
                payment_reference="cs_test_1",
                amount_cents=1000,
                currency="USD",
                credits=D("10"),
            )

        assert await in_transaction(app, confirm) is True
        assert await in_transaction(app, confirm) is False  # a replayed webhook
        rows = await outbox(db, user_id=user.id, type="payment_confirmation")
        assert [r["dedupe_key"] for r in rows] == ["payment:cs_test_1"]
        assert rows[0]["context"]["credits"] == "10" and rows[0]["context"]["currency"] == "usd"

    async def test_concurrent_replays_queue_one_message(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)

        async def confirm(conn: asyncpg.Connection) -> bool:
            return await notifications.payment_confirmed(
                conn,
                user_id=user.id,
                payment_reference="in_race",
                amount_cents=500,
                currency="usd",
                credits=D(5),
            )

        results = await asyncio.gather(*(in_transaction(app, confirm) for _ in range(8)))
        assert sorted(results) == [False] * 7 + [True]
        assert len(await outbox(db, dedupe_key="payment:in_race")) == 1

    async def test_receipts_ignore_preferences_optional_types_respect_them(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        # Even a stored "off" for a receipt (the API refuses to store one) is ignored.
        await db.execute(
            "INSERT INTO notification_preferences (user_id, types) VALUES ($1, $2)",
            user.id,
            {"payment_confirmation": False, "api_key_created": False, "low_balance": False},
        )

        async def events(conn: asyncpg.Connection) -> tuple[bool, bool]:
            receipt = await notifications.payment_confirmed(
                conn,
                user_id=user.id,
                payment_reference="pi_pref",
                amount_cents=100,
                currency="usd",
                credits=D(1),
            )
            low = await notifications.low_balance_check(
                conn, user_id=user.id, balance_before=D(5), balance_after=D("0.5")
            )
            return receipt, low

        assert await in_transaction(app, events) == (True, False)
        await create_key(app, user, name="second")
        assert sorted(r["type"] for r in await outbox(db, user_id=user.id)) == [
            "api_key_created",
            "payment_confirmation",
        ]

    async def test_no_address_no_message(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        await db.execute("UPDATE users SET email = NULL WHERE id = $1", user.id)
        assert await in_transaction(app, lambda conn: notifications.welcome(conn, user_id=user.id)) is False
        # A contact address the user typed is used when there is no verified one.
        await db.execute("UPDATE users SET contact_email = 'Contact@Example.com' WHERE id = $1", user.id)
        assert await in_transaction(app, lambda conn: notifications.welcome(conn, user_id=user.id)) is True
        assert [r["to_email"] for r in await outbox(db, user_id=user.id)] == ["contact@example.com"]

    async def test_suppressed_address_gets_nothing(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        await db.execute(
            "INSERT INTO email_suppressions (email, reason) VALUES ($1, 'hard_bounce')", user.email
        )

        async def receipt(conn: asyncpg.Connection) -> bool:
            return await notifications.payment_confirmed(
                conn,
                user_id=user.id,
                payment_reference="pi_sup",
                amount_cents=100,
                currency="usd",
                credits=D(1),
            )

        assert await in_transaction(app, receipt) is False
        assert await outbox(db, user_id=user.id) == []


class TestLowBalance:
    async def test_once_per_crossing_through_the_sql_function(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)

        async def settle(before: str, after: str) -> bool:
            result: bool = await db.fetchval(
                "SELECT gw_notify_low_balance($1, $2, $3)", user.id, D(before), D(after)
            )
            return result

        assert await settle("5", "2") is False  # still above the default threshold of 1
        assert await settle("2", "0.9") is True  # crosses below 1
        assert await settle("0.9", "0.5") is False  # already below: the same crossing
        assert await settle("0.5", "0") is False
        # A top-up lifts the balance above the threshold; the next fall below is a new crossing.
        assert await settle("10", "0.99") is True
        assert await settle("0.99", "0.98") is False
        rows = await outbox(db, user_id=user.id, type="low_balance")
        assert [r["dedupe_key"] for r in rows] == [f"low-balance:{user.id}:1", f"low-balance:{user.id}:2"]
        assert rows[0]["context"]["balance"] == "0.9" and D(rows[0]["context"]["threshold"]) == 1

    async def test_a_settlement_that_crosses_queues_it_once(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="1.5")
        pool = app_state(app).pool

        async def spend(cost: str) -> None:
            hold = await credits.place_hold(
                pool,
                user_id=user.id,
                api_key_id=None,
                amount=D("0.4"),
                model="m",
                request_type="chat",
                ttl_seconds=600,
            )
            total = D(cost)
            usage = Usage(
                provider="fake",
                input_tokens=1,
                output_tokens=1,
                cost=Cost(input_cost=total, output_cost=D(0), total=total),
                estimated=False,
                status="success",
            )
            await credits.settle(pool, hold, usage, actor="test")

        await spend("0.4")  # 1.1 left: above the default threshold of 1
        assert await outbox(db, user_id=user.id, type="low_balance") == []
        await spend("0.4")  # 0.7: this settlement crosses
        await spend("0.4")  # 0.3: the same crossing
        rows = await outbox(db, user_id=user.id, type="low_balance")
        assert len(rows) == 1 and D(rows[0]["context"]["balance"]) == D("0.7")

    async def test_python_helper_and_threshold(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        await db.execute(
            "INSERT INTO notification_preferences (user_id, low_balance_threshold) VALUES ($1, 20)", user.id
        )

        async def check(before: str, after: str) -> bool:
            return await in_transaction(
                app,
                lambda conn: notifications.low_balance_check(
                    conn, user_id=user.id, balance_before=D(before), balance_after=D(after)
                ),
            )

        assert await check("25", "20") is False  # at the threshold is not below it
        assert await check("20", "19.99") is True
        assert await check("19.99", "3") is False
        assert await check("3", "3") is False  # no charge
        assert len(await outbox(db, user_id=user.id, type="low_balance")) == 1

    async def test_turned_off(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        await db.execute(
            """INSERT INTO notification_preferences (user_id, types) VALUES ($1, '{"low_balance": false}')""",
            user.id,
        )
        assert await db.fetchval("SELECT gw_notify_low_balance($1, 5, 0)", user.id) is False
        assert await outbox(db, user_id=user.id) == []


class TestTrials:
    async def test_expiring_and_ended_once_each(
        self, app: FastAPI, db: asyncpg.Connection, settings: Settings
    ) -> None:
        soon, over, later = await create_user(app), await create_user(app), await create_user(app)
        now = datetime.now(UTC)
        for user, started, ends, status in (
            (soon, now - timedelta(days=5), now + timedelta(days=2), "active"),
            (over, now - timedelta(days=8), now - timedelta(hours=1), "active"),
            (later, now, now + timedelta(days=30), "active"),
        ):
            await db.execute(
                """INSERT INTO trials
                        (user_id, credits, max_tokens, max_requests, started_at, ends_at, status)
                    VALUES ($1, 5, 1000, 10, $2, $3, $4)""",
                user.id,
                started,
                ends,
                status,
            )
        pool = app_state(app).pool
        assert await notifications.check_trials(pool, settings, now=now) == 2
        assert await notifications.check_trials(pool, settings, now=now) == 0
        assert [r["type"] for r in await outbox(db, user_id=soon.id)] == ["trial_expiring"]
        assert [r["type"] for r in await outbox(db, user_id=over.id)] == ["trial_ended"]
        assert await outbox(db, user_id=later.id) == []
        # An extended trial is a new end: it gets its own reminder.
        await db.execute("UPDATE trials SET ends_at = ends_at + interval '1 day' WHERE user_id = $1", soon.id)
        assert await notifications.check_trials(pool, settings, now=now) == 1
        backend = LogBackend()
        assert await notifications.deliver_due(pool, backend) == 3
        assert {m.email.type for m in backend.messages} == {"trial_expiring", "trial_ended"}


class TestDelivery:
    async def _queue_welcome(self, app: FastAPI) -> UUID:
        user = await create_user(app)
        assert await in_transaction(app, lambda conn: notifications.welcome(conn, user_id=user.id))
        return user.id

    async def test_log_backend_records_both_formats_once(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user_id = await self._queue_welcome(app)
        backend = LogBackend()
        pool = app_state(app).pool
        assert await notifications.deliver_due(pool, backend) == 1
        assert await notifications.deliver_due(pool, backend) == 0
        [recorded] = backend.messages
        [row] = await outbox(db, user_id=user_id)
        assert row["status"] == "sent" and row["attempts"] == 1 and row["sent_at"] is not None
        assert row["provider_message_id"] == recorded.id
        assert recorded.email.to == row["to_email"] and recorded.email.subject == "Welcome to Gatewayz"
        assert recorded.email.html == row["html"] and "<html" in recorded.email.html
        assert recorded.email.text == row["text"] and "Welcome to Gatewayz" in recorded.email.text

    async def test_resend_backend_sends_through_the_sdk(
        self, app: FastAPI, db: asyncpg.Connection, fake_resend: FakeResend
    ) -> None:
        user_id = await self._queue_welcome(app)
        assert await notifications.deliver_due(app_state(app).pool, resend_backend(fake_resend)) == 1
        [accepted] = fake_resend.emails
        [row] = await outbox(db, user_id=user_id)
        assert row["status"] == "sent" and row["provider_message_id"] == accepted.id
        assert accepted.body["from"] == "Gatewayz <noreply@gatewayz.ai>"
        assert accepted.to == [row["to_email"]]
        assert accepted.body["subject"] == row["subject"]
        assert accepted.body["html"] == row["html"] and accepted.body["text"] == row["text"]
        assert accepted.body["tags"] == [{"name": "type", "value": "welcome"}]
        assert accepted.user_agent is not None and accepted.user_agent.startswith("resend-python")
        assert accepted.idempotency_key is not None

    async def test_a_failing_backend_keeps_the_message_and_retries_with_backoff(
        self, app: FastAPI, db: asyncpg.Connection, fake_resend: FakeResend
    ) -> None:
        user_id = await self._queue_welcome(app)
        pool, backend = app_state(app).pool, resend_backend(fake_resend)
        now = datetime.now(UTC)
        fake_resend.fail(503)
        assert await notifications.deliver_due(pool, backend, now=now) == 0
        [row] = await outbox(db, user_id=user_id)
        assert row["status"] == "queued" and row["attempts"] == 1
        assert "503" in row["last_error"]
        assert row["next_attempt_at"] == now + notifications.backoff(1)
        # Not due yet: nothing is tried before the backoff ends.
        assert await notifications.deliver_due(pool, backend, now=now + timedelta(seconds=30)) == 0
        assert fake_resend.requests == 1
        later = now + notifications.backoff(1)
        assert await notifications.deliver_due(pool, backend, now=later) == 0
        [row] = await outbox(db, user_id=user_id)
        assert row["attempts"] == 2 and row["next_attempt_at"] == later + notifications.backoff(2)
        assert notifications.backoff(2) == 2 * notifications.backoff(1)
        fake_resend.reset()
        assert await notifications.deliver_due(pool, backend, now=later + timedelta(hours=1)) == 1
        [row] = await outbox(db, user_id=user_id)
        assert row["status"] == "sent" and row["last_error"] is None
        assert [e.id for e in fake_resend.emails] == [row["provider_message_id"]]
        # Sent: never again, however far the clock moves.
        assert await notifications.deliver_due(pool, backend, now=later + timedelta(days=3)) == 0
        assert len(fake_resend.emails) == 1

    async def test_failed_only_after_the_last_attempt(
        self, app: FastAPI, db: asyncpg.Connection, fake_resend: FakeResend
    ) -> None:
        user_id = await self._queue_welcome(app)
        pool, backend = app_state(app).pool, resend_backend(fake_resend)
        fake_resend.fail(500)
        moment = datetime.now(UTC)
        for attempt in range(1, notifications.MAX_ATTEMPTS + 1):
            await notifications.deliver_due(pool, backend, now=moment)
            [row] = await outbox(db, user_id=user_id)
            assert row["attempts"] == attempt
            assert row["status"] == ("failed" if attempt == notifications.MAX_ATTEMPTS else "queued")
            moment = row["next_attempt_at"]
        await notifications.deliver_due(pool, backend, now=moment + timedelta(days=1))
        assert fake_resend.requests == notifications.MAX_ATTEMPTS

    async def test_a_permanent_rejection_fails_at_once(
        self, app: FastAPI, db: asyncpg.Connection, fake_resend: FakeResend
    ) -> None:
        user_id = await self._queue_welcome(app)
        fake_resend.fail(422)
        assert await notifications.deliver_due(app_state(app).pool, resend_backend(fake_resend)) == 0
        [row] = await outbox(db, user_id=user_id)
        assert row["status"] == "failed" and row["attempts"] == 1 and "422" in row["last_error"]

    async def test_a_success_that_was_not_recorded_is_not_sent_again(
        self, app: FastAPI, db: asyncpg.Connection, fake_resend: FakeResend
    ) -> None:
        """The provider accepted the message but the answer was lost: the retry reuses the
        idempotency key, so Resend answers the same id and sends nothing new."""
        user_id = await self._queue_welcome(app)
        pool, real = app_state(app).pool, resend_backend(fake_resend)

        class LostAnswer:
            name = "lost-answer"

            async def send(self, email: OutgoingEmail) -> str:
                await real.send(email)
                raise ConnectionResetError("the connection dropped before the answer arrived")

        now = datetime.now(UTC)
        assert await notifications.deliver_due(pool, LostAnswer(), now=now) == 0
        [first] = fake_resend.emails
        assert (await outbox(db, user_id=user_id))[0]["status"] == "queued"
        assert await notifications.deliver_due(pool, real, now=now + timedelta(hours=1)) == 1
        assert fake_resend.emails == [first]
        assert (await outbox(db, user_id=user_id))[0]["provider_message_id"] == first.id

    async def test_an_abandoned_claim_is_delivered_after_its_lease(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user_id = await self._queue_welcome(app)
        pool, backend = app_state(app).pool, LogBackend()
        now = datetime.now(UTC)
        # A worker claims the message and dies before sending it.
        async with pool.acquire() as conn:
            claimed = await notifications_db.claim_due(
                conn, now=now, limit=10, lease_seconds=notifications.LEASE_SECONDS, max_attempts=10
            )
        assert len(claimed) == 1
        assert await notifications.deliver_due(pool, backend, now=now) == 0  # the lease holds
        lease_end = now + timedelta(seconds=notifications.LEASE_SECONDS)
        assert await notifications.deliver_due(pool, backend, now=lease_end) == 1
        [row] = await outbox(db, user_id=user_id)
        assert row["status"] == "sent" and row["attempts"] == 2
        assert len(backend.messages) == 1

    async def test_an_abandoned_last_attempt_is_failed_not_retried(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user_id = await self._queue_welcome(app)
        await db.execute(
            "UPDATE notification_outbox SET attempts = $2 WHERE user_id = $1",
            user_id,
            notifications.MAX_ATTEMPTS - 1,
        )
        pool, backend = app_state(app).pool, LogBackend()
        now = datetime.now(UTC)
        async with pool.acquire() as conn:
            await notifications_db.claim_due(
                conn,
                now=now,
                limit=10,
                lease_seconds=notifications.LEASE_SECONDS,
                max_attempts=notifications.MAX_ATTEMPTS,
            )
        after_lease = now + timedelta(seconds=notifications.LEASE_SECONDS + 1)
        assert await notifications.deliver_due(pool, backend, now=after_lease) == 0
        [row] = await outbox(db, user_id=user_id)
        assert row["status"] == "failed" and "interrupted" in row["last_error"]
        assert row["attempts"] == notifications.MAX_ATTEMPTS
        assert list(backend.messages) == []

    async def test_concurrent_workers_send_each_message_once(
        self, app: FastAPI, db: asyncpg.Connection, fake_resend: FakeResend
    ) -> None:
        users = [await create_user(app) for _ in range(30)]
        for user in users:
            await in_transaction(app, lambda conn, u=user: notifications.welcome(conn, user_id=u.id))
        pool = app_state(app).pool
        sent = await asyncio.gather(
            *(notifications.deliver_due(pool, resend_backend(fake_resend)) for _ in range(4))
        )
        assert sum(sent) == 30
        assert sorted(e.to[0] for e in fake_resend.emails) == sorted(u.email for u in users)
        assert {r["status"] for r in await outbox(db, type="welcome")} == {"sent"}

    async def test_an_address_suppressed_after_queueing_is_not_mailed(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user_id = await self._queue_welcome(app)
        [row] = await outbox(db, user_id=user_id)
        await db.execute(
            "INSERT INTO email_suppressions (email, reason) VALUES ($1, 'hard_bounce')", row["to_email"]
        )
        backend = LogBackend()
        assert await notifications.deliver_due(app_state(app).pool, backend) == 0
        assert list(backend.messages) == []
        [row] = await outbox(db, user_id=user_id)
        assert row["status"] == "failed" and "suppressed" in row["last_error"]

    async def test_a_deleted_account_is_not_mailed(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user_id = await self._queue_welcome(app)
        await db.execute("UPDATE users SET deleted_at = now() WHERE id = $1", user_id)
        backend = LogBackend()
        assert await notifications.deliver_due(app_state(app).pool, backend) == 0
        assert list(backend.messages) == []
        [row] = await outbox(db, user_id=user_id)
        assert row["status"] == "failed" and row["last_error"] == "the account was deleted"

    async def test_an_unrenderable_message_fails_without_blocking_others(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        await db.execute(
            """INSERT INTO notification_outbox (user_id, to_email, type, context)
                VALUES ($1, $2, 'low_balance', '{"balance": "oops", "threshold": "1"}')""",
            user.id,
            user.email,
        )
        await in_transaction(app, lambda conn: notifications.welcome(conn, user_id=user.id))
        backend = LogBackend()
        assert await notifications.deliver_due(app_state(app).pool, backend) == 1
        statuses = {r["type"]: (r["status"], r["last_error"]) for r in await outbox(db, user_id=user.id)}
        assert statuses["welcome"] == ("sent", None)
        assert statuses["low_balance"][0] == "failed" and "render" in statuses["low_balance"][1]


class TestBackendChoice:
    def test_log_backend_by_default(self, settings: Settings) -> None:
        assert isinstance(notifications.backend_for(settings), LogBackend)

    def test_resend_when_its_key_is_set(self, settings: Settings) -> None:
        configured = settings.model_copy(
            update={"resend_api_key": settings.admin_api_key, "resend_api_url": "http://127.0.0.1:9"}
        )
        backend = notifications.backend_for(configured)
        assert isinstance(backend, ResendBackend) and backend.sender == settings.email_from


class TestWorker:
    @pytest.fixture
    def settings_overrides(self, resend_server: FakeResend) -> dict[str, Any]:
        return {
            "notify_poll_interval_seconds": 0.05,
            "resend_api_key": API_KEY,
            "resend_api_url": resend_server.url,
        }

    async def test_the_app_worker_delivers_through_resend(
        self, app: FastAPI, db: asyncpg.Connection, fake_resend: FakeResend
    ) -> None:
        state = app_state(app)
        assert isinstance(state.mailer, ResendBackend)
        assert state.notifier is not None and not state.notifier.done()
        user = await create_user(app)
        await in_transaction(app, lambda conn: notifications.welcome(conn, user_id=user.id))
        for _ in range(400):  # the worker polls every 50 ms; wait for it, bounded
            rows = await outbox(db, user_id=user.id)
            if rows[0]["status"] == "sent":
                break
            await asyncio.sleep(0.05)
        assert rows[0]["status"] == "sent"
        assert [e.id for e in fake_resend.emails] == [rows[0]["provider_message_id"]]
