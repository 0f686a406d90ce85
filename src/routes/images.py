"""POST /v1/images/generations."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from src.deps import State
from src.schemas.images import ImageGenerationRequest
from src.schemas.openapi import json_body
from src.security.deps import RateLimitedUser
from src.services import images as images_service

router = APIRouter(tags=["inference"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request, or a model without a per-image price (`param` names the field)."},
    401: {"description": "Invalid or missing API key."},
    402: {"description": "Not enough credits for n images at the model's price."},
    404: {"description": "Unknown model."},
    429: {"description": "Rate limited (here or upstream); see Retry-After."},
    502: {"description": "The upstream provider failed, or the images could not be stored."},
    503: {"description": "No provider is available."},
    504: {"description": "The upstream provider timed out."},
}


@router.post(
    "/v1/images/generations",
    responses=ERRORS,
    openapi_extra=json_body(ImageGenerationRequest),
)
async def create_image(request: Request, limited: RateLimitedUser, state: State) -> Response:
    """Generate images from a prompt (OpenAI's ImagesResponse: URLs or base64, plus the cost)."""
    result = await images_service.create(
        state, limited, await request.body(), client_request_id=request.state.request_id
    )
    return Response(result.body, media_type="application/json", headers=result.headers)
