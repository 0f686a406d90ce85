"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from src.deps import State
from src.schemas.chat import ChatCompletionRequest
from src.schemas.openapi import json_body
from src.security.deps import RateLimitedUser
from src.services import chat as chat_service

router = APIRouter(tags=["inference"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (OpenAI error body, `param` names the field)."},
    401: {"description": "Invalid or missing API key."},
    402: {"description": "Not enough credits for the worst-case cost of this request."},
    404: {"description": "Unknown model."},
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
async def create_chat_completion(request: Request, limited: RateLimitedUser, state: State) -> Response:
    """Create a chat completion (plain JSON, or server-sent events with `stream: true`)."""
    result = await chat_service.create(
        state, limited, await request.body(), client_request_id=request.state.request_id
    )
    if isinstance(result, chat_service.StreamStart):
        return StreamingResponse(
            result.chunks,
            media_type="text/event-stream",
            headers={
                "X-Gateway-Provider": result.provider,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )
    return Response(result.body, media_type="application/json", headers=result.headers)
