"""Routes: admin prices per model (and per provider), audited.

Like every /admin route: the operator's ADMIN_API_KEY or a key whose owner's role grants the
permission, decided before the body is validated (see src/routes/admin.py for why this order holds).
A price applies on the instance that took it at once, and on every other instance within
SNAPSHOT_TTL_SECONDS (30 s), when their catalog snapshots reload from the database.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from src.deps import Pool, State
from src.schemas.catalog import (
    EffectivePrice,
    ModelPricing,
    OverrideOut,
    PriceUpdated,
    PricingList,
    ProviderPrice,
    SetPrice,
)
from src.schemas.common import Paging
from src.security.deps import Principal, authenticate, request_meta, require_permission
from src.services import catalog as catalog_service
from src.services import pricing as pricing_service
from src.services.pricing import PriceOverride, ProviderPricing

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authenticate)])

PricingWriter = Annotated[Principal, Depends(require_permission("pricing.write"))]
PricingReader = Annotated[Principal, Depends(require_permission("pricing.read"))]

DENIED: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid credentials."},
    403: {"description": "The caller's role lacks the permission, or the key's scopes exclude /admin."},
}


def _override(override: PriceOverride) -> OverrideOut:
    return OverrideOut(
        model=override.model_id,
        provider=override.provider,
        prompt=override.prompt_price,
        completion=override.completion_price,
        image=override.image_price,
        request=override.request_price,
        free=override.is_free,
        updated_by=override.updated_by,
        updated_at=override.updated_at,
    )


def _effective(item: ProviderPricing) -> EffectivePrice:
    row = item.row
    return EffectivePrice(
        provider=row.provider,
        provider_price=ProviderPrice(
            prompt=row.prompt_price,
            completion=row.completion_price,
            image=row.image_price,
            request=row.request_price,
        ),
        override=_override(item.override) if item.override is not None else None,
        effective=ModelPricing(**catalog_service.price_view(item.effective)) if item.effective else None,
    )


@router.put(
    "/pricing",
    responses={
        **DENIED,
        400: {"description": "An invalid price (negative, not finite, missing); `param` names it."},
        404: {"description": "No configured provider lists the model."},
    },
)
async def set_price(
    actor: PricingWriter, body: SetPrice, pool: Pool, state: State, request: Request
) -> PriceUpdated:
    """Set a model's price per token (one provider, or every provider), or make it free; audited."""
    override, pricing = await pricing_service.set_price(
        pool,
        state.catalog,
        model_id=body.model,
        provider=body.provider,
        prompt=body.prompt,
        completion=body.completion,
        image=body.image,
        request=body.request,
        free=body.free,
        actor=actor,
        meta=request_meta(request, state),
    )
    return PriceUpdated(
        override=_override(override),
        effective=[_effective(item) for item in pricing],
        propagation_seconds=catalog_service.SNAPSHOT_TTL_SECONDS,
    )


@router.get("/pricing", responses={**DENIED, 400: {"description": "An invalid query parameter."}})
async def list_prices(
    actor: PricingReader,
    pool: Pool,
    state: State,
    paging: Paging,
    model: Annotated[
        str | None, Query(max_length=256, description="One model: also its price on each provider.")
    ] = None,
) -> PricingList:
    """The admin prices, and with ?model= that model's provider price, override and effective price."""
    result = await pricing_service.list_prices(
        pool, state.catalog, model_id=model, limit=paging.limit, offset=paging.offset
    )
    return PricingList(
        data=[_override(override) for override in result.overrides],
        total=result.total,
        limit=paging.limit,
        offset=paging.offset,
        markup=format(state.catalog.markup, "f"),
        model=model,
        effective=[_effective(item) for item in result.pricing] if result.pricing is not None else None,
    )
