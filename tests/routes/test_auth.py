"""POST /auth: Privy login and sign-up; only genuine ES256 tokens for this app get a key."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI

from tests.factories import create_user

APP_ID = "cm-gatewayz-auth-test"
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_PEM = SIGNING_KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
MISSING = object()


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # Sign-up trials are tested in tests/routes/test_trials.py; here a new account starts empty.
    return {"privy_app_id": APP_ID, "privy_verification_key": PUBLIC_PEM, "trial_on_signup": False}


def new_sub() -> str:
    return f"did:privy:{uuid.uuid4().hex}"


def claims(sub: str, /, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "sid": "session-1",
        "iss": "privy.io",
        "aud": APP_ID,
        "sub": sub,
        "iat": now,
        "exp": now + 3600,
    }
    for name, value in overrides.items():
        if value is MISSING:
            payload.pop(name)
        else:
            payload[name] = value
    return payload


def access_token(sub: str, /, *, key: Any = SIGNING_KEY, **overrides: Any) -> str:
    return jwt.encode(claims(sub, **overrides), key, algorithm="ES256")


def identity_token(sub: str, email: str) -> str:
    linked = [{"type": "wallet", "address": "0xabc"}, {"type": "email", "address": email}]
    return jwt.encode(claims(sub, linked_accounts=json.dumps(linked)), SIGNING_KEY, algorithm="ES256")


def _segment(value: dict[str, Any]) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned_token(sub: str) -> str:
    return f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(claims(sub))}."


def hs256_with_public_key(sub: str) -> str:
    # The classic confusion attack: an HMAC keyed with the verifier's own public PEM.
    signing_input = f"{_segment({'alg': 'HS256', 'typ': 'JWT'})}.{_segment(claims(sub))}"
    signature = hmac.new(PUBLIC_PEM.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


async def login(client: httpx.AsyncClient, token: str, **body: Any) -> httpx.Response:
    return await client.post("/auth", headers={"Authorization": f"Bearer {token}"}, json=body or None)


async def audit_actions(db: asyncpg.Connection, action: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT user_id, metadata, before, after FROM audit_logs WHERE action = $1 ORDER BY id", action
    )


class TestFirstLogin:
    async def test_creates_user_and_working_primary_key(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = new_sub()
        response = await login(client, access_token(sub))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["is_new_user"] is True
        assert body["api_key"].startswith("gw_live_")
        assert body["balance"] == {
            "balance": "0.0000000000",
            "held": "0.0000000000",
            "available": "0.0000000000",
        }
        assert body["user"]["email"] is None
        row = await db.fetchrow("SELECT id, privy_id FROM users WHERE privy_id = $1", sub)
        assert row is not None and str(row["id"]) == body["user"]["id"]
        keys = await db.fetch("SELECT is_primary, key_prefix FROM api_keys WHERE user_id = $1", row["id"])
        assert [(k["is_primary"], k["key_prefix"].startswith("gw_live_")) for k in keys] == [(True, True)]
        balance = await client.get("/user/balance", headers={"Authorization": f"Bearer {body['api_key']}"})
        assert balance.status_code == 200
        assert balance.json()["available"] == "0.0000000000"
        signups = await audit_actions(db, "user.signup")
        assert [r["user_id"] for r in signups] == [row["id"]]
        # The audit trail never holds the key itself.
        dump = await db.fetchval(
            "SELECT string_agg(coalesce(after::text, '') || coalesce(metadata::text, ''), '') FROM audit_logs"
        )
        assert body["api_key"] not in dump

    async def test_second_login_returns_the_same_key(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = new_sub()
        first = (await login(client, access_token(sub))).json()
        second = await client.post("/auth", json={"access_token": access_token(sub)})
        assert second.status_code == 200
        assert second.json()["is_new_user"] is False
        assert second.json()["api_key"] == first["api_key"]
        assert second.json()["user"]["id"] == first["user"]["id"]
        assert await db.fetchval("SELECT count(*) FROM users") == 1
        assert await db.fetchval("SELECT count(*) FROM api_keys") == 1

    async def test_identity_token_email_is_attached_lower_cased(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = new_sub()
        response = await login(
            client, access_token(sub), identity_token=identity_token(sub, "Ada@Example.COM")
        )
        assert response.status_code == 200
        assert response.json()["user"]["email"] == "ada@example.com"
        assert await db.fetchval("SELECT email FROM users WHERE privy_id = $1", sub) == "ada@example.com"

    async def test_later_login_attaches_a_first_verified_email(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = new_sub()
        first = (await login(client, access_token(sub))).json()
        assert first["user"]["email"] is None
        second = await login(
            client, access_token(sub), identity_token=identity_token(sub, "Late@Example.com")
        )
        assert second.status_code == 200
        assert second.json()["user"]["email"] == "late@example.com"
        assert second.json()["api_key"] == first["api_key"]
        verified = await audit_actions(db, "user.email_verified")
        assert [(r["before"], r["after"]) for r in verified] == [
            ({"email": None}, {"email": "late@example.com"})
        ]

    async def test_identity_token_of_another_user_is_refused(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = new_sub()
        response = await login(
            client, access_token(sub), identity_token=identity_token(new_sub(), "x@example.com")
        )
        assert response.status_code == 401
        assert await db.fetchval("SELECT count(*) FROM users") == 0

    async def test_email_of_another_account_is_not_attached(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        owner = await create_user(app, email="taken@example.com")
        sub = new_sub()
        response = await login(
            client, access_token(sub), identity_token=identity_token(sub, "TAKEN@example.com")
        )
        assert response.status_code == 200
        assert response.json()["user"]["email"] is None
        assert response.json()["is_new_user"] is True
        rows = await db.fetch("SELECT id, email FROM users ORDER BY created_at")
        assert next((r["id"], r["email"]) for r in rows) == (owner.id, "taken@example.com")
        assert rows[1]["email"] is None
        conflicts = await audit_actions(db, "user.email_conflict")
        assert len(conflicts) == 1
        assert conflicts[0]["metadata"]["privy_id"] == sub

    async def test_concurrent_first_logins_create_one_user(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = new_sub()
        token = access_token(sub)
        responses = await asyncio.gather(*(login(client, token) for _ in range(10)))
        assert [r.status_code for r in responses] == [200] * 10
        assert len({r.json()["api_key"] for r in responses}) == 1
        assert sum(r.json()["is_new_user"] for r in responses) == 1
        assert await db.fetchval("SELECT count(*) FROM users WHERE privy_id = $1", sub) == 1
        assert await db.fetchval("SELECT count(*) FROM api_keys") == 1


FORGERIES = {
    "wrong_key": lambda sub: access_token(sub, key=OTHER_KEY),
    "alg_none": unsigned_token,
    "hs256_with_public_key": hs256_with_public_key,
    "wrong_issuer": lambda sub: access_token(sub, iss="evil.example"),
    "wrong_audience": lambda sub: access_token(sub, aud="cm-someone-else"),
    "expired": lambda sub: access_token(sub, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
    "missing_sub": lambda sub: access_token(sub, sub=MISSING),
}


class TestRefusals:
    @pytest.mark.parametrize("forgery", sorted(FORGERIES))
    async def test_forged_token_is_refused_and_audited(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, forgery: str
    ) -> None:
        sub = new_sub()
        response = await login(client, FORGERIES[forgery](sub))
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "authentication_error"
        assert "api_key" not in response.json()
        assert await db.fetchval("SELECT count(*) FROM users") == 0
        assert await db.fetchval("SELECT count(*) FROM api_keys") == 0
        failures = await audit_actions(db, "auth.login_failed")
        assert len(failures) == 1
        assert failures[0]["metadata"] == {"method": "privy"}

    async def test_missing_token_is_refused(self, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        response = await client.post("/auth")
        assert response.status_code == 401
        assert len(await audit_actions(db, "auth.login_failed")) == 1

    async def test_body_email_is_refused(self, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        sub = new_sub()
        response = await client.post(
            "/auth", json={"access_token": access_token(sub), "email": "me@example.com"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "email"
        assert await db.fetchval("SELECT count(*) FROM users") == 0

    async def test_two_different_tokens_are_refused(self, client: httpx.AsyncClient) -> None:
        response = await login(client, access_token(new_sub()), access_token=access_token(new_sub()))
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "access_token"

    async def test_disabled_user_gets_403_and_no_key(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        sub = new_sub()
        assert (await login(client, access_token(sub))).status_code == 200
        await db.execute("UPDATE users SET is_active = false WHERE privy_id = $1", sub)
        response = await login(client, access_token(sub))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "account_disabled"
        assert "api_key" not in response.text
        failures = await audit_actions(db, "auth.login_failed")
        assert [f["metadata"]["reason"] for f in failures] == ["account disabled"]


class TestNotConfigured:
    @pytest.fixture
    def settings_overrides(self) -> dict[str, Any]:
        return {}

    async def test_privy_not_configured_is_503(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        response = await login(client, access_token(new_sub()))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "privy_not_configured"
        assert await db.fetchval("SELECT count(*) FROM users") == 0
