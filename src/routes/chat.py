"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from src.deps import State
from src.routes.streaming import SettledStream
from src.schemas.chat import ChatCompletionRequest
from src.schemas.openapi import json_body
from src.security.deps import RateLimitedUser
from src.services import chat as chat_service

router = APIRouter(tags=["inference"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (OpenAI error body, `param` names the field)."},
    401: {"description": "Invalid or missing API key."},
    402: {"description": "Not enough credits for the worst-case cost of this request."},
    404: {"description": "Unknown model, or a chat session that is not yours."},
    429: {"description": "Rate limited (here or upstream); see Retry-After."},
    502: {"description": "The upstream provider failed."},
    503: {"description": "No provider is available."},
    504: {"description": "The upstream provider timed out."},
}


@router.post(
    "/v1/chat/completions",
    responses=ERRORS,
    openapi_extra=json_body(ChatCompletionRequest),
)
async def create_chat_completion(
    request: Request,
    limited: RateLimitedUser,
    state: State,
    # No constraints here: a query that failed validation after the rate limiter admitted the
    # request would keep its concurrency slot. The service answers a bad id with 404.
    session_id: Annotated[
        str | None, Query(description="A chat session of yours whose history to include (or in the body).")
    ] = None,
) -> Response:
    """Create a chat completion (plain JSON, or server-sent events with `stream: true`)."""
    result = await chat_service.create(
        state,
        limited,
        await request.body(),
        client_request_id=request.state.request_id,
        session_id=session_id,
    )
    if isinstance(result, chat_service.StreamStart):
        return SettledStream(result)
    return Response(result.body, media_type="application/json", headers=result.headers)
