"""POST /v1/responses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from src.deps import State
from src.routes.streaming import SettledStream
from src.schemas.openapi import json_body
from src.schemas.responses import ResponsesRequest
from src.security.deps import RateLimitedUser
from src.services import chat as chat_service
from src.services import responses as responses_service

router = APIRouter(tags=["inference"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request, or a stored-state field such as previous_response_id."},
    401: {"description": "Invalid or missing API key."},
    402: {"description": "Not enough credits for the worst-case cost of this request."},
    404: {"description": "Unknown model."},
    429: {"description": "Rate limited (here or upstream); see Retry-After."},
    502: {"description": "The upstream provider failed."},
    503: {"description": "No provider is available."},
    504: {"description": "The upstream provider timed out."},
}


@router.post("/v1/responses", responses=ERRORS, openapi_extra=json_body(ResponsesRequest))
async def create_response(request: Request, limited: RateLimitedUser, state: State) -> Response:
    """Create a model response (plain JSON, or the Responses event stream with `stream: true`)."""
    result = await responses_service.create(
        state, limited, await request.body(), client_request_id=request.state.request_id
    )
    if isinstance(result, chat_service.StreamStart):
        return SettledStream(result)
    return Response(result.body, media_type="application/json", headers=result.headers)
