"""Notification routes: the welcome e-mail on first login only, the caller's preferences (receipts
cannot be turned off) and e-mails, the admin outbox, test e-mails and announcements (refused to
non-admins), and Resend's webhook (Svix signature verified, replays ignored, hard bounces
suppress the address)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI

from src.services import notifications
from src.services.notifications import LogBackend
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import TestUser, app_state, create_user, create_user_with_permissions

APP_ID = "cm-gatewayz-notifications-test"
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_PEM = SIGNING_KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "privy_app_id": APP_ID,
        "privy_verification_key": PUBLIC_PEM,
        "trial_on_signup": False,
        "resend_webhook_secret": WEBHOOK_SECRET,
        # The tests drive delivery themselves (deliver_due); the app's own worker stays asleep.
        "notify_poll_interval_seconds": 3600,
    }


def _claims(sub: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sid": "s", "iss": "privy.io", "aud": APP_ID, "sub": sub, "iat": now, "exp": now + 3600, **extra}


async def login(client: httpx.AsyncClient, sub: str, email: str) -> dict[str, Any]:
    linked = json.dumps([{"type": "email", "address": email}])
    body = {
        "access_token": jwt.encode(_claims(sub), SIGNING_KEY, algorithm="ES256"),
        "identity_token": jwt.encode(_claims(sub, linked_accounts=linked), SIGNING_KEY, algorithm="ES256"),
    }
    response = await client.post("/auth", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def deliver(app: FastAPI) -> LogBackend:
    backend = LogBackend()
    await notifications.deliver_due(app_state(app).pool, backend)
    return backend


async def queue_receipt(app: FastAPI, user: TestUser, reference: str) -> None:
    async with app_state(app).pool.acquire() as conn, conn.transaction():
        assert await notifications.payment_confirmed(
            conn,
            user_id=user.id,
            payment_reference=reference,
            amount_cents=2000,
            currency="usd",
            credits=Decimal("20"),
        )


class TestWelcome:
    async def test_first_login_only(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = f"did:privy:{uuid.uuid4().hex}"
        first = await login(client, sub, "Ada@Example.com")
        again = await login(client, sub, "ada@example.com")
        assert first["is_new_user"] is True and again["is_new_user"] is False
        rows = await db.fetch("SELECT type, to_email, dedupe_key FROM notification_outbox")
        user_id = first["user"]["id"]
        assert [tuple(r) for r in rows] == [("welcome", "ada@example.com", f"welcome:{user_id}")]
        backend = await deliver(app)
        [message] = backend.messages
        assert message.email.subject == "Welcome to Gatewayz" and message.email.to == "ada@example.com"
        mine = await client.get(
            "/user/notifications", headers={"Authorization": f"Bearer {again['api_key']}"}
        )
        assert mine.status_code == 200
        assert [(n["type"], n["status"]) for n in mine.json()["data"]] == [("welcome", "sent")]


class TestPreferences:
    async def test_defaults(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        response = await client.get("/user/notifications/preferences", headers=user.headers)
        assert response.status_code == 200
        assert response.json() == {
            "types": {
                "low_balance": True,
                "trial_expiring": True,
                "trial_ended": True,
                "announcement": True,
                "payment_confirmation": True,
                "api_key_created": True,
            },
            "always_on": ["payment_confirmation", "api_key_created"],
            "low_balance_threshold": "1",
        }

    async def test_update_and_effect(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        response = await client.put(
            "/user/notifications/preferences",
            headers=user.headers,
            json={"types": {"announcement": False}, "low_balance_threshold": "7.5"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["types"]["announcement"] is False and body["types"]["low_balance"] is True
        assert body["low_balance_threshold"] == "7.5000000000"
        # Partial: the threshold stays when only a type changes.
        response = await client.put(
            "/user/notifications/preferences", headers=user.headers, json={"types": {"announcement": True}}
        )
        assert response.json()["types"]["announcement"] is True
        assert response.json()["low_balance_threshold"] == "7.5000000000"
        # The threshold is what the low-balance check uses.
        assert await db.fetchval("SELECT gw_notify_low_balance($1, 8, 7)", user.id) is True
        audit = await db.fetch(
            "SELECT after FROM audit_logs WHERE action = 'notifications.preferences_update' AND user_id = $1",
            user.id,
        )
        assert len(audit) == 2

    @pytest.mark.parametrize("kind", ["payment_confirmation", "api_key_created"])
    async def test_receipts_cannot_be_turned_off(
        self, app: FastAPI, client: httpx.AsyncClient, kind: str
    ) -> None:
        user = await create_user(app)
        response = await client.put(
            "/user/notifications/preferences", headers=user.headers, json={"types": {kind: False}}
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "notification_required"
        assert response.json()["error"]["param"] == f"types.{kind}"

    @pytest.mark.parametrize(
        "body",
        [
            {"types": {"welcome": False}},
            {"types": {"nope": True}},
            {"types": {"announcement": "no"}},
            {"low_balance_threshold": "-1"},
            {"low_balance_threshold": "0.00000000001"},
            {"extra": 1},
            {},
        ],
    )
    async def test_invalid_bodies(
        self, app: FastAPI, client: httpx.AsyncClient, body: dict[str, Any]
    ) -> None:
        user = await create_user(app)
        response = await client.put("/user/notifications/preferences", headers=user.headers, json=body)
        assert response.status_code == 400, body

    async def test_needs_a_user_key(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/user/notifications/preferences")).status_code == 401
        response = await client.get("/user/notifications/preferences", headers=OPERATOR)
        assert response.status_code == 403


class TestMyNotifications:
    async def test_own_messages_paged(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        me, other = await create_user(app), await create_user(app)
        for n in range(3):
            await queue_receipt(app, me, f"pi_mine_{n}")
        await queue_receipt(app, other, "pi_other")
        page = await client.get("/user/notifications?limit=2", headers=me.headers)
        assert page.status_code == 200
        body = page.json()
        assert body["total"] == 3 and len(body["data"]) == 2 and body["limit"] == 2
        # Queued messages show the subject they will have.
        assert body["data"][0]["subject"] == "Payment received: $20.00"
        assert body["data"][0]["status"] == "queued"
        assert "to_email" not in body["data"][0]
        rest = await client.get("/user/notifications?limit=2&offset=2", headers=me.headers)
        assert len(rest.json()["data"]) == 1
        theirs = await client.get("/user/notifications", headers=other.headers)
        assert theirs.json()["total"] == 1


class TestAdmin:
    async def test_non_admins_are_refused(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        reader = await create_user_with_permissions(app, client, ["notifications.read"])
        for method, path, body in (
            ("GET", "/admin/notifications", None),
            ("POST", "/admin/notifications/test", {"to": "x@example.com"}),
            ("POST", "/admin/notifications/announcement", {"subject": "s", "body": "b"}),
        ):
            assert (await client.request(method, path, json=body)).status_code == 401
            assert (await client.request(method, path, json=body, headers=user.headers)).status_code == 403
        assert (await client.get("/admin/notifications", headers=reader.headers)).status_code == 200
        refused = await client.post(
            "/admin/notifications/test", headers=reader.headers, json={"to": "x@example.com"}
        )
        assert refused.status_code == 403

    async def test_test_email_and_delivery_status(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        queued = await client.post(
            "/admin/notifications/test", headers=OPERATOR, json={"to": "Ops@Example.com"}
        )
        assert queued.status_code == 202, queued.text
        body = queued.json()
        assert body["status"] == "queued" and body["to_email"] == "ops@example.com" and body["type"] == "test"
        assert body["subject"] == "Gatewayz test e-mail" and body["user_id"] is None
        backend = await deliver(app)
        [message] = backend.messages
        listed = await client.get("/admin/notifications?type=test", headers=OPERATOR)
        assert listed.status_code == 200
        [row] = listed.json()["data"]
        assert row["id"] == body["id"] and row["status"] == "sent" and row["attempts"] == 1
        assert row["provider_message_id"] == message.id and row["sent_at"] is not None
        by_status = await client.get("/admin/notifications?status=queued", headers=OPERATOR)
        assert by_status.json()["total"] == 0
        assert await db.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'notifications.test'") == 1

    async def test_suppressed_address_is_refused(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        await db.execute(
            "INSERT INTO email_suppressions (email, reason) VALUES ('gone@example.com', 'hard_bounce')"
        )
        response = await client.post(
            "/admin/notifications/test", headers=OPERATOR, json={"to": "gone@example.com"}
        )
        assert response.status_code == 409 and response.json()["error"]["code"] == "email_suppressed"

    async def test_admin_list_filters(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        first, second = await create_user(app), await create_user(app)
        await queue_receipt(app, first, "pi_a")
        await queue_receipt(app, second, "pi_b")
        only = await client.get(f"/admin/notifications?user_id={first.id}", headers=OPERATOR)
        assert [r["dedupe_key"] for r in only.json()["data"]] == ["payment:pi_a"]
        by_address = await client.get(f"/admin/notifications?to={second.email.upper()}", headers=OPERATOR)
        assert [r["dedupe_key"] for r in by_address.json()["data"]] == ["payment:pi_b"]
        bad = await client.get("/admin/notifications?status=nope", headers=OPERATOR)
        assert bad.status_code == 400

    async def test_announcement_to_everyone_who_wants_it(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        users = [await create_user(app) for _ in range(4)]
        keen, opted_out, banned, bounced = users
        await client.put(
            "/user/notifications/preferences",
            headers=opted_out.headers,
            json={"types": {"announcement": False}},
        )
        await db.execute("UPDATE users SET banned_at = now() WHERE id = $1", banned.id)
        await db.execute(
            "INSERT INTO email_suppressions (email, reason) VALUES ($1, 'complaint')", bounced.email
        )
        response = await client.post(
            "/admin/notifications/announcement",
            headers=OPERATOR,
            json={"subject": "New models <today>", "body": "Hello & welcome.\n\nSecond <b>paragraph</b>."},
        )
        assert response.status_code == 202, response.text
        assert response.json()["queued"] == 1
        backend = await deliver(app)
        [message] = backend.messages
        assert message.email.to == keen.email and message.email.subject == "New models <today>"
        assert "Second &lt;b&gt;paragraph&lt;/b&gt;." in message.email.html
        assert "Second <b>paragraph</b>." in message.email.text
        audit = await db.fetchrow(
            "SELECT metadata FROM audit_logs WHERE action = 'notifications.announcement'"
        )
        assert audit["metadata"]["queued"] == 1

    async def test_announcement_to_listed_users(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        users = [await create_user(app) for _ in range(3)]
        response = await client.post(
            "/admin/notifications/announcement",
            headers=OPERATOR,
            json={
                "subject": "Beta",
                "body": "You are in.",
                "user_ids": [str(users[0].id), str(uuid.uuid4())],
            },
        )
        assert response.status_code == 202
        assert response.json()["queued"] == 1
        assert [m.email.to for m in (await deliver(app)).messages] == [users[0].email]


def sign(
    body: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None, svix_id: str | None = None
) -> dict[str, str]:
    svix_id = svix_id or f"msg_{uuid.uuid4().hex}"
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{svix_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "svix-id": svix_id,
        "svix-timestamp": stamp,
        "svix-signature": "v1," + base64.b64encode(digest).decode(),
        "content-type": "application/json",
    }


def event(type: str, email_id: str, to: str, **data: Any) -> bytes:
    payload = {
        "type": type,
        "created_at": "2026-03-01T12:00:00.000Z",
        "data": {
            "created_at": "2026-03-01T12:00:00.000Z",
            "email_id": email_id,
            "from": "Gatewayz <noreply@gatewayz.ai>",
            "to": [to],
            "subject": "Payment received",
            **data,
        },
    }
    return json.dumps(payload).encode()


class TestResendWebhook:
    async def _sent_receipt(self, app: FastAPI) -> tuple[TestUser, str]:
        user = await create_user(app)
        await queue_receipt(app, user, f"pi_{uuid.uuid4().hex[:8]}")
        [message] = (await deliver(app)).messages
        return user, message.id

    async def _status(self, db: asyncpg.Connection, user: TestUser) -> tuple[str, str | None]:
        row = await db.fetchrow(
            """SELECT status, last_error FROM notification_outbox
                WHERE user_id = $1 AND type = 'payment_confirmation'""",
            user.id,
        )
        return row["status"], row["last_error"]

    async def test_delivered_and_replays_ignored(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user, email_id = await self._sent_receipt(app)
        body = event("email.delivered", email_id, user.email)
        headers = sign(body)
        response = await client.post("/webhooks/resend", content=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"received": True, "duplicate": False}
        assert await self._status(db, user) == ("delivered", None)
        # A replay of that delivery (same svix-id), even carrying another event, changes nothing.
        bounce = event("email.bounced", email_id, user.email, bounce={"type": "Permanent", "message": "x"})
        replay = await client.post(
            "/webhooks/resend", content=bounce, headers=sign(bounce, svix_id=headers["svix-id"])
        )
        assert replay.status_code == 200 and replay.json()["duplicate"] is True
        assert await self._status(db, user) == ("delivered", None)
        assert await db.fetchval("SELECT count(*) FROM email_suppressions") == 0

    async def test_hard_bounce_suppresses_the_address(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user, email_id = await self._sent_receipt(app)
        body = event(
            "email.bounced",
            email_id,
            user.email.upper(),
            bounce={"type": "Permanent", "subType": "General", "message": "550 mailbox does not exist"},
        )
        response = await client.post("/webhooks/resend", content=body, headers=sign(body))
        assert response.status_code == 200
        assert await self._status(db, user) == ("bounced", "550 mailbox does not exist")
        reason = await db.fetchval("SELECT reason FROM email_suppressions WHERE email = $1", user.email)
        assert reason == "hard_bounce"
        # No further mail to that address: not even a receipt is queued.
        async with app_state(app).pool.acquire() as conn:
            assert not await notifications.payment_confirmed(
                conn,
                user_id=user.id,
                payment_reference="pi_after",
                amount_cents=100,
                currency="usd",
                credits=Decimal(1),
            )
        listed = await client.get(f"/admin/notifications?user_id={user.id}", headers=OPERATOR)
        [row] = listed.json()["data"]
        assert row["status"] == "bounced" and row["last_error"] == "550 mailbox does not exist"

    async def test_transient_bounce_does_not_suppress(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user, email_id = await self._sent_receipt(app)
        body = event(
            "email.bounced", email_id, user.email, bounce={"type": "Transient", "message": "mailbox full"}
        )
        assert (await client.post("/webhooks/resend", content=body, headers=sign(body))).status_code == 200
        assert (await self._status(db, user))[0] == "bounced"
        assert await db.fetchval("SELECT count(*) FROM email_suppressions") == 0

    async def test_complaint_suppresses(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user, email_id = await self._sent_receipt(app)
        body = event("email.complained", email_id, user.email)
        assert (await client.post("/webhooks/resend", content=body, headers=sign(body))).status_code == 200
        assert (
            await db.fetchval("SELECT reason FROM email_suppressions WHERE email = $1", user.email)
            == "complaint"
        )

    @pytest.mark.parametrize(
        "tamper",
        ["wrong secret", "changed body", "stale timestamp", "no signature", "no id", "garbage signature"],
    )
    async def test_bad_signatures_are_refused(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, tamper: str
    ) -> None:
        user, email_id = await self._sent_receipt(app)
        body = event("email.bounced", email_id, user.email, bounce={"type": "Permanent", "message": "x"})
        headers = sign(body)
        if tamper == "wrong secret":
            headers = sign(body, secret="whsec_" + base64.b64encode(secrets.token_bytes(24)).decode())
        elif tamper == "changed body":
            body = body.replace(b"Permanent", b"Permanant")
        elif tamper == "stale timestamp":
            headers = sign(body, timestamp=int(time.time()) - 3600)
        elif tamper == "no signature":
            del headers["svix-signature"]
        elif tamper == "no id":
            del headers["svix-id"]
        else:
            headers["svix-signature"] = "v1,bm90IGEgc2lnbmF0dXJl"
        response = await client.post("/webhooks/resend", content=body, headers=headers)
        assert response.status_code == 400, tamper
        assert response.json()["error"]["code"] == "invalid_signature"
        assert await self._status(db, user) == ("sent", None)
        assert await db.fetchval("SELECT count(*) FROM resend_webhook_events") == 0
        assert await db.fetchval("SELECT count(*) FROM email_suppressions") == 0

    @pytest.mark.parametrize("settings_overrides", [{"resend_webhook_secret": None}])
    async def test_unconfigured_secret_refuses_everything(self, client: httpx.AsyncClient) -> None:
        body = event("email.delivered", "x", "a@example.com")
        response = await client.post("/webhooks/resend", content=body, headers=sign(body))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "webhook_not_configured"
