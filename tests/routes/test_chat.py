"""POST /v1/chat/completions: the OpenAI SDK against the gateway, exact billing, extras, bad input, holds."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import openai
import orjson
import pytest
from fastapi import FastAPI

from src.config import Settings
from src.db import models as models_db
from src.services import tokens
from tests.factories import TestUser, create_user, create_user_for
from tests.fakes.live_server import LiveServer
from tests.fakes.upstream import DEFAULT_CONTENT, DEFAULT_TOOL_ARGUMENTS, FakeUpstream

MODEL = "openai/gpt-4o-mini"
PROMPT_PRICE = Decimal("0.000001")
COMPLETION_PRICE = Decimal("0.000002")
QUANTUM = Decimal("0.0000000001")
MESSAGES: Any = [{"role": "user", "content": "Say hello."}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest, upstream_server: FakeUpstream) -> dict[str, Any]:
    """The fake upstream as the only provider; indirect parametrisation adds per-test settings."""
    extra: dict[str, Any] = getattr(request, "param", {})
    return {
        "custom_provider_base_url": upstream_server.base_url,
        "custom_provider_name": "fake",
        **extra,
    }


def expected_cost(prompt: int, completion: int, *, markup: Decimal = Decimal(1)) -> Decimal:
    return (
        Decimal(prompt) * PROMPT_PRICE * markup + Decimal(completion) * COMPLETION_PRICE * markup
    ).quantize(QUANTUM)


def usage_cost(usage: Any) -> Decimal:
    """The gateway's `usage.cost`, read the way an SDK user would (attribute or model_extra)."""
    cost = getattr(usage, "cost", None)
    if cost is None and usage.model_extra:
        cost = usage.model_extra.get("cost")
    assert cost is not None, "usage.cost is missing"
    return Decimal(str(cost))


def sdk(gateway: LiveServer, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=api_key, max_retries=0, timeout=10)


async def usage_records(db: asyncpg.Connection, user_id: UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT request_id, provider, input_tokens, output_tokens, input_cost, output_cost, cost, charged,"
        " held, estimated, status, error_code, client_request_id FROM usage_records WHERE user_id = $1"
        " ORDER BY id",
        user_id,
    )
    return rows


async def usage_charges(db: asyncpg.Connection, user_id: UUID) -> list[Decimal]:
    rows = await db.fetch(
        "SELECT amount FROM credit_transactions WHERE user_id = $1 AND type = 'usage' ORDER BY id", user_id
    )
    return [row["amount"] for row in rows]


async def balance(db: asyncpg.Connection, user_id: UUID) -> tuple[Decimal, Decimal]:
    row = await db.fetchrow("SELECT credits, held FROM users WHERE id = $1", user_id)
    assert row is not None
    return row["credits"], row["held"]


async def assert_ledger(db: asyncpg.Connection) -> None:
    """For every user: credits = sum of the ledger, held = open holds = 0, never below zero."""
    rows = await db.fetch(
        """SELECT u.id, u.credits, u.held,
                  COALESCE((SELECT sum(t.amount) FROM credit_transactions t WHERE t.user_id = u.id), 0)
                      AS ledger,
                  COALESCE((SELECT sum(h.amount) FROM credit_holds h WHERE h.user_id = u.id), 0) AS holds
           FROM users u"""
    )
    assert rows
    for row in rows:
        assert row["credits"] == row["ledger"], row
        assert row["held"] == row["holds"] == 0, row
        assert row["credits"] >= 0, row


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, **extra}


class TestSdkCompletion:
    async def test_plain_completion_bills_provider_usage_exactly(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(prompt_tokens=1234, completion_tokens=567)
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)

        assert completion.choices[0].message.content == DEFAULT_CONTENT
        assert completion.model == MODEL
        assert completion.usage is not None
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (1234, 567)
        expected = expected_cost(1234, 567)
        assert usage_cost(completion.usage) == expected
        assert await usage_charges(db, user.id) == [-expected]
        [record] = await usage_records(db, user.id)
        assert (record["cost"], record["charged"]) == (expected, expected)
        assert (record["input_tokens"], record["output_tokens"]) == (1234, 567)
        assert (record["provider"], record["status"], record["estimated"]) == ("fake", "success", False)
        assert await balance(db, user.id) == (Decimal(5) - expected, Decimal(0))
        await assert_ledger(db)

    async def test_stream_ends_with_usage_chunk_carrying_cost(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(prompt_tokens=40, completion_tokens=7)
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            chunks = [chunk async for chunk in stream]

        # The client did not ask for usage; billing needs it, so the gateway asked upstream.
        assert upstream.last_request.body["stream_options"]["include_usage"] is True
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == DEFAULT_CONTENT
        last = chunks[-1]
        assert last.choices == []
        assert last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (40, 7)
        expected = expected_cost(40, 7)
        assert usage_cost(last.usage) == expected
        assert [c for c in chunks if c.usage is not None] == [last]
        assert await usage_charges(db, user.id) == [-expected]
        [record] = await usage_records(db, user.id)
        assert (record["cost"], record["input_tokens"], record["output_tokens"]) == (expected, 40, 7)
        await assert_ledger(db)

    async def test_stream_with_client_usage_option_has_one_usage_chunk(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]

        with_usage = [c for c in chunks if c.usage is not None]
        assert len(with_usage) == 1
        assert with_usage[0] is chunks[-1]
        [charge] = await usage_charges(db, user.id)
        assert usage_cost(chunks[-1].usage) == -charge > 0

    async def test_gateway_fields_are_stripped_and_the_rest_forwarded(
        self, live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream
    ) -> None:
        user = await create_user_for(gateway_settings, credits="5")
        async with httpx.AsyncClient(base_url=live_gateway.url, headers=user.headers) as http:
            session = (await http.post("/v1/chat/sessions", json={})).json()
        extra = {
            "provider": "fake",
            "session_id": session["id"],
            "allow_fallbacks": False,
            "foo_bar": {"nested": [1, "two"]},
        }
        async with sdk(live_gateway, user.api_key) as client:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra)
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, extra_body=extra
            )
            assert [chunk async for chunk in stream][-1].usage is not None
            # An object `provider` is OpenRouter's routing preference: the upstream's business.
            preference = {"order": ["together", "fireworks"], "allow_fallbacks": False, "sort": "price"}
            await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, extra_body={"provider": preference}
            )

        *bodies, last = [r.body for r in upstream.chat_requests]
        assert last["provider"] == preference
        assert len(bodies) == 2
        for body in bodies:
            assert "session_id" not in body
            assert "allow_fallbacks" not in body
            assert "provider" not in body
            assert body["foo_bar"] == {"nested": [1, "two"]}
            assert body["model"] == MODEL

    async def test_tool_calls_round_trip(
        self, live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream
    ) -> None:
        upstream.set_reply(tool_call=True)
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            completion = await client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                tools=TOOLS,
                tool_choice="auto",
            )

        assert upstream.last_request.body["tools"] == TOOLS
        assert upstream.last_request.body["tool_choice"] == "auto"
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls is not None
        [call] = choice.message.tool_calls
        assert call.type == "function"
        assert call.function.name == "get_weather"
        assert call.function.arguments == DEFAULT_TOOL_ARGUMENTS
        assert completion.usage is not None and usage_cost(completion.usage) > 0

    async def test_streamed_tool_calls_round_trip(
        self, live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream
    ) -> None:
        upstream.set_reply(tool_call=True, chunks=4)
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                tools=TOOLS,
                stream=True,
            )
            chunks = [chunk async for chunk in stream]

        assert upstream.last_request.body["tools"] == TOOLS
        names, arguments, finish = [], [], []
        for chunk in chunks:
            for choice in chunk.choices:
                finish.append(choice.finish_reason)
                for call in choice.delta.tool_calls or ():
                    assert call.index == 0
                    if call.function and call.function.name:
                        names.append(call.function.name)
                    if call.function and call.function.arguments:
                        arguments.append(call.function.arguments)
        assert names == ["get_weather"]
        assert len(arguments) == 4
        assert "".join(arguments) == DEFAULT_TOOL_ARGUMENTS
        assert "tool_calls" in finish
        assert chunks[-1].usage is not None and usage_cost(chunks[-1].usage) > 0

    async def test_models_list(
        self, live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream
    ) -> None:
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            models = {m.id: m async for m in client.models.list()}

        assert set(models) == {MODEL, "meta-llama/llama-3.1-8b-instruct"}
        mini = models[MODEL]
        assert mini.object == "model"
        assert mini.owned_by == "openai"
        assert mini.created == 1721260800
        assert mini.model_extra is not None
        pricing = mini.model_extra["pricing"]
        assert Decimal(pricing["prompt"]) == PROMPT_PRICE
        assert Decimal(pricing["completion"]) == COMPLETION_PRICE
        assert mini.model_extra["context_length"] == 128000
        assert [p["name"] for p in mini.model_extra["providers"]] == ["fake"]

    @pytest.mark.parametrize("settings_overrides", [{"pricing_markup": Decimal("1.5")}], indirect=True)
    async def test_markup_applies_to_listed_and_charged_prices(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(prompt_tokens=1000, completion_tokens=333)
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            models = {m.id: m async for m in client.models.list()}
            completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)

        extra = models[MODEL].model_extra
        assert extra is not None
        pricing = extra["pricing"]
        assert Decimal(pricing["prompt"]) == Decimal("0.0000015")
        assert Decimal(pricing["completion"]) == Decimal("0.000003")
        expected = expected_cost(1000, 333, markup=Decimal("1.5"))
        assert expected == Decimal("0.0024990000")
        assert completion.usage is not None
        assert usage_cost(completion.usage) == expected
        assert await usage_charges(db, user.id) == [-expected]


class TestSdkErrors:
    async def test_errors_map_to_sdk_exceptions(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        # One gateway for every case: each is one request, a gateway per case is not cheap.
        user = await create_user_for(gateway_settings, credits="5")
        broke = await create_user_for(gateway_settings, credits="0")

        async with sdk(live_gateway, "gw_live_" + "x" * 43) as client:
            with pytest.raises(openai.AuthenticationError) as unauthenticated:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert unauthenticated.value.status_code == 401
        assert unauthenticated.value.code == "invalid_api_key"

        async with sdk(live_gateway, user.api_key) as client:
            with pytest.raises(openai.NotFoundError) as unknown:
                await client.chat.completions.create(model="acme/no-such-model", messages=MESSAGES)
            with pytest.raises(openai.BadRequestError) as invalid:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3)
        assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
        assert (invalid.value.status_code, invalid.value.param) == (400, "temperature")
        assert invalid.value.type == "invalid_request_error"

        async with sdk(live_gateway, broke.api_key) as client:
            with pytest.raises(openai.APIStatusError) as unfunded:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        # 402, not 429: the SDKs retry 429, which would turn one refusal into several calls.
        assert unfunded.value.status_code == 402
        assert not isinstance(unfunded.value, openai.RateLimitError)
        assert unfunded.value.code == "insufficient_quota"
        assert upstream.chat_requests == []

        upstream.set_fault(status=429, retry_after=7)
        async with sdk(live_gateway, user.api_key) as client:
            with pytest.raises(openai.RateLimitError) as limited:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert limited.value.status_code == 429
        assert limited.value.response.headers["retry-after"] == "7"
        assert len(upstream.chat_requests) == 1  # max_retries=0, and no retry storm in the gateway

        assert await usage_charges(db, user.id) == await usage_charges(db, broke.id) == []
        assert await balance(db, user.id) == (Decimal(5), Decimal(0))
        await assert_ledger(db)


class TestResponseExtras:
    async def test_headers_and_gateway_usage(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        upstream.set_reply(prompt_tokens=300, completion_tokens=120)
        user = await create_user(app, credits="5")
        response = await client.post("/v1/chat/completions", json=chat_body(), headers=user.headers)

        assert response.status_code == 200, response.text
        expected = expected_cost(300, 120)
        assert response.headers["x-request-id"]
        assert response.headers["x-gateway-provider"] == "fake"
        assert Decimal(response.headers["x-gateway-cost"]) == expected
        assert await usage_charges(db, user.id) == [-expected]
        body = response.json()
        extras = body["gateway_usage"]
        assert extras["provider"] == "fake"
        assert Decimal(str(extras["cost"])) == expected
        assert Decimal(str(extras["input_cost"])) == expected_cost(300, 0)
        assert Decimal(str(extras["output_cost"])) == expected_cost(0, 120)
        assert isinstance(extras["request_ms"], int) and extras["request_ms"] >= 0
        assert body["usage"] == {
            "prompt_tokens": 300,
            "completion_tokens": 120,
            "total_tokens": 420,
            "cost": float(expected),
        }
        [record] = await usage_records(db, user.id)
        assert record["client_request_id"] == response.headers["x-request-id"]

    async def test_client_request_id_never_keys_the_settlement(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="5")
        headers = {**user.headers, "X-Request-ID": "client-chosen-id"}
        for _ in range(2):
            response = await client.post("/v1/chat/completions", json=chat_body(), headers=headers)
            assert response.status_code == 200
            assert response.headers["x-request-id"] == "client-chosen-id"
        records = await usage_records(db, user.id)
        # Two requests, two settlements: a replayed client id neither skips nor merges a charge.
        assert [r["client_request_id"] for r in records] == ["client-chosen-id"] * 2
        assert records[0]["request_id"] != records[1]["request_id"]
        assert len(await usage_charges(db, user.id)) == 2
        await assert_ledger(db)


VALID_MESSAGES = [{"role": "user", "content": "hi"}]
BAD_INPUT: list[tuple[str, bytes, str | None]] = [
    ("empty messages", orjson.dumps({"model": MODEL, "messages": []}), "messages"),
    (
        "unknown role",
        orjson.dumps({"model": MODEL, "messages": [{"role": "hacker", "content": "x"}]}),
        "messages",
    ),
    ("n zero", orjson.dumps(chat_body(n=0)), "n"),
    ("max_tokens negative", orjson.dumps(chat_body(max_tokens=-1)), "max_tokens"),
    ("max_tokens 2**63", json.dumps(chat_body(max_tokens=2**63)).encode(), "max_tokens"),
    ("temperature 3", orjson.dumps(chat_body(temperature=3)), "temperature"),
    ("10 kB model", orjson.dumps({"model": "m" * 10_240, "messages": VALID_MESSAGES}), "model"),
    ("dot-dot model", orjson.dumps({"model": "openai/../admin", "messages": VALID_MESSAGES}), "model"),
    ("query model", orjson.dumps({"model": "openai/gpt-4o-mini?x=1", "messages": VALID_MESSAGES}), "model"),
    ("crlf model", orjson.dumps({"model": "a\r\nb", "messages": VALID_MESSAGES}), "model"),
    ("api_base", orjson.dumps(chat_body(api_base="http://169.254.169.254/v1")), "api_base"),
    ("api_key", orjson.dumps(chat_body(api_key="sk-someone-elses-key")), "api_key"),
    ("invalid json", b'{"model": "openai/gpt-4o-mini", "messages": [', None),
    ("json array", orjson.dumps([chat_body()]), None),
]


class TestBadInput:
    async def test_rejected_before_any_hold(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        # One app for every case: each case is cheap, a fresh database per case is not.
        user = await create_user(app, credits="5")
        for case, raw, param in BAD_INPUT:
            response = await client.post(
                "/v1/chat/completions",
                content=raw,
                headers={**user.headers, "content-type": "application/json"},
            )

            assert response.status_code == 400, (case, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, case
            assert error["type"] == "invalid_request_error", case
            if param is None:
                assert error["param"] is None, case
            else:
                assert error["param"] is not None and error["param"].split(".")[0] == param, case
            assert "\r" not in response.text and len(response.content) < 2000, case  # nothing echoed
            assert upstream.requests == [], case
            await assert_no_money_moved(db, user)

    async def test_well_formed_unknown_model_is_404(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="5")
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "acme/unknown-1", "messages": VALID_MESSAGES},
            headers=user.headers,
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert response.json()["error"]["param"] == "model"
        assert upstream.chat_requests == []
        await assert_no_money_moved(db, user)


async def assert_no_money_moved(db: asyncpg.Connection, user: TestUser) -> None:
    assert await db.fetchval("SELECT count(*) FROM credit_holds") == 0
    assert await db.fetchval("SELECT count(*) FROM usage_records") == 0
    assert await balance(db, user.id) == (Decimal(5), Decimal(0))
    await assert_ledger(db)


def history(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful assistant."}]
    for turn in range(turns):
        messages.append(
            {"role": "user", "content": f"Question {turn}: " + "tell me about the sea and ships " * 12}
        )
        messages.append(
            {"role": "assistant", "content": f"Answer {turn}: " + "waves, hulls, harbours; " * 15}
        )
    messages.append({"role": "user", "content": "Summarise everything."})
    return messages


class TestHolds:
    async def test_long_history_hold_covers_the_prompt(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        messages = history(40)
        user = await create_user(app, credits="5")
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": messages, "max_tokens": 50},
            headers=user.headers,
        )
        assert response.status_code == 200, response.text

        estimate = tokens.estimate_prompt(messages).text_tokens
        worst = (Decimal(estimate) * Decimal("1.25") * PROMPT_PRICE + 50 * COMPLETION_PRICE).quantize(QUANTUM)
        [record] = await usage_records(db, user.id)
        assert record["held"] == worst
        # The history dominates the hold: ~4 characters a token would already need this much.
        characters = sum(len(m["content"]) for m in messages)
        assert record["held"] > Decimal(characters // 4) * PROMPT_PRICE
        # And the real charge (the fake counts characters // 4 prompt tokens) fits in it.
        assert 0 < record["cost"] <= record["held"]
        await assert_ledger(db)

    async def test_image_parts_add_the_per_part_allowance(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
        text = {"type": "text", "text": "What is in these pictures?"}
        user = await create_user(app, credits="5")
        for content in ([text], [text, image, image]):
            body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 10}
            response = await client.post("/v1/chat/completions", json=body, headers=user.headers)
            assert response.status_code == 200, response.text

        plain, with_images = await usage_records(db, user.id)
        allowance = app.state.gateway.settings.media_part_token_allowance
        assert allowance > 0
        assert with_images["held"] - plain["held"] == 2 * allowance * PROMPT_PRICE
        await assert_ledger(db)

    async def test_output_allowance_beyond_any_balance_is_402(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="5")
        body = chat_body(max_tokens=2**31 - 1, n=128)
        refused = await client.post("/v1/chat/completions", json=body, headers=user.headers)
        assert refused.status_code == 402, refused.text
        assert refused.json()["error"]["code"] == "insufficient_quota"

        # At a dear enough price the worst case exceeds what a balance column can hold: still 402.
        await models_db.upsert_override(
            db,
            model_id=MODEL,
            provider=None,
            prompt_price=Decimal("0.5"),
            completion_price=Decimal("0.5"),
            image_price=None,
            request_price=None,
            is_free=False,
            updated_by="operator",
        )
        app.state.gateway.catalog.invalidate()
        huge = await client.post("/v1/chat/completions", json=body, headers=user.headers)
        assert huge.status_code == 402, huge.text
        assert huge.json()["error"]["code"] == "insufficient_quota"
        assert upstream.chat_requests == []
        await assert_no_money_moved(db, user)

    async def test_negative_provider_price_makes_the_model_unpriced(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        upstream.models.append(
            {
                "id": "acme/auto-router",
                "owned_by": "acme",
                "context_length": 32000,
                "pricing": {"prompt": "-1", "completion": "-1"},
            }
        )
        user = await create_user(app, credits="5")
        response = await client.post(
            "/v1/chat/completions",
            json={"model": "acme/auto-router", "messages": VALID_MESSAGES},
            headers=user.headers,
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "model_not_priced"
        assert response.json()["error"]["param"] == "model"
        listed = await client.get("/v1/models", headers=user.headers)
        assert "acme/auto-router" not in {m["id"] for m in listed.json()["data"]}
        assert MODEL in {m["id"] for m in listed.json()["data"]}
        assert upstream.chat_requests == []
        await assert_no_money_moved(db, user)

    async def test_admin_override_wins_over_the_provider_price(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        upstream.set_reply(prompt_tokens=100, completion_tokens=50)
        user = await create_user(app, credits="5")
        before = await client.post("/v1/chat/completions", json=chat_body(), headers=user.headers)
        assert Decimal(before.headers["x-gateway-cost"]) == expected_cost(100, 50)

        await models_db.upsert_override(
            db,
            model_id=MODEL,
            provider=None,
            prompt_price=Decimal("0.00001"),
            completion_price=Decimal("0.00003"),
            image_price=None,
            request_price=None,
            is_free=False,
            updated_by="operator",
        )
        app.state.gateway.catalog.invalidate()
        after = await client.post("/v1/chat/completions", json=chat_body(), headers=user.headers)

        override_cost = (100 * Decimal("0.00001") + 50 * Decimal("0.00003")).quantize(QUANTUM)
        assert Decimal(after.headers["x-gateway-cost"]) == override_cost
        assert await usage_charges(db, user.id) == [-expected_cost(100, 50), -override_cost]
        listed = (await client.get(f"/v1/models/{MODEL}", headers=user.headers)).json()
        assert Decimal(listed["pricing"]["prompt"]) == Decimal("0.00001")
        assert Decimal(listed["pricing"]["completion"]) == Decimal("0.00003")
        await assert_ledger(db)
