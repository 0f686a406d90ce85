"""Failover across providers, cool-downs after an upstream 429, and the circuit breaker."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from src.config import Settings
from src.main import create_app
from tests.conftest import REPO_ROOT, TEST_ADMIN_KEY, TEST_SECRET_KEY, asgi_client, make_settings
from tests.factories import TestUser, create_user
from tests.fakes.upstream import DEFAULT_MODELS, FakeUpstream

MODEL = "openai/gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}


def priced(prompt: str, completion: str) -> list[dict[str, Any]]:
    models = [dict(m) for m in DEFAULT_MODELS]
    for model in models:
        model["pricing"] = {"prompt": prompt, "completion": completion, "image": "0", "request": "0"}
    return models


@pytest.fixture(scope="module")
def cheap() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=priced("0.000001", "0.000002")) as server:
        yield server


@pytest.fixture(scope="module")
def dear() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=priced("0.000002", "0.000004")) as server:
        yield server


@pytest.fixture
def providers(cheap: FakeUpstream, dear: FakeUpstream) -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    for server in (cheap, dear):
        if not server.running:
            server.start()
        server.reset()
    yield cheap, dear
    for server in (cheap, dear):
        if not server.running:
            server.start()
        server.reset()


def two_provider_settings(
    settings: Settings, cheap: FakeUpstream, dear: FakeUpstream, **extra: Any
) -> Settings:
    """The cheap fake as the custom provider 'cheap', the dear one as OpenRouter."""
    values: dict[str, Any] = {
        "custom_provider_base_url": cheap.base_url,
        "custom_provider_name": "cheap",
        "openrouter_base_url": dear.base_url,
        "openrouter_api_key": SecretStr("sk-or-v1-" + "d" * 40),
        "upstream_first_byte_timeout_seconds": 0.5,
        "breaker_failure_threshold": 3,
        "breaker_open_seconds": 30.0,
    }
    values.update(extra)
    return settings.model_copy(update=values)


@pytest.fixture
async def gateway(
    settings: Settings, providers: tuple[FakeUpstream, FakeUpstream], request: pytest.FixtureRequest
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    overrides = getattr(request, "param", {})
    app = create_app(two_provider_settings(settings, *providers, **overrides))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        yield app, client


async def ledger_ok(db: asyncpg.Connection, user: TestUser) -> tuple[Decimal, Decimal]:
    credits, held = await db.fetchrow("SELECT credits, held FROM users WHERE id = $1", user.id)
    ledger = await db.fetchval("SELECT sum(amount) FROM credit_transactions WHERE user_id = $1", user.id)
    assert credits == ledger and held == 0
    return credits, held


def usage_rows(db: asyncpg.Connection, user: TestUser) -> Any:
    return db.fetch(
        "SELECT provider, status, charged FROM usage_records WHERE user_id = $1 ORDER BY created_at", user.id
    )


class TestFailover:
    async def test_cheapest_first(self, gateway: tuple[FastAPI, httpx.AsyncClient], providers, db) -> None:  # type: ignore[no-untyped-def]
        app, client = gateway
        cheap, dear = providers
        user = await create_user(app, credits="1")
        response = await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert response.status_code == 200
        assert response.headers["x-gateway-provider"] == "cheap"
        assert len(cheap.chat_requests) == 1 and not dear.chat_requests

    @pytest.mark.parametrize(
        "fault",
        [
            {"status": 500},
            {"status": 503},
            {"status": 429, "retry_after": 5},
            {"delay": 2.0},
            {"status": 401},
        ],
        ids=["500", "503", "429-retry-after", "timeout", "our-key-refused"],
    )
    async def test_second_provider_answers_with_one_charge(
        self,
        gateway: tuple[FastAPI, httpx.AsyncClient],
        providers,
        db,
        fault: dict[str, Any],  # type: ignore[no-untyped-def]
    ) -> None:
        app, client = gateway
        cheap, dear = providers
        cheap.set_fault(**fault)
        user = await create_user(app, credits="1")
        response = await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert response.status_code == 200, response.text
        assert response.headers["x-gateway-provider"] == "openrouter"
        assert response.json()["gateway_usage"]["provider"] == "openrouter"
        assert len(cheap.chat_requests) == 1 and len(dear.chat_requests) == 1
        rows = await usage_rows(db, user)
        assert [(r["provider"], r["status"]) for r in rows] == [("openrouter", "success")]
        charges = await db.fetch(
            "SELECT amount FROM credit_transactions WHERE user_id = $1 AND type = 'usage'", user.id
        )
        assert len(charges) == 1 and -charges[0]["amount"] == rows[0]["charged"]
        usage = response.json()["usage"]
        # Charged at the provider that answered (the dear one), exactly.
        expected = Decimal(usage["prompt_tokens"]) * Decimal("0.000002") + Decimal(
            usage["completion_tokens"]
        ) * Decimal("0.000004")
        assert rows[0]["charged"] == expected
        await ledger_ok(db, user)

    async def test_refused_connection_fails_over(
        self, gateway: tuple[FastAPI, httpx.AsyncClient], providers, db
    ) -> None:  # type: ignore[no-untyped-def]
        app, client = gateway
        cheap, _ = providers
        user = await create_user(app, credits="1")
        await client.get("/v1/models", headers=user.headers)  # the catalog knows both providers
        cheap.stop()
        response = await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert response.status_code == 200
        assert response.headers["x-gateway-provider"] == "openrouter"
        await ledger_ok(db, user)

    async def test_streaming_fails_over_before_the_first_byte(
        self,
        gateway: tuple[FastAPI, httpx.AsyncClient],
        providers,
        db,  # type: ignore[no-untyped-def]
    ) -> None:
        app, client = gateway
        cheap, _ = providers
        cheap.set_fault(status=502)
        user = await create_user(app, credits="1")
        response = await client.post(
            "/v1/chat/completions", json={**BODY, "stream": True}, headers=user.headers
        )
        assert response.status_code == 200
        assert response.headers["x-gateway-provider"] == "openrouter"
        assert response.text.rstrip().endswith("data: [DONE]")
        await ledger_ok(db, user)

    async def test_cool_down_skips_the_provider_on_the_next_request(
        self,
        gateway: tuple[FastAPI, httpx.AsyncClient],
        providers,
        db,  # type: ignore[no-untyped-def]
    ) -> None:
        app, client = gateway
        cheap, _ = providers
        cheap.set_fault(status=429, retry_after=30, times=1)
        user = await create_user(app, credits="1")
        first = await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        second = await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert first.status_code == second.status_code == 200
        assert second.headers["x-gateway-provider"] == "openrouter"
        assert len(cheap.chat_requests) == 1  # skipped while cooling down, though it would answer now
        # The cool-down is per provider AND model: the cheap provider still serves another model.
        other = {**BODY, "model": "meta-llama/llama-3.1-8b-instruct"}
        third = await client.post("/v1/chat/completions", json=other, headers=user.headers)
        assert third.headers["x-gateway-provider"] == "cheap"

    async def test_every_candidate_rate_limited_gives_429_with_the_smallest_retry_after(
        self,
        gateway: tuple[FastAPI, httpx.AsyncClient],
        providers,
        db,  # type: ignore[no-untyped-def]
    ) -> None:
        app, client = gateway
        cheap, dear = providers
        cheap.set_fault(status=429, retry_after=20)
        dear.set_fault(status=429, retry_after=7)
        user = await create_user(app, credits="1")
        before, _ = await ledger_ok(db, user)
        response = await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert response.status_code == 429
        assert response.headers["retry-after"] == "7"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert "127.0.0.1" not in response.text
        # Both now cool down: the next request is refused at once, without calling either.
        again = await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert again.status_code == 429 and 1 <= int(again.headers["retry-after"]) <= 7
        assert len(cheap.chat_requests) == 1 and len(dear.chat_requests) == 1
        assert (await ledger_ok(db, user))[0] == before

    @pytest.mark.parametrize(
        ("faults", "status"),
        [
            (({"status": 500}, {"status": 503}), 502),
            (({"delay": 2.0}, {"delay": 2.0}), 504),
            (({"status": 429, "retry_after": 3}, {"status": 500}), 502),
        ],
        ids=["5xx", "timeouts", "mixed"],
    )
    async def test_every_candidate_failing_charges_nothing(
        self,
        gateway: tuple[FastAPI, httpx.AsyncClient],
        providers,
        db,
        faults: Any,
        status: int,  # type: ignore[no-untyped-def]
    ) -> None:
        app, client = gateway
        cheap, dear = providers
        cheap.set_fault(**faults[0])
        dear.set_fault(**faults[1])
        user = await create_user(app, credits="1")
        response = await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert (await ledger_ok(db, user))[0] == Decimal(1)
        rows = await usage_rows(db, user)
        assert [r["status"] for r in rows] == ["upstream_error"] and rows[0]["charged"] == 0

    async def test_pinned_provider_without_fallbacks_is_tried_alone(
        self,
        gateway: tuple[FastAPI, httpx.AsyncClient],
        providers,
        db,  # type: ignore[no-untyped-def]
    ) -> None:
        app, client = gateway
        cheap, dear = providers
        cheap.set_fault(status=500)
        user = await create_user(app, credits="1")
        pinned = await client.post(
            "/v1/chat/completions", json={**BODY, "provider": "cheap"}, headers=user.headers
        )
        assert pinned.status_code == 502
        assert not dear.chat_requests
        allowed = await client.post(
            "/v1/chat/completions",
            json={**BODY, "provider": "cheap", "allow_fallbacks": True},
            headers=user.headers,
        )
        assert allowed.status_code == 200 and allowed.headers["x-gateway-provider"] == "openrouter"
        await ledger_ok(db, user)

    async def test_pinning_the_dear_provider_bypasses_the_cheap_one(
        self,
        gateway: tuple[FastAPI, httpx.AsyncClient],
        providers,
        db,  # type: ignore[no-untyped-def]
    ) -> None:
        app, client = gateway
        cheap, _ = providers
        user = await create_user(app, credits="1")
        response = await client.post(
            "/v1/chat/completions", json={**BODY, "provider": "openrouter"}, headers=user.headers
        )
        assert response.headers["x-gateway-provider"] == "openrouter" and not cheap.chat_requests


class TestBreaker:
    @pytest.mark.parametrize(
        "gateway", [{"breaker_failure_threshold": 2, "breaker_open_seconds": 0.6}], indirect=True
    )
    async def test_opens_skips_probes_and_closes(
        self, gateway: tuple[FastAPI, httpx.AsyncClient], providers, db
    ) -> None:  # type: ignore[no-untyped-def]
        app, client = gateway
        cheap, _ = providers
        user = await create_user(app, credits="1")
        cheap.set_fault(status=500)
        for _ in range(2):
            assert (
                await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
            ).status_code == 200
        report = {p["provider"]: p for p in (await client.get("/health/providers")).json()["data"]}
        assert report["cheap"]["state"] == "open"
        assert report["cheap"]["error_rate_5m"] > 0
        cheap.reset()  # healthy again, but the open circuit keeps it out
        await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert not cheap.chat_requests
        await asyncio.sleep(0.7)  # past the open period: the next request probes
        probe = await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert probe.headers["x-gateway-provider"] == "cheap"
        report = {p["provider"]: p for p in (await client.get("/health/providers")).json()["data"]}
        assert report["cheap"]["state"] == "closed"
        await ledger_ok(db, user)

    @pytest.mark.parametrize(
        "gateway", [{"breaker_failure_threshold": 1, "breaker_open_seconds": 0.4}], indirect=True
    )
    async def test_failed_probe_opens_again(
        self, gateway: tuple[FastAPI, httpx.AsyncClient], providers, db
    ) -> None:  # type: ignore[no-untyped-def]
        app, client = gateway
        cheap, _ = providers
        user = await create_user(app, credits="1")
        cheap.set_fault(status=500)
        await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        await asyncio.sleep(0.5)
        await client.post("/v1/chat/completions", json=BODY, headers=user.headers)  # the probe fails
        assert len(cheap.chat_requests) == 2
        await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
        assert len(cheap.chat_requests) == 2  # open again

    async def test_health_providers_names_no_secret(
        self, gateway: tuple[FastAPI, httpx.AsyncClient], providers
    ) -> None:  # type: ignore[no-untyped-def]
        _, client = gateway
        response = await client.get("/health/providers")
        assert response.status_code == 200
        names = [p["provider"] for p in response.json()["data"]]
        assert names == ["cheap", "openrouter"]
        assert "sk-or-v1-" not in response.text and "127.0.0.1" not in response.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
async def test_an_open_breaker_is_seen_by_another_instance(
    settings: Settings,
    database_url: str,
    redis_url: str,
    providers,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    cheap, dear = providers
    app = create_app(
        two_provider_settings(
            make_settings(database_url, tmp_path, redis_url=redis_url),
            cheap,
            dear,
            breaker_failure_threshold=2,
        )
    )
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SECRET_KEY": TEST_SECRET_KEY,
        "ENCRYPTION_KEYS": settings.encryption_keys.get_secret_value() if settings.encryption_keys else "",
        "ADMIN_API_KEY": TEST_ADMIN_KEY,
        "GATEWAY_DATA_DIR": str(tmp_path / "other"),
        "CUSTOM_PROVIDER_BASE_URL": cheap.base_url,
        "CUSTOM_PROVIDER_NAME": "cheap",
        "OPENROUTER_BASE_URL": dear.base_url,
        "OPENROUTER_API_KEY": "sk-or-v1-" + "d" * 40,
        "LOG_LEVEL": "WARNING",
    }
    other = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "uvicorn", "src.main:app", "--port", str(port), "--log-level", "warning"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as remote:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if (await remote.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the second instance did not start"
                await asyncio.sleep(0.1)

            async def remote_state() -> str:
                data = (await remote.get("/health/providers")).json()["data"]
                return str({p["provider"]: p for p in data}["cheap"]["state"])

            assert await remote_state() == "closed"
            async with app.router.lifespan_context(app), asgi_client(app) as client:
                await asyncio.sleep(0.2)  # both instances are subscribed
                user = await create_user(app, credits="1")
                cheap.set_fault(status=500)
                for _ in range(2):
                    await client.post("/v1/chat/completions", json=BODY, headers=user.headers)
                for _ in range(50):
                    if await remote_state() == "open":
                        break
                    await asyncio.sleep(0.05)
                assert await remote_state() == "open"
                # The other instance skips the provider without ever having seen it fail.
                requests_before = len(cheap.chat_requests)
                remote_user = await create_user(app, credits="1")
                response = await remote.post("/v1/chat/completions", json=BODY, headers=remote_user.headers)
                assert response.status_code == 200 and response.headers["x-gateway-provider"] == "openrouter"
                assert len(cheap.chat_requests) == requests_before
    finally:
        other.terminate()
        await asyncio.wait_for(other.wait(), timeout=10)
