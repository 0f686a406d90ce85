"""Rate limits over HTTP: exactly N of 3N concurrent requests, X-RateLimit headers on every /v1
response, token limits that keep the real usage, the concurrency cap with streams, the per-IP
throttle of key guessers, admin ceilings and key limits, and the per-IP limit of POST /auth.

The limiter's clock is frozen in the middle of a minute (and of a day) in the in-process tests,
so no burst straddles a window boundary, where a sliding window would rightly let one more in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from src.config import Settings
from src.db import api_keys as keys_db
from src.security.security import generate_key
from src.services import tokens
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import app_state, create_key, create_user, create_user_for
from tests.fakes.live_server import LiveServer
from tests.fakes.upstream import FakeUpstream

MODEL = "openai/gpt-4o-mini"
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "Say hello."}]
BODY: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 20}
OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
CHAT = "/v1/chat/completions"
# 30 s into a minute (and 8 h into a UTC day): a test's requests all fall in one window.
FROZEN_AT = 1_800_000_030.0
REQUEST_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)
TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest, upstream_server: FakeUpstream) -> dict[str, Any]:
    """The fake upstream as the only provider; indirect parametrisation adds per-test settings."""
    extra: dict[str, Any] = getattr(request, "param", {})
    return {"custom_provider_base_url": upstream_server.base_url, "custom_provider_name": "fake", **extra}


def freeze(app: FastAPI) -> None:
    app_state(app).limiter.clock = lambda: FROZEN_AT


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def estimate(max_tokens: int, messages: list[dict[str, Any]] = MESSAGES) -> int:
    """The tokens a request reserves against tpm: its prompt estimate plus max_tokens."""
    return tokens.estimate_prompt(messages, tools=None).text_tokens + max_tokens


async def my_limits(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    response = await client.get("/user/limit", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_refused(response: httpx.Response, param: str, limit_name: str) -> None:
    """A 429 from our limiter: OpenAI's body naming the limit, Retry-After and X-RateLimit-*."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert error["param"] == param
    assert limit_name in error["message"]
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    for name in REQUEST_HEADERS:
        assert name in response.headers, name


async def count(db: asyncpg.Connection, sql: str, user_id: UUID) -> int:
    value: int = await db.fetchval(sql, user_id)
    return value


async def charged_requests(db: asyncpg.Connection, user_id: UUID) -> tuple[int, int, int, Decimal]:
    """Usage records, usage ledger rows, open holds and the held amount of one user."""
    usage = await count(db, "SELECT count(*) FROM usage_records WHERE user_id = $1", user_id)
    ledger = await count(
        db, "SELECT count(*) FROM credit_transactions WHERE user_id = $1 AND type = 'usage'", user_id
    )
    holds = await count(db, "SELECT count(*) FROM credit_holds WHERE user_id = $1", user_id)
    held: Decimal = await db.fetchval("SELECT held FROM users WHERE id = $1", user_id)
    return usage, ledger, holds, held


async def assert_ledger(db: asyncpg.Connection) -> None:
    """For every user: credits == sum of the ledger, held == sum of open holds, never negative."""
    rows = await db.fetch(
        """SELECT u.id, u.credits, u.held,
                  (SELECT coalesce(sum(amount), 0) FROM credit_transactions t
                   WHERE t.user_id = u.id) AS ledger,
                  (SELECT coalesce(sum(amount), 0) FROM credit_holds h WHERE h.user_id = u.id) AS holds
           FROM users u"""
    )
    for row in rows:
        assert row["credits"] == row["ledger"], dict(row)
        assert row["held"] == row["holds"], dict(row)
        assert row["credits"] >= 0, dict(row)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def client_from(app: FastAPI, ip: str) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client whose requests come from `ip` (the default client is 127.0.0.1)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(ip, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


class TestRequestLimit:
    async def test_exactly_n_of_3n_concurrent_requests(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        freeze(app)
        n = 5
        user = await create_user(app, credits="5")
        _, key = await create_key(app, user, limits={"rpm_limit": n})
        responses = await asyncio.gather(
            *(client.post(CHAT, json=BODY, headers=bearer(key)) for _ in range(3 * n))
        )

        assert Counter(r.status_code for r in responses) == {200: n, 429: 2 * n}
        admitted = [r for r in responses if r.status_code == 200]
        # Each admitted request saw its own count: the check and the increment are one step.
        assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted) == list(range(n))
        for refused in (r for r in responses if r.status_code == 429):
            assert_refused(refused, "rpm", "requests per minute")
            assert "API key" in refused.json()["error"]["message"]
            assert refused.headers["x-ratelimit-limit-requests"] == str(n)
            assert refused.headers["x-ratelimit-remaining-requests"] == "0"

        # Refused requests consumed no quota, reached no provider and were not charged.
        limits = await my_limits(client, bearer(key))
        assert limits["key"]["usage"]["rpm"] == n
        assert limits["account"]["usage"]["rpm"] == n
        assert limits["key"]["usage"]["concurrency"] == 0
        assert len(upstream.chat_requests) == n
        assert await charged_requests(db, user.id) == (n, n, 0, Decimal(0))
        await assert_ledger(db)

    async def test_headers_on_every_v1_response_count_down_with_the_limiter(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        freeze(app)
        rpm, tpm = 20, 100_000
        user = await create_user(app, credits="0.01")
        _, key = await create_key(app, user, limits={"rpm_limit": rpm, "tpm_limit": tpm})
        headers = bearer(key)

        chat = await client.post(CHAT, json=BODY, headers=headers)
        models = await client.get("/v1/models", headers=headers)
        invalid = await client.post(CHAT, json={"model": MODEL, "messages": "not a list"}, headers=headers)
        # 16,000 output tokens at $0.000002 hold $0.032, more than the $0.01 this user has.
        broke = await client.post(CHAT, json={**BODY, "max_tokens": 16_000}, headers=headers)

        assert [r.status_code for r in (chat, models, invalid, broke)] == [200, 200, 400, 402]
        for number, response in enumerate((chat, models, invalid, broke), start=1):
            assert response.headers["x-ratelimit-limit-requests"] == str(rpm)
            assert response.headers["x-ratelimit-remaining-requests"] == str(rpm - number)
            assert response.headers["x-ratelimit-reset-requests"] == "30s"
        for response in (chat, broke):
            for name in TOKEN_HEADERS:
                assert name in response.headers, name
            assert response.headers["x-ratelimit-limit-tokens"] == str(tpm)

        limits = await my_limits(client, headers)
        used = limits["key"]["usage"]
        # The limiter's own numbers agree with what the headers counted down.
        assert used["rpm"] == 4 == rpm - int(broke.headers["x-ratelimit-remaining-requests"])
        real = chat.json()["usage"]["total_tokens"]
        # The 402 reserved its estimate and gave it back: only the first call's real tokens remain.
        assert used["tpm"] == real
        assert int(chat.headers["x-ratelimit-remaining-tokens"]) == tpm - estimate(20)
        assert int(broke.headers["x-ratelimit-remaining-tokens"]) == tpm - real - estimate(16_000)
        assert limits["key"]["limits"]["rpm_limit"] == rpm
        assert limits["key"]["own"]["rpm_limit"] == rpm
        assert limits["key"]["own"]["rpd_limit"] is None

    @pytest.mark.parametrize("settings_overrides", [{"max_body_bytes": 2048}], indirect=True)
    async def test_a_body_too_large_frees_the_concurrency_slot(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        freeze(app)
        user = await create_user(app, credits="1")

        async def chunked() -> AsyncIterator[bytes]:
            # No Content-Length: the limit is found while the body is read, after admission.
            yield b'{"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "'
            yield b"x" * 4096
            yield b'"}]}'

        response = await client.post(CHAT, content=chunked(), headers=user.headers)
        assert response.status_code == 413
        limits = await my_limits(client, user.headers)
        assert limits["key"]["usage"]["rpm"] == 1
        assert limits["key"]["usage"]["concurrency"] == 0
        assert limits["account"]["usage"]["concurrency"] == 0


class TestTokenLimit:
    async def test_refused_on_estimate_and_counted_with_real_usage(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        freeze(app)
        tpm = 1000
        upstream.set_reply(prompt_tokens=11, completion_tokens=7)
        user = await create_user(app, credits="1")
        _, key = await create_key(app, user, limits={"tpm_limit": tpm})
        headers = bearer(key)

        first = await client.post(CHAT, json=BODY, headers=headers)
        assert first.status_code == 200, first.text
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == tpm - estimate(20)
        after_first = await my_limits(client, headers)
        # The reservation was the estimate; what stays counted is the provider's real usage.
        assert estimate(20) != 18
        assert after_first["key"]["usage"]["tpm"] == 18
        assert after_first["account"]["usage"]["tpm"] == 18

        remaining = tpm - 18
        too_big = {**BODY, "max_tokens": remaining - estimate(0) + 1}
        refused = await client.post(CHAT, json=too_big, headers=headers)
        assert_refused(refused, "tpm", "tokens per minute")
        assert refused.headers["x-ratelimit-limit-tokens"] == str(tpm)
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(remaining)

        after_refusal = await my_limits(client, headers)
        for subject in ("key", "account"):
            usage = after_refusal[subject]["usage"]
            assert usage["rpm"] == 2  # the refused request keeps its request count
            assert usage["tpm"] == 18  # and consumed no tokens
            assert usage["concurrency"] == 0  # and its slot is free
        assert len(upstream.chat_requests) == 1
        assert await charged_requests(db, user.id) == (1, 1, 0, Decimal(0))

        # A request that fits exactly is admitted.
        fits = await client.post(CHAT, json={**BODY, "max_tokens": remaining - estimate(0)}, headers=headers)
        assert fits.status_code == 200, fits.text
        assert fits.headers["x-ratelimit-remaining-tokens"] == "0"
        await assert_ledger(db)


class TestConcurrency:
    @pytest.mark.parametrize("settings_overrides", [{"default_concurrency": 3}], indirect=True)
    async def test_cap_then_slots_return_after_disconnects(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(chunks=100, chunk_delay=0.05)
        user = await create_user_for(gateway_settings, credits="5")
        stream_body = {**BODY, "max_tokens": 200, "stream": True}
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=live_gateway.url, timeout=10, limits=limits) as http:

            async def concurrency() -> tuple[int, int]:
                body = await my_limits(http, user.headers)
                return body["key"]["usage"]["concurrency"], body["account"]["usage"]["concurrency"]

            async with contextlib.AsyncExitStack() as open_streams:
                # Kept referenced: a dropped iterator is closed by the collector, and so its stream.
                readers: list[AsyncIterator[bytes]] = []
                for _ in range(3):
                    stream = await open_streams.enter_async_context(
                        http.stream("POST", CHAT, json=stream_body, headers=user.headers)
                    )
                    assert stream.status_code == 200
                    readers.append(stream.aiter_raw())
                    assert (await anext(readers[-1])).startswith(b"data: ")

                fourth = await http.post(CHAT, json=stream_body, headers=user.headers)
                assert_refused(fourth, "conc", "concurrent requests")
                assert await concurrency() == (3, 3)
            # Leaving the block closed the three streams mid-way: the clients are gone.

            async def all_free() -> bool:
                return await concurrency() == (0, 0)

            await eventually(all_free)
            assert len(upstream.chat_requests) == 3

            upstream.set_reply(chunks=3, chunk_delay=0)
            again = await http.post(CHAT, json=stream_body, headers=user.headers)
            assert again.status_code == 200
            assert again.text.rstrip().endswith("data: [DONE]")

        async def nothing_held() -> bool:
            return await db.fetchval("SELECT held FROM users WHERE id = $1", user.id) == 0

        await eventually(nothing_held)
        await assert_ledger(db)
        # The disconnected streams' token counts were corrected to what was billed for them.
        async with httpx.AsyncClient(base_url=live_gateway.url, timeout=10) as http:
            used = (await my_limits(http, user.headers))["key"]["usage"]["tpm"]
        billed = await db.fetchval(
            "SELECT sum(input_tokens + output_tokens) FROM usage_records WHERE user_id = $1", user.id
        )
        assert await count(db, "SELECT count(*) FROM usage_records WHERE user_id = $1", user.id) == 4
        assert used == billed


class TestKeyGuessing:
    async def _guess(self, client: httpx.AsyncClient, attempts: int) -> list[httpx.Response]:
        return [await client.get("/v1/models", headers=bearer(generate_key("live"))) for _ in range(attempts)]

    @pytest.fixture
    def lookups(self, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
        """Digests looked up in the database by authentication."""
        seen: list[bytes] = []
        real = keys_db.get_auth_record

        async def counting(conn: asyncpg.Connection, *, key_hash: bytes) -> keys_db.AuthRecord | None:
            seen.append(key_hash)
            return await real(conn, key_hash=key_hash)

        monkeypatch.setattr(keys_db, "get_auth_record", counting)
        return seen

    @pytest.mark.parametrize("settings_overrides", [{"auth_failure_limit_per_minute": 50}], indirect=True)
    async def test_guessing_ip_is_throttled_and_other_ips_are_not(
        self, app: FastAPI, client: httpx.AsyncClient, lookups: list[bytes]
    ) -> None:
        freeze(app)
        other = await create_user(app, credits="1")
        responses = await self._guess(client, 500)

        statuses = [r.status_code for r in responses]
        assert statuses == [401] * 50 + [429] * 450
        # Throttled requests cost no database lookup.
        assert len(lookups) == 50
        last = responses[-1]
        assert last.json()["error"]["code"] == "too_many_auth_failures"
        assert last.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(last.headers["retry-after"]) <= 60

        async with client_from(app, "10.9.9.9") as elsewhere:
            response = await elsewhere.get("/v1/models", headers=other.headers)
        assert response.status_code == 200

    @pytest.mark.parametrize("settings_overrides", [{"auth_failure_limit_per_minute": 50}], indirect=True)
    async def test_throttled_ip_is_refused_even_with_a_valid_key_and_without_a_lookup(
        self, app: FastAPI, client: httpx.AsyncClient, lookups: list[bytes]
    ) -> None:
        freeze(app)
        user = await create_user(app, credits="1")
        await self._guess(client, 50)
        looked_up = len(lookups)

        response = await client.get("/v1/models", headers=user.headers)
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "too_many_auth_failures"
        assert len(lookups) == looked_up
        async with client_from(app, "10.9.9.9") as elsewhere:
            assert (await elsewhere.get("/v1/models", headers=user.headers)).status_code == 200


class TestPublicLimit:
    @pytest.mark.parametrize("settings_overrides", [{"public_rpm_per_ip": 3}], indirect=True)
    async def test_auth_is_limited_per_ip(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        freeze(app)
        responses = [await client.post("/auth", json={"access_token": "x"}) for _ in range(5)]
        # Privy is not configured: admitted requests get 503, refused ones 429 first.
        assert [r.status_code for r in responses] == [503, 503, 503, 429, 429]
        assert_refused(responses[-1], "rpm", "requests per minute")
        async with client_from(app, "10.9.9.9") as elsewhere:
            assert (await elsewhere.post("/auth", json={"access_token": "x"})).status_code == 503


async def audit_rows(db: asyncpg.Connection, action: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        """SELECT actor_type, user_id, subject_type, subject_id, before, after
           FROM audit_logs WHERE action = $1 ORDER BY id""",
        action,
    )
    return [dict(row) for row in rows]


def as_json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str) else value


class TestCeilings:
    async def test_user_cannot_exceed_the_ceiling_until_an_admin_raises_it(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        key_id, _ = await create_key(app, user, name="existing")
        above = 100_001  # the test settings' default_rpm is 100,000

        created = await client.post(
            "/user/api-keys", json={"name": "fast", "rpm_limit": above}, headers=user.headers
        )
        updated = await client.put(
            f"/user/api-keys/{key_id}", json={"rpm_limit": above}, headers=user.headers
        )
        for response in (created, updated):
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "rpm_limit"
            assert response.json()["error"]["code"] == "limit_above_ceiling"

        raised = await client.put(
            f"/admin/rate-limits/users/{user.id}", json={"rpm_limit": 200_000}, headers=OPERATOR
        )
        assert raised.status_code == 200, raised.text
        assert raised.json()["admin_set"] == {
            "rpm_limit": 200_000,
            "rpd_limit": None,
            "tpm_limit": None,
            "tpd_limit": None,
            "concurrency_limit": None,
        }
        assert raised.json()["ceiling"]["rpm_limit"] == 200_000
        assert raised.json()["ceiling"]["rpd_limit"] == 10_000_000  # the plan's (settings default)

        created = await client.post(
            "/user/api-keys", json={"name": "fast", "rpm_limit": above}, headers=user.headers
        )
        assert created.status_code == 201, created.text
        assert created.json()["rpm_limit"] == above
        updated = await client.put(
            f"/user/api-keys/{key_id}", json={"rpm_limit": above}, headers=user.headers
        )
        assert updated.status_code == 200, updated.text
        assert (await my_limits(client, user.headers))["account"]["limits"]["rpm_limit"] == 200_000

        (row,) = await audit_rows(db, "limits.user_update")
        assert row["actor_type"] == "operator"
        assert row["user_id"] == user.id
        assert (row["subject_type"], row["subject_id"]) == ("user", str(user.id))
        assert as_json(row["before"])["rpm_limit"] is None
        assert as_json(row["after"])["rpm_limit"] == 200_000

    @pytest.mark.parametrize("settings_overrides", [{"auth_cache_ttl_seconds": 60}], indirect=True)
    async def test_a_changed_ceiling_applies_at_once_and_null_clears_it(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        freeze(app)
        user = await create_user(app, credits="1")
        # The key is now cached with its owner's old ceiling (for 60 s).
        assert (await client.post(CHAT, json=BODY, headers=user.headers)).status_code == 200

        lowered = await client.put(
            f"/admin/rate-limits/users/{user.id}", json={"rpm_limit": 3}, headers=OPERATOR
        )
        assert lowered.status_code == 200, lowered.text
        statuses = [(await client.post(CHAT, json=BODY, headers=user.headers)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]

        cleared = await client.put(
            f"/admin/rate-limits/users/{user.id}", json={"rpm_limit": None}, headers=OPERATOR
        )
        assert cleared.status_code == 200
        assert cleared.json()["admin_set"]["rpm_limit"] is None
        assert cleared.json()["ceiling"]["rpm_limit"] == 100_000
        assert (await client.post(CHAT, json=BODY, headers=user.headers)).status_code == 200
        fetched = await client.get(f"/admin/rate-limits/users/{user.id}", headers=OPERATOR)
        assert fetched.json() == cleared.json()

    @pytest.mark.parametrize("settings_overrides", [{"auth_cache_ttl_seconds": 60}], indirect=True)
    async def test_admin_sets_a_key_limit(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        freeze(app)
        user = await create_user(app, credits="1")
        key_id, key = await create_key(app, user)
        assert (await client.post(CHAT, json=BODY, headers=bearer(key))).status_code == 200

        response = await client.put(
            f"/admin/rate-limits/keys/{key_id}", json={"rpm_limit": 2}, headers=OPERATOR
        )
        assert response.status_code == 200, response.text
        view = response.json()
        assert view["key_id"] == str(key_id) and view["user_id"] == str(user.id)
        assert view["own"]["rpm_limit"] == 2 and view["effective"]["rpm_limit"] == 2
        assert view["ceiling"]["rpm_limit"] == 100_000
        assert (await client.get(f"/admin/rate-limits/keys/{key_id}", headers=OPERATOR)).json() == view

        # The key was cached before the change; the change applies at once anyway.
        statuses = [(await client.post(CHAT, json=BODY, headers=bearer(key))).status_code for _ in range(2)]
        assert statuses == [200, 429]
        # The owner's other key is not limited by it.
        assert (await client.post(CHAT, json=BODY, headers=user.headers)).status_code == 200

        (row,) = await audit_rows(db, "limits.key_update")
        assert row["actor_type"] == "operator" and row["user_id"] == user.id
        assert (row["subject_type"], row["subject_id"]) == ("api_key", str(key_id))
        assert as_json(row["before"])["rpm_limit"] is None
        assert as_json(row["after"])["rpm_limit"] == 2

    async def test_a_key_limit_above_the_ceiling_is_capped(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        user = await create_user(app)
        key_id, key = await create_key(app, user)
        await client.put(
            f"/admin/rate-limits/users/{user.id}", json={"concurrency_limit": 4}, headers=OPERATOR
        )
        response = await client.put(
            f"/admin/rate-limits/keys/{key_id}", json={"concurrency_limit": 9}, headers=OPERATOR
        )
        assert response.json()["own"]["concurrency_limit"] == 9
        assert response.json()["effective"]["concurrency_limit"] == 4
        limits = await my_limits(client, bearer(key))
        assert limits["key"]["limits"]["concurrency_limit"] == 4
        assert limits["account"]["limits"]["concurrency_limit"] == 4


class TestAdminRoutes:
    @pytest.mark.parametrize(
        "path",
        [
            "/admin/rate-limits/users/{}",
            "/admin/rate-limits/keys/{}",
        ],
    )
    async def test_unknown_and_malformed_ids_are_404(self, client: httpx.AsyncClient, path: str) -> None:
        for target in (str(uuid4()), "not-a-uuid"):
            for method, body in (("GET", None), ("PUT", {"rpm_limit": 5})):
                response = await client.request(method, path.format(target), json=body, headers=OPERATOR)
                assert response.status_code == 404, (method, target, response.text)
                assert response.json()["error"]["code"] in {"user_not_found", "api_key_not_found"}

    async def test_a_revoked_key_is_404(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        key_id, _ = await create_key(app, user)
        assert (await client.delete(f"/user/api-keys/{key_id}", headers=user.headers)).status_code == 200
        response = await client.get(f"/admin/rate-limits/keys/{key_id}", headers=OPERATOR)
        assert response.status_code == 404

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"rpm_limit": 0}, "rpm_limit"),
            ({"rpd_limit": -1}, "rpd_limit"),
            ({"rpm_limit": "5"}, "rpm_limit"),
            ({"rpm_limit": 5.0}, "rpm_limit"),
            ({"concurrency_limit": True}, "concurrency_limit"),
            ({"rpm_limit": 2**31}, "rpm_limit"),
            ({"tpm_limit": 2**63}, "tpm_limit"),
            ({"rpm": 5}, "rpm"),
            ({"user_id": "someone-else"}, "user_id"),
        ],
    )
    async def test_strict_bodies(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        body: dict[str, Any],
        param: str,
    ) -> None:
        user = await create_user(app)
        key_id, _ = await create_key(app, user)
        for path in (f"/admin/rate-limits/users/{user.id}", f"/admin/rate-limits/keys/{key_id}"):
            response = await client.put(path, json=body, headers=OPERATOR)
            assert response.status_code == 400, (path, response.text)
            assert response.json()["error"]["param"] == param
        assert await db.fetchval("SELECT count(*) FROM audit_logs WHERE action LIKE 'limits.%'") == 0

    async def test_token_limits_take_big_numbers(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        response = await client.put(
            f"/admin/rate-limits/users/{user.id}", json={"tpd_limit": 2**40}, headers=OPERATOR
        )
        assert response.status_code == 200, response.text
        assert response.json()["ceiling"]["tpd_limit"] == 2**40

    @pytest.mark.parametrize("settings_overrides", [{"auth_cache_ttl_seconds": 60}], indirect=True)
    async def test_read_and_write_are_separate_permissions(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        role = {"name": "limits-viewer", "description": "reads limits", "permissions": ["limits.read"]}
        assert (await client.post("/admin/roles", json=role, headers=OPERATOR)).status_code == 201
        viewer = await create_user(app)
        target = await create_user(app)
        assign = {"user_id": str(viewer.id), "role": "limits-viewer"}
        assert (await client.post("/admin/roles/assign", json=assign, headers=OPERATOR)).status_code == 200

        path = f"/admin/rate-limits/users/{target.id}"
        assert (await client.get(path, headers=viewer.headers)).status_code == 200
        refused = await client.put(path, json={"rpm_limit": 5}, headers=viewer.headers)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "permission_denied"
        plain = await client.get(path, headers=target.headers)
        assert plain.status_code == 403

    async def test_the_operator_key_has_no_limits_of_its_own(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/user/limit", headers=OPERATOR)
        assert response.status_code == 403
        assert (await client.get("/user/limit")).status_code == 401
