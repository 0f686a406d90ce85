"""The model catalog: GET /v1/models (OpenAI's shape, plus prices and providers), and /catalog for
the website: public browsing of models and providers, and a cost estimate for signed-in callers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from src.deps import State
from src.schemas.catalog import (
    CatalogProvider,
    CatalogProviderList,
    CostEstimate,
    EstimateCandidate,
    ModelEntry,
    ModelPricing,
)
from src.schemas.chat import ChatCompletionRequest
from src.schemas.common import Page, Paging
from src.schemas.openapi import json_body
from src.security.deps import CurrentUser, LimitedPrincipal
from src.services import catalog as catalog_service
from src.services import chat as chat_service

router = APIRouter()

ModelId = Annotated[str, Path(description="A model id, e.g. openai/gpt-4o-mini.", max_length=256)]


@router.get("/v1/models", tags=["models"])
async def list_models(principal: LimitedPrincipal, state: State) -> dict[str, Any]:
    """Every usable model, with the per-token price the caller pays and the providers serving it."""
    models = await state.catalog.ready()
    return {
        "object": "list",
        "data": [catalog_service.model_view(m) for m in models.values() if m.candidates],
    }


@router.get("/v1/models/{model_id:path}", tags=["models"], responses={404: {"description": "Unknown model."}})
async def get_model(model_id: ModelId, principal: LimitedPrincipal, state: State) -> dict[str, Any]:
    """One model."""
    return catalog_service.model_view(await state.catalog.get(model_id))


@router.get(
    "/catalog/models", tags=["catalog"], responses={400: {"description": "An invalid query parameter."}}
)
async def browse_models(
    state: State,
    paging: Paging,
    q: Annotated[
        str | None, Query(max_length=200, description="Part of a model's id or name, any case.")
    ] = None,
    provider: Annotated[
        str | None, Query(max_length=64, description="Only models this provider serves.")
    ] = None,
) -> Page[ModelEntry]:
    """Public (no key): search the usable models, with what they cost; only public model data is shown."""
    found = catalog_service.search(await state.catalog.ready(), q=q, provider=provider)
    page = found[paging.offset : paging.offset + paging.limit]
    return Page[ModelEntry](
        data=[ModelEntry.model_validate(catalog_service.model_view(m)) for m in page],
        total=len(found),
        limit=paging.limit,
        offset=paging.offset,
    )


@router.get("/catalog/providers", tags=["catalog"])
async def list_providers(state: State) -> CatalogProviderList:
    """Public (no key): every provider the gateway knows, whether it is enabled, and its model count."""
    overview = await catalog_service.provider_overview(state.catalog)
    return CatalogProviderList(
        data=[CatalogProvider.model_validate(info, from_attributes=True) for info in overview]
    )


@router.post(
    "/catalog/estimate",
    tags=["catalog"],
    openapi_extra=json_body(ChatCompletionRequest),
    responses={
        400: {"description": "Invalid request (as for /v1/chat/completions); `param` names the field."},
        401: {"description": "Invalid or missing API key."},
        404: {"description": "Unknown model."},
    },
)
async def estimate_cost(request: Request, principal: CurrentUser, state: State) -> CostEstimate:
    """What a chat completion body would hold and likely cost; no provider is called, nothing is held."""
    result = await chat_service.estimate_cost(state, await request.body())
    prepared = result.prepared
    return CostEstimate(
        model=prepared.request.model,
        prompt_tokens=prepared.prompt_tokens,
        max_output_tokens=prepared.output_allowance,
        worst_case_cost=format(prepared.hold_amount, "f"),
        likely_cost=format(result.likely_cost, "f"),
        candidates=[
            EstimateCandidate(
                provider=c.provider, pricing=ModelPricing(**catalog_service.price_view(c.price))
            )
            for c in prepared.candidates
        ],
    )
