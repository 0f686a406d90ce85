"""The catalog service: price parsing, search, provider list failures, and how price changes travel."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any, ClassVar

import asyncpg
import pytest
from fastapi import FastAPI

from src.db import models as models_db
from src.security.deps import Principal, RequestMeta
from src.services import catalog as catalog_service
from src.services import pricing as pricing_service
from src.services.catalog import Candidate, Catalog, CatalogModel, Price, parse_price
from tests.factories import app_state
from tests.fakes.upstream import FakeUpstream

MODEL = "openai/gpt-4o-mini"
LLAMA = "meta-llama/llama-3.1-8b-instruct"
OPERATOR = Principal(user_id=None, key_id=None, is_operator=True)
META = RequestMeta(ip=None, user_agent=None, request_id=None)


@pytest.fixture
def settings_overrides(upstream_server: FakeUpstream) -> dict[str, Any]:
    return {"custom_provider_base_url": upstream_server.base_url, "custom_provider_name": "fake"}


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestParsePrice:
    @pytest.mark.parametrize(
        "value",
        [
            -1,
            "-1",
            -0.000001,
            "-0.000001",
            "NaN",
            float("nan"),
            "Infinity",
            float("inf"),
            "-inf",
            "abc",
            "",
            None,
            True,
            [],
            {},
            "0x10",
        ],
    )
    def test_refused(self, value: Any) -> None:
        assert parse_price(value) is None

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("0", Decimal(0)),
            ("0.000001", Decimal("0.000001")),
            (0, Decimal(0)),
            (2e-06, Decimal("0.000002")),
            ("1e-7", Decimal("0.0000001")),
        ],
    )
    def test_accepted(self, value: Any, expected: Decimal) -> None:
        assert parse_price(value) == expected


def model(model_id: str, name: str | None, *providers: str, unpriced: tuple[str, ...] = ()) -> CatalogModel:
    price = Price(prompt=Decimal("0.000001"), completion=Decimal("0.000002"))
    return CatalogModel(
        id=model_id,
        name=name,
        owned_by="x",
        created=0,
        context_length=None,
        candidates=[Candidate(p, model_id, model_id, price, None, None) for p in providers],
        unpriced_providers=list(unpriced),
    )


class TestSearch:
    MODELS: ClassVar[dict[str, CatalogModel]] = {
        m.id: m
        for m in [
            model("z/zeta", "Zeta Large", "openrouter"),
            model("a/alpha", "Alpha", "openrouter", "chutes"),
            model("m/mid", None, "chutes"),
            model("u/unpriced", "Alpha Unpriced", unpriced=("openrouter",)),
            model("p/partly", "Partly", "chutes", unpriced=("openrouter",)),
        ]
    }

    def ids(self, **filters: Any) -> list[str]:
        return [m.id for m in catalog_service.search(self.MODELS, **{"q": None, "provider": None, **filters})]

    def test_every_usable_model_by_id(self) -> None:
        assert self.ids() == ["a/alpha", "m/mid", "p/partly", "z/zeta"]

    def test_provider_filter_counts_only_priced_providers(self) -> None:
        assert self.ids(provider="openrouter") == ["a/alpha", "z/zeta"]
        assert self.ids(provider="chutes") == ["a/alpha", "m/mid", "p/partly"]
        assert self.ids(provider="portkey") == []

    def test_query_matches_id_or_name_in_any_case(self) -> None:
        assert self.ids(q="ALPHA") == ["a/alpha"]
        assert self.ids(q="large") == ["z/zeta"]
        assert self.ids(q="m/") == ["m/mid"]
        assert self.ids(q="alpha", provider="chutes") == ["a/alpha"]


async def active_model_ids(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch(
        "SELECT model_id FROM models WHERE provider = 'fake' AND is_active ORDER BY model_id"
    )
    return [row["model_id"] for row in rows]


def list_requests(upstream: FakeUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path == "/v1/models")


class TestProviderLists:
    async def test_a_failing_list_keeps_the_stored_models(
        self, app: FastAPI, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        catalog = app_state(app).catalog
        assert set(await catalog.ready()) == {MODEL, LLAMA}
        assert await active_model_ids(db) == [LLAMA, MODEL]

        upstream.set_fault(status=503, endpoints="all")
        asked = list_requests(upstream)
        await catalog.refresh(fetch=True)
        assert list_requests(upstream) == asked + 1  # the provider was asked, and failed
        assert await active_model_ids(db) == [LLAMA, MODEL]
        assert set(await catalog.ready()) == {MODEL, LLAMA}
        assert (await catalog.resolve(MODEL))[0].price.prompt == Decimal("0.000001")

    async def test_an_empty_list_keeps_the_stored_models(
        self, app: FastAPI, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        catalog = app_state(app).catalog
        await catalog.ready()
        upstream.models = []
        await catalog.refresh(fetch=True)
        assert await active_model_ids(db) == [LLAMA, MODEL]
        assert set(await catalog.ready()) == {MODEL, LLAMA}

    async def test_a_model_the_provider_drops_is_deactivated(
        self, app: FastAPI, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        catalog = app_state(app).catalog
        await catalog.ready()
        upstream.models = [m for m in upstream.models if m["id"] == MODEL]
        await catalog.refresh(fetch=True)
        assert await active_model_ids(db) == [MODEL]
        assert set(await catalog.ready()) == {MODEL}


async def prompt_price(catalog: Catalog) -> Decimal:
    return (await catalog.resolve(MODEL))[0].price.prompt


async def eventually_price(catalog: Catalog, expected: Decimal, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while await prompt_price(catalog) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"price is still {await prompt_price(catalog)}, expected {expected}")
        await asyncio.sleep(0.02)


class TestPricePropagation:
    async def test_another_instance_sees_a_price_within_the_snapshot_ttl(
        self, app: FastAPI, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(catalog_service, "SNAPSHOT_TTL_SECONDS", 5.0)
        state = app_state(app)
        # Two catalogs over one database: this instance's, and another instance's with its own clock.
        here = state.catalog
        clock = ManualClock()
        there = Catalog(pool=state.pool, redis=None, clients=state.providers, markup=Decimal(1), clock=clock)
        assert await prompt_price(here) == await prompt_price(there) == Decimal("0.000001")

        await pricing_service.set_price(
            state.pool,
            here,
            model_id=MODEL,
            provider=None,
            prompt=Decimal("0.00005"),
            completion=Decimal("0.00006"),
            image=None,
            request=None,
            free=False,
            actor=OPERATOR,
            meta=META,
        )
        assert await prompt_price(here) == Decimal("0.00005")  # at once where it was set

        clock.now += 4.9
        assert await prompt_price(there) == Decimal("0.000001")  # the other still has its snapshot
        clock.now += 0.2  # past SNAPSHOT_TTL_SECONDS: the next use reloads it
        await eventually_price(there, Decimal("0.00005"))
        assert upstream.chat_requests == []

    async def test_a_price_change_during_a_reload_is_not_lost(
        self, app: FastAPI, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        state = app_state(app)
        catalog = Catalog(
            pool=state.pool, redis=None, clients=state.providers, markup=Decimal(1), clock=ManualClock()
        )
        real_price_overrides = models_db.price_overrides
        calls = 0

        async def overrides_then_a_concurrent_change(conn: asyncpg.Connection) -> list[Any]:
            # The reload has read the old prices when an admin's change commits and invalidates.
            nonlocal calls
            calls += 1
            old = await real_price_overrides(conn)
            if calls == 1:
                async with state.pool.acquire() as other:
                    await models_db.upsert_override(
                        other,
                        model_id=MODEL,
                        provider=None,
                        prompt_price=Decimal("0.00007"),
                        completion_price=Decimal("0.00007"),
                        image_price=None,
                        request_price=None,
                        is_free=False,
                        updated_by="operator",
                    )
                catalog.invalidate()
            return old

        monkeypatch.setattr(models_db, "price_overrides", overrides_then_a_concurrent_change)
        await catalog.ready()
        # The clock never moves, so only the invalidation can make the next use reload.
        assert await prompt_price(catalog) == Decimal("0.00007")
        assert calls == 2
