"""/user routes: the caller's balance, profile, deletion and ledger, and nobody else's."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from src.db import ledger as ledger_db
from src.routes import users as users_routes
from src.services import users as users_service
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import TestUser, app_state, create_key, create_user

ZERO = "0.0000000000"


async def profile_row(db: asyncpg.Connection, user: TestUser) -> dict[str, Any]:
    row = await db.fetchrow(
        """SELECT email, contact_email, privy_id, username, credits, held, role, is_active, banned_at,
                referral_code, preferences, deleted_at, updated_at FROM users WHERE id = $1""",
        user.id,
    )
    assert row is not None
    return dict(row)


async def add_ledger_row(db: asyncpg.Connection, user: TestUser, amount: str, type: str) -> None:
    async with db.transaction():
        row = await ledger_db.change_credits(
            db, user_id=user.id, amount=Decimal(amount), type=type, actor="system", reference=f"ref-{type}"
        )
    assert row is not None


class TestBalance:
    async def test_balance_held_and_available(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="5")
        first = (await client.get("/user/balance", headers=user.headers)).json()
        assert {k: first[k] for k in ("balance", "held", "available")} == {
            "balance": "5.0000000000",
            "held": ZERO,
            "available": "5.0000000000",
        }
        assert [(g["source"], g["amount"], g["remaining"], g["expires_at"]) for g in first["grants"]] == [
            ("admin", "5.0000000000", "5.0000000000", None)
        ]
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await users_service.change_credits(
                conn, user_id=user.id, amount=Decimal("2.5"), reason="goodwill", actor=None, meta=None
            )
        await db.execute("UPDATE users SET held = 1.25 WHERE id = $1", user.id)
        response = await client.get("/user/balance", headers=user.headers)
        assert response.status_code == 200
        body = response.json()
        assert {k: body[k] for k in ("balance", "held", "available")} == {
            "balance": "7.5000000000",
            "held": "1.2500000000",
            "available": "6.2500000000",
        }
        assert sorted(g["remaining"] for g in body["grants"]) == ["2.5000000000", "5.0000000000"]

    async def test_each_user_sees_their_own_balance(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        rich = await create_user(app, credits="100")
        poor = await create_user(app, credits="1")
        assert (await client.get("/user/balance", headers=rich.headers)).json()["balance"] == "100.0000000000"
        assert (await client.get("/user/balance", headers=poor.headers)).json()["balance"] == "1.0000000000"


class TestProfile:
    async def test_get_profile_shows_public_fields_only(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        user = await create_user(app, email="ada@example.com")
        response = await client.get("/user/profile", headers=user.headers)
        assert response.status_code == 200
        body = response.json()
        assert body["id"] == str(user.id)
        assert body["email"] == "ada@example.com"
        assert body["contact_email"] is None
        assert body["role"] == "user"
        assert body["is_active"] is True
        assert body["preferences"] == {}
        assert not {"privy_id", "credits", "held", "banned_at", "deleted_at"} & body.keys()

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("credits", 1_000_000),
            ("role", "admin"),
            ("is_active", False),
            ("referral_code", "FREE-MONEY"),
            ("id", str(uuid.uuid4())),
            ("privy_id", "did:privy:someone"),
            ("email_verified", True),
            ("held", "-100"),
            ("contact_email", "a@b.co"),
        ],
    )
    async def test_mass_assignment_is_refused(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, field: str, value: Any
    ) -> None:
        user = await create_user(app, credits="5")
        before = await profile_row(db, user)
        response = await client.put(
            "/user/profile", headers=user.headers, json={"username": "mallory", field: value}
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == field
        assert await profile_row(db, user) == before
        assert not await db.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'user.profile_update'")

    async def test_update_is_applied_and_audited(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, email="verified@example.com")
        response = await client.put(
            "/user/profile",
            headers=user.headers,
            json={"username": "  Ada  ", "email": "Ada@Contact.example", "preferences": {"theme": "dark"}},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["username"] == "Ada"
        assert body["contact_email"] == "ada@contact.example"
        # The verified address is untouched: a typed one never replaces it.
        assert body["email"] == "verified@example.com"
        assert body["preferences"] == {"theme": "dark"}
        row = await profile_row(db, user)
        assert (row["username"], row["contact_email"], row["email"], row["preferences"]) == (
            "Ada",
            "ada@contact.example",
            "verified@example.com",
            {"theme": "dark"},
        )
        audit = await db.fetchrow(
            "SELECT actor_type, actor_id, before, after FROM audit_logs WHERE action = 'user.profile_update'"
        )
        assert audit is not None
        assert (audit["actor_type"], audit["actor_id"]) == ("user", user.id)
        assert audit["before"] == {"username": None, "contact_email": None, "preferences": {}}
        assert audit["after"] == {
            "username": "Ada",
            "contact_email": "ada@contact.example",
            "preferences": {"theme": "dark"},
        }

    async def test_partial_update_keeps_other_fields(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        await client.put(
            "/user/profile", headers=user.headers, json={"username": "ada", "preferences": {"a": 1}}
        )
        response = await client.put("/user/profile", headers=user.headers, json={"email": "a@b.co"})
        assert response.status_code == 200
        row = await profile_row(db, user)
        assert (row["username"], row["preferences"], row["contact_email"]) == ("ada", {"a": 1}, "a@b.co")

    async def test_typed_email_is_not_treated_as_an_identity(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        owner = await create_user(app, email="owner@example.com")
        other = await create_user(app)
        response = await client.put(
            "/user/profile", headers=other.headers, json={"email": "owner@example.com"}
        )
        assert response.status_code == 200
        assert await db.fetchval("SELECT email FROM users WHERE id = $1", other.id) == other.email
        assert await db.fetchval("SELECT email FROM users WHERE id = $1", owner.id) == "owner@example.com"

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"username": ""}, "username"),
            ({"username": "   "}, "username"),
            ({"username": "x" * 65}, "username"),
            ({"username": "bad\x00name"}, "username"),
            ({"email": "not-an-email"}, "email"),
            ({"email": "a@b"}, "email"),
            ({"preferences": ["not", "an", "object"]}, "preferences"),
            ({"preferences": None}, "preferences"),
            ({"preferences": {"blob": "x" * 17_000}}, "preferences"),
        ],
    )
    async def test_invalid_values_are_refused(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        body: dict[str, Any],
        param: str,
    ) -> None:
        user = await create_user(app)
        before = await profile_row(db, user)
        response = await client.put("/user/profile", headers=user.headers, json=body)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param
        assert await profile_row(db, user) == before

    async def test_empty_update_is_refused(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        response = await client.put("/user/profile", headers=user.headers, json={})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "empty_update"


class TestDeleteAccount:
    @pytest.mark.parametrize("body", [None, {}, {"confirm": "yes"}, {"confirm": "delete"}, {"confirm": True}])
    async def test_confirmation_is_required(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, body: Any
    ) -> None:
        user = await create_user(app)
        response = await client.request("DELETE", "/user/account", headers=user.headers, json=body)
        assert response.status_code == 400
        row = await profile_row(db, user)
        assert row["deleted_at"] is None and row["is_active"] is True
        assert (await client.get("/user/balance", headers=user.headers)).status_code == 200

    async def test_delete_anonymises_and_revokes_every_key(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, email="gone@example.com", credits="3")
        _, second_key = await create_key(app, user)
        await client.put("/user/profile", headers=user.headers, json={"username": "ada", "email": "c@d.co"})
        # Both keys are now in the auth cache: deletion must drop them there too, not only in the table.
        assert (await client.get("/user/balance", headers=user.headers)).status_code == 200
        second_headers = {"Authorization": f"Bearer {second_key}"}
        assert (await client.get("/user/profile", headers=second_headers)).status_code == 200
        audit_before = await db.fetchval("SELECT count(*) FROM audit_logs WHERE user_id = $1", user.id)

        response = await client.request(
            "DELETE", "/user/account", headers=user.headers, json={"confirm": "DELETE"}
        )
        assert response.status_code == 200
        assert response.json() == {"deleted": True}

        assert (await client.get("/user/balance", headers=user.headers)).status_code == 401
        assert (await client.get("/user/profile", headers=second_headers)).status_code == 401
        row = await profile_row(db, user)
        assert row["email"] is None and row["contact_email"] is None
        assert row["privy_id"] is None and row["username"] is None
        assert row["is_active"] is False and row["deleted_at"] is not None
        assert (
            await db.fetchval(
                "SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL", user.id
            )
            == 0
        )
        actions = [
            r["action"]
            for r in await db.fetch("SELECT action FROM audit_logs WHERE user_id = $1 ORDER BY id", user.id)
        ]
        assert len(actions) == audit_before + 1
        assert actions[-1] == "user.delete"
        assert {"user.create", "user.profile_update"} <= set(actions)
        # The e-mail is free again for a new account.
        assert await create_user(app, email="gone@example.com")


class TestCreditTransactions:
    async def test_paging_newest_first(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="5")
        await add_ledger_row(db, user, "10", "purchase")
        await add_ledger_row(db, user, "-1.5", "usage")
        await add_ledger_row(db, user, "20", "purchase")
        first = await client.get("/user/credit-transactions?limit=2", headers=user.headers)
        assert first.status_code == 200
        page = first.json()
        assert (page["object"], page["total"], page["limit"], page["offset"]) == ("list", 4, 2, 0)
        assert [(t["type"], t["amount"]) for t in page["data"]] == [
            ("purchase", "20.0000000000"),
            ("usage", "-1.5000000000"),
        ]
        assert page["data"][0]["balance_after"] == "33.5000000000"
        assert page["data"][0]["reference"] == "ref-purchase"
        rest = (await client.get("/user/credit-transactions?limit=2&offset=2", headers=user.headers)).json()
        assert [(t["type"], t["amount"]) for t in rest["data"]] == [
            ("purchase", "10.0000000000"),
            ("admin_adjustment", "5.0000000000"),
        ]
        assert "actor" not in rest["data"][0]

    async def test_type_filter(self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        user = await create_user(app, credits="5")
        await add_ledger_row(db, user, "10", "purchase")
        await add_ledger_row(db, user, "-1", "usage")
        page = (await client.get("/user/credit-transactions?type=purchase", headers=user.headers)).json()
        assert page["total"] == 1
        assert [t["type"] for t in page["data"]] == ["purchase"]
        none = (await client.get("/user/credit-transactions?type=refund", headers=user.headers)).json()
        assert (none["total"], none["data"]) == (0, [])

    async def test_only_the_callers_rows(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        alice = await create_user(app, credits="5")
        bob = await create_user(app, credits="7")
        await add_ledger_row(db, bob, "9", "purchase")
        page = (await client.get("/user/credit-transactions", headers=alice.headers)).json()
        own = {
            r["id"] for r in await db.fetch("SELECT id FROM credit_transactions WHERE user_id = $1", alice.id)
        }
        assert page["total"] == 1
        assert {t["id"] for t in page["data"]} == own
        assert (await client.get("/user/credit-transactions", headers=bob.headers)).json()["total"] == 2

    @pytest.mark.parametrize("query", ["limit=0", "limit=201", "offset=-1", "type=" + "x" * 65])
    async def test_invalid_paging_is_400(self, app: FastAPI, client: httpx.AsyncClient, query: str) -> None:
        user = await create_user(app)
        response = await client.get(f"/user/credit-transactions?{query}", headers=user.headers)
        assert response.status_code == 400


def user_routes() -> list[tuple[str, str]]:
    routes = [
        (method, route.path)
        for route in users_routes.router.routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods)
    ]
    assert len(routes) == 5
    return routes


class TestAccess:
    @pytest.mark.parametrize(("method", "path"), user_routes())
    async def test_no_credentials_is_401(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, method: str, path: str
    ) -> None:
        response = await client.request(method, path, json={"confirm": "DELETE", "username": "x"})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"

    @pytest.mark.parametrize(("method", "path"), user_routes())
    async def test_operator_key_is_403(self, client: httpx.AsyncClient, method: str, path: str) -> None:
        headers = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
        body = {"confirm": "DELETE"} if method == "DELETE" else {"username": "operator"}
        response = await client.request(method, path, headers=headers, json=body)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "operator_not_allowed"
