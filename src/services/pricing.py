"""Admin prices: set a model's price (audited, in one transaction) and show what each provider charges.

A price set here applies on this instance at once (its catalog snapshot is invalidated) and on
every other instance within catalog.SNAPSHOT_TTL_SECONDS, when their snapshots reload from the
database. Admin prices are per token before the markup, like the providers' own quotes.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from src.db import models as models_db
from src.db.models import ModelRow, PriceOverride
from src.errors import InvalidRequest, ModelNotFound
from src.security.deps import Principal, RequestMeta
from src.services import audit
from src.services.catalog import Catalog, Price, applicable_override, effective_price


@dataclass(frozen=True)
class ProviderPricing:
    """One provider of a model: its own quote, the admin price that applies, and what users pay."""

    row: ModelRow
    override: PriceOverride | None
    effective: Price | None


@dataclass(frozen=True)
class PriceList:
    overrides: list[PriceOverride]
    total: int
    pricing: list[ProviderPricing] | None


def _price(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")


def _audit_view(override: PriceOverride | None) -> dict[str, Any] | None:
    if override is None:
        return None
    return {
        "model": override.model_id,
        "provider": override.provider,
        "prompt": _price(override.prompt_price),
        "completion": _price(override.completion_price),
        "image": _price(override.image_price),
        "request": _price(override.request_price),
        "free": override.is_free,
        "updated_by": override.updated_by,
    }


async def provider_pricing(
    conn: asyncpg.Connection, catalog: Catalog, *, model_id: str
) -> list[ProviderPricing]:
    """Every configured provider that lists `model_id`, read fresh from the database."""
    rows = await models_db.active_model_rows(conn, model_id=model_id, providers=list(catalog.clients))
    overrides = {
        (o.model_id, o.provider): o for o in await models_db.overrides_for_model(conn, model_id=model_id)
    }
    return [
        ProviderPricing(
            row=row,
            override=applicable_override(row, overrides),
            effective=effective_price(row, overrides, catalog.markup),
        )
        for row in rows
    ]


async def set_price(
    pool: asyncpg.Pool,
    catalog: Catalog,
    *,
    model_id: str,
    provider: str | None,
    prompt: Decimal | None,
    completion: Decimal | None,
    image: Decimal | None,
    request: Decimal | None,
    free: bool,
    actor: Principal,
    meta: RequestMeta,
) -> tuple[PriceOverride, list[ProviderPricing]]:
    """Set the admin price of a model (on one provider, or on all), audited with before and after."""
    if not free and (prompt is None or completion is None):
        missing = "prompt" if prompt is None else "completion"
        raise InvalidRequest(
            f"'{missing}' is required unless 'free' is true.", param=missing, code="missing_price"
        )
    # Known models only, so a typo cannot create a price nobody uses. The snapshot lists unpriced
    # providers too, which are exactly the ones that need an admin price.
    entry = (await catalog.ready()).get(model_id)
    if entry is None:
        raise ModelNotFound(f"No configured provider lists the model '{model_id}'.", param="model")
    if provider is not None and provider not in entry.providers:
        raise InvalidRequest(
            f"The provider '{provider}' does not serve '{model_id}'.",
            param="provider",
            code="provider_not_available",
        )
    async with pool.acquire() as conn:
        async with conn.transaction():
            before = await models_db.get_override(conn, model_id=model_id, provider=provider, for_update=True)
            after = await models_db.upsert_override(
                conn,
                model_id=model_id,
                provider=provider,
                prompt_price=prompt,
                completion_price=completion,
                image_price=image,
                request_price=request,
                is_free=free,
                updated_by=actor.actor,
            )
            await audit.record(
                conn,
                action="pricing.update",
                actor=actor,
                meta=meta,
                subject_type="model",
                subject_id=model_id,
                before=_audit_view(before),
                after=_audit_view(after),
            )
        catalog.invalidate()
        pricing = await provider_pricing(conn, catalog, model_id=model_id)
    return after, pricing


async def list_prices(
    pool: asyncpg.Pool, catalog: Catalog, *, model_id: str | None, limit: int, offset: int
) -> PriceList:
    """The admin prices (of one model when given), and then that model's price on each provider."""
    # The first use of the catalog fills the models table; without it a fresh instance shows nothing.
    await catalog.ready()
    async with pool.acquire() as conn:
        overrides = await models_db.list_overrides(conn, model_id=model_id, limit=limit, offset=offset)
        total = await models_db.count_overrides(conn, model_id=model_id)
        pricing = await provider_pricing(conn, catalog, model_id=model_id) if model_id is not None else None
    return PriceList(overrides=overrides, total=total, pricing=pricing)


__all__ = ["PriceList", "PriceOverride", "ProviderPricing", "list_prices", "provider_pricing", "set_price"]
