"""Upstream faults on POST /v1/chat/completions: status, OpenAI error shape, charge, and no leaks."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from src.config import Settings
from src.db import models as models_db
from src.services import catalog as catalog_service
from src.services import tokens
from tests.factories import TestUser, create_user, create_user_for
from tests.fakes.live_server import LiveServer
from tests.fakes.upstream import DEFAULT_CONTENT, DEFAULT_MODELS, FakeUpstream
from tests.routes.test_chat import (
    MODEL,
    assert_ledger,
    balance,
    expected_cost,
    usage_charges,
    usage_records,
)

UPSTREAM_SECRET = "sk-upstream-secret-7f3c9a1e5b2d4c6e8a0b"
CREDITS = Decimal(5)
CLOSED = object()  # settings_overrides param: a base URL on a port nothing listens on


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest, upstream_server: FakeUpstream) -> dict[str, Any]:
    """The fake upstream as the only provider, reached with a recognisable upstream key."""
    extra: dict[str, Any] = dict(getattr(request, "param", {}))
    if extra.get("custom_provider_base_url") is CLOSED:
        extra["custom_provider_base_url"] = f"http://127.0.0.1:{closed_port()}/v1"
    return {
        "custom_provider_base_url": upstream_server.base_url,
        "custom_provider_name": "fake",
        "custom_provider_api_key": UPSTREAM_SECRET,
        **extra,
    }


@pytest.fixture
def keyed_upstream(upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake refuses requests without the upstream key, so every answered call proves it was sent."""
    upstream.api_key = UPSTREAM_SECRET
    yield upstream


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_no_leak(text: str, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """No upstream key or provider address in what the client got, nor in any log line."""
    assert any(r.name == "gatewayz.access" for r in caplog.records)  # the gateway's logs were seen
    for needle in (UPSTREAM_SECRET, "upstream-secret"):
        assert needle not in text
        assert needle not in caplog.text
        for record in caplog.records:
            assert needle not in record.getMessage()
    for needle in ("127.0.0.1", "localhost", f":{upstream.port}"):
        assert needle not in text


async def access_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Wait for the gateway's access line: a stream's is written just after its last byte."""
    for _ in range(200):
        if any(r.name == "gatewayz.access" for r in caplog.records):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the gateway wrote no access log line")


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


async def post_chat(client: httpx.AsyncClient, user: TestUser, **extra: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], **extra}
    return await client.post("/v1/chat/completions", json=body, headers=user.headers)


async def assert_not_charged(db: asyncpg.Connection, user: TestUser) -> asyncpg.Record:
    """Balance unchanged, no usage ledger row, the hold released, one zero-cost usage record."""
    assert await balance(db, user.id) == (CREDITS, Decimal(0))
    assert await usage_charges(db, user.id) == []
    assert await db.fetchval("SELECT count(*) FROM credit_holds") == 0
    [record] = await usage_records(db, user.id)
    assert record["cost"] == record["charged"] == 0
    await assert_ledger(db)
    return record


async def assert_bounded_charge(db: asyncpg.Connection, user: TestUser) -> asyncpg.Record:
    """Billed for what was generated: more than nothing, never more than the hold."""
    [record] = await usage_records(db, user.id)
    assert 0 < record["charged"] == record["cost"] <= record["held"]
    assert await usage_charges(db, user.id) == [-record["charged"]]
    assert await balance(db, user.id) == (CREDITS - record["charged"], Decimal(0))
    await assert_ledger(db)
    return record


class TestUpstreamFailsBeforeAnswering:
    @pytest.mark.parametrize(
        "settings_overrides",
        [{"custom_provider_base_url": CLOSED}],
        indirect=True,
    )
    async def test_connect_error_is_502(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        upstream: FakeUpstream,
        settings: Settings,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # The provider is down, but the stored catalog still knows the model.
        rows = [catalog_service.model_row("fake", item, with_prices=True) for item in DEFAULT_MODELS]
        async with db.transaction():
            await models_db.replace_provider_models(db, provider="fake", rows=rows)
        user = await create_user(app, credits=CREDITS)

        response = await post_chat(client, user)

        error = assert_openai_error(response, 502)
        assert error["code"] == "upstream_unreachable"
        assert settings.custom_provider_base_url is not None
        port = settings.custom_provider_base_url.split(":")[2].split("/")[0]
        assert port not in response.text
        assert_no_leak(response.text, upstream, caplog)
        record = await assert_not_charged(db, user)
        assert record["status"] == "upstream_error"

    @pytest.mark.parametrize(
        "settings_overrides", [{"upstream_first_byte_timeout_seconds": 0.3}], indirect=True
    )
    async def test_no_first_byte_in_time_is_504(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        keyed_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        keyed_upstream.set_fault(delay=3.0)
        user = await create_user(app, credits=CREDITS)

        started = time.monotonic()
        response = await post_chat(client, user)
        elapsed = time.monotonic() - started

        error = assert_openai_error(response, 504)
        assert error["code"] == "upstream_timeout"
        assert elapsed < 1.5
        assert_no_leak(response.text, keyed_upstream, caplog)
        await assert_not_charged(db, user)

    async def test_upstream_429_with_retry_after(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        keyed_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        keyed_upstream.set_fault(status=429, retry_after=12)
        user = await create_user(app, credits=CREDITS)

        response = await post_chat(client, user)

        error = assert_openai_error(response, 429)
        assert error["type"] == "rate_limit_error"
        assert response.headers["retry-after"] == "12"
        assert_no_leak(response.text, keyed_upstream, caplog)
        await assert_not_charged(db, user)

    async def test_upstream_429_without_retry_after(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        keyed_upstream: FakeUpstream,
    ) -> None:
        keyed_upstream.set_fault(status=429)
        user = await create_user(app, credits=CREDITS)

        response = await post_chat(client, user)

        assert_openai_error(response, 429)
        assert int(response.headers["retry-after"]) >= 1
        await assert_not_charged(db, user)

    async def test_upstream_refusing_our_key_is_502_never_401(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        keyed_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        for status in (401, 403):
            keyed_upstream.set_fault(
                status=status, error_message=f"Incorrect API key provided: {UPSTREAM_SECRET}"
            )
            user = await create_user(app, credits=CREDITS)

            response = await post_chat(client, user)

            # A 401 would tell the client its own gateway key is bad, and SDKs would stop using it.
            error = assert_openai_error(response, 502)
            assert error["code"] == "upstream_auth_failed"
            assert_no_leak(response.text, keyed_upstream, caplog)
            await assert_not_charged(db, user)

    async def test_upstream_400_is_400_with_its_message_redacted(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        keyed_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        keyed_upstream.set_fault(
            status=400, error_message=f"Unsupported parameter 'logit_bias' (key {UPSTREAM_SECRET})."
        )
        user = await create_user(app, credits=CREDITS)

        response = await post_chat(client, user)

        error = assert_openai_error(response, 400)
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "upstream_bad_request"
        assert "Unsupported parameter 'logit_bias'" in error["message"]
        assert_no_leak(response.text, keyed_upstream, caplog)
        await assert_not_charged(db, user)

    async def test_upstream_500_is_502_and_costs_nothing(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        keyed_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        keyed_upstream.set_fault(status=500)
        user = await create_user(app, credits=CREDITS)

        response = await post_chat(client, user)

        assert_openai_error(response, 502)
        assert_no_leak(response.text, keyed_upstream, caplog)
        record = await assert_not_charged(db, user)
        assert record["status"] == "upstream_error"
        assert record["held"] > 0  # a hold was taken, and released in full
        assert len(keyed_upstream.chat_requests) == 1


# (name, fault, what is billed): nothing, unless the provider reported the tokens it will bill.
BAD_200: list[tuple[str, dict[str, Any], Decimal]] = [
    ("html", {"html": True}, Decimal(0)),
    ("malformed json", {"malformed_json": True}, Decimal(0)),
    ("error body", {"error_frame_after": 1}, Decimal(0)),
    ("no choices", {"no_choices": True}, expected_cost(10, 4)),
]


class TestUpstreamAnswersBadly:
    async def test_bad_200_is_502(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        keyed_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        keyed_upstream.set_reply(prompt_tokens=10, completion_tokens=4)
        for case, fault, billed in BAD_200:
            keyed_upstream.set_fault(**fault)
            user = await create_user(app, credits=CREDITS)

            response = await post_chat(client, user)

            error = assert_openai_error(response, 502)
            assert error["code"] == "upstream_bad_response", case
            assert "<html" not in response.text.lower()
            assert_no_leak(response.text, keyed_upstream, caplog)
            [record] = await usage_records(db, user.id)
            assert record["status"] == "upstream_error", case
            assert record["charged"] == record["cost"] == billed <= record["held"], case
            assert await balance(db, user.id) == (CREDITS - billed, Decimal(0)), case
        await assert_ledger(db)

    async def test_missing_usage_is_estimated_within_the_hold(
        self,
        app: FastAPI,
        client: httpx.AsyncClient,
        db: asyncpg.Connection,
        keyed_upstream: FakeUpstream,
    ) -> None:
        keyed_upstream.set_fault(no_usage=True)
        user = await create_user(app, credits=CREDITS)

        response = await post_chat(client, user)

        assert response.status_code == 200, response.text
        body = response.json()
        # Billed, so counted with the real tokenizer: not the (larger) bound the hold used.
        messages = [{"role": "user", "content": "Say hello."}]
        assert body["usage"]["prompt_tokens"] == tokens.count_prompt(messages)
        assert body["usage"]["prompt_tokens"] < tokens.estimate_prompt(messages).text_tokens
        assert body["usage"]["completion_tokens"] == tokens.count_text(DEFAULT_CONTENT)
        assert body["gateway_usage"]["estimated"] is True
        record = await assert_bounded_charge(db, user)
        assert record["estimated"] is True
        assert record["status"] == "success"
        assert Decimal(str(body["usage"]["cost"])) == record["charged"]


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) for each SSE event of a finished stream."""
    events: list[tuple[str | None, str]] = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if name is not None or data:
            events.append((name, "\n".join(data)))
    return events


async def stream_chat(gateway: LiveServer, user: TestUser, **extra: Any) -> tuple[httpx.Response, str, float]:
    """POST a streaming request over a real socket; the response, its whole text and the seconds it took."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "stream": True, **extra}
    started = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=user.headers) as response,
    ):
        text = "".join([part async for part in response.aiter_text()])
    return response, text, time.monotonic() - started


def assert_error_event(text: str) -> dict[str, Any]:
    """The stream ended with an OpenAI-shaped `error` event and without a clean [DONE]."""
    events = sse_events(text)
    assert "[DONE]" not in text
    name, data = events[-1]
    assert name == "error", events
    payload = orjson.loads(data)
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = payload["error"]
    return error


class TestStreamFaults:
    async def test_error_frame_mid_stream_is_an_error_event(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        keyed_upstream: FakeUpstream,
        db: asyncpg.Connection,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        keyed_upstream.set_fault(error_frame_after=2)
        user = await create_user_for(gateway_settings, credits=CREDITS)

        response, text, _ = await stream_chat(live_gateway, user)

        assert response.status_code == 200
        error = assert_error_event(text)
        assert error["code"] == "upstream_stream_error"
        content = [orjson.loads(data) for name, data in sse_events(text) if name is None]
        assert [c["choices"][0]["delta"].get("content") for c in content] == ["", "Hello "]
        await access_logged(caplog)
        assert_no_leak(text, keyed_upstream, caplog)
        [record] = await usage_records(db, user.id)
        assert record["status"] == "stream_error"
        assert 0 <= record["charged"] <= record["held"]
        await assert_ledger(db)

    async def test_connection_cut_mid_stream_bills_what_was_generated(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        keyed_upstream: FakeUpstream,
        db: asyncpg.Connection,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        keyed_upstream.set_fault(cut_after=3)
        user = await create_user_for(gateway_settings, credits=CREDITS)

        response, text, _ = await stream_chat(live_gateway, user)

        assert response.status_code == 200
        error = assert_error_event(text)
        assert error["code"] == "upstream_stream_truncated"
        await access_logged(caplog)
        assert_no_leak(text, keyed_upstream, caplog)
        record = await assert_bounded_charge(db, user)
        assert record["estimated"] is True
        assert record["status"] == "stream_error"
        assert record["output_tokens"] > 0  # "Hello from " reached the client and is billed

    @pytest.mark.parametrize("settings_overrides", [{"upstream_total_timeout_seconds": 1.0}], indirect=True)
    async def test_slow_drip_past_the_deadline_ends_the_stream(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        keyed_upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        keyed_upstream.set_reply(chunks=30, chunk_delay=0.4)
        user = await create_user_for(gateway_settings, credits=CREDITS)

        response, text, elapsed = await stream_chat(live_gateway, user)

        assert response.status_code == 200
        error = assert_error_event(text)
        assert error["code"] == "upstream_timeout"
        # The deadline (plus set-up on a loaded machine), not the 12 s the upstream would take.
        assert elapsed < 1.0 + 3.0
        assert any(name is None for name, _ in sse_events(text))  # some content arrived first
        record = await assert_bounded_charge(db, user)
        assert record["estimated"] is True

    async def test_missing_stream_usage_is_estimated(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        keyed_upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        keyed_upstream.set_fault(no_usage=True)
        user = await create_user_for(gateway_settings, credits=CREDITS)

        _, text, _ = await stream_chat(live_gateway, user)

        events = sse_events(text)
        assert events[-1] == (None, "[DONE]")
        usage_chunk = orjson.loads(events[-2][1])
        assert usage_chunk["choices"] == []
        assert usage_chunk["gateway_usage"]["estimated"] is True
        record = await assert_bounded_charge(db, user)
        assert Decimal(str(usage_chunk["usage"]["cost"])) == record["charged"]

    async def test_upstream_429_before_the_stream_is_a_plain_429(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        keyed_upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        keyed_upstream.set_fault(status=429, retry_after=3)
        user = await create_user_for(gateway_settings, credits=CREDITS)

        response, text, _ = await stream_chat(live_gateway, user)

        assert response.status_code == 429
        assert response.headers["retry-after"] == "3"
        assert response.headers["content-type"].startswith("application/json")
        assert set(orjson.loads(text)["error"]) == {"message", "type", "param", "code"}
        await assert_not_charged(db, user)
