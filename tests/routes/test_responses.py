"""POST /v1/responses: the OpenAI SDK's responses API against the gateway, translated to chat upstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
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
from tests.factories import TestUser, create_user, create_user_for
from tests.fakes.live_server import LiveServer
from tests.fakes.upstream import DEFAULT_CONTENT, DEFAULT_TOOL_ARGUMENTS, FakeUpstream

MODEL = "openai/gpt-4o-mini"
PROMPT_PRICE = Decimal("0.000001")
COMPLETION_PRICE = Decimal("0.000002")
QUANTUM = Decimal("0.0000000001")
TOOLS: Any = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": False,
    }
]
CHAT_TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": False,
        },
    }
]
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest, upstream_server: FakeUpstream) -> dict[str, Any]:
    """The fake upstream as the only provider; indirect parametrisation adds per-test settings."""
    extra: dict[str, Any] = getattr(request, "param", {})
    return {"custom_provider_base_url": upstream_server.base_url, "custom_provider_name": "fake", **extra}


def sdk(gateway: LiveServer, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=api_key, max_retries=0, timeout=10)


def expected_cost(prompt: int, completion: int) -> Decimal:
    return (Decimal(prompt) * PROMPT_PRICE + Decimal(completion) * COMPLETION_PRICE).quantize(QUANTUM)


def extra(model: Any, name: str) -> Any:
    """A field the gateway adds to an SDK object (`usage.cost`, `gateway_usage`)."""
    value = getattr(model, name, None)
    if value is None and model.model_extra:
        value = model.model_extra.get(name)
    assert value is not None, f"{name} is missing"
    return value


async def usage_records(db: asyncpg.Connection, user_id: UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT request_id, request_type, provider, model, input_tokens, output_tokens, cost, charged,"
        " status, estimated FROM usage_records WHERE user_id = $1 ORDER BY id",
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
    """For every user: credits = sum of the ledger, no open hold, never below zero."""
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


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Poll `check` until it holds (a settlement after a disconnect runs in a task of its own).

    Generous: a worker's first settlement without provider usage loads the tokenizer first (about
    0.7 s on a quiet machine, several seconds on a busy one); polling returns as soon as it holds.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


class TestSdkResponses:
    async def test_plain_response_is_billed_exactly_like_chat(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(prompt_tokens=1234, completion_tokens=567)
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            raw = await client.responses.with_raw_response.create(model=MODEL, input="Say hello.")
        response = raw.parse()

        assert upstream.last_request.path == "/v1/chat/completions"
        assert upstream.last_request.body["messages"] == [{"role": "user", "content": "Say hello."}]
        assert response.object == "response" and response.id.startswith("resp_")
        assert response.status == "completed" and response.error is None
        assert response.model == MODEL
        assert response.output_text == DEFAULT_CONTENT
        [message] = response.output
        assert message.type == "message" and message.role == "assistant" and message.status == "completed"
        assert message.id.startswith("msg_")
        [part] = message.content
        assert part.type == "output_text" and part.text == DEFAULT_CONTENT and part.annotations == []
        usage = response.usage
        assert usage is not None
        assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (1234, 567, 1801)
        assert usage.input_tokens_details.cached_tokens == 0
        assert usage.output_tokens_details.reasoning_tokens == 0
        expected = expected_cost(1234, 567)
        assert Decimal(str(extra(usage, "cost"))) == expected
        assert Decimal(str(extra(response, "gateway_usage")["cost"])) == expected
        assert raw.headers["x-gateway-provider"] == "fake"
        assert Decimal(raw.headers["x-gateway-cost"]) == expected

        [record] = await usage_records(db, user.id)
        assert record["request_type"] == "responses"
        assert (record["provider"], record["model"], record["status"]) == ("fake", MODEL, "success")
        assert (record["input_tokens"], record["output_tokens"]) == (1234, 567)
        assert (record["cost"], record["charged"], record["estimated"]) == (expected, expected, False)
        assert await usage_charges(db, user.id) == [-expected]
        assert await balance(db, user.id) == (Decimal(5) - expected, Decimal(0))
        await assert_ledger(db)

    async def test_instructions_and_settings_are_translated(
        self, live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream
    ) -> None:
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            response = await client.responses.create(
                model=MODEL,
                instructions="Answer in one word.",
                input=[
                    {"role": "developer", "content": "Be polite."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What is this?"},
                            {
                                "type": "input_image",
                                "image_url": "https://example.com/a.png",
                                "detail": "low",
                            },
                        ],
                    },
                ],
                max_output_tokens=64,
                temperature=0.5,
                top_p=0.9,
                metadata={"ticket": "42"},
                user="end-user-1",
                store=True,
            )

        body = upstream.last_request.body
        assert body["messages"] == [
            {"role": "system", "content": "Answer in one word."},
            {"role": "developer", "content": "Be polite."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                ],
            },
        ]
        assert body["max_completion_tokens"] == 64
        assert (body["temperature"], body["top_p"], body["user"]) == (0.5, 0.9, "end-user-1")
        # Responses-only fields stay at the gateway.
        for name in ("input", "instructions", "max_output_tokens", "metadata", "store"):
            assert name not in body, name
        assert response.instructions == "Answer in one word."
        assert response.metadata == {"ticket": "42"}
        assert (response.temperature, response.top_p, response.max_output_tokens) == (0.5, 0.9, 64)
        assert response.output_text == DEFAULT_CONTENT

    async def test_function_tools_round_trip(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(tool_call=True)
        user = await create_user_for(gateway_settings, credits="5")
        question: Any = {"role": "user", "content": "Weather in Paris?"}
        async with sdk(live_gateway, user.api_key) as client:
            first = await client.responses.create(
                model=MODEL,
                input=[question],
                tools=TOOLS,
                tool_choice={"type": "function", "name": "get_weather"},
            )
            sent = upstream.last_request.body
            [call] = first.output
            assert call.type == "function_call"
            upstream.set_reply(tool_call=False, content="It is 21 degrees in Paris.")
            second = await client.responses.create(
                model=MODEL,
                input=[
                    question,
                    *first.output,  # the SDK's own output items, sent back as input
                    {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'},
                ],
                tools=TOOLS,
            )

        assert sent["tools"] == CHAT_TOOLS
        assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
        assert call.name == "get_weather" and call.arguments == DEFAULT_TOOL_ARGUMENTS
        assert call.call_id.startswith("call_fake") and call.id.startswith("fc_")
        assert call.status == "completed"
        assert first.output_text == ""
        assert first.usage is not None and first.usage.output_tokens > 0

        assert upstream.last_request.body["messages"] == [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": DEFAULT_TOOL_ARGUMENTS},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'},
        ]
        assert second.output_text == "It is 21 degrees in Paris."
        assert [item.type for item in second.output] == ["message"]
        records = await usage_records(db, user.id)
        assert [r["request_type"] for r in records] == ["responses", "responses"]
        assert sum(await usage_charges(db, user.id)) == -sum(r["charged"] for r in records)
        await assert_ledger(db)

    async def test_length_cut_answer_is_incomplete(
        self, live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream
    ) -> None:
        upstream.set_reply(finish_reason="length")
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            response = await client.responses.create(model=MODEL, input="Go on.", max_output_tokens=16)

        assert response.status == "incomplete"
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.output[0].status == "incomplete"
        assert upstream.last_request.body["max_completion_tokens"] == 16


class TestSdkStreaming:
    async def test_text_stream_events_in_order_and_billed(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(prompt_tokens=40, completion_tokens=7, chunks=5)
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            stream = await client.responses.create(model=MODEL, input="Say hello.", stream=True)
            events = [event async for event in stream]

        types = [event.type for event in events]
        assert types == TEXT_EVENTS[:4] + ["response.output_text.delta"] * 5 + TEXT_EVENTS[5:]
        assert [event.sequence_number for event in events] == list(range(len(events)))
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        assert "".join(e.delta for e in deltas) == DEFAULT_CONTENT
        item_id = events[2].item.id
        assert {e.item_id for e in deltas} == {item_id}
        [done] = [e for e in events if e.type == "response.output_text.done"]
        assert done.text == DEFAULT_CONTENT and done.item_id == item_id
        completed = events[-1]
        assert completed.type == "response.completed"
        final = completed.response
        assert final.id == events[0].response.id
        assert final.status == "completed" and final.output_text == DEFAULT_CONTENT
        assert final.output[0].id == item_id
        assert final.usage is not None
        assert (final.usage.input_tokens, final.usage.output_tokens) == (40, 7)
        expected = expected_cost(40, 7)
        assert Decimal(str(extra(final.usage, "cost"))) == expected
        # Billing needs the provider's usage, so the gateway asked for it upstream.
        assert upstream.last_request.body["stream_options"] == {"include_usage": True}
        [record] = await usage_records(db, user.id)
        assert record["request_type"] == "responses" and record["cost"] == expected
        assert await usage_charges(db, user.id) == [-expected]
        await assert_ledger(db)

    async def test_the_sdk_stream_helper_accepts_the_event_stream(
        self, live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream
    ) -> None:
        # The SDK's accumulator checks every event against the snapshot it builds (indexes,
        # item identities, lifecycle ids): it raises on a stream that is not well formed.
        upstream.set_reply(chunks=3)
        user = await create_user_for(gateway_settings, credits="5")
        async with (
            sdk(live_gateway, user.api_key) as client,
            client.responses.stream(model=MODEL, input="Say hello.") as stream,
        ):
            final = await stream.get_final_response()
        assert final.output_text == DEFAULT_CONTENT
        assert final.usage is not None and final.usage.output_tokens == 3

    async def test_streamed_function_call(
        self, live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream
    ) -> None:
        upstream.set_reply(tool_call=True, chunks=3)
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            stream = await client.responses.create(model=MODEL, input="Weather?", tools=TOOLS, stream=True)
            events = [event async for event in stream]

        assert [e.type for e in events] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            *["response.function_call_arguments.delta"] * 3,
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        added = events[2]
        assert added.type == "response.output_item.added" and added.item.type == "function_call"
        assert added.item.name == "get_weather" and added.item.call_id.startswith("call_fake")
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert "".join(deltas) == DEFAULT_TOOL_ARGUMENTS
        args_done = events[6]
        assert args_done.type == "response.function_call_arguments.done"
        assert args_done.arguments == DEFAULT_TOOL_ARGUMENTS
        final = events[-1].response
        [call] = final.output
        assert call.type == "function_call" and call.status == "completed"
        assert (call.name, call.arguments, call.id) == ("get_weather", DEFAULT_TOOL_ARGUMENTS, added.item.id)

    async def test_length_cut_stream_ends_with_response_incomplete(
        self, live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream
    ) -> None:
        upstream.set_reply(finish_reason="length")
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            stream = await client.responses.create(model=MODEL, input="Go on.", stream=True)
            events = [event async for event in stream]

        types = [e.type for e in events]
        assert types[-1] == "response.incomplete" and "response.completed" not in types
        final = events[-1].response
        assert final.status == "incomplete" and final.output[0].status == "incomplete"
        assert final.incomplete_details is not None
        assert final.incomplete_details.reason == "max_output_tokens"
        assert final.output_text == DEFAULT_CONTENT and final.usage is not None

    async def test_upstream_failure_mid_stream_is_response_failed(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_fault(error_frame_after=3)
        user = await create_user_for(gateway_settings, credits="5")
        async with sdk(live_gateway, user.api_key) as client:
            stream = await client.responses.create(model=MODEL, input="Say hello.", stream=True)
            events = [event async for event in stream]

        types = [e.type for e in events]
        assert "response.output_text.delta" in types
        assert types[-1] == "response.failed" and "response.completed" not in types
        failed = events[-1].response
        assert failed.status == "failed"
        assert failed.error is not None and failed.error.code == "upstream_stream_error"
        # The text delivered before the failure is billed (estimated), and nothing is left held.
        [record] = await usage_records(db, user.id)
        assert record["request_type"] == "responses" and record["status"] == "stream_error"
        assert record["charged"] > 0
        await assert_ledger(db)

    async def test_client_leaving_mid_stream_is_settled(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(chunks=20, chunk_delay=0.2)
        user = await create_user_for(gateway_settings, credits="1")
        received = 0
        async with (
            httpx.AsyncClient(base_url=live_gateway.url, timeout=10) as http,
            http.stream(
                "POST",
                "/v1/responses",
                json={"model": MODEL, "input": "Count.", "stream": True},
                headers=user.headers,
            ) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("event: response.output_text.delta"):
                    received += 1
                if received == 2:
                    break

        async def settled() -> bool:
            return len(await usage_records(db, user.id)) == 1

        await eventually(settled)
        assert await upstream.wait_until_async(lambda: upstream.in_flight == 0, timeout=3.0)
        [record] = await usage_records(db, user.id)
        assert record["request_type"] == "responses" and record["status"] == "client_disconnect"
        assert 0 < record["output_tokens"] < 20
        await assert_ledger(db)


class TestSdkErrors:
    async def test_errors_map_to_sdk_exceptions_and_cost_nothing(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="5")
        broke = await create_user_for(gateway_settings, credits="0")
        async with sdk(live_gateway, user.api_key) as client:
            with pytest.raises(openai.NotFoundError) as unknown:
                await client.responses.create(model="acme/no-such-model", input="hi")
            with pytest.raises(openai.BadRequestError) as invalid:
                await client.responses.create(model=MODEL, input="hi", temperature=3)
            with pytest.raises(openai.BadRequestError) as stateful:
                await client.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
        assert (unknown.value.code, unknown.value.param) == ("model_not_found", "model")
        assert (invalid.value.status_code, invalid.value.param) == (400, "temperature")
        assert stateful.value.param == "previous_response_id"
        assert "not supported" in stateful.value.message

        async with sdk(live_gateway, broke.api_key) as client:
            with pytest.raises(openai.APIStatusError) as unfunded:
                await client.responses.create(model=MODEL, input="hi")
        assert unfunded.value.status_code == 402 and unfunded.value.code == "insufficient_quota"
        assert upstream.chat_requests == []

        upstream.set_fault(status=500)
        async with sdk(live_gateway, user.api_key) as client:
            with pytest.raises(openai.InternalServerError) as failed:
                await client.responses.create(model=MODEL, input="hi")
            with pytest.raises(openai.InternalServerError) as failed_stream:
                await client.responses.create(model=MODEL, input="hi", stream=True)
        assert failed.value.status_code == failed_stream.value.status_code == 502
        assert len(upstream.chat_requests) == 2

        records = await usage_records(db, user.id)
        assert [(r["request_type"], r["status"], r["charged"]) for r in records] == [
            ("responses", "upstream_error", Decimal(0))
        ] * 2
        assert await usage_charges(db, user.id) == await usage_charges(db, broke.id) == []
        assert await balance(db, user.id) == (Decimal(5), Decimal(0))
        await assert_ledger(db)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "hi", **fields}


def user_content(*parts: Any) -> list[Any]:
    return [{"role": "user", "content": list(parts)}]


BAD_INPUT: list[tuple[str, bytes, str | None]] = [
    ("invalid json", b'{"model": "openai/gpt-4o-mini", "input": [', None),
    ("json array", orjson.dumps([body()]), None),
    ("missing input", orjson.dumps({"model": MODEL}), "input"),
    ("empty input list", orjson.dumps(body(input=[])), "input"),
    ("input a number", orjson.dumps(body(input=5)), "input"),
    ("unknown role", orjson.dumps(body(input=[{"role": "hacker", "content": "x"}])), "input[0]"),
    ("unknown item", orjson.dumps(body(input=[{"type": "reasoning", "summary": []}])), "input[0]"),
    (
        "text part without text",
        orjson.dumps(body(input=user_content({"type": "input_text"}))),
        "input[0].content[0].text",
    ),
    (
        "image by file id",
        orjson.dumps(body(input=user_content({"type": "input_image", "file_id": "file-1"}))),
        "input[0].content[0]",
    ),
    (
        "image in a system message",
        orjson.dumps(
            body(input=[{"role": "system", "content": [{"type": "input_image", "image_url": "x"}]}])
        ),
        "input[0].content[0]",
    ),
    (
        "function_call_output without call_id",
        orjson.dumps(body(input=[{"type": "function_call_output", "output": "x"}])),
        "input[0].call_id",
    ),
    ("max_output_tokens below 16", orjson.dumps(body(max_output_tokens=8)), "max_output_tokens"),
    ("max_output_tokens 2**63", json.dumps(body(max_output_tokens=2**63)).encode(), "max_output_tokens"),
    ("temperature 3", orjson.dumps(body(temperature=3)), "temperature"),
    ("hosted tool", orjson.dumps(body(tools=[{"type": "web_search"}])), "tools[0].type"),
    ("tool choice word", orjson.dumps(body(tool_choice="sometimes")), "tool_choice"),
    ("17 metadata pairs", orjson.dumps(body(metadata={str(i): "v" for i in range(17)})), "metadata"),
    ("model with ..", orjson.dumps(body(model="openai/../admin")), "model"),
    ("previous_response_id", orjson.dumps(body(previous_response_id="resp_1")), "previous_response_id"),
    ("conversation", orjson.dumps(body(conversation="conv_1")), "conversation"),
    ("background", orjson.dumps(body(background=True)), "background"),
    ("chat messages", orjson.dumps(body(messages=[{"role": "user", "content": "x"}])), "messages"),
    ("chat max_tokens", orjson.dumps(body(max_tokens=10)), "max_tokens"),
    ("api_key", orjson.dumps(body(api_key="sk-someone-elses-key")), "api_key"),
    ("api_base", orjson.dumps(body(api_base="http://169.254.169.254/v1")), "api_base"),
]


async def assert_no_money_moved(db: asyncpg.Connection, user: TestUser) -> None:
    assert await balance(db, user.id) == (Decimal(5), Decimal(0))
    assert await usage_records(db, user.id) == []


class TestBadInput:
    # One slot per key: a 400 that kept its slot would turn the next request into a 429.
    @pytest.mark.parametrize("settings_overrides", [{"default_concurrency": 1}], indirect=True)
    async def test_rejected_before_any_hold_with_the_field_named(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="5")
        for case, raw, param in BAD_INPUT:
            response = await client.post(
                "/v1/responses", content=raw, headers={**user.headers, "content-type": "application/json"}
            )

            assert response.status_code == 400, (case, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, case
            assert error["type"] == "invalid_request_error", case
            assert error["param"] == param, (case, error)
            assert "'=" not in error["message"] and "Value error" not in error["message"], (case, error)
            assert upstream.requests == [], case
            await assert_no_money_moved(db, user)

        response = await client.post("/v1/responses", json=body(), headers=user.headers)
        assert response.status_code == 200, response.text

    async def test_unknown_fields_go_upstream_and_gateway_fields_do_not(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="5")
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
        response = await client.post(
            "/v1/responses",
            json=body(
                provider="fake",
                seed=7,
                frequency_penalty=0.5,
                text={"format": {"type": "json_schema", "name": "reply", "schema": schema, "strict": True}},
                reasoning={"effort": "low"},
                include=["message.output_text.logprobs"],
                truncation="auto",
                tools=TOOLS,
                parallel_tool_calls=False,
            ),
            headers=user.headers,
        )

        assert response.status_code == 200, response.text
        sent = upstream.last_request.body
        assert (sent["seed"], sent["frequency_penalty"]) == (7, 0.5)
        assert sent["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True},
        }
        assert sent["reasoning_effort"] == "low"
        assert sent["parallel_tool_calls"] is False
        for name in ("provider", "text", "reasoning", "include", "truncation", "input"):
            assert name not in sent, name
        data = response.json()
        assert data["text"]["format"]["name"] == "reply"
        assert data["parallel_tool_calls"] is False
        assert data["tools"] == TOOLS

    async def test_stream_content_type_and_sse_framing(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="5")
        response = await client.post("/v1/responses", json=body(stream=True), headers=user.headers)

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-gateway-provider"] == "fake"
        frames = [f for f in response.text.split("\n\n") if f]
        for frame in frames:
            event_line, data_line = frame.split("\n")
            kind = event_line.removeprefix("event: ")
            assert orjson.loads(data_line.removeprefix("data: "))["type"] == kind
        assert "[DONE]" not in response.text
