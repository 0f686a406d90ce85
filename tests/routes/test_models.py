"""GET /v1/models and /v1/models/{id}: OpenAI's list shape, plus prices and providers, behind a key."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from src.errors import REQUEST_ID_HEADER
from tests.factories import create_user
from tests.fakes.upstream import DEFAULT_MODELS, FakeUpstream

MODEL = "openai/gpt-4o-mini"
LLAMA = "meta-llama/llama-3.1-8b-instruct"


@pytest.fixture
def settings_overrides(upstream_server: FakeUpstream) -> dict[str, Any]:
    return {"custom_provider_base_url": upstream_server.base_url, "custom_provider_name": "fake"}


@pytest.fixture
async def headers(app: FastAPI, upstream: FakeUpstream) -> dict[str, str]:
    user = await create_user(app, credits="1")
    return user.headers


class TestListModels:
    async def test_requires_a_key(self, client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
        for path in ("/v1/models", f"/v1/models/{MODEL}"):
            response = await client.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert upstream.requests == []

    async def test_openai_list_shape_with_prices_and_providers(
        self, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        response = await client.get("/v1/models", headers=headers)

        assert response.status_code == 200
        assert response.headers[REQUEST_ID_HEADER]
        body = response.json()
        assert body["object"] == "list"
        models = {m["id"]: m for m in body["data"]}
        assert set(models) == {m["id"] for m in DEFAULT_MODELS}
        for model in body["data"]:
            assert model["object"] == "model"
            assert isinstance(model["created"], int) and model["created"] > 0
            assert isinstance(model["owned_by"], str) and model["owned_by"]
            assert set(model["pricing"]) >= {"prompt", "completion"}
            assert isinstance(model["context_length"], int)
            assert [p["name"] for p in model["providers"]] == ["fake"]
        mini, llama = models[MODEL], models[LLAMA]
        assert (mini["owned_by"], mini["created"], mini["context_length"]) == ("openai", 1721260800, 128000)
        assert llama["owned_by"] == "meta-llama"
        # Exact decimal strings, never floats: 1e-07 would be an unreadable price.
        assert mini["pricing"]["prompt"] == "0.000001"
        assert mini["pricing"]["completion"] == "0.000002"
        assert llama["pricing"]["prompt"] == "0.0000001"
        assert mini["providers"][0]["pricing"] == mini["pricing"]
        assert mini["providers"][0]["context_length"] == 128000

    async def test_a_model_the_provider_drops_leaves_the_list(
        self, app: FastAPI, client: httpx.AsyncClient, headers: dict[str, str], upstream: FakeUpstream
    ) -> None:
        before = await client.get("/v1/models", headers=headers)
        assert LLAMA in {m["id"] for m in before.json()["data"]}

        upstream.models = [m for m in upstream.models if m["id"] != LLAMA]
        await app.state.gateway.catalog.refresh(fetch=True)

        after = await client.get("/v1/models", headers=headers)
        assert {m["id"] for m in after.json()["data"]} == {MODEL}
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": LLAMA, "messages": [{"role": "user", "content": "hi"}]},
            headers=headers,
        )
        assert chat.status_code == 404
        assert upstream.chat_requests == []


class TestGetModel:
    async def test_id_with_a_slash(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.get(f"/v1/models/{MODEL}", headers=headers)

        assert response.status_code == 200
        model = response.json()
        assert (model["id"], model["object"], model["owned_by"]) == (MODEL, "model", "openai")
        assert Decimal(model["pricing"]["completion"]) == Decimal("0.000002")
        listed = (await client.get("/v1/models", headers=headers)).json()["data"]
        assert model == next(m for m in listed if m["id"] == MODEL)

    async def test_unknown_model_is_404(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        for model_id in ("acme/no-such-model", "gpt-4o-mini", "openai/gpt-4o-mini/extra"):
            response = await client.get(f"/v1/models/{model_id}", headers=headers)

            assert response.status_code == 404, model_id
            error = response.json()["error"]
            assert error["code"] == "model_not_found"
            assert error["type"] == "invalid_request_error"
