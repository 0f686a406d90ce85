"""POST /v1/images/generations: the OpenAI SDK against the gateway, per-image billing, storage, failures."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import openai
import pytest
from openai.types import ImagesResponse

from src.config import Settings
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import create_user_for
from tests.fakes.live_server import LiveServer
from tests.fakes.storage import DEFAULT_BUCKET, SERVICE_KEY, FakeStorage
from tests.fakes.upstream import TINY_PNG, FakeUpstream, RecordedRequest

IMAGE_MODEL = "openai/dall-e-3"
IMAGE_PRICE = Decimal("0.04")
# Publishes no per-image price: usable for images only once an admin marks it free.
UNPRICED_IMAGE_MODEL = "black-forest-labs/flux-schnell"
CHAT_MODEL = "openai/gpt-4o-mini"
PROMPT = "A red bicycle leaning on a wall"
OTHER_BUCKET = "user-art"


@pytest.fixture(autouse=True)
def image_models(upstream: FakeUpstream) -> None:
    """The fake provider also lists image models (before the gateway's catalog first loads)."""
    upstream.models += [
        {
            "id": IMAGE_MODEL,
            "name": "OpenAI: DALL-E 3",
            "pricing": {"prompt": "0", "completion": "0", "image": str(IMAGE_PRICE)},
        },
        {
            "id": UNPRICED_IMAGE_MODEL,
            "name": "FLUX.1 schnell",
            "pricing": {"prompt": "0", "completion": "0", "image": "0"},
        },
    ]


@pytest.fixture(scope="module")
def storage_server() -> Iterator[FakeStorage]:
    with FakeStorage(buckets=(DEFAULT_BUCKET, OTHER_BUCKET)) as server:
        yield server


@pytest.fixture
def storage(storage_server: FakeStorage) -> Iterator[FakeStorage]:
    storage_server.reset()
    yield storage_server
    storage_server.reset()


@pytest.fixture
def settings_overrides(
    request: pytest.FixtureRequest, storage_server: FakeStorage, upstream_server: FakeUpstream
) -> dict[str, Any]:
    """Indirect parametrisation: "storage" (Supabase Storage on the fake), "second_provider" (the
    fake upstream also as OpenRouter, for failover), or a dict of settings."""
    overrides: dict[str, Any] = {}
    for option in getattr(request, "param", ()):
        if option == "storage":
            overrides.update(supabase_url=storage_server.url, supabase_service_key=SERVICE_KEY)
        elif option == "second_provider":
            overrides.update(
                openrouter_api_key="or-test-key-" + "x" * 20, openrouter_base_url=upstream_server.base_url
            )
        else:
            overrides.update(option)
    return overrides


def with_settings(*options: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("settings_overrides", [options], indirect=True, ids=[""])


def sdk(gateway: LiveServer, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url, api_key=api_key, max_retries=0, timeout=10)


async def generate(gateway: LiveServer, api_key: str, **params: Any) -> ImagesResponse:
    """images.generate through the SDK, as an application would call it."""
    async with sdk(gateway, api_key) as client:
        result: ImagesResponse = await client.images.generate(**params)
        return result


async def generate_raw(gateway: LiveServer, api_key: str, **params: Any) -> tuple[ImagesResponse, Any]:
    """The same, with the response headers."""
    async with sdk(gateway, api_key) as client:
        raw = await client.images.with_raw_response.generate(**params)
        result: ImagesResponse = raw.parse()
        return result, raw.headers


def image_requests(upstream: FakeUpstream) -> list[RecordedRequest]:
    return [r for r in upstream.requests if r.path == "/v1/images/generations"]


async def usage_records(db: asyncpg.Connection, user_id: UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT request_id, model, provider, request_type, input_tokens, output_tokens, input_cost,"
        " output_cost, cost, charged, held, estimated, status, error_code FROM usage_records"
        " WHERE user_id = $1 ORDER BY id",
        user_id,
    )
    return rows


async def usage_charges(db: asyncpg.Connection, user_id: UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT amount, reference FROM credit_transactions WHERE user_id = $1 AND type = 'usage' ORDER BY id",
        user_id,
    )
    return rows


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


async def assert_nothing_happened(db: asyncpg.Connection, upstream: FakeUpstream, user_id: UUID) -> None:
    """Refused before the hold: no upstream call, no hold, no usage record, no charge."""
    assert image_requests(upstream) == []
    assert await db.fetchval("SELECT count(*) FROM credit_holds") == 0
    assert await usage_records(db, user_id) == []
    assert await usage_charges(db, user_id) == []
    await assert_ledger(db)


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    error: dict[str, Any] = body["error"]
    return error


class TestGenerate:
    async def test_provider_url_passes_through_and_one_image_is_billed(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        result, headers = await generate_raw(
            live_gateway,
            user.api_key,
            model=IMAGE_MODEL,
            prompt=PROMPT,
            size="1024x1024",
            quality="hd",
            style="vivid",
            user="end-user-1",
        )

        assert headers["X-Gateway-Provider"] == "fake"
        assert Decimal(headers["X-Gateway-Cost"]) == IMAGE_PRICE
        assert len(result.data) == 1
        assert result.data[0].url == f"{upstream.url}/files/image-0.png"
        assert result.data[0].b64_json is None
        assert result.data[0].revised_prompt == PROMPT
        assert isinstance(result.created, int)
        extra = result.model_extra or {}
        assert extra["gateway_usage"]["provider"] == "fake"
        assert Decimal(str(extra["gateway_usage"]["cost"])) == IMAGE_PRICE
        assert extra["gateway_usage"]["images"] == 1
        # Unknown OpenAI fields pass through; the client's response_format (none) is left alone.
        sent = image_requests(upstream)
        assert len(sent) == 1
        assert sent[0].body == {
            "model": IMAGE_MODEL,
            "prompt": PROMPT,
            "size": "1024x1024",
            "quality": "hd",
            "style": "vivid",
            "user": "end-user-1",
        }
        credits, held = await balance(db, user.id)
        assert (credits, held) == (Decimal(1) - IMAGE_PRICE, 0)
        await assert_ledger(db)

    async def test_b64_json(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        result = await generate(
            live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT, response_format="b64_json"
        )

        assert len(result.data) == 1
        assert result.data[0].url is None
        assert result.data[0].b64_json is not None
        assert base64.b64decode(result.data[0].b64_json) == TINY_PNG
        assert image_requests(upstream)[0].body["response_format"] == "b64_json"
        assert (await balance(db, user.id))[0] == Decimal(1) - IMAGE_PRICE
        await assert_ledger(db)

    async def test_two_images_charge_exactly_twice_the_image_price(
        self, live_gateway: LiveServer, gateway_settings: Settings, db: asyncpg.Connection
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        result = await generate(live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT, n=2)

        assert [item.url is not None for item in result.data] == [True, True]
        charge = 2 * IMAGE_PRICE
        assert await balance(db, user.id) == (Decimal(1) - charge, 0)
        [record] = await usage_records(db, user.id)
        assert record["request_type"] == "images"
        assert record["model"] == IMAGE_MODEL
        assert record["provider"] == "fake"
        assert record["status"] == "success"
        assert (record["cost"], record["charged"], record["held"]) == (charge, charge, charge)
        assert (record["input_tokens"], record["output_tokens"], record["estimated"]) == (0, 0, False)
        [ledger] = await usage_charges(db, user.id)
        assert ledger["amount"] == -charge
        assert ledger["reference"] == str(record["request_id"])
        await assert_ledger(db)

    async def test_pinned_provider_and_gateway_fields_are_stripped(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        async with httpx.AsyncClient(base_url=live_gateway.url, headers=user.headers, timeout=10) as http:
            response = await http.post(
                "/v1/images/generations",
                json={
                    "model": IMAGE_MODEL,
                    "prompt": PROMPT,
                    "provider": "fake",
                    "allow_fallbacks": False,
                    "session_id": "ignored",
                    "background": "transparent",
                    "output_format": "png",
                },
            )

        assert response.status_code == 200, response.text
        assert image_requests(upstream)[0].body == {
            "model": IMAGE_MODEL,
            "prompt": PROMPT,
            "background": "transparent",
            "output_format": "png",
        }
        await assert_ledger(db)


class TestStorage:
    @with_settings("storage")
    async def test_base64_from_the_provider_is_stored_and_the_client_gets_signed_urls(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        storage: FakeStorage,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        result = await generate(live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT, n=2)

        # The client asked for URLs; the gateway asked the provider for base64 to store it.
        assert image_requests(upstream)[0].body["response_format"] == "b64_json"
        [record] = await usage_records(db, user.id)
        request_id = record["request_id"]
        paths = [f"{user.id}/{request_id}/{index}.png" for index in range(2)]
        uploads = sorted(storage.uploads, key=lambda item: item.path)
        assert [(u.bucket, u.path) for u in uploads] == [(DEFAULT_BUCKET, path) for path in paths]
        for upload in uploads:
            assert upload.data == TINY_PNG
            assert upload.content_type == "image/png"
            assert upload.authorization == f"Bearer {SERVICE_KEY}"
            assert upload.apikey == SERVICE_KEY
        async with httpx.AsyncClient(timeout=10) as http:
            for item, path in zip(result.data, paths, strict=True):
                assert item.b64_json is None
                assert item.revised_prompt == PROMPT
                assert item.url is not None
                assert item.url.startswith(
                    f"{storage.url}/storage/v1/object/sign/{DEFAULT_BUCKET}/{path}?token="
                )
                fetched = await http.get(item.url)
                assert fetched.status_code == 200
                assert fetched.content == TINY_PNG
        assert (record["status"], record["charged"]) == ("success", 2 * IMAGE_PRICE)
        await assert_ledger(db)

    @with_settings("storage", {"supabase_storage_bucket": OTHER_BUCKET})
    async def test_the_configured_bucket_is_used(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        storage: FakeStorage,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        result = await generate(live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT)

        assert [u.bucket for u in storage.uploads] == [OTHER_BUCKET]
        assert result.data[0].url is not None
        assert f"/object/sign/{OTHER_BUCKET}/{user.id}/" in result.data[0].url
        await assert_ledger(db)

    @with_settings("storage")
    async def test_b64_json_asked_for_is_returned_and_not_stored(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        storage: FakeStorage,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        result = await generate(
            live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT, response_format="b64_json"
        )

        assert result.data[0].b64_json is not None
        assert base64.b64decode(result.data[0].b64_json) == TINY_PNG
        assert storage.requests == []
        assert (await balance(db, user.id))[0] == Decimal(1) - IMAGE_PRICE
        await assert_ledger(db)

    @with_settings("storage")
    async def test_storage_failure_answers_502_and_charges_nothing(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        storage: FakeStorage,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        storage.fail_uploads = 500
        with pytest.raises(openai.APIStatusError) as caught:
            await generate(live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT)

        assert caught.value.status_code == 502
        assert error_of(caught.value)["code"] == "image_storage_failed"
        assert SERVICE_KEY not in caught.value.response.text
        assert storage.url not in caught.value.response.text
        assert len(image_requests(upstream)) == 1
        assert await balance(db, user.id) == (Decimal(1), 0)
        [record] = await usage_records(db, user.id)
        assert (record["status"], record["error_code"]) == ("failed", "image_storage_failed")
        assert (record["cost"], record["charged"], record["held"]) == (0, 0, IMAGE_PRICE)
        assert await usage_charges(db, user.id) == []
        await assert_ledger(db)


class TestPricing:
    async def test_unknown_model_is_404(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        with pytest.raises(openai.NotFoundError) as caught:
            await generate(live_gateway, user.api_key, model="acme/no-such-model", prompt=PROMPT)

        error = error_of(caught.value)
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        await assert_nothing_happened(db, upstream, user.id)

    @pytest.mark.parametrize("model", [CHAT_MODEL, UNPRICED_IMAGE_MODEL])
    async def test_model_without_an_image_price_is_400(
        self,
        model: str,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        with pytest.raises(openai.BadRequestError) as caught:
            await generate(live_gateway, user.api_key, model=model, prompt=PROMPT)

        error = error_of(caught.value)
        assert (error["code"], error["param"]) == ("model_not_priced", "model")
        await assert_nothing_happened(db, upstream, user.id)

    async def test_a_model_an_admin_made_free_costs_nothing(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="0")
        async with httpx.AsyncClient(base_url=live_gateway.url, timeout=10) as http:
            response = await http.put(
                "/admin/pricing",
                json={"model": UNPRICED_IMAGE_MODEL, "free": True},
                headers={"Authorization": f"Bearer {TEST_ADMIN_KEY}"},
            )
        assert response.status_code == 200, response.text

        result, headers = await generate_raw(
            live_gateway, user.api_key, model=UNPRICED_IMAGE_MODEL, prompt=PROMPT, n=3
        )

        assert len(result.data) == 3
        assert Decimal(headers["X-Gateway-Cost"]) == 0
        [record] = await usage_records(db, user.id)
        assert (record["status"], record["charged"], record["held"]) == ("success", 0, 0)
        assert await usage_charges(db, user.id) == []
        await assert_ledger(db)

    async def test_insufficient_credits_is_402_before_any_upstream_call(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        # Enough for one image, not for the two asked for.
        user = await create_user_for(gateway_settings, credits="0.05")
        with pytest.raises(openai.APIStatusError) as caught:
            await generate(live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT, n=2)

        assert caught.value.status_code == 402
        assert "0.08" in error_of(caught.value)["message"]
        await assert_nothing_happened(db, upstream, user.id)
        assert await balance(db, user.id) == (Decimal("0.05"), 0)


class TestUpstreamFailures:
    async def test_upstream_500_is_502_with_no_charge_and_the_hold_released(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        upstream.set_fault(status=500, endpoints="all", model=IMAGE_MODEL)
        with pytest.raises(openai.APIStatusError) as caught:
            await generate(live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT, n=2)

        assert caught.value.status_code == 502
        assert len(image_requests(upstream)) == 1
        assert await balance(db, user.id) == (Decimal(1), 0)
        [record] = await usage_records(db, user.id)
        assert record["status"] == "upstream_error"
        assert (record["cost"], record["charged"], record["held"]) == (0, 0, 2 * IMAGE_PRICE)
        assert await usage_charges(db, user.id) == []
        await assert_ledger(db)

    @with_settings("second_provider")
    async def test_fails_over_to_the_next_provider_and_bills_once(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        upstream.set_fault(status=503, endpoints="all", model=IMAGE_MODEL, times=1)
        result, headers = await generate_raw(live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT)

        assert headers["X-Gateway-Provider"] == "openrouter"
        assert len(result.data) == 1
        assert len(image_requests(upstream)) == 2
        [record] = await usage_records(db, user.id)
        assert (record["provider"], record["charged"]) == ("openrouter", IMAGE_PRICE)
        await assert_ledger(db)

    @with_settings("second_provider")
    async def test_an_upstream_400_is_not_retried(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        upstream.set_fault(
            status=400, endpoints="all", model=IMAGE_MODEL, error_message="Your prompt was rejected."
        )
        with pytest.raises(openai.BadRequestError) as caught:
            await generate(live_gateway, user.api_key, model=IMAGE_MODEL, prompt=PROMPT)

        assert error_of(caught.value)["code"] == "upstream_bad_request"
        assert "rejected" in error_of(caught.value)["message"]
        assert len(image_requests(upstream)) == 1
        assert await balance(db, user.id) == (Decimal(1), 0)
        await assert_ledger(db)


BAD_BODIES = [
    pytest.param({"model": IMAGE_MODEL, "prompt": PROMPT, "n": 0}, "n", id="n=0"),
    pytest.param({"model": IMAGE_MODEL, "prompt": PROMPT, "n": 11}, "n", id="n=11"),
    pytest.param({"model": IMAGE_MODEL, "prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({"model": IMAGE_MODEL}, "prompt", id="no-prompt"),
    pytest.param({"model": IMAGE_MODEL, "prompt": "x" * 32_001}, "prompt", id="long-prompt"),
    pytest.param({"prompt": PROMPT}, "model", id="no-model"),
    pytest.param({"model": IMAGE_MODEL, "prompt": PROMPT, "size": "huge"}, "size", id="size"),
    pytest.param(
        {"model": IMAGE_MODEL, "prompt": PROMPT, "response_format": "png"}, "response_format", id="format"
    ),
    pytest.param({"model": IMAGE_MODEL, "prompt": PROMPT, "stream": True}, "stream", id="stream"),
    pytest.param({"model": IMAGE_MODEL, "prompt": PROMPT, "api_base": "http://x"}, "api_base", id="denied"),
]


class TestBadInput:
    @pytest.mark.parametrize(("body", "param"), BAD_BODIES)
    async def test_refused_with_400_and_param_before_anything_is_held(
        self,
        body: dict[str, Any],
        param: str,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        user = await create_user_for(gateway_settings, credits="1")
        async with httpx.AsyncClient(base_url=live_gateway.url, headers=user.headers, timeout=10) as http:
            response = await http.post("/v1/images/generations", json=body)

        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param
        assert error["type"] == "invalid_request_error"
        await assert_nothing_happened(db, upstream, user.id)
        assert await balance(db, user.id) == (Decimal(1), 0)


class TestConcurrencySlot:
    @with_settings({"default_concurrency": 1})
    async def test_every_outcome_frees_the_slot(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        # With one slot, a request that kept it would turn every later one into a 429.
        user = await create_user_for(gateway_settings, credits="0.05")
        async with httpx.AsyncClient(base_url=live_gateway.url, headers=user.headers, timeout=10) as http:

            async def generate(**body: Any) -> int:
                response = await http.post(
                    "/v1/images/generations", json={"model": IMAGE_MODEL, "prompt": PROMPT, **body}
                )
                return response.status_code

            assert await generate(n=0) == 400
            assert await generate(model="acme/none") == 404
            assert await generate(n=2) == 402
            upstream.set_fault(status=500, endpoints="all", model=IMAGE_MODEL, times=1)
            assert await generate() == 502
            assert await generate() == 200
            assert await generate() == 402  # 0.01 left
        await assert_ledger(db)
