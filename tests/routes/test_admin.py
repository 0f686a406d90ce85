"""The /admin routes: accounts, credits, roles, the audit log and auth-failure statistics."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from src.db import ledger as ledger_db
from src.security.security import key_digest
from tests.conftest import TEST_ADMIN_KEY, TEST_SECRET_KEY
from tests.factories import TestUser, app_state, create_key, create_user

OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # Keys stay cached for the whole test, so a test about role changes cannot pass by cache expiry.
    return {"auth_cache_ttl_seconds": 60}


def with_id(headers: dict[str, str], request_id: str) -> dict[str, str]:
    return {**headers, "X-Request-ID": request_id, "User-Agent": "admin-tests/1.0"}


async def audit_rows(db: asyncpg.Connection, action: str) -> list[asyncpg.Record]:
    return await db.fetch(
        """SELECT actor_type, actor_id, user_id, subject_type, subject_id, before, after, metadata,
                host(ip) AS ip, user_agent, request_id
            FROM audit_logs WHERE action = $1 ORDER BY id""",
        action,
    )


async def credits_of(db: asyncpg.Connection, user_id: uuid.UUID) -> Decimal:
    value: Decimal = await db.fetchval("SELECT credits FROM users WHERE id = $1", user_id)
    return value


async def make_role(client: httpx.AsyncClient, name: str, permissions: list[str]) -> None:
    response = await client.post(
        "/admin/roles", headers=OPERATOR, json={"name": name, "description": name, "permissions": permissions}
    )
    assert response.status_code == 201, response.text


async def assign(client: httpx.AsyncClient, user: TestUser, role: str) -> httpx.Response:
    return await client.post(
        "/admin/roles/assign", headers=OPERATOR, json={"user_id": str(user.id), "role": role}
    )


async def user_with_role(
    app: FastAPI, client: httpx.AsyncClient, name: str, permissions: list[str]
) -> TestUser:
    await make_role(client, name, permissions)
    user = await create_user(app)
    assert (await assign(client, user, name)).status_code == 200
    return user


class TestCreateUser:
    async def test_operator_creates_user_whose_key_works(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        response = await client.post(
            "/admin/users",
            headers=with_id(OPERATOR, "req-create-1"),
            json={"email": "Ada@Example.com", "credits": "12.5"},
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["email"] == "ada@example.com"
        assert body["role"] == "user"
        assert body["api_key"].startswith("gw_live_")
        assert {k: Decimal(v) for k, v in body["balance"].items()} == {
            "balance": Decimal("12.5"),
            "held": Decimal("0"),
            "available": Decimal("12.5"),
        }
        user_id = uuid.UUID(body["user_id"])

        balance = await client.get("/user/balance", headers={"Authorization": f"Bearer {body['api_key']}"})
        assert balance.status_code == 200, balance.text
        assert Decimal(balance.json()["balance"]) == Decimal("12.5")

        assert await credits_of(db, user_id) == Decimal("12.5")
        assert await ledger_db.ledger_sum(db, user_id=user_id) == Decimal("12.5")
        (created,) = await audit_rows(db, "user.create")
        assert created["actor_type"] == "operator"
        assert created["actor_id"] is None
        assert created["user_id"] == user_id
        assert created["after"]["role"] == "user"
        assert created["request_id"] == "req-create-1"
        assert created["ip"] == "127.0.0.1"
        assert created["user_agent"] == "admin-tests/1.0"

    async def test_zero_credits_by_default_and_no_ledger_row(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        response = await client.post("/admin/users", headers=OPERATOR, json={"email": "zero@example.com"})
        assert response.status_code == 201
        assert Decimal(response.json()["balance"]["balance"]) == 0
        assert await db.fetchval("SELECT count(*) FROM credit_transactions") == 0

    async def test_duplicate_email_is_409(self, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        first = await client.post("/admin/users", headers=OPERATOR, json={"email": "dup@example.com"})
        assert first.status_code == 201
        again = await client.post("/admin/users", headers=OPERATOR, json={"email": " DUP@example.com "})
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "email_taken"
        assert await db.fetchval("SELECT count(*) FROM users") == 1

    async def test_unknown_role_is_400(self, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        response = await client.post(
            "/admin/users", headers=OPERATOR, json={"email": "r@example.com", "role": "wizard"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "role"
        assert await db.fetchval("SELECT count(*) FROM users") == 0

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"email": "not-an-email"}, "email"),
            ({"email": "a@example.com", "credits": "-1"}, "credits"),
            ({"email": "a@example.com", "credits": "NaN"}, "credits"),
            ({"email": "a@example.com", "is_active": False}, "is_active"),
            ({"email": "a@example.com", "api_key": "gw_live_x"}, "api_key"),
        ],
    )
    async def test_invalid_bodies_are_400(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, body: dict[str, Any], param: str
    ) -> None:
        response = await client.post("/admin/users", headers=OPERATOR, json=body)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param
        assert await db.fetchval("SELECT count(*) FROM users") == 0

    async def test_created_admin_key_reaches_admin_routes(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/admin/users", headers=OPERATOR, json={"email": "boss@example.com", "role": "admin"}
        )
        assert response.status_code == 201
        key = response.json()["api_key"]
        roles = await client.get("/admin/roles", headers={"Authorization": f"Bearer {key}"})
        assert roles.status_code == 200


class TestAddCredits:
    async def test_adds_and_removes_through_the_ledger(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        added = await client.post(
            "/admin/add_credits",
            headers=with_id(OPERATOR, "req-add-1"),
            json={"user_id": str(user.id), "amount": "10", "reason": "goodwill"},
        )
        assert added.status_code == 200, added.text
        body = added.json()
        assert body["user_id"] == str(user.id)
        assert Decimal(body["amount"]) == 10
        assert {k: Decimal(v) for k, v in body["balance"].items()} == {
            "balance": Decimal(10),
            "held": Decimal(0),
            "available": Decimal(10),
        }
        removed = await client.post(
            "/admin/add_credits",
            headers=with_id(OPERATOR, "req-add-2"),
            json={"user_id": str(user.id), "amount": "-3.25", "reason": "correction"},
        )
        assert removed.status_code == 200, removed.text
        assert Decimal(removed.json()["balance"]["available"]) == Decimal("6.75")

        rows = await db.fetch(
            """SELECT id, amount, type, actor, reason, request_id FROM credit_transactions
                WHERE user_id = $1 ORDER BY id""",
            user.id,
        )
        assert [(r["amount"], r["actor"], r["reason"], r["request_id"]) for r in rows] == [
            (Decimal(10), "operator", "goodwill", "req-add-1"),
            (Decimal("-3.25"), "operator", "correction", "req-add-2"),
        ]
        assert {r["type"] for r in rows} == {"admin_adjustment"}
        assert [r["id"] for r in rows] == [body["transaction_id"], removed.json()["transaction_id"]]
        assert (
            await credits_of(db, user.id)
            == await ledger_db.ledger_sum(db, user_id=user.id)
            == Decimal("6.75")
        )

        adjustments = await audit_rows(db, "credits.adjust")
        assert [(Decimal(a["before"]["balance"]), Decimal(a["after"]["balance"])) for a in adjustments] == [
            (Decimal(0), Decimal(10)),
            (Decimal(10), Decimal("6.75")),
        ]
        assert [a["metadata"]["reason"] for a in adjustments] == ["goodwill", "correction"]
        assert [a["request_id"] for a in adjustments] == ["req-add-1", "req-add-2"]
        assert {a["actor_type"] for a in adjustments} == {"operator"}
        assert {a["user_id"] for a in adjustments} == {user.id}

    async def test_removal_above_available_is_409_and_changes_nothing(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="10")
        # 3 credits held by a request in flight: only 7 are available to remove.
        await db.execute("UPDATE users SET held = 3 WHERE id = $1", user.id)
        ledger_before = await db.fetchval("SELECT count(*) FROM credit_transactions")
        audit_before = await db.fetchval("SELECT count(*) FROM audit_logs")

        refused = await client.post(
            "/admin/add_credits",
            headers=OPERATOR,
            json={"user_id": str(user.id), "amount": "-7.0000000001", "reason": "too much"},
        )
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "insufficient_available_balance"
        assert await credits_of(db, user.id) == Decimal(10)
        assert await db.fetchval("SELECT count(*) FROM credit_transactions") == ledger_before
        assert await db.fetchval("SELECT count(*) FROM audit_logs") == audit_before

        exact = await client.post(
            "/admin/add_credits",
            headers=OPERATOR,
            json={"user_id": str(user.id), "amount": "-7", "reason": "all that is available"},
        )
        assert exact.status_code == 200
        assert {k: Decimal(v) for k, v in exact.json()["balance"].items()} == {
            "balance": Decimal(3),
            "held": Decimal(3),
            "available": Decimal(0),
        }

    async def test_unknown_user_is_404(self, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        response = await client.post(
            "/admin/add_credits",
            headers=OPERATOR,
            json={"user_id": str(uuid.uuid4()), "amount": "5", "reason": "x"},
        )
        assert response.status_code == 404
        assert await db.fetchval("SELECT count(*) FROM credit_transactions") == 0

    @pytest.mark.parametrize(
        ("changes", "param"),
        [
            ({"amount": "0"}, "amount"),
            ({"amount": "NaN"}, "amount"),
            ({"amount": "Infinity"}, "amount"),
            ({"amount": "1000000000.0000000001"}, "amount"),
            ({"amount": "-1000000001"}, "amount"),
            ({"reason": ""}, "reason"),
            ({"reason": "   "}, "reason"),
            ({"reason": "x" * 501}, "reason"),
            ({"reason": None}, "reason"),
            ({"api_key": "gw_live_" + "k" * 43}, "api_key"),
        ],
    )
    async def test_invalid_bodies_are_400(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        changes: dict[str, Any],
        param: str,
    ) -> None:
        user = await create_user(app)
        body = {"user_id": str(user.id), "amount": "5", "reason": "ok", **changes}
        response = await client.post("/admin/add_credits", headers=OPERATOR, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert await db.fetchval("SELECT count(*) FROM credit_transactions") == 0

    async def test_missing_reason_is_400(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        response = await client.post(
            "/admin/add_credits", headers=OPERATOR, json={"user_id": str(user.id), "amount": "5"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "reason"


class TestAdminRoleUsers:
    async def test_admin_role_user_can_administer_and_is_audited_as_user(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        admin = await create_user(app, role="admin")
        target = await create_user(app)
        response = await client.post(
            "/admin/add_credits",
            headers=with_id(admin.headers, "req-admin-user"),
            json={"user_id": str(target.id), "amount": "2", "reason": "support ticket 42"},
        )
        assert response.status_code == 200, response.text
        row = await db.fetchrow("SELECT actor FROM credit_transactions WHERE user_id = $1", target.id)
        assert row["actor"] == f"user:{admin.id}"
        (audit,) = await audit_rows(db, "credits.adjust")
        assert (audit["actor_type"], audit["actor_id"], audit["request_id"]) == (
            "user",
            admin.id,
            "req-admin-user",
        )

    async def test_demoted_admin_is_refused_on_the_next_request(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        admin = await create_user(app, role="admin")
        assert (await client.get("/admin/roles", headers=admin.headers)).status_code == 200

        demoted = await client.post(
            "/admin/roles/assign",
            headers=with_id(OPERATOR, "req-demote"),
            json={"user_id": str(admin.id), "role": "user"},
        )
        assert demoted.status_code == 200
        assert demoted.json() == {"user_id": str(admin.id), "role": "user", "previous_role": "admin"}

        refused = await client.get("/admin/roles", headers=admin.headers)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "permission_denied"
        (row,) = await audit_rows(db, "role.assign")
        assert (row["before"], row["after"]) == ({"role": "admin"}, {"role": "user"})
        assert (row["actor_type"], row["user_id"], row["request_id"]) == ("operator", admin.id, "req-demote")

    async def test_role_is_read_fresh_while_the_key_is_cached(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        admin = await create_user(app, role="admin")
        assert (await client.get("/admin/roles", headers=admin.headers)).status_code == 200
        cache = app_state(app).auth_cache
        digest = key_digest(TEST_SECRET_KEY, admin.api_key)
        cached = cache.get(digest)
        assert cached is not None and cached.role == "admin"

        # Demoted behind the app's back: no invalidation reaches the cache.
        await db.execute("UPDATE users SET role = 'user' WHERE id = $1", admin.id)

        assert (await client.get("/admin/roles", headers=admin.headers)).status_code == 403
        assert cache.get(digest) is cached

    async def test_assign_drops_the_users_cached_keys(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        assert (await client.get("/user/balance", headers=user.headers)).status_code == 200
        digest = key_digest(TEST_SECRET_KEY, user.api_key)
        assert app_state(app).auth_cache.get(digest) is not None
        assert (await assign(client, user, "developer")).status_code == 200
        assert app_state(app).auth_cache.get(digest) is None

    async def test_disabled_admin_is_refused(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        admin = await create_user(app, role="admin")
        assert (await client.get("/admin/roles", headers=admin.headers)).status_code == 200
        await db.execute("UPDATE users SET banned_at = now() WHERE id = $1", admin.id)
        assert (await client.get("/admin/roles", headers=admin.headers)).status_code == 403


class TestRoles:
    async def test_lists_builtin_roles_and_the_catalogue(self, client: httpx.AsyncClient) -> None:
        roles = await client.get("/admin/roles", headers=OPERATOR)
        assert roles.status_code == 200
        by_name = {role["name"]: role for role in roles.json()["data"]}
        assert by_name["admin"]["permissions"] == ["*"]
        assert by_name["user"]["permissions"] == []
        assert all(by_name[name]["is_builtin"] for name in ("admin", "user", "developer"))

        catalogue = await client.get("/admin/roles/permissions", headers=OPERATOR)
        assert catalogue.status_code == 200
        names = {item["name"] for item in catalogue.json()["data"]}
        assert {
            "users.write",
            "credits.write",
            "roles.read",
            "roles.write",
            "audit.read",
            "audit.sweep",
        } <= names

    async def test_custom_role_grants_exactly_its_permissions(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        reader = await user_with_role(app, client, "role-reader", ["roles.read"])
        assert (await client.get("/admin/roles", headers=reader.headers)).status_code == 200
        assert (await client.get("/admin/roles/permissions", headers=reader.headers)).status_code == 200
        denied = await client.post("/admin/users", headers=reader.headers, json={"email": "x@example.com"})
        assert denied.status_code == 403
        assert "users.write" in denied.json()["error"]["message"]
        assert (await client.get("/admin/audit-logs", headers=reader.headers)).status_code == 403

    async def test_create_role_validation(self, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        await make_role(client, "support", ["users.read", "audit.read", "users.read"])
        role = await db.fetchrow("SELECT permissions, is_builtin FROM roles WHERE name = 'support'")
        assert (list(role["permissions"]), role["is_builtin"]) == (["audit.read", "users.read"], False)

        cases = [
            ({"name": "support", "permissions": []}, 409, "role_exists"),
            ({"name": "bad", "permissions": ["users.fly"]}, 400, "unknown_permission"),
            ({"name": "root", "permissions": ["*"]}, 400, "unknown_permission"),
            ({"name": "Bad Name", "permissions": []}, 400, "invalid_value"),
            ({"name": "ok-name", "permissions": [], "is_builtin": True}, 400, "invalid_value"),
        ]
        for body, status, code in cases:
            response = await client.post("/admin/roles", headers=OPERATOR, json=body)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), body
        assert await db.fetchval("SELECT count(*) FROM roles") == 4

    async def test_update_custom_role_applies_on_the_next_request(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        holder = await user_with_role(app, client, "watcher", ["roles.read"])
        assert (await client.get("/admin/security/auth-failures", headers=holder.headers)).status_code == 403

        updated = await client.put(
            "/admin/roles/watcher",
            headers=with_id(OPERATOR, "req-update"),
            json={"permissions": ["roles.read", "security.read"]},
        )
        assert updated.status_code == 200, updated.text
        assert updated.json()["permissions"] == ["roles.read", "security.read"]
        assert updated.json()["description"] == "watcher"
        assert (await client.get("/admin/security/auth-failures", headers=holder.headers)).status_code == 200

        (row,) = await audit_rows(db, "role.update")
        assert row["before"]["permissions"] == ["roles.read"]
        assert row["after"]["permissions"] == ["roles.read", "security.read"]
        assert (row["subject_type"], row["subject_id"], row["request_id"]) == (
            "role",
            "watcher",
            "req-update",
        )

    async def test_update_refusals(self, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        builtin = await client.put(
            "/admin/roles/user", headers=OPERATOR, json={"permissions": ["users.write"]}
        )
        assert (builtin.status_code, builtin.json()["error"]["code"]) == (409, "builtin_role")
        missing = await client.put("/admin/roles/nobody", headers=OPERATOR, json={"description": "x"})
        assert missing.status_code == 404
        await make_role(client, "empty", [])
        nothing = await client.put("/admin/roles/empty", headers=OPERATOR, json={})
        assert nothing.status_code == 400
        unknown = await client.put("/admin/roles/empty", headers=OPERATOR, json={"permissions": ["nope"]})
        assert unknown.status_code == 400
        assert list(await db.fetchval("SELECT permissions FROM roles WHERE name = 'user'")) == []
        assert await audit_rows(db, "role.update") == []

    async def test_delete_only_unused_custom_roles(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        holder = await user_with_role(app, client, "temp", ["roles.read"])
        in_use = await client.delete("/admin/roles/temp", headers=OPERATOR)
        assert (in_use.status_code, in_use.json()["error"]["code"]) == (409, "role_in_use")
        builtin = await client.delete("/admin/roles/developer", headers=OPERATOR)
        assert (builtin.status_code, builtin.json()["error"]["code"]) == (409, "builtin_role")

        assert (await assign(client, holder, "user")).status_code == 200
        deleted = await client.delete("/admin/roles/temp", headers=OPERATOR)
        assert deleted.status_code == 200
        assert deleted.json() == {"name": "temp", "object": "role", "deleted": True}
        assert await db.fetchval("SELECT count(*) FROM roles WHERE name = 'temp'") == 0
        assert (await client.delete("/admin/roles/temp", headers=OPERATOR)).status_code == 404
        (row,) = await audit_rows(db, "role.delete")
        assert row["before"]["permissions"] == ["roles.read"]

    async def test_assign_refusals(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        unknown_role = await assign(client, user, "wizard")
        assert (unknown_role.status_code, unknown_role.json()["error"]["param"]) == (400, "role")
        unknown_user = await client.post(
            "/admin/roles/assign", headers=OPERATOR, json={"user_id": str(uuid.uuid4()), "role": "admin"}
        )
        assert unknown_user.status_code == 404
        assert await db.fetchval("SELECT role FROM users WHERE id = $1", user.id) == "user"
        assert await audit_rows(db, "role.assign") == []


class TestNoEscalation:
    async def test_roles_writer_cannot_grant_what_they_lack(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        manager = await user_with_role(app, client, "role-manager", ["roles.read", "roles.write"])
        admin = await create_user(app, role="admin")
        plain = await create_user(app)

        to_admin = await client.post(
            "/admin/roles/assign", headers=manager.headers, json={"user_id": str(manager.id), "role": "admin"}
        )
        assert (to_admin.status_code, to_admin.json()["error"]["code"]) == (403, "permission_escalation")
        demote_admin = await client.post(
            "/admin/roles/assign", headers=manager.headers, json={"user_id": str(admin.id), "role": "user"}
        )
        assert demote_admin.status_code == 403
        richer = await client.post(
            "/admin/roles", headers=manager.headers, json={"name": "richer", "permissions": ["credits.write"]}
        )
        assert richer.status_code == 403
        widen = await client.put(
            "/admin/roles/role-manager",
            headers=manager.headers,
            json={"permissions": ["roles.write", "audit.read"]},
        )
        assert widen.status_code == 403

        narrower = await client.post(
            "/admin/roles", headers=manager.headers, json={"name": "viewer", "permissions": ["roles.read"]}
        )
        assert narrower.status_code == 201
        given = await client.post(
            "/admin/roles/assign", headers=manager.headers, json={"user_id": str(plain.id), "role": "viewer"}
        )
        assert given.status_code == 200
        roles = dict(await db.fetch("SELECT id, role FROM users"))
        assert (roles[manager.id], roles[admin.id], roles[plain.id]) == ("role-manager", "admin", "viewer")

    async def test_users_writer_cannot_create_admins_or_credits(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        creator = await user_with_role(app, client, "onboarding", ["users.write"])
        as_admin = await client.post(
            "/admin/users", headers=creator.headers, json={"email": "evil@example.com", "role": "admin"}
        )
        assert as_admin.status_code == 403
        with_credits = await client.post(
            "/admin/users", headers=creator.headers, json={"email": "rich@example.com", "credits": "100"}
        )
        assert with_credits.status_code == 403
        assert (
            await db.fetchval(
                "SELECT count(*) FROM users WHERE email LIKE '%@example.com' AND role = 'admin'"
            )
            == 0
        )

        plain = await client.post("/admin/users", headers=creator.headers, json={"email": "new@example.com"})
        assert plain.status_code == 201
        row = (await audit_rows(db, "user.create"))[-1]
        assert (row["actor_type"], row["actor_id"], row["user_id"]) == (
            "user",
            creator.id,
            uuid.UUID(plain.json()["user_id"]),
        )


class TestAuditLog:
    async def test_every_change_is_audited_without_secrets(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        created = await client.post(
            "/admin/users",
            headers=with_id(OPERATOR, "req-a1"),
            json={"email": "s@example.com", "credits": "3"},
        )
        assert created.status_code == 201
        made_key = created.json()["api_key"]
        admin = await create_user(app, role="admin")
        _, extra_key = await create_key(app, admin, scopes=["inference"])
        user_id = created.json()["user_id"]
        steps = [
            ("/admin/add_credits", {"user_id": user_id, "amount": "1", "reason": "r"}, "credits.adjust"),
            ("/admin/roles", {"name": "ops", "permissions": ["audit.read"]}, "role.create"),
            ("/admin/roles/assign", {"user_id": user_id, "role": "ops"}, "role.assign"),
        ]
        for number, (path, body, _) in enumerate(steps):
            response = await client.post(path, headers=with_id(admin.headers, f"req-b{number}"), json=body)
            assert response.status_code in (200, 201), response.text

        creation = [row for row in await audit_rows(db, "credits.adjust") if row["request_id"] == "req-a1"]
        assert [(row["actor_type"], Decimal(row["after"]["balance"])) for row in creation] == [
            ("operator", Decimal(3))
        ]
        for number, (_, _, action) in enumerate(steps):
            (row,) = [row for row in await audit_rows(db, action) if row["request_id"] == f"req-b{number}"]
            assert (row["actor_type"], row["actor_id"]) == ("user", admin.id), action
            assert (row["ip"], row["user_agent"]) == ("127.0.0.1", "admin-tests/1.0"), action
            assert row["after"] is not None, action

        dump: str = await db.fetchval("SELECT string_agg(a::text, E'\\n') FROM audit_logs a")
        assert "req-b2" in dump  # the dump is the real table, not an empty string
        stored = await db.fetch("SELECT key_hash, key_encrypted FROM api_keys")
        assert len(stored) == 3
        secrets = [made_key, extra_key, admin.api_key, TEST_ADMIN_KEY, TEST_SECRET_KEY]
        for row in stored:
            secrets += [row["key_hash"].hex(), row["key_encrypted"]]
        for secret in secrets:
            assert secret not in dump

    async def test_filters_paging_and_order(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        alice, bob = uuid.uuid4(), uuid.uuid4()
        base = datetime(2026, 1, 1, tzinfo=UTC)
        for day, (action, user) in enumerate(
            [("a.one", alice), ("a.two", bob), ("a.one", alice), ("a.one", bob), ("a.two", alice)]
        ):
            await db.execute(
                """INSERT INTO audit_logs (created_at, actor_type, user_id, action)
                    VALUES ($1, 'system', $2, $3)""",
                base + timedelta(days=day),
                user,
                action,
            )

        async def fetch(**params: Any) -> dict[str, Any]:
            response = await client.get("/admin/audit-logs", headers=OPERATOR, params=params)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body

        everything = await fetch(until="2026-02-01T00:00:00Z")
        assert everything["total"] == 5
        days = [row["created_at"][:10] for row in everything["data"]]
        assert days == sorted(days, reverse=True)

        page = await fetch(until="2026-02-01T00:00:00Z", limit=2, offset=2)
        assert (page["total"], page["limit"], page["offset"]) == (5, 2, 2)
        assert [r["id"] for r in page["data"]] == [r["id"] for r in everything["data"][2:4]]

        by_action = await fetch(action="a.one")
        assert by_action["total"] == 3 and {r["action"] for r in by_action["data"]} == {"a.one"}
        by_user = await fetch(user_id=str(alice), action="a.one")
        assert by_user["total"] == 2 and {r["user_id"] for r in by_user["data"]} == {str(alice)}

        window = await fetch(since="2026-01-02T00:00:00Z", until="2026-01-04T00:00:00")
        assert [r["created_at"][:10] for r in window["data"]] == ["2026-01-03", "2026-01-02"]

        for params in ({"since": "yesterday"}, {"since": "2026-01-03", "until": "2026-01-02"}, {"limit": 0}):
            response = await client.get("/admin/audit-logs", headers=OPERATOR, params=params)
            assert response.status_code == 400, params

    async def test_sweep_route(self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
        for age in (400, 366, 10):
            await db.execute(
                "INSERT INTO audit_logs (created_at, actor_type, action) VALUES ($1, 'system', 'old')",
                datetime.now(UTC) - timedelta(days=age),
            )
        reader = await user_with_role(app, client, "log-reader", ["audit.read"])
        assert (await client.post("/admin/audit-logs/sweep", headers=reader.headers)).status_code == 403

        swept = await client.post("/admin/audit-logs/sweep", headers=with_id(OPERATOR, "req-sweep"))
        assert swept.status_code == 200
        assert swept.json() == {"deleted": 2, "retention_days": 365}
        assert await db.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'old'") == 1
        (row,) = await audit_rows(db, "audit.sweep")
        assert (row["actor_type"], row["request_id"]) == ("operator", "req-sweep")
        assert row["metadata"] == {"deleted": 2, "retention_days": 365}


class TestAuthFailures:
    async def test_counts_failures_per_ip(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        for headers in ({}, {"Authorization": "Bearer gw_live_" + "x" * 43}, {"Authorization": "Basic abc"}):
            assert (await client.get("/admin/roles", headers=headers)).status_code == 401
        reader = await user_with_role(app, client, "sec", ["security.read"])
        response = await client.get("/admin/security/auth-failures", headers=reader.headers)
        assert response.status_code == 200
        body = response.json()
        assert body["window_minutes"] == 60
        # Three refused requests, three failures: authentication ran once per request.
        assert [(row["ip"], row["failures"]) for row in body["data"]] == [("127.0.0.1", 3)]
        assert (
            await client.get("/admin/security/auth-failures", headers=OPERATOR, params={"minutes": 0})
        ).status_code == 400
