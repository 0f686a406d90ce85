"""Trials: once per person at sign-up, expiry at the end or at a limit, operator grants and extensions,
conversion; after every test, each user's balance is the sum of their ledger."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI

from src.config import Settings
from src.services import grants
from src.services import trials as trials_service
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import app_state, create_user, create_user_with_permissions
from tests.fakes.upstream import FakeUpstream
from tests.money import assert_money_invariants

APP_ID = "cm-gatewayz-trial-test"
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_PEM = SIGNING_KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
MODEL = "openai/gpt-4o-mini"
CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 50,
}
D = Decimal


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest, upstream_server: FakeUpstream) -> dict[str, Any]:
    """Privy login and the fake upstream as the only provider; indirect parametrisation adds more."""
    extra: dict[str, Any] = getattr(request, "param", {})
    return {
        "privy_app_id": APP_ID,
        "privy_verification_key": PUBLIC_PEM,
        "custom_provider_base_url": upstream_server.base_url,
        "custom_provider_name": "fake",
        "auth_cache_ttl_seconds": 60,
        **extra,
    }


@pytest.fixture(autouse=True)
async def _money_invariants(db: asyncpg.Connection) -> AsyncIterator[None]:
    yield
    await assert_money_invariants(db)


def _claims(sub: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sid": "s", "iss": "privy.io", "aud": APP_ID, "sub": sub, "iat": now, "exp": now + 3600, **extra}


def new_sub() -> str:
    return f"did:privy:{uuid.uuid4().hex}"


async def sign_up(client: httpx.AsyncClient, sub: str, email: str | None = None) -> dict[str, Any]:
    """POST /auth with a Privy access token and, with an e-mail, an identity token carrying it."""
    body: dict[str, Any] = {"access_token": jwt.encode(_claims(sub), SIGNING_KEY, algorithm="ES256")}
    if email is not None:
        linked = json.dumps([{"type": "email", "address": email}])
        body["identity_token"] = jwt.encode(
            _claims(sub, linked_accounts=linked), SIGNING_KEY, algorithm="ES256"
        )
    response = await client.post("/auth", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def bearer(login: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {login['api_key']}"}


async def trial_status(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    response = await client.get("/trial/status", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def stored_credits(db: asyncpg.Connection, user_id: UUID | str) -> Decimal:
    value: Decimal = await db.fetchval("SELECT credits FROM users WHERE id = $1", UUID(str(user_id)))
    return value


async def ledger(db: asyncpg.Connection, user_id: UUID | str) -> list[tuple[str, Decimal]]:
    rows = await db.fetch(
        "SELECT type, amount FROM credit_transactions WHERE user_id = $1 ORDER BY id", UUID(str(user_id))
    )
    return [(row["type"], row["amount"]) for row in rows]


async def claims_of(db: asyncpg.Connection, user_id: UUID | str) -> list[str]:
    rows = await db.fetch(
        "SELECT identity FROM trial_claims WHERE user_id = $1 ORDER BY identity", UUID(str(user_id))
    )
    return [row["identity"] for row in rows]


async def audit_rows(db: asyncpg.Connection, action: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT actor_type, user_id, before, after, metadata FROM audit_logs WHERE action = $1 ORDER BY id",
        action,
    )


class TestEmailNormalisation:
    @pytest.mark.parametrize(
        ("raw", "normalised"),
        [
            ("  Ada.Lovelace+promo@GMail.com ", "adalovelace@gmail.com"),
            ("ada.lovelace@googlemail.com", "adalovelace@gmail.com"),
            ("bob+tag@Example.com", "bob@example.com"),
            ("b.ob@example.com", "b.ob@example.com"),
            ("+only@example.com", "+only@example.com"),
        ],
    )
    def test_one_form_per_mailbox(self, raw: str, normalised: str) -> None:
        assert trials_service.normalise_email(raw) == normalised


class TestSignupTrial:
    async def test_signup_gets_a_trial(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, settings: Settings
    ) -> None:
        sub = new_sub()
        login = await sign_up(client, sub, "Grace.Hopper@Gmail.com")
        assert login["is_new_user"] is True
        assert login["balance"]["balance"] == "5.0000000000"
        user_id = login["user"]["id"]

        status = await trial_status(client, bearer(login))
        assert status["has_trial"] is True and status["active"] is True and status["status"] == "active"
        assert (status["credits_granted"], status["credits_remaining"]) == ("5.0000000000", "5.0000000000")
        assert (status["max_tokens"], status["max_requests"]) == (
            settings.trial_max_tokens,
            settings.trial_max_requests,
        )
        assert (status["used_tokens"], status["used_requests"], status["converted"]) == (0, 0, False)
        trial = await db.fetchrow("SELECT started_at, ends_at FROM trials WHERE user_id = $1", UUID(user_id))
        assert trial is not None and trial["ends_at"] - trial["started_at"] == timedelta(
            days=settings.trial_days
        )

        balance = (await client.get("/user/balance", headers=bearer(login))).json()
        assert [(g["source"], g["remaining"]) for g in balance["grants"]] == [("trial", "5.0000000000")]
        grant = await db.fetchrow(
            "SELECT reference, expires_at FROM credit_grants WHERE user_id = $1", UUID(user_id)
        )
        assert grant is not None and grant["reference"] == f"trial:{user_id}"
        assert grant["expires_at"] == trial["ends_at"]
        assert await ledger(db, user_id) == [("trial", D(5))]
        assert await claims_of(db, user_id) == ["email:gracehopper@gmail.com", f"privy:{sub}"]

    async def test_a_second_login_grants_nothing_more(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = new_sub()
        first = await sign_up(client, sub, "linus@example.com")
        again = await sign_up(client, sub, "linus@example.com")
        assert again["is_new_user"] is False
        assert await ledger(db, first["user"]["id"]) == [("trial", D(5))]

    @pytest.mark.parametrize(
        ("first", "second"),
        [
            ("ada.lovelace@gmail.com", "AdaLovelace+second@googlemail.com"),
            ("bob@example.com", "Bob+again@example.com"),
        ],
    )
    async def test_same_normalised_email_gets_no_second_trial(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, first: str, second: str
    ) -> None:
        one = await sign_up(client, new_sub(), first)
        other_sub = new_sub()
        two = await sign_up(client, other_sub, second)
        assert two["is_new_user"] is True and two["user"]["email"] == second.lower()
        assert two["balance"]["balance"] == "0.0000000000"
        assert (await trial_status(client, bearer(two)))["has_trial"] is False
        assert await ledger(db, two["user"]["id"]) == []
        # All-or-nothing: the new Privy id was not recorded either, so it could still earn a trial.
        assert await claims_of(db, two["user"]["id"]) == []
        assert len(await claims_of(db, one["user"]["id"])) == 2

    async def test_dots_count_outside_gmail(self, client: httpx.AsyncClient) -> None:
        await sign_up(client, new_sub(), "bob@example.com")
        other = await sign_up(client, new_sub(), "b.ob@example.com")
        assert (await trial_status(client, bearer(other)))["active"] is True

    async def test_same_privy_id_after_deletion_gets_no_second_trial(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = new_sub()
        first = await sign_up(client, sub)
        deleted = await client.request(
            "DELETE", "/user/account", headers=bearer(first), json={"confirm": "DELETE"}
        )
        assert deleted.status_code == 200
        second = await sign_up(client, sub)
        assert second["is_new_user"] is True and second["user"]["id"] != first["user"]["id"]
        assert second["balance"]["balance"] == "0.0000000000"
        assert (await trial_status(client, bearer(second)))["has_trial"] is False
        # The claim outlives the account it was made for.
        assert await claims_of(db, first["user"]["id"]) == [f"privy:{sub}"]

    async def test_concurrent_signups_of_one_mailbox_get_one_trial(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        spellings = ["tim.berners.lee@gmail.com", "timbernerslee@gmail.com", "Tim.BernersLee+w3@gmail.com"]
        spellings += ["t.i.m.bernerslee@googlemail.com", "timberners.lee+x@googlemail.com"]
        logins = await asyncio.gather(*(sign_up(client, new_sub(), email) for email in spellings))
        assert all(login["is_new_user"] for login in logins)
        trials = await db.fetchval("SELECT count(*) FROM trials")
        grants_made = await db.fetchval("SELECT count(*) FROM credit_grants WHERE source = 'trial'")
        assert (trials, grants_made) == (1, 1)
        assert await db.fetchval("SELECT count(*) FROM trial_claims") == 2

    @pytest.mark.parametrize("settings_overrides", [{"trial_on_signup": False}], indirect=True)
    async def test_no_trial_when_switched_off(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        login = await sign_up(client, new_sub(), "off@example.com")
        status = await trial_status(client, bearer(login))
        assert status == {
            "object": "trial",
            "has_trial": False,
            "status": None,
            "active": False,
            "credits_granted": "0.0000000000",
            "credits_remaining": "0.0000000000",
            "started_at": None,
            "ends_at": None,
            "ended_at": None,
            "used_tokens": 0,
            "max_tokens": None,
            "used_requests": 0,
            "max_requests": None,
            "converted": False,
            "converted_at": None,
        }
        assert await db.fetchval("SELECT count(*) FROM trial_claims") == 0


class TestTrialEnd:
    async def test_trial_credits_stop_counting_at_the_end(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        login = await sign_up(client, new_sub(), "ends@example.com")
        user_id = UUID(login["user"]["id"])
        await db.execute(
            "UPDATE trials SET ends_at = now() - interval '1 second' WHERE user_id = $1", user_id
        )
        await db.execute(
            "UPDATE credit_grants SET expires_at = now() - interval '1 second' WHERE user_id = $1", user_id
        )

        # No sweeper has run: the stored balance still holds the credits, every read leaves them out.
        assert await stored_credits(db, user_id) == D(5)
        balance = (await client.get("/user/balance", headers=bearer(login))).json()
        assert (balance["balance"], balance["available"], balance["grants"]) == (
            "0.0000000000",
            "0.0000000000",
            [],
        )
        status = await trial_status(client, bearer(login))
        assert (status["status"], status["active"], status["credits_remaining"]) == (
            "ended",
            False,
            "0.0000000000",
        )
        assert status["ended_at"] == status["ends_at"]
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(login))
        assert refused.status_code == 402, refused.text
        assert upstream.chat_requests == []

        assert await grants.expire_due(app_state(app).pool) == 1
        assert await ledger(db, user_id) == [("trial", D(5)), ("expiry", D(-5))]
        assert await stored_credits(db, user_id) == D(0)
        history = (await client.get("/user/credit-transactions", headers=bearer(login))).json()
        assert [(row["type"], row["amount"]) for row in history["data"]] == [
            ("expiry", "-5.0000000000"),
            ("trial", "5.0000000000"),
        ]

    @pytest.mark.parametrize("settings_overrides", [{"trial_max_requests": 2}], indirect=True)
    async def test_used_up_by_max_requests_expires_the_grant(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        upstream.set_reply(prompt_tokens=100, completion_tokens=50)
        login = await sign_up(client, new_sub(), "busy@example.com")
        user_id = UUID(login["user"]["id"])
        costs = []
        for _ in range(2):
            response = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(login))
            assert response.status_code == 200, response.text
            costs.append(D(response.headers["x-gateway-cost"]))
        spent = sum(costs, D(0))
        assert spent > 0

        status = await trial_status(client, bearer(login))
        assert (status["status"], status["active"]) == ("used_up", False)
        assert (status["used_requests"], status["used_tokens"]) == (2, 300)
        assert status["credits_remaining"] == "0.0000000000" and status["ended_at"] is not None
        assert await ledger(db, user_id) == [
            ("trial", D(5)),
            ("usage", -costs[0]),
            ("usage", -costs[1]),
            ("expiry", -(D(5) - spent)),
        ]
        assert await stored_credits(db, user_id) == D(0)
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(login))
        assert refused.status_code == 402, refused.text


async def grant(
    client: httpx.AsyncClient, user_id: UUID, body: dict[str, Any], headers: dict[str, str] = OPERATOR
) -> httpx.Response:
    return await client.post(f"/admin/trials/{user_id}/grant", headers=headers, json=body)


async def extend(
    client: httpx.AsyncClient, user_id: UUID, body: dict[str, Any], headers: dict[str, str] = OPERATOR
) -> httpx.Response:
    return await client.post(f"/admin/trials/{user_id}/extend", headers=headers, json=body)


class TestAdminGrant:
    async def test_operator_grants_a_trial_audited(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        response = await grant(
            client, user.id, {"credits": "3", "days": 2, "max_requests": 10, "reason": "conference lead"}
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["active"], body["credits_granted"], body["max_requests"]) == (True, "3.0000000000", 10)
        assert body["max_tokens"] == 1_000_000  # the setting, as the body left it out
        assert await ledger(db, user.id) == [("trial", D(3))]
        assert await claims_of(db, user.id) == [f"email:{user.email}"]
        [row] = await audit_rows(db, "trial.grant")
        assert (row["actor_type"], row["user_id"]) == ("operator", user.id)
        assert row["after"]["credits"] == "3.0000000000"
        assert row["metadata"] == {"reason": "conference lead"}
        assert (await trial_status(client, user.headers))["credits_remaining"] == "3.0000000000"

        again = await grant(client, user.id, {})
        assert again.status_code == 409 and again.json()["error"]["code"] == "trial_exists"
        assert await ledger(db, user.id) == [("trial", D(3))]

    async def test_unknown_user(self, client: httpx.AsyncClient) -> None:
        response = await grant(client, uuid.uuid4(), {})
        assert response.status_code == 404 and response.json()["error"]["code"] == "user_not_found"

    async def test_needs_trials_write(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        reader = await create_user_with_permissions(app, client, ["billing.read", "users.write"])
        target = await create_user(app)
        for response in (
            await grant(client, target.id, {}, reader.headers),
            await extend(client, target.id, {"days": 1}, reader.headers),
        ):
            assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
        writer = await create_user_with_permissions(app, client, ["trials.write"])
        assert (await grant(client, target.id, {}, writer.headers)).status_code == 201
        [row] = await audit_rows(db, "trial.grant")
        assert (row["actor_type"], row["user_id"]) == ("user", target.id)


class TestAdminCreateUserTrial:
    async def test_trial_only_when_asked(self, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        plain = await client.post("/admin/users", headers=OPERATOR, json={"email": "plain@example.com"})
        asked = await client.post(
            "/admin/users", headers=OPERATOR, json={"email": "asked@example.com", "trial": True}
        )
        assert (plain.status_code, asked.status_code) == (201, 201)
        assert plain.json()["balance"]["balance"] == "0.0000000000"
        assert asked.json()["balance"]["balance"] == "5.0000000000"
        key = {"Authorization": f"Bearer {asked.json()['api_key']}"}
        assert (await trial_status(client, key))["active"] is True
        assert await db.fetchval("SELECT count(*) FROM trials") == 1
        assert await claims_of(db, asked.json()["user_id"]) == ["email:asked@example.com"]

    async def test_asking_for_a_trial_needs_trials_write(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        creator = await create_user_with_permissions(app, client, ["users.write"])
        response = await client.post(
            "/admin/users", headers=creator.headers, json={"email": "t@example.com", "trial": True}
        )
        assert response.status_code == 403 and response.json()["error"]["code"] == "permission_escalation"
        assert await db.fetchval("SELECT count(*) FROM users WHERE email = 't@example.com'") == 0


class TestAdminExtend:
    async def test_extend_moves_the_end_and_adds_credits_and_limits(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        assert (
            await grant(client, user.id, {"credits": "2", "days": 1, "max_requests": 5})
        ).status_code == 201
        before = await db.fetchrow("SELECT ends_at FROM trials WHERE user_id = $1", user.id)
        assert before is not None
        response = await extend(
            client, user.id, {"days": 3, "credits": "1.5", "max_requests": 10, "reason": "needs more time"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["active"], body["credits_granted"], body["credits_remaining"]) == (
            True,
            "3.5000000000",
            "3.5000000000",
        )
        assert body["max_requests"] == 15
        trial = await db.fetchrow("SELECT ends_at, credits FROM trials WHERE user_id = $1", user.id)
        assert trial is not None and trial["ends_at"] == before["ends_at"] + timedelta(days=3)
        assert trial["credits"] == D("3.5")
        expiries = await db.fetch(
            "SELECT amount, expires_at FROM credit_grants WHERE user_id = $1 ORDER BY id", user.id
        )
        assert [(row["amount"], row["expires_at"]) for row in expiries] == [
            (D(2), trial["ends_at"]),
            (D("1.5"), trial["ends_at"]),
        ]
        [row] = await audit_rows(db, "trial.extend")
        assert row["actor_type"] == "operator" and row["user_id"] == user.id
        assert row["before"]["max_requests"] == 5 and row["after"]["max_requests"] == 15
        assert row["metadata"]["reason"] == "needs more time"

    async def test_extending_an_ended_trial_restarts_from_now_without_reviving_expired_credits(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        assert (await grant(client, user.id, {"credits": "4", "days": 1})).status_code == 201
        await db.execute("UPDATE trials SET ends_at = now() - interval '1 day' WHERE user_id = $1", user.id)
        await db.execute(
            "UPDATE credit_grants SET expires_at = now() - interval '1 day' WHERE user_id = $1", user.id
        )
        assert (await trial_status(client, user.headers))["status"] == "ended"

        response = await extend(client, user.id, {"days": 2, "credits": "1"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["status"], body["credits_remaining"], body["credits_granted"]) == (
            "active",
            "1.0000000000",
            "5.0000000000",
        )
        assert await ledger(db, user.id) == [("trial", D(4)), ("expiry", D(-4)), ("trial", D(1))]
        # Two days from the extension (the new grant was made in the same transaction).
        extended_at = await db.fetchval(
            "SELECT created_at FROM credit_grants WHERE user_id = $1 ORDER BY id DESC LIMIT 1", user.id
        )
        assert await db.fetchval(
            "SELECT ends_at FROM trials WHERE user_id = $1", user.id
        ) == extended_at + timedelta(days=2)

    async def test_a_used_up_trial_needs_more_requests(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        assert (await grant(client, user.id, {"credits": "1", "max_requests": 1})).status_code == 201
        await db.execute(
            "UPDATE trials SET used_requests = 1, status = 'used_up', ended_at = now() WHERE user_id = $1",
            user.id,
        )
        refused = await extend(client, user.id, {"days": 5})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "trial_still_over"
        assert await audit_rows(db, "trial.extend") == []
        response = await extend(client, user.id, {"max_requests": 3})
        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["ended_at"]) == ("active", None)

    async def test_refusals(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        missing = await extend(client, user.id, {"days": 1})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "trial_not_found"
        empty = await extend(client, user.id, {})
        assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_extension"
        negative = await extend(client, user.id, {"days": -1})
        assert negative.status_code == 400

    async def test_idempotency_key_extends_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        assert (await grant(client, user.id, {"credits": "1"})).status_code == 201
        headers = {**OPERATOR, "Idempotency-Key": "extend-1"}
        first = await extend(client, user.id, {"days": 1, "credits": "2"}, headers)
        second = await extend(client, user.id, {"days": 1, "credits": "2"}, headers)
        assert (first.status_code, second.status_code) == (200, 200)
        assert first.json() == second.json()
        assert await ledger(db, user.id) == [("trial", D(1)), ("trial", D(2))]
        assert len(await audit_rows(db, "trial.extend")) == 1


class TestConversion:
    async def test_recorded_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        login = await sign_up(client, new_sub(), "payer@example.com")
        user_id = UUID(login["user"]["id"])
        async with app_state(app).pool.acquire() as conn, conn.transaction():
            await trials_service.record_conversion(conn, user_id=user_id, payment_reference="cs_first")
        first = await db.fetchrow(
            "SELECT converted_at, conversion_reference FROM trials WHERE user_id = $1", user_id
        )
        async with app_state(app).pool.acquire() as conn, conn.transaction():
            await trials_service.record_conversion(conn, user_id=user_id, payment_reference="cs_second")
        again = await db.fetchrow(
            "SELECT converted_at, conversion_reference FROM trials WHERE user_id = $1", user_id
        )
        assert first is not None and first["conversion_reference"] == "cs_first"
        assert again == first
        status = await trial_status(client, bearer(login))
        assert status["converted"] is True and status["converted_at"] is not None

    async def test_nothing_for_a_user_without_a_trial(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app)
        async with app_state(app).pool.acquire() as conn, conn.transaction():
            await trials_service.record_conversion(conn, user_id=user.id, payment_reference="cs_x")
        assert await db.fetchval("SELECT count(*) FROM trials") == 0
