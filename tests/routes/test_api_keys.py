"""The /user/api-keys routes: a user's own keys, masked, rotated, revoked, scoped and limited."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from src.main import create_app
from src.security.security import KEY_PATTERN, generate_key
from src.services import api_keys as keys_service
from tests.conftest import TEST_ADMIN_KEY, TEST_SECRET_KEY, asgi_client, make_settings
from tests.factories import TestUser, create_key, create_user

VIEW_FIELDS = {
    "object",
    "id",
    "name",
    "masked_key",
    "key_prefix",
    "key_last4",
    "environment",
    "is_primary",
    "scopes",
    "ip_allowlist",
    "domain_restrictions",
    "rpm_limit",
    "rpd_limit",
    "tpm_limit",
    "tpd_limit",
    "concurrency_limit",
    "is_active",
    "expires_at",
    "last_used_at",
    "created_at",
    "updated_at",
}
LIMITS = ("rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit", "concurrency_limit")
CEILING = {
    "default_rpm": 10,
    "default_rpd": 100,
    "default_tpm": 1000,
    "default_tpd": 10000,
    "default_concurrency": 3,
}


INVALID_CREATE: list[tuple[dict[str, Any], str]] = [
    ({"user_id": str(uuid.uuid4())}, "user_id"),
    ({"role": "admin"}, "role"),
    ({"key_hash": "00"}, "key_hash"),
    ({"is_primary": True}, "is_primary"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "x" * 101}, "name"),
    ({"environment": "prod"}, "environment"),
    ({"scopes": ["inference", "everything"]}, "scopes"),
    ({"scopes": []}, "scopes"),
    ({"expires_in_days": 0}, "expires_in_days"),
    ({"expires_in_days": 3651}, "expires_in_days"),
    ({"ip_allowlist": ["300.1.2.3"]}, "ip_allowlist"),
    ({"ip_allowlist": ["10.1.2.3/8"]}, "ip_allowlist"),
    ({"ip_allowlist": ["example.com"]}, "ip_allowlist"),
    ({"ip_allowlist": [f"10.0.0.{i}" for i in range(51)]}, "ip_allowlist"),
    ({"domain_restrictions": ["https://app.example.com"]}, "domain_restrictions"),
    ({"domain_restrictions": ["*"]}, "domain_restrictions"),
    ({"domain_restrictions": ["*.com"]}, "domain_restrictions"),
    ({"domain_restrictions": ["app.example.com:443"]}, "domain_restrictions"),
    ({"domain_restrictions": ["bad host.com"]}, "domain_restrictions"),
    ({"domain_restrictions": [f"h{i}.example.com" for i in range(51)]}, "domain_restrictions"),
    ({"rpm_limit": 0}, "rpm_limit"),
    ({"tpm_limit": -5}, "tpm_limit"),
    ({"concurrency_limit": 2**31}, "concurrency_limit"),
]
INVALID_UPDATE: list[tuple[dict[str, Any], str]] = [
    ({"name": None}, "name"),
    ({"scopes": None}, "scopes"),
    ({"is_active": None}, "is_active"),
    ({"ip_allowlist": None}, "ip_allowlist"),
    ({"scopes": ["root"]}, "scopes"),
    ({"user_id": str(uuid.uuid4())}, "user_id"),
    ({"key_hash": "00"}, "key_hash"),
    ({"role": "admin"}, "role"),
    ({"expires_at": None}, "expires_at"),
    ({"ip_allowlist": ["1.2.3.4/33"]}, "ip_allowlist"),
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def unknown_key_body(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/user/balance", headers=bearer(generate_key()))
    assert response.status_code == 401
    body: dict[str, Any] = response.json()
    assert body["error"]["code"] == "invalid_api_key"
    return body


async def create(client: httpx.AsyncClient, user: TestUser, **body: Any) -> dict[str, Any]:
    response = await client.post("/user/api-keys", json={"name": "k", **body}, headers=user.headers)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def create_app_with(database_url: str, tmp_path: Path, **overrides: Any) -> FastAPI:
    return create_app(make_settings(database_url, tmp_path / "second", **overrides))


async def assert_works(client: httpx.AsyncClient, key: str) -> None:
    response = await client.get("/user/balance", headers=bearer(key))
    assert response.status_code == 200, response.text


async def assert_refused(client: httpx.AsyncClient, key: str) -> None:
    response = await client.get("/user/balance", headers=bearer(key))
    assert response.status_code == 401
    assert response.json() == await unknown_key_body(client)


class TestCreate:
    @pytest.mark.parametrize("environment", ["live", "test", "staging", "dev"])
    async def test_each_environment_gives_a_working_key(
        self, app: FastAPI, client: httpx.AsyncClient, environment: str
    ) -> None:
        user = await create_user(app)
        created = await create(client, user, name="my key", environment=environment)
        plaintext = created["api_key"]
        assert KEY_PATTERN.match(plaintext)
        assert plaintext.startswith(f"gw_{environment}_")
        assert set(created) == VIEW_FIELDS | {"api_key"}
        assert created["environment"] == environment
        assert created["name"] == "my key"
        assert created["masked_key"] == f"{plaintext[: len(f'gw_{environment}_') + 4]}...{plaintext[-4:]}"
        assert created["scopes"] == ["*"]
        assert created["expires_at"] is None
        assert created["is_primary"] is False
        await assert_works(client, plaintext)

    async def test_lookup_is_by_hmac_and_no_column_holds_the_key(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        created = await create(client, user)
        plaintext = created["api_key"]
        row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1", uuid.UUID(created["id"]))
        assert row is not None
        assert (
            row["key_hash"] == hmac.new(TEST_SECRET_KEY.encode(), plaintext.encode(), hashlib.sha256).digest()
        )
        random_part = plaintext.split("_", 2)[2]
        for column, value in dict(row).items():
            assert random_part[4:-4] not in str(value), column
        audit = await db.fetch("SELECT before::text, after::text, metadata::text FROM audit_logs")
        assert audit and all(random_part[4:-4] not in str(dict(r)) for r in audit)

    async def test_a_database_copy_alone_cannot_authenticate(
        self, app: FastAPI, client: httpx.AsyncClient, database_url: str, tmp_path: Path
    ) -> None:
        user = await create_user(app)
        plaintext = (await create(client, user))["api_key"]
        other = create_app_with(database_url, tmp_path, secret_key="a-different-server-secret-" + "z" * 30)
        async with other.router.lifespan_context(other), asgi_client(other) as thief:
            response = await thief.get("/user/balance", headers=bearer(plaintext))
            assert response.status_code == 401
            assert response.json() == await unknown_key_body(thief)
            response = await thief.get("/user/balance", headers=user.headers)
            assert response.status_code == 401
        await assert_works(client, plaintext)

    async def test_options_are_stored(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        created = await create(
            client,
            user,
            scopes=["inference", "account:read", "inference"],
            expires_in_days=30,
            ip_allowlist=["203.0.113.7", "10.0.0.0/8", "2001:db8::/32"],
            domain_restrictions=["App.Example.com", "*.example.org"],
            rpm_limit=5,
            concurrency_limit=2,
        )
        assert created["scopes"] == ["account:read", "inference"]
        assert created["ip_allowlist"] == ["203.0.113.7/32", "10.0.0.0/8", "2001:db8::/32"]
        assert created["domain_restrictions"] == ["app.example.com", "*.example.org"]
        assert created["rpm_limit"] == 5 and created["concurrency_limit"] == 2
        assert created["rpd_limit"] is None
        expires_at = datetime.fromisoformat(created["expires_at"])
        assert abs(expires_at - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=1)

    async def test_invalid_bodies(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        for body, param in INVALID_CREATE:
            response = await client.post("/user/api-keys", json={"name": "k", **body}, headers=user.headers)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["param"] is not None and error["param"].split(".")[0] == param, body
        assert await db.fetchval("SELECT count(*) FROM api_keys WHERE user_id = $1", user.id) == 1

    @pytest.mark.parametrize("settings_overrides", [CEILING])
    async def test_limits_above_the_ceiling(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        for field in LIMITS:
            ceiling = CEILING["default_" + field.removesuffix("_limit")]
            response = await client.post(
                "/user/api-keys", json={"name": "k", field: ceiling + 1}, headers=user.headers
            )
            assert response.status_code == 400, field
            assert response.json()["error"]["param"] == field
            assert str(ceiling) in response.json()["error"]["message"]
            created = await create(client, user, **{field: ceiling})
            assert created[field] == ceiling

    async def test_a_narrow_key_cannot_mint_a_broader_one(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        user = await create_user(app)
        _, manager = await create_key(app, user, scopes=["keys"])
        response = await client.post("/user/api-keys", json={"name": "k"}, headers=bearer(manager))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "scope_not_held"
        response = await client.post(
            "/user/api-keys", json={"name": "k", "scopes": ["inference"]}, headers=bearer(manager)
        )
        assert response.status_code == 403
        response = await client.post(
            "/user/api-keys", json={"name": "k", "scopes": ["keys"]}, headers=bearer(manager)
        )
        assert response.status_code == 201

    async def test_keys_per_account_are_capped(
        self, app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(keys_service, "MAX_KEYS_PER_USER", 3)
        user = await create_user(app)
        await create(client, user)
        await create(client, user)
        response = await client.post("/user/api-keys", json={"name": "k"}, headers=user.headers)
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "too_many_api_keys"


class TestList:
    async def test_masked_and_own_only(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        other = await create_user(app)
        first = await create(client, user, name="first")
        second = await create(client, user, name="second")
        revoked = await create(client, user, name="revoked")
        await client.delete(f"/user/api-keys/{revoked['id']}", headers=user.headers)
        response = await client.get("/user/api-keys", headers=user.headers)
        assert response.status_code == 200
        body = response.json()
        assert body["total"] == 3
        assert [key["name"] for key in body["data"]] == ["Primary key", "first", "second"]
        for key in body["data"]:
            assert set(key) == VIEW_FIELDS
        for plaintext in (user.api_key, first["api_key"], second["api_key"], other.api_key):
            assert plaintext not in response.text
            assert plaintext[12:-4] not in response.text
        assert {key["masked_key"] for key in body["data"]} >= {first["masked_key"], second["masked_key"]}
        assert "key_hash" not in response.text and "key_encrypted" not in response.text

        page = await client.get("/user/api-keys", params={"limit": 1, "offset": 1}, headers=user.headers)
        assert [key["name"] for key in page.json()["data"]] == ["first"]
        assert page.json()["total"] == 3

    async def test_get_one(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        created = await create(client, user, name="mine")
        response = await client.get(f"/user/api-keys/{created['id']}", headers=user.headers)
        assert response.status_code == 200
        assert response.json() == {k: v for k, v in created.items() if k != "api_key"}
        assert created["api_key"] not in response.text

    async def test_malformed_id_is_an_unknown_id(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        unknown = await client.get(f"/user/api-keys/{uuid.uuid4()}", headers=user.headers)
        malformed = await client.get("/user/api-keys/not-a-uuid", headers=user.headers)
        assert unknown.status_code == malformed.status_code == 404
        assert unknown.json() == malformed.json()
        # Without credentials the answer is 401, whatever the id looks like.
        anonymous = await client.get("/user/api-keys/not-a-uuid")
        assert anonymous.status_code == 401


class TestUpdate:
    async def test_changes_only_what_is_sent(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        created = await create(client, user, name="before", rpm_limit=5, ip_allowlist=["10.0.0.0/8"])
        url = f"/user/api-keys/{created['id']}"
        response = await client.put(
            url,
            json={
                "name": "after",
                "scopes": ["inference", "account:read"],
                "domain_restrictions": ["*.example.com"],
                "tpm_limit": 500,
            },
            headers=user.headers,
        )
        assert response.status_code == 200, response.text
        updated = response.json()
        assert updated["name"] == "after"
        assert updated["scopes"] == ["account:read", "inference"]
        assert updated["domain_restrictions"] == ["*.example.com"]
        assert updated["tpm_limit"] == 500
        # Not sent, so untouched.
        assert updated["rpm_limit"] == 5
        assert updated["ip_allowlist"] == ["10.0.0.0/8"]
        assert updated["is_active"] is True

        cleared = await client.put(url, json={"rpm_limit": None, "ip_allowlist": []}, headers=user.headers)
        assert cleared.status_code == 200
        assert cleared.json()["rpm_limit"] is None
        assert cleared.json()["ip_allowlist"] == []
        assert cleared.json()["tpm_limit"] == 500
        assert cleared.json()["name"] == "after"

    async def test_empty_body_changes_nothing(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        created = await create(client, user)
        response = await client.put(f"/user/api-keys/{created['id']}", json={}, headers=user.headers)
        assert response.status_code == 200
        assert response.json()["updated_at"] == created["updated_at"]

    async def test_invalid_bodies(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        created = await create(client, user, name="unchanged")
        url = f"/user/api-keys/{created['id']}"
        for body, param in INVALID_UPDATE:
            response = await client.put(url, json=body, headers=user.headers)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["param"].split(".")[0] == param, body
        current = await client.get(url, headers=user.headers)
        assert current.json() == {k: v for k, v in created.items() if k != "api_key"}

    @pytest.mark.parametrize("settings_overrides", [CEILING])
    async def test_limit_above_the_ceiling(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        created = await create(client, user)
        url = f"/user/api-keys/{created['id']}"
        response = await client.put(url, json={"rpd_limit": 101}, headers=user.headers)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "rpd_limit"
        response = await client.put(url, json={"rpd_limit": 100}, headers=user.headers)
        assert response.status_code == 200 and response.json()["rpd_limit"] == 100

    async def test_deactivate_and_reactivate(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        created = await create(client, user)
        await assert_works(client, created["api_key"])  # cached now
        url = f"/user/api-keys/{created['id']}"
        response = await client.put(url, json={"is_active": False}, headers=user.headers)
        assert response.status_code == 200 and response.json()["is_active"] is False
        await assert_refused(client, created["api_key"])
        response = await client.put(url, json={"is_active": True}, headers=user.headers)
        assert response.status_code == 200
        await assert_works(client, created["api_key"])

    async def test_narrowed_scopes_apply_at_once(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        created = await create(client, user)
        await assert_works(client, created["api_key"])
        response = await client.put(
            f"/user/api-keys/{created['id']}", json={"scopes": ["inference"]}, headers=user.headers
        )
        assert response.status_code == 200
        refused = await client.get("/user/balance", headers=bearer(created["api_key"]))
        assert refused.status_code == 403

    async def test_a_narrow_key_cannot_widen_scopes(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        manager_id, manager = await create_key(app, user, scopes=["keys"])
        response = await client.put(
            f"/user/api-keys/{manager_id}", json={"scopes": ["*"]}, headers=bearer(manager)
        )
        assert response.status_code == 403
        response = await client.put(
            f"/user/api-keys/{manager_id}", json={"name": "m"}, headers=bearer(manager)
        )
        assert response.status_code == 200


class TestRotate:
    async def test_old_secret_dies_at_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        created = await create(client, user, name="rotating", scopes=["account:read", "keys"])
        old = created["api_key"]
        await assert_works(client, old)  # cached now
        response = await client.post(f"/user/api-keys/{created['id']}/rotate", headers=user.headers)
        assert response.status_code == 200, response.text
        rotated = response.json()
        new = rotated["api_key"]
        assert new != old and KEY_PATTERN.match(new)
        assert rotated["id"] == created["id"]
        assert rotated["name"] == "rotating"
        assert rotated["scopes"] == ["account:read", "keys"]
        assert rotated["masked_key"] == f"{new[:12]}...{new[-4:]}"
        await assert_refused(client, old)
        await assert_works(client, new)
        rows = await db.fetch(
            "SELECT before::text AS b, after::text AS a FROM audit_logs WHERE action = 'api_key.rotate'"
            " AND subject_id = $1",
            created["id"],
        )
        assert len(rows) == 1
        assert old[12:-4] not in str(dict(rows[0])) and new[12:-4] not in str(dict(rows[0]))

    async def test_a_narrow_key_cannot_rotate_a_broader_one(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        user = await create_user(app)
        primary_id = (await client.get("/user/api-keys", headers=user.headers)).json()["data"][0]["id"]
        _, manager = await create_key(app, user, scopes=["keys"])
        response = await client.post(f"/user/api-keys/{primary_id}/rotate", headers=bearer(manager))
        assert response.status_code == 403
        assert user.api_key not in response.text
        await assert_works(client, user.api_key)


class TestDelete:
    async def test_revoked_key_is_refused(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        created = await create(client, user)
        await assert_works(client, created["api_key"])  # cached now
        url = f"/user/api-keys/{created['id']}"
        response = await client.delete(url, headers=user.headers)
        assert response.status_code == 200
        assert response.json() == {"object": "api_key", "id": created["id"], "deleted": True}
        await assert_refused(client, created["api_key"])
        assert (await client.get(url, headers=user.headers)).status_code == 404
        assert (await client.delete(url, headers=user.headers)).status_code == 404
        assert (
            await db.fetchval(
                "SELECT count(*) FROM audit_logs WHERE action = 'api_key.revoke' AND subject_id = $1",
                created["id"],
            )
            == 1
        )
        await assert_works(client, user.api_key)

    async def test_a_key_may_revoke_itself(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        created = await create(client, user)
        response = await client.delete(f"/user/api-keys/{created['id']}", headers=bearer(created["api_key"]))
        assert response.status_code == 200
        await assert_refused(client, created["api_key"])


class TestOwnership:
    async def test_another_users_key_is_not_found(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        alice = await create_user(app)
        bob = await create_user(app)
        key = await create(client, alice, name="alice's")
        url = f"/user/api-keys/{key['id']}"
        missing = (await client.get(f"/user/api-keys/{uuid.uuid4()}", headers=bob.headers)).json()
        attempts = [
            await client.get(url, headers=bob.headers),
            await client.put(url, json={"name": "mine now", "is_active": False}, headers=bob.headers),
            await client.post(url + "/rotate", headers=bob.headers),
            await client.delete(url, headers=bob.headers),
        ]
        for response in attempts:
            assert response.status_code == 404
            assert response.json() == missing
            assert key["api_key"] not in response.text
        listed = (await client.get("/user/api-keys", headers=bob.headers)).json()
        assert key["id"] not in {k["id"] for k in listed["data"]}
        row = await db.fetchrow(
            "SELECT name, is_active, revoked_at FROM api_keys WHERE id = $1", uuid.UUID(key["id"])
        )
        assert row is not None and dict(row) == {"name": "alice's", "is_active": True, "revoked_at": None}
        await assert_works(client, key["api_key"])


class TestScopes:
    async def test_inference_only_key(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        _, key = await create_key(app, user, scopes=["inference"])
        for response in (
            await client.get("/user/api-keys", headers=bearer(key)),
            await client.post("/user/api-keys", json={"name": "k"}, headers=bearer(key)),
            await client.get("/user/balance", headers=bearer(key)),
        ):
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "insufficient_scope"

    async def test_account_read_key(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        _, key = await create_key(app, user, scopes=["account:read"])
        assert (await client.get("/user/balance", headers=bearer(key))).status_code == 200
        response = await client.put("/user/profile", json={"username": "renamed"}, headers=bearer(key))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "insufficient_scope"
        assert (await client.get("/user/api-keys", headers=bearer(key))).status_code == 403

    async def test_routes_need_a_key(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        key = await create(client, user)
        url = f"/user/api-keys/{key['id']}"
        for response in (
            await client.get("/user/api-keys"),
            await client.post("/user/api-keys", json={"name": "k"}),
            await client.get(url),
            await client.put(url, json={"name": "x"}),
            await client.post(url + "/rotate"),
            await client.delete(url),
        ):
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"

    async def test_operator_key_has_no_keys_of_its_own(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        response = await client.get("/user/api-keys", headers=bearer(TEST_ADMIN_KEY))
        assert response.status_code == 403
