"""The model list: GET /v1/models (OpenAI's shape, plus prices and providers)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from src.deps import State
from src.security.deps import CurrentUser
from src.services import catalog as catalog_service

router = APIRouter(tags=["models"])

ModelId = Annotated[str, Path(description="A model id, e.g. openai/gpt-4o-mini.", max_length=256)]


@router.get("/v1/models")
async def list_models(principal: CurrentUser, state: State) -> dict[str, Any]:
    """Every usable model, with the per-token price the caller pays and the providers serving it."""
    models = await state.catalog.ready()
    return {
        "object": "list",
        "data": [catalog_service.model_view(m) for m in models.values() if m.candidates],
    }


@router.get("/v1/models/{model_id:path}", responses={404: {"description": "Unknown model."}})
async def get_model(model_id: ModelId, principal: CurrentUser, state: State) -> dict[str, Any]:
    """One model."""
    return catalog_service.model_view(await state.catalog.get(model_id))
