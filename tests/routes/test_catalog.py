"""The catalog: GET /catalog/models and /catalog/providers (public), POST /catalog/estimate."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from src.services import credits
from tests.factories import create_key, create_user
from tests.fakes.upstream import FakeUpstream

MODEL = "openai/gpt-4o-mini"
LLAMA = "meta-llama/llama-3.1-8b-instruct"
PROMPT_PRICE = Decimal("0.000001")
COMPLETION_PRICE = Decimal("0.000002")
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
    ],
    "max_tokens": 100,
}


@pytest.fixture
def settings_overrides(upstream_server: FakeUpstream) -> dict[str, Any]:
    return {"custom_provider_base_url": upstream_server.base_url, "custom_provider_name": "fake"}


def model_list_requests(upstream: FakeUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path == "/v1/models")


class TestBrowseModels:
    async def test_needs_no_key(self, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        response = await client.get("/catalog/models")
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["object"] == "list"
        assert page["total"] == 2
        assert [m["id"] for m in page["data"]] == [LLAMA, MODEL]
        gpt = page["data"][1]
        assert gpt["object"] == "model"
        assert gpt["owned_by"] == "openai"
        assert gpt["name"] == "OpenAI: GPT-4o-mini"
        assert gpt["context_length"] == 128000
        assert gpt["pricing"] == {
            "prompt": "0.000001",
            "completion": "0.000002",
            "image": "0",
            "request": "0",
        }
        assert [p["name"] for p in gpt["providers"]] == ["fake"]

    async def test_an_invalid_key_is_ignored_not_refused(
        self, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        # Public means public: a stale key in a browser must not break the page.
        response = await client.get("/catalog/models", headers={"Authorization": "Bearer gw_live_nope"})
        assert response.status_code == 200
        assert response.json()["total"] == 2

    @pytest.mark.parametrize(
        ("q", "expected"),
        [
            ("LLAMA", [LLAMA]),  # the id, any case
            ("gpt-4O", [MODEL]),
            ("meta: llama 3.1", [LLAMA]),  # only the name contains this
            ("openai: gpt", [MODEL]),
            ("/", [LLAMA, MODEL]),
            ("claude", []),
        ],
    )
    async def test_search(
        self, client: httpx.AsyncClient, upstream: FakeUpstream, q: str, expected: list[str]
    ) -> None:
        response = await client.get("/catalog/models", params={"q": q})
        assert response.status_code == 200
        assert [m["id"] for m in response.json()["data"]] == expected
        assert response.json()["total"] == len(expected)

    async def test_provider_filter(self, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        served = await client.get("/catalog/models", params={"provider": "fake"})
        assert served.json()["total"] == 2
        other = await client.get("/catalog/models", params={"provider": "openrouter"})
        assert other.status_code == 200
        assert other.json()["data"] == [] and other.json()["total"] == 0
        both = await client.get("/catalog/models", params={"provider": "fake", "q": "llama"})
        assert [m["id"] for m in both.json()["data"]] == [LLAMA]

    async def test_paging(self, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        first = (await client.get("/catalog/models", params={"limit": 1})).json()
        assert [m["id"] for m in first["data"]] == [LLAMA]
        assert (first["total"], first["limit"], first["offset"]) == (2, 1, 0)
        second = (await client.get("/catalog/models", params={"limit": 1, "offset": 1})).json()
        assert [m["id"] for m in second["data"]] == [MODEL]
        past = (await client.get("/catalog/models", params={"limit": 1, "offset": 2})).json()
        assert past["data"] == [] and past["total"] == 2

    @pytest.mark.parametrize(
        ("params", "param"), [({"limit": 0}, "limit"), ({"offset": -1}, "offset"), ({"q": "x" * 201}, "q")]
    )
    async def test_invalid_query(
        self, client: httpx.AsyncClient, upstream: FakeUpstream, params: dict[str, Any], param: str
    ) -> None:
        response = await client.get("/catalog/models", params=params)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == param

    async def test_unpriced_models_are_not_listed(
        self, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        # OpenRouter publishes -1 for routers whose price varies: such a model is not usable.
        upstream.models.append(
            {"id": "openrouter/auto", "name": "Auto Router", "pricing": {"prompt": "-1", "completion": "-1"}}
        )
        upstream.models.append(
            {"id": "tiny", "owned_by": "acme", "pricing": {"prompt": "0.0000005", "completion": "0.0000005"}}
        )
        data = (await client.get("/catalog/models")).json()["data"]
        assert [m["id"] for m in data] == [LLAMA, MODEL, "tiny"]
        assert data[2]["owned_by"] == "acme"


class TestProviders:
    async def test_lists_every_known_provider(
        self, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        response = await client.get("/catalog/providers")
        assert response.status_code == 200, response.text
        providers = {p["name"]: p for p in response.json()["data"]}
        assert list(providers) == ["openrouter", "portkey", "featherless", "chutes", "fake"]
        assert providers["fake"]["enabled"] is True
        assert providers["fake"]["model_count"] == 2
        assert providers["fake"]["display_name"] == "fake"
        # The test settings configure no key for the named providers.
        for name, display in [
            ("openrouter", "OpenRouter"),
            ("portkey", "Portkey"),
            ("featherless", "Featherless"),
            ("chutes", "Chutes"),
        ]:
            assert providers[name]["enabled"] is False, name
            assert providers[name]["model_count"] == 0, name
            assert providers[name]["display_name"] == display
            assert providers[name]["site_url"].startswith("https://")
            assert providers[name]["logo_url"].startswith("https://")

    async def test_counts_only_usable_models(self, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        upstream.models.append({"id": "unpriced/model", "pricing": {"prompt": "-1", "completion": "0"}})
        providers = {p["name"]: p for p in (await client.get("/catalog/providers")).json()["data"]}
        assert providers["fake"]["model_count"] == 2


async def held_of_last_request(db: asyncpg.Connection, user_id: Any) -> Decimal:
    held: Decimal = await db.fetchval(
        "SELECT held FROM usage_records WHERE user_id = $1 ORDER BY id DESC LIMIT 1", user_id
    )
    return held


class TestEstimate:
    async def test_needs_a_key(self, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        response = await client.post("/catalog/estimate", json=BODY)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"

    async def test_worst_case_is_the_hold_a_real_request_takes(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="5")
        response = await client.post("/catalog/estimate", headers=user.headers, json=BODY)
        assert response.status_code == 200, response.text
        estimate = response.json()
        assert upstream.chat_requests == []
        assert await db.fetchval("SELECT count(*) FROM credit_holds") == 0
        assert await db.fetchval("SELECT held FROM users WHERE id = $1", user.id) == 0

        completion = await client.post("/v1/chat/completions", headers=user.headers, json=BODY)
        assert completion.status_code == 200, completion.text
        assert len(upstream.chat_requests) == 1
        held = await held_of_last_request(db, user.id)
        assert Decimal(estimate["worst_case_cost"]) == held
        assert held > 0

        prompt_tokens = estimate["prompt_tokens"]
        assert estimate["model"] == MODEL
        assert estimate["max_output_tokens"] == 100
        assert estimate["currency"] == "credits"
        assert held == credits.quantize(
            Decimal(prompt_tokens) * Decimal("1.25") * PROMPT_PRICE + 100 * COMPLETION_PRICE
        )
        expected_likely = credits.quantize(prompt_tokens * PROMPT_PRICE) + credits.quantize(
            100 * COMPLETION_PRICE
        )
        assert Decimal(estimate["likely_cost"]) == expected_likely
        assert estimate["candidates"] == [
            {
                "provider": "fake",
                "pricing": {"prompt": "0.000001", "completion": "0.000002", "image": "0", "request": "0"},
            }
        ]

    async def test_likely_output_is_capped_at_256_tokens_per_choice(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        # No max_tokens: the hold covers the model's whole output limit (16384) for each of n choices.
        body = {"model": MODEL, "messages": BODY["messages"], "n": 2}
        user = await create_user(app, credits="5")
        estimate = (await client.post("/catalog/estimate", headers=user.headers, json=body)).json()
        assert estimate["max_output_tokens"] == 16384 * 2
        prompt = estimate["prompt_tokens"]
        assert Decimal(estimate["likely_cost"]) == credits.quantize(prompt * PROMPT_PRICE) + credits.quantize(
            256 * 2 * COMPLETION_PRICE
        )
        assert upstream.chat_requests == []

        await client.post("/v1/chat/completions", headers=user.headers, json=body)
        assert Decimal(estimate["worst_case_cost"]) == await held_of_last_request(db, user.id)

    async def test_works_without_credits_and_holds_nothing(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="0")
        estimate = await client.post("/catalog/estimate", headers=user.headers, json=BODY)
        assert estimate.status_code == 200
        # The same body as a real request is refused for want of credits, which the estimate told.
        real = await client.post("/v1/chat/completions", headers=user.headers, json=BODY)
        assert real.status_code == 402
        worst = Decimal(estimate.json()["worst_case_cost"])
        assert f"needs up to {worst.normalize():f} credits" in real.json()["error"]["message"]
        assert upstream.chat_requests == []
        assert await db.fetchval("SELECT count(*) FROM usage_records") == 0

    async def test_an_inference_only_key_may_estimate(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="1")
        _, key = await create_key(app, user, scopes=["inference"])
        response = await client.post(
            "/catalog/estimate", headers={"Authorization": f"Bearer {key}"}, json=BODY
        )
        assert response.status_code == 200, response.text

    @pytest.mark.parametrize(
        ("body", "status", "param"),
        [
            ({"model": MODEL}, 400, "messages"),
            ({**BODY, "max_tokens": 0}, 400, "max_tokens"),
            ({**BODY, "api_key": "sk-elsewhere"}, 400, "api_key"),
            ({**BODY, "model": "nobody/nothing"}, 404, "model"),
            ({**BODY, "provider": "openrouter"}, 400, "provider"),
        ],
    )
    async def test_validates_like_chat_completions(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        upstream: FakeUpstream,
        body: dict[str, Any],
        status: int,
        param: str,
    ) -> None:
        user = await create_user(app, credits="1")
        estimate = await client.post("/catalog/estimate", headers=user.headers, json=body)
        real = await client.post("/v1/chat/completions", headers=user.headers, json=body)
        assert estimate.status_code == real.status_code == status
        assert estimate.json()["error"]["param"] == real.json()["error"]["param"] == param
        assert upstream.chat_requests == []

    async def test_not_json(self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        user = await create_user(app, credits="1")
        response = await client.post("/catalog/estimate", headers=user.headers, content=b"{nope")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_json"


class TestModelList:
    async def test_v1_models_needs_a_key(self, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        assert (await client.get("/v1/models")).status_code == 401

    async def test_v1_models_matches_the_catalog(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        user = await create_user(app)
        listed = (await client.get("/v1/models", headers=user.headers)).json()["data"]
        browsed = (await client.get("/catalog/models")).json()["data"]
        assert listed == browsed
        one = await client.get(f"/v1/models/{MODEL}", headers=user.headers)
        assert one.json() == browsed[1]
        missing = await client.get("/v1/models/nobody/nothing", headers=user.headers)
        assert missing.status_code == 404
