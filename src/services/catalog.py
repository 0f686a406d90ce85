"""The model catalog: what each provider serves, at what price, kept in PostgreSQL and in memory.

Provider lists are fetched every CATALOG_TTL_SECONDS (5 minutes; shared through Redis when set)
and stored in `models`, so prices survive restarts. The in-memory snapshot that requests read is
rebuilt from the database (models + admin prices) at most every SNAPSHOT_TTL_SECONDS, so an admin
price set on one instance reaches the others within that bound, and at once on its own instance.
Prices are per token; the user pays price x PRICING_MARKUP, which is also what /v1/models shows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from src.db import models as models_db
from src.db.models import ModelRow, PriceOverride
from src.errors import InvalidRequest, ModelNotFound, ModelNotPriced
from src.services.providers import PROVIDER_CATALOG, ProviderClient, ProviderError

logger = logging.getLogger("gatewayz.catalog")

CATALOG_TTL_SECONDS = 300.0
SNAPSHOT_TTL_SECONDS = 30.0
REDIS_KEY = "gatewayz:catalog:{provider}"
ZERO = Decimal(0)


@dataclass(frozen=True)
class Price:
    """Per-token (and per-image, per-request) prices the user pays, markup included."""

    prompt: Decimal
    completion: Decimal
    image: Decimal = ZERO
    request: Decimal = ZERO
    # Set only by an admin's "free" price: a zero price from a provider (an image model that
    # publishes no per-image price, say) is not a promise that the request costs nothing.
    free: bool = False


@dataclass(frozen=True)
class Candidate:
    provider: str
    model_id: str
    upstream_id: str
    price: Price
    context_length: int | None
    max_output_tokens: int | None


@dataclass
class CatalogModel:
    id: str
    name: str | None
    owned_by: str
    created: int
    context_length: int | None
    candidates: list[Candidate] = field(default_factory=list)
    unpriced_providers: list[str] = field(default_factory=list)

    @property
    def providers(self) -> list[str]:
        return [c.provider for c in self.candidates] + self.unpriced_providers


def parse_price(value: Any) -> Decimal | None:
    """A provider's per-token price; negative, non-finite or placeholder values mean 'unpriced'."""
    if value is None or isinstance(value, bool):
        return None
    try:
        price = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not price.is_finite() or price < 0:
        return None
    return price


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    number = int(value)
    return number if number > 0 else None


def model_row(provider: str, item: dict[str, Any], *, with_prices: bool) -> ModelRow:
    raw_pricing = item.get("pricing")
    pricing: dict[str, Any] = raw_pricing if with_prices and isinstance(raw_pricing, dict) else {}
    raw_top = item.get("top_provider")
    top: dict[str, Any] = raw_top if isinstance(raw_top, dict) else {}
    created = item.get("created")
    return ModelRow(
        provider=provider,
        model_id=item["id"],
        upstream_id=item["id"],
        name=item.get("name") if isinstance(item.get("name"), str) else None,
        owned_by=item.get("owned_by") if isinstance(item.get("owned_by"), str) else None,
        context_length=_int(item.get("context_length")),
        max_output_tokens=_int(top.get("max_completion_tokens")),
        prompt_price=parse_price(pricing.get("prompt")),
        completion_price=parse_price(pricing.get("completion")),
        image_price=parse_price(pricing.get("image")),
        request_price=parse_price(pricing.get("request")),
        created=created if isinstance(created, int) and created >= 0 else 0,
    )


def applicable_override(
    row: ModelRow, overrides: dict[tuple[str, str | None], PriceOverride]
) -> PriceOverride | None:
    """The admin price that governs this row: its provider's own, else the model-wide one."""
    return overrides.get((row.model_id, row.provider)) or overrides.get((row.model_id, None))


def effective_price(
    row: ModelRow, overrides: dict[tuple[str, str | None], PriceOverride], markup: Decimal
) -> Price | None:
    """Admin price for this provider, else for every provider, else the provider's own; None: unpriced."""
    override = applicable_override(row, overrides)
    if override is not None and override.is_free:
        return Price(prompt=ZERO, completion=ZERO, free=True)
    if override is not None and override.prompt_price is not None and override.completion_price is not None:
        prompt, completion = override.prompt_price, override.completion_price
        image, request = override.image_price or ZERO, override.request_price or ZERO
    elif row.prompt_price is not None and row.completion_price is not None:
        prompt, completion = row.prompt_price, row.completion_price
        image, request = row.image_price or ZERO, row.request_price or ZERO
    else:
        return None
    return Price(
        prompt=prompt * markup, completion=completion * markup, image=image * markup, request=request * markup
    )


class Catalog:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: Redis | None,
        clients: dict[str, ProviderClient],
        markup: Decimal,
        clock: Any = time.monotonic,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.clients = clients
        self.markup = markup
        self.clock = clock
        self.models: dict[str, CatalogModel] = {}
        self._fetched_at = -math.inf
        self._loaded_at = -math.inf
        self._lock = asyncio.Lock()
        self._refreshing: asyncio.Task[None] | None = None
        # Bumped by invalidate(): a load that read the database before the bump must not mark
        # the snapshot fresh, or a price change could wait a whole TTL on its own instance.
        self._generation = 0

    async def ready(self) -> dict[str, CatalogModel]:
        """The current snapshot; loads it on first use and refreshes it in the background when stale."""
        now = self.clock()
        if self._loaded_at == -math.inf:
            # First use fetches the provider lists; after an invalidation the database is enough.
            await self.refresh(fetch=None if self._fetched_at == -math.inf else False)
        elif (
            now - self._loaded_at > SNAPSHOT_TTL_SECONDS or now - self._fetched_at > CATALOG_TTL_SECONDS
        ) and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self.refresh())
        return self.models

    async def refresh(self, *, fetch: bool | None = None) -> None:
        async with self._lock:
            if fetch or (fetch is None and self.clock() - self._fetched_at > CATALOG_TTL_SECONDS):
                await self._fetch_providers()
            await self._load_snapshot()

    def invalidate(self) -> None:
        """Rebuild the snapshot from the database on next use (after an admin price change)."""
        self._generation += 1
        self._loaded_at = -math.inf

    async def _fetch_providers(self) -> None:
        results = await asyncio.gather(
            *(self._provider_list(c) for c in self.clients.values()), return_exceptions=True
        )
        async with self.pool.acquire() as conn:
            for client, result in zip(self.clients.values(), results, strict=True):
                if isinstance(result, BaseException):
                    # Keep what the database already has for this provider.
                    logger.warning("model list of %s unavailable: %s", client.name, type(result).__name__)
                    continue
                if not result:
                    # An empty list from a provider that served models is a glitch far more often
                    # than a real change; deactivating everything would take the provider offline.
                    logger.warning("model list of %s is empty; keeping the stored one", client.name)
                    continue
                rows = [
                    model_row(client.name, item, with_prices=client.profile.publishes_prices)
                    for item in result
                ]
                async with conn.transaction():
                    await models_db.replace_provider_models(conn, provider=client.name, rows=rows)
        self._fetched_at = self.clock()

    async def _provider_list(self, client: ProviderClient) -> list[dict[str, Any]]:
        key = REDIS_KEY.format(provider=client.name)
        if self.redis is not None:
            try:
                cached = await self.redis.get(key)
                if cached:
                    data: list[dict[str, Any]] = orjson.loads(cached)
                    return data
            except Exception as exc:  # Redis is a cache here: fetch from the provider instead
                logger.warning("catalog cache unavailable: %s", type(exc).__name__)
        items = await client.list_models()
        if self.redis is not None:
            try:
                await self.redis.set(key, orjson.dumps(items), ex=int(CATALOG_TTL_SECONDS))
            except Exception as exc:
                logger.warning("catalog cache unavailable: %s", type(exc).__name__)
        return items

    async def _load_snapshot(self) -> None:
        generation = self._generation
        async with self.pool.acquire() as conn:
            rows = await models_db.active_models(conn, providers=list(self.clients))
            overrides = {(o.model_id, o.provider): o for o in await models_db.price_overrides(conn)}
        models: dict[str, CatalogModel] = {}
        for row in rows:
            entry = models.get(row.model_id)
            if entry is None:
                entry = models[row.model_id] = CatalogModel(
                    id=row.model_id,
                    name=row.name,
                    owned_by=row.owned_by
                    or (row.model_id.split("/")[0] if "/" in row.model_id else row.provider),
                    created=row.created,
                    context_length=row.context_length,
                )
            price = effective_price(row, overrides, self.markup)
            if price is None:
                entry.unpriced_providers.append(row.provider)
                continue
            entry.candidates.append(
                Candidate(
                    provider=row.provider,
                    model_id=row.model_id,
                    upstream_id=row.upstream_id,
                    price=price,
                    context_length=row.context_length,
                    max_output_tokens=row.max_output_tokens,
                )
            )
            if row.context_length and (
                entry.context_length is None or row.context_length > entry.context_length
            ):
                entry.context_length = row.context_length
        for entry in models.values():
            entry.candidates.sort(key=lambda c: (c.price.prompt + c.price.completion, c.provider))
        self.models = models
        if generation == self._generation:
            self._loaded_at = self.clock()

    async def get(self, model: str) -> CatalogModel:
        entry = (await self.ready()).get(model)
        if entry is None or not entry.candidates:
            raise ModelNotFound(f"The model '{model}' does not exist or is not available.", param="model")
        return entry

    async def resolve(self, model: str, *, provider: str | None = None) -> list[Candidate]:
        """The priced candidates for `model`, cheapest first (only `provider` when pinned)."""
        models = await self.ready()
        entry = models.get(model)
        if entry is None:
            raise ModelNotFound(f"The model '{model}' does not exist or is not available.", param="model")
        candidates = entry.candidates
        if provider is not None:
            candidates = [c for c in candidates if c.provider == provider]
            if not candidates:
                if provider in entry.unpriced_providers:
                    raise ModelNotPriced(f"The model '{model}' has no price on '{provider}'.", param="model")
                raise InvalidRequest(
                    f"The provider '{provider}' does not serve '{model}'.",
                    param="provider",
                    code="provider_not_available",
                )
        if not candidates:
            raise ModelNotPriced(
                f"The model '{model}' has no price configured and cannot be used.", param="model"
            )
        return list(candidates)


def price_view(price: Price) -> dict[str, str]:
    """Per-token prices as exact decimal strings (OpenRouter's convention)."""
    return {
        "prompt": f"{price.prompt.normalize():f}",
        "completion": f"{price.completion.normalize():f}",
        "image": f"{price.image.normalize():f}",
        "request": f"{price.request.normalize():f}",
    }


def model_view(model: CatalogModel) -> dict[str, Any]:
    """A model in OpenAI's list shape, plus what the user pays (cheapest provider) and who serves it."""
    cheapest = model.candidates[0]
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "name": model.name,
        "context_length": model.context_length,
        "pricing": price_view(cheapest.price),
        "providers": [
            {"name": c.provider, "pricing": price_view(c.price), "context_length": c.context_length}
            for c in model.candidates
        ],
    }


def search(models: dict[str, CatalogModel], *, q: str | None, provider: str | None) -> list[CatalogModel]:
    """Usable models whose id or name contains `q` (any case), served by `provider` when given, by id."""
    needle = q.casefold() if q else None
    found = []
    for model in sorted(models.values(), key=lambda m: m.id):
        if not model.candidates:
            continue
        if provider is not None and all(c.provider != provider for c in model.candidates):
            continue
        if needle and needle not in model.id.casefold() and needle not in (model.name or "").casefold():
            continue
        found.append(model)
    return found


@dataclass(frozen=True)
class ProviderInfo:
    name: str
    display_name: str
    enabled: bool
    model_count: int
    site_url: str | None
    logo_url: str | None


# How the named providers present themselves while they are not configured here (a configured
# provider shows its profile's values).
NAMED_PROVIDERS: dict[str, tuple[str, str, str]] = {
    "openrouter": ("OpenRouter", "https://openrouter.ai", "https://openrouter.ai/favicon.ico"),
    "portkey": ("Portkey", "https://portkey.ai", "https://portkey.ai/favicon.ico"),
    "featherless": ("Featherless", "https://featherless.ai", "https://featherless.ai/favicon.ico"),
    "chutes": ("Chutes", "https://chutes.ai", "https://chutes.ai/favicon.ico"),
}


async def provider_overview(catalog: Catalog) -> list[ProviderInfo]:
    """Every named provider, enabled or not, and any other configured one, with its usable model count."""
    models = await catalog.ready()
    counts = Counter(c.provider for m in models.values() for c in m.candidates)
    names = list(PROVIDER_CATALOG) + [name for name in catalog.clients if name not in PROVIDER_CATALOG]
    overview = []
    for name in names:
        client = catalog.clients.get(name)
        if client is not None:
            profile = client.profile
            display, site, logo = profile.display_name, profile.site_url, profile.logo_url
        else:
            display, site, logo = NAMED_PROVIDERS.get(name, (name, "", ""))
        overview.append(
            ProviderInfo(
                name=name,
                display_name=display,
                enabled=client is not None,
                model_count=counts[name],
                site_url=site or None,
                logo_url=logo or None,
            )
        )
    return overview


__all__ = ["Candidate", "Catalog", "CatalogModel", "Price", "ProviderError", "parse_price"]
