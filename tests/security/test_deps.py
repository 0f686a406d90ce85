"""The `authenticate` dependency: one 401 for every bad key, key and owner checks, the auth cache."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request

from src.db import api_keys as keys_db
from src.security import deps as auth_deps
from src.security.deps import Principal, RequestMeta, authenticate
from src.security.security import generate_key, key_digest
from src.services import api_keys as keys_service
from src.state import AppState
from tests.conftest import TEST_ADMIN_KEY, TEST_SECRET_KEY
from tests.factories import TestUser, app_state, create_key, create_user

BALANCE = "/user/balance"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(app: FastAPI) -> FakeClock:
    """Drives the auth cache's TTL and its last_used_at coalescing."""
    fake = FakeClock()
    cache = app_state(app).auth_cache
    cache.clock = fake
    cache.records.clock = fake
    return fake


async def settle(state: AppState) -> None:
    """Wait for the background work requests spawned (the last_used_at updates)."""
    await asyncio.gather(*list(state.background))


async def reference_401(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get(BALANCE, headers=bearer(generate_key()))
    assert response.status_code == 401
    body: dict[str, Any] = response.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "authentication_error"
    return body


class TestOne401ForEveryBadKey:
    async def test_malformed_and_unknown_credentials(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        key = user.api_key
        near_miss = key[:12] + ("A" if key[12] != "A" else "B") * (len(key) - 12)
        assert near_miss[:12] == key[:12] and near_miss != key
        expected = await reference_401(client)
        header_sets: list[list[tuple[str, str]]] = [
            [],
            [("Authorization", "Bearer")],
            [("Authorization", "Bearer ")],
            [("Authorization", "Basic dXNlcjpwYXNzd29yZA==")],
            [("Authorization", key)],
            [("Authorization", f"Bearer {key} ")],
            [("Authorization", f"Bearer  {key}")],
            [("Authorization", f"Bearer {key} extra")],
            [("Authorization", f"Bearer {key}"), ("Authorization", f"Bearer {key}")],
            [("Authorization", f"Bearer {generate_key()}")],
            [("Authorization", f"Bearer {near_miss}")],
            [("Authorization", "Bearer gw_live_short")],
            [("Authorization", f"Bearer {TEST_ADMIN_KEY}x")],
        ]
        for headers in header_sets:
            response = await client.get(BALANCE, headers=headers)
            assert response.status_code == 401, headers
            assert response.json() == expected, headers
        # A key anywhere but the Authorization header is no key.
        response = await client.get(BALANCE, params={"api_key": key})
        assert response.status_code == 401 and response.json() == expected
        # The real key still works: none of the above was refused for another reason.
        assert (await client.get(BALANCE, headers=bearer(key))).status_code == 200

    async def test_revoked_expired_and_deactivated_keys(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        revoked_id, revoked = await create_key(app, user, name="revoked")
        expired_id, expired = await create_key(app, user, name="expired")
        inactive_id, inactive = await create_key(app, user, name="inactive")
        _, expiring = await create_key(app, user, name="expires later", expires_in_days=1)
        await db.execute(
            "UPDATE api_keys SET revoked_at = now(), is_active = false WHERE id = $1", revoked_id
        )
        await db.execute(
            "UPDATE api_keys SET expires_at = $2 WHERE id = $1",
            expired_id,
            datetime.now(UTC) - timedelta(seconds=1),
        )
        await db.execute("UPDATE api_keys SET is_active = false WHERE id = $1", inactive_id)
        expected = await reference_401(client)
        for key in (revoked, expired, inactive):
            response = await client.get(BALANCE, headers=bearer(key))
            assert response.status_code == 401
            assert response.json() == expected
        assert (await client.get(BALANCE, headers=bearer(expiring))).status_code == 200

    async def test_lookup_compares_digests_in_constant_time(
        self, app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        user = await create_user(app)
        compared: list[tuple[bytes, bytes]] = []

        def refuse(a: bytes, b: bytes) -> bool:
            compared.append((a, b))
            return False

        monkeypatch.setattr(auth_deps, "digests_match", refuse)
        response = await client.get(BALANCE, headers=user.headers)
        assert response.status_code == 401
        digest = key_digest(TEST_SECRET_KEY, user.api_key)
        assert compared == [(digest, digest)]


class TestIpAllowlist:
    """httpx's ASGITransport reports the client as 127.0.0.1."""

    async def _key(self, app: FastAPI, allowlist: list[str]) -> tuple[TestUser, str]:
        user = await create_user(app)
        _, key = await create_key(app, user, ip_allowlist=allowlist)
        return user, key

    async def test_direct_client_outside_the_allowlist(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        _, key = await self._key(app, ["10.0.0.0/8"])
        response = await client.get(BALANCE, headers=bearer(key))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "ip_not_allowed"
        # X-Forwarded-For from a peer that is not a trusted proxy is the client's say-so: ignored.
        response = await client.get(BALANCE, headers={**bearer(key), "X-Forwarded-For": "10.1.2.3"})
        assert response.status_code == 403

    async def test_direct_client_inside_the_allowlist(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        _, key = await self._key(app, ["127.0.0.1/32", "10.0.0.0/8"])
        assert (await client.get(BALANCE, headers=bearer(key))).status_code == 200

    async def test_ipv4_client_on_a_dual_stack_listener(self, app: FastAPI) -> None:
        _, key = await self._key(app, ["10.0.0.0/8"])
        transport = httpx.ASGITransport(app=app, client=("::ffff:10.1.2.3", 123))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as dual_stack:
            assert (await dual_stack.get(BALANCE, headers=bearer(key))).status_code == 200

    @pytest.mark.parametrize("settings_overrides", [{"trusted_proxies": "127.0.0.1"}])
    async def test_client_behind_a_trusted_proxy(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        _, key = await self._key(app, ["10.0.0.0/8"])
        allowed = await client.get(BALANCE, headers={**bearer(key), "X-Forwarded-For": "10.1.2.3"})
        assert allowed.status_code == 200, allowed.text
        for forwarded in ("192.168.1.1", "10.1.2.3, 203.0.113.9", "not-an-ip"):
            refused = await client.get(BALANCE, headers={**bearer(key), "X-Forwarded-For": forwarded})
            assert refused.status_code == 403, forwarded
        # The proxy itself (no X-Forwarded-For) is not in the allowlist.
        assert (await client.get(BALANCE, headers=bearer(key))).status_code == 403


class TestDomainRestrictions:
    @pytest.mark.parametrize("pattern", ["*.example.com", "app.example.com"])
    async def test_origin_and_referer(self, app: FastAPI, client: httpx.AsyncClient, pattern: str) -> None:
        user = await create_user(app)
        _, key = await create_key(app, user, domain_restrictions=[pattern])
        for allowed in (
            {"Origin": "https://app.example.com"},
            {"Origin": "https://APP.example.com:8443"},
            {"Referer": "https://app.example.com/some/page?x=1"},
        ):
            response = await client.get(BALANCE, headers={**bearer(key), **allowed})
            assert response.status_code == 200, allowed
        for refused in (
            {},
            {"Origin": "https://evil.com"},
            {"Origin": "https://app.example.com.evil.com"},
            {"Origin": "https://evilexample.com"},
            {"Origin": "null"},
            {"Origin": "http://[::1"},
            {"Referer": "https://evil.com/?next=https://app.example.com"},
        ):
            response = await client.get(BALANCE, headers={**bearer(key), **refused})
            assert response.status_code == 403, refused
            assert response.json()["error"]["code"] == "domain_not_allowed"


DISABLE_OWNER = {
    "deactivated": "UPDATE users SET is_active = false WHERE id = $1",
    "banned": "UPDATE users SET banned_at = now() WHERE id = $1",
}


class TestOwnerState:
    @pytest.mark.parametrize("how", DISABLE_OWNER)
    async def test_disabled_owner(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, how: str
    ) -> None:
        user = await create_user(app)
        await db.execute(DISABLE_OWNER[how], user.id)
        response = await client.get(BALANCE, headers=user.headers)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "account_disabled"


class TestAuthCache:
    @pytest.mark.parametrize("settings_overrides", [{"auth_cache_ttl_seconds": 2}])
    async def test_cached_within_the_ttl_and_no_longer(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        user = await create_user(app)
        lookups = 0
        real = keys_db.get_auth_record

        async def counting(conn: asyncpg.Connection, *, key_hash: bytes) -> keys_db.AuthRecord | None:
            nonlocal lookups
            lookups += 1
            return await real(conn, key_hash=key_hash)

        monkeypatch.setattr(keys_db, "get_auth_record", counting)
        assert (await client.get(BALANCE, headers=user.headers)).status_code == 200
        assert lookups == 1
        # Revoked behind the service's back: nothing tells the cache.
        await db.execute(
            "UPDATE api_keys SET revoked_at = now(), is_active = false WHERE user_id = $1", user.id
        )
        clock.advance(1.9)
        assert (await client.get(BALANCE, headers=user.headers)).status_code == 200
        assert lookups == 1
        clock.advance(0.2)
        assert (await client.get(BALANCE, headers=user.headers)).status_code == 401
        assert lookups == 2

    async def test_revocation_through_the_service_applies_at_once(
        self, app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
    ) -> None:
        user = await create_user(app)
        key_id, key = await create_key(app, user)
        assert (await client.get(BALANCE, headers=bearer(key))).status_code == 200
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await keys_service.revoke_key(
                conn,
                state,
                owner_id=user.id,
                key_id=key_id,
                actor=Principal(user_id=user.id, key_id=None, is_operator=False),
                meta=RequestMeta(ip=None, user_agent=None, request_id=None),
            )
        assert (await client.get(BALANCE, headers=bearer(key))).status_code == 401
        assert (await client.get(BALANCE, headers=user.headers)).status_code == 200

    async def test_a_lookup_overtaken_by_an_invalidation_is_not_cached(
        self, app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        user = await create_user(app)
        state = app_state(app)
        real = keys_db.get_auth_record

        async def read_then_revoked(
            conn: asyncpg.Connection, *, key_hash: bytes
        ) -> keys_db.AuthRecord | None:
            record = await real(conn, key_hash=key_hash)
            # A revocation commits and is announced while this read is on its way back.
            state.auth_cache.drop(digests=[key_hash])
            return record

        monkeypatch.setattr(keys_db, "get_auth_record", read_then_revoked)
        assert (await client.get(BALANCE, headers=user.headers)).status_code == 200
        assert state.auth_cache.get(key_digest(TEST_SECRET_KEY, user.api_key)) is None
        monkeypatch.setattr(keys_db, "get_auth_record", real)
        assert (await client.get(BALANCE, headers=user.headers)).status_code == 200
        assert state.auth_cache.get(key_digest(TEST_SECRET_KEY, user.api_key)) is not None


class TestLastUsed:
    async def test_written_at_most_once_a_minute(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        user = await create_user(app)
        state = app_state(app)
        touches: list[UUID] = []
        real = keys_db.touch_last_used

        async def counting(conn: asyncpg.Connection, *, key_id: UUID) -> None:
            touches.append(key_id)
            await real(conn, key_id=key_id)

        monkeypatch.setattr(keys_db, "touch_last_used", counting)
        query = "SELECT last_used_at FROM api_keys WHERE user_id = $1"
        assert await db.fetchval(query, user.id) is None

        assert (await client.get(BALANCE, headers=user.headers)).status_code == 200
        await settle(state)
        first = await db.fetchval(query, user.id)
        assert first is not None and len(touches) == 1

        clock.advance(30)
        assert (await client.get(BALANCE, headers=user.headers)).status_code == 200
        assert not state.background
        await settle(state)
        assert len(touches) == 1
        assert await db.fetchval(query, user.id) == first

        clock.advance(31)
        assert (await client.get(BALANCE, headers=user.headers)).status_code == 200
        await settle(state)
        assert len(touches) == 2
        assert await db.fetchval(query, user.id) > first


def _request(token: str, path: str = "/admin/users") -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "scheme": "http",
            "query_string": b"",
            "headers": [(b"authorization", f"Bearer {token}".encode()), (b"host", b"testserver")],
            "client": ("127.0.0.1", 123),
            "server": ("testserver", 80),
            "state": {},
        }
    )


class TestOperatorKey:
    async def test_admin_api_key_is_the_operator(self, app: FastAPI) -> None:
        principal = await authenticate(_request(TEST_ADMIN_KEY), app_state(app))
        assert principal.is_operator
        assert principal.user_id is None and principal.key_id is None
        assert principal.actor == "operator"

    async def test_user_key_is_not_the_operator(self, app: FastAPI) -> None:
        user = await create_user(app)
        principal = await authenticate(_request(user.api_key, "/user/balance"), app_state(app))
        assert not principal.is_operator
        assert principal.user_id == user.id

    async def test_operator_key_has_no_account(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        response = await client.get(BALANCE, headers=bearer(TEST_ADMIN_KEY))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "operator_not_allowed"
