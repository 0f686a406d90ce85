"""Admin prices: PUT/GET /admin/pricing, and what the next request is charged."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from tests.conftest import TEST_ADMIN_KEY
from tests.factories import TestUser, create_user
from tests.fakes.upstream import FakeUpstream

OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
MODEL = "openai/gpt-4o-mini"
MARKUP = Decimal("1.5")
PROVIDER_PROMPT = Decimal("0.000001")
PROVIDER_COMPLETION = Decimal("0.000002")
PROMPT_TOKENS = 120
COMPLETION_TOKENS = 40
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 100,
}


@pytest.fixture
def settings_overrides(upstream_server: FakeUpstream) -> dict[str, Any]:
    # Two providers (both served by the fake upstream) so a per-provider price can be told apart.
    return {
        "custom_provider_base_url": upstream_server.base_url,
        "custom_provider_name": "fake",
        "openrouter_api_key": "sk-or-test-key-0000000000",
        "openrouter_base_url": upstream_server.base_url,
        "pricing_markup": MARKUP,
        "auth_cache_ttl_seconds": 60,
    }


@pytest.fixture
def fixed_usage(upstream: FakeUpstream) -> FakeUpstream:
    upstream.set_reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS)
    return upstream


def expected_cost(prompt: Decimal, completion: Decimal) -> Decimal:
    return PROMPT_TOKENS * prompt * MARKUP + COMPLETION_TOKENS * completion * MARKUP


async def chat(client: httpx.AsyncClient, user: TestUser, **extra: Any) -> httpx.Response:
    response = await client.post("/v1/chat/completions", headers=user.headers, json={**BODY, **extra})
    assert response.status_code == 200, response.text
    return response


async def last_usage(db: asyncpg.Connection, user_id: UUID) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT provider, cost, charged, input_tokens, output_tokens FROM usage_records"
        " WHERE user_id = $1 ORDER BY id DESC LIMIT 1",
        user_id,
    )
    assert row is not None
    return row


async def assert_ledger(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        """SELECT u.credits, u.held,
                  (SELECT coalesce(sum(amount), 0) FROM credit_transactions t
                   WHERE t.user_id = u.id) AS ledger
           FROM users u"""
    )
    for row in rows:
        assert row["credits"] == row["ledger"] and row["held"] == 0, dict(row)


async def put_price(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] = OPERATOR
) -> Any:
    response = await client.put("/admin/pricing", headers=headers, json=body)
    assert response.status_code == 200, response.text
    return response.json()


class TestSetPrice:
    async def test_the_next_request_is_charged_at_the_new_price(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, fixed_usage: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="10")
        # A request first, so the catalog snapshot is loaded and the change must invalidate it.
        await chat(client, user)
        before = await last_usage(db, user.id)
        assert before["cost"] == expected_cost(PROVIDER_PROMPT, PROVIDER_COMPLETION)

        answer = await put_price(client, {"model": MODEL, "prompt": "0.00001", "completion": 0.00003})
        assert answer["override"]["model"] == MODEL
        assert answer["override"]["provider"] is None
        assert answer["override"]["prompt"] == "0.00001"
        assert answer["override"]["completion"] == "0.00003"
        assert answer["override"]["updated_by"] == "operator"
        assert answer["propagation_seconds"] == 30
        effective = {e["provider"]: e for e in answer["effective"]}
        assert set(effective) == {"fake", "openrouter"}
        for entry in effective.values():
            assert entry["provider_price"]["prompt"] == "0.000001"
            assert entry["effective"]["prompt"] == "0.000015"
            assert entry["effective"]["completion"] == "0.000045"

        response = await chat(client, user)
        usage = await last_usage(db, user.id)
        cost = expected_cost(Decimal("0.00001"), Decimal("0.00003"))
        assert cost == Decimal("0.0036")
        assert usage["cost"] == usage["charged"] == cost
        assert Decimal(response.headers["X-Gateway-Cost"]) == cost
        credits = await db.fetchval("SELECT credits FROM users WHERE id = $1", user.id)
        assert credits == Decimal("10") - before["cost"] - cost
        assert (
            await db.fetchval(
                "SELECT amount FROM credit_transactions WHERE user_id = $1 AND type = 'usage'"
                " ORDER BY id DESC LIMIT 1",
                user.id,
            )
            == -cost
        )
        await assert_ledger(db)

    async def test_a_provider_price_applies_to_that_provider_only(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, fixed_usage: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="10")
        await put_price(
            client, {"model": MODEL, "provider": "openrouter", "prompt": "0.00002", "completion": "0.00004"}
        )
        await chat(client, user, provider="openrouter")
        usage = await last_usage(db, user.id)
        assert usage["provider"] == "openrouter"
        assert usage["cost"] == expected_cost(Decimal("0.00002"), Decimal("0.00004"))

        await chat(client, user, provider="fake")
        usage = await last_usage(db, user.id)
        assert usage["provider"] == "fake"
        assert usage["cost"] == expected_cost(PROVIDER_PROMPT, PROVIDER_COMPLETION)

        # Unpinned, the request goes to the cheaper provider, which the override did not touch.
        await chat(client, user)
        assert (await last_usage(db, user.id))["provider"] == "fake"
        await assert_ledger(db)

    async def test_a_provider_price_wins_over_the_model_wide_one(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, fixed_usage: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="10")
        await put_price(client, {"model": MODEL, "prompt": "0.00001", "completion": "0.00001"})
        await put_price(
            client, {"model": MODEL, "provider": "fake", "prompt": "0.000003", "completion": "0.000005"}
        )
        await chat(client, user, provider="fake")
        assert (await last_usage(db, user.id))["cost"] == expected_cost(
            Decimal("0.000003"), Decimal("0.000005")
        )
        await chat(client, user, provider="openrouter")
        assert (await last_usage(db, user.id))["cost"] == expected_cost(
            Decimal("0.00001"), Decimal("0.00001")
        )

    async def test_free_requests_cost_nothing(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, fixed_usage: FakeUpstream
    ) -> None:
        answer = await put_price(client, {"model": MODEL, "free": True})
        assert answer["override"]["free"] is True
        assert answer["override"]["prompt"] is None
        assert all(e["effective"]["prompt"] == "0" for e in answer["effective"])
        # Even a user without credits: the worst case of a free request is zero.
        broke = await create_user(app, credits="0")
        paying = await create_user(app, credits="2")
        for user in (broke, paying):
            response = await chat(client, user)
            assert response.json()["usage"]["cost"] == 0
            usage = await last_usage(db, user.id)
            assert usage["cost"] == usage["charged"] == 0
            assert usage["input_tokens"] == PROMPT_TOKENS
            assert (
                await db.fetchval(
                    "SELECT count(*) FROM credit_transactions WHERE user_id = $1 AND type = 'usage'", user.id
                )
                == 0
            )
        assert await db.fetchval("SELECT credits FROM users WHERE id = $1", paying.id) == Decimal("2")
        await assert_ledger(db)

    async def test_prices_take_numbers_and_strings(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        answer = await put_price(
            client,
            {
                "model": MODEL,
                "provider": "fake",
                "prompt": 1e-7,
                "completion": "0",
                "image": "0.04",
                "request": 0,
            },
        )
        assert answer["override"]["prompt"] == "0.0000001"
        assert answer["override"]["completion"] == "0"
        assert answer["override"]["image"] == "0.04"
        row = await db.fetchrow("SELECT prompt_price, image_price FROM model_pricing")
        assert row["prompt_price"] == Decimal("0.0000001") and row["image_price"] == Decimal("0.04")

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"prompt": -1, "completion": "0.00001"}, "prompt"),
            ({"prompt": "-1", "completion": "0.00001"}, "prompt"),
            ({"prompt": "0.00001", "completion": "-0.000001"}, "completion"),
            ({"prompt": "NaN", "completion": "0.00001"}, "prompt"),
            ({"prompt": "0.00001", "completion": "Infinity"}, "completion"),
            ({"prompt": "cheap", "completion": "0.00001"}, "prompt"),
            ({"prompt": True, "completion": "0.00001"}, "prompt"),
            ({"prompt": "0.000000000000001", "completion": "0"}, "prompt"),  # beyond the column's 14 places
            ({"prompt": "1e20", "completion": "0"}, "prompt"),
            ({"prompt": "0.00001", "completion": "0", "image": "-0.5"}, "image"),
            ({"prompt": "0.00001"}, "completion"),
            ({"completion": "0.00001"}, "prompt"),
            ({}, "prompt"),
            ({"prompt": "0", "completion": "0", "currency": "usd"}, "currency"),
        ],
    )
    async def test_invalid_prices(
        self,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        upstream: FakeUpstream,
        body: dict[str, Any],
        param: str,
    ) -> None:
        response = await client.put("/admin/pricing", headers=OPERATOR, json={"model": MODEL, **body})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert await db.fetchval("SELECT count(*) FROM model_pricing") == 0
        assert await db.fetchval("SELECT count(*) FROM audit_logs WHERE action = 'pricing.update'") == 0

    async def test_a_json_nan_literal_is_refused(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        raw = b'{"model": "openai/gpt-4o-mini", "prompt": NaN, "completion": 0}'
        response = await client.put(
            "/admin/pricing", headers={**OPERATOR, "Content-Type": "application/json"}, content=raw
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "prompt"
        assert await db.fetchval("SELECT count(*) FROM model_pricing") == 0

    async def test_unknown_model_or_provider(self, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        unknown = await client.put(
            "/admin/pricing", headers=OPERATOR, json={"model": "nobody/nothing", "prompt": 0, "completion": 0}
        )
        assert unknown.status_code == 404
        assert unknown.json()["error"]["param"] == "model"
        elsewhere = await client.put(
            "/admin/pricing",
            headers=OPERATOR,
            json={"model": MODEL, "provider": "chutes", "prompt": 0, "completion": 0},
        )
        assert elsewhere.status_code == 400
        assert elsewhere.json()["error"]["param"] == "provider"

    async def test_audited_with_before_and_after(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        await put_price(
            client, {"model": MODEL, "provider": "fake", "prompt": "0.00001", "completion": "0.00002"}
        )
        admin = await create_user(app, role="admin")
        await put_price(client, {"model": MODEL, "provider": "fake", "free": True}, headers=admin.headers)
        rows = await db.fetch(
            "SELECT actor_type, actor_id, subject_type, subject_id, before, after FROM audit_logs"
            " WHERE action = 'pricing.update' ORDER BY id"
        )
        assert len(rows) == 2
        first, second = (dict(row) for row in rows)
        assert first["actor_type"] == "operator" and first["actor_id"] is None
        assert (first["subject_type"], first["subject_id"]) == ("model", MODEL)
        assert first["before"] is None
        assert first["after"] == {
            "model": MODEL,
            "provider": "fake",
            "prompt": "0.00001",
            "completion": "0.00002",
            "image": None,
            "request": None,
            "free": False,
            "updated_by": "operator",
        }
        assert second["actor_type"] == "user" and second["actor_id"] == admin.id
        assert second["before"] == first["after"]
        assert second["after"]["free"] is True and second["after"]["prompt"] is None
        assert second["after"]["updated_by"] == f"user:{admin.id}"
        assert admin.api_key not in orjson.dumps([dict(row) for row in rows], default=str).decode()
        # One row per (model, provider): the second call updated the first.
        assert await db.fetchval("SELECT count(*) FROM model_pricing") == 1


class TestAccess:
    async def test_no_key(self, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        for method in ("GET", "PUT"):
            response = await client.request(method, "/admin/pricing", json={"model": MODEL, "prompt": -1})
            assert response.status_code == 401, method
            assert response.json()["error"]["code"] == "invalid_api_key"

    async def test_a_plain_user(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="1")
        put = await client.put(
            "/admin/pricing", headers=user.headers, json={"model": MODEL, "prompt": 0, "completion": 0}
        )
        assert put.status_code == 403
        assert put.json()["error"]["code"] == "permission_denied"
        # Refused before the body is looked at.
        bad = await client.put("/admin/pricing", headers=user.headers, json={"prompt": "-1"})
        assert bad.status_code == 403
        assert (await client.get("/admin/pricing", headers=user.headers)).status_code == 403
        assert await db.fetchval("SELECT count(*) FROM model_pricing") == 0

    async def test_read_and_write_are_separate_permissions(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        created = await client.post(
            "/admin/roles",
            headers=OPERATOR,
            json={"name": "price-viewer", "description": "", "permissions": ["pricing.read"]},
        )
        assert created.status_code == 201, created.text
        viewer = await create_user(app)
        assigned = await client.post(
            "/admin/roles/assign", headers=OPERATOR, json={"user_id": str(viewer.id), "role": "price-viewer"}
        )
        assert assigned.status_code == 200, assigned.text
        assert (await client.get("/admin/pricing", headers=viewer.headers)).status_code == 200
        put = await client.put(
            "/admin/pricing", headers=viewer.headers, json={"model": MODEL, "prompt": 0, "completion": 0}
        )
        assert put.status_code == 403


class TestListPrices:
    async def test_lists_overrides_and_the_effective_price_per_provider(
        self, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        await put_price(
            client, {"model": MODEL, "provider": "openrouter", "prompt": "0.00002", "completion": "0.00004"}
        )
        await put_price(client, {"model": "meta-llama/llama-3.1-8b-instruct", "free": True})

        everything = await client.get("/admin/pricing", headers=OPERATOR)
        assert everything.status_code == 200, everything.text
        listing = everything.json()
        assert listing["total"] == 2 and listing["markup"] == "1.5"
        assert [(o["model"], o["provider"]) for o in listing["data"]] == [
            ("meta-llama/llama-3.1-8b-instruct", None),
            (MODEL, "openrouter"),
        ]
        assert listing["effective"] is None

        one = (await client.get("/admin/pricing", headers=OPERATOR, params={"model": MODEL})).json()
        assert [o["provider"] for o in one["data"]] == ["openrouter"] and one["total"] == 1
        effective = {e["provider"]: e for e in one["effective"]}
        assert effective["fake"]["override"] is None
        assert effective["fake"]["provider_price"]["completion"] == "0.000002"
        assert effective["fake"]["effective"]["prompt"] == "0.0000015"
        assert effective["fake"]["effective"]["completion"] == "0.000003"
        assert effective["openrouter"]["override"]["prompt"] == "0.00002"
        assert effective["openrouter"]["provider_price"]["prompt"] == "0.000001"
        assert effective["openrouter"]["effective"]["prompt"] == "0.00003"
        assert effective["openrouter"]["effective"]["completion"] == "0.00006"

        paged = (
            await client.get("/admin/pricing", headers=OPERATOR, params={"limit": 1, "offset": 1})
        ).json()
        assert [o["model"] for o in paged["data"]] == [MODEL] and paged["total"] == 2

    async def test_an_unpriced_provider_shows_no_effective_price_until_priced(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        upstream.models.append({"id": "vendor/router", "pricing": {"prompt": "-1", "completion": "-1"}})
        user = await create_user(app, credits="1")
        refused = await client.post(
            "/v1/chat/completions", headers=user.headers, json={**BODY, "model": "vendor/router"}
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "model_not_priced"

        one = (await client.get("/admin/pricing", headers=OPERATOR, params={"model": "vendor/router"})).json()
        assert {e["provider"]: e["effective"] for e in one["effective"]} == {"fake": None, "openrouter": None}

        await put_price(client, {"model": "vendor/router", "prompt": "0.000001", "completion": "0.000001"})
        upstream.set_reply(prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS)
        await chat(client, user, model="vendor/router")
        assert (await last_usage(db, user.id))["cost"] == expected_cost(
            Decimal("0.000001"), Decimal("0.000001")
        )
