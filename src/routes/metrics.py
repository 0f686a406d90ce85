"""Route: /metrics in Prometheus' text format, for admin credentials or METRICS_TOKEN.

The scraper may send `Authorization: Bearer <METRICS_TOKEN>`; anyone else needs an admin key (or a
role with `metrics.read`) like every /admin route.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from src.deps import State
from src.security.deps import authenticate, require_permission
from src.services import monitor

router = APIRouter(tags=["admin"])

_metrics_permission = require_permission("metrics.read")


async def metrics_access(request: Request, state: State) -> None:
    token = state.settings.metrics_token
    header = request.headers.get("authorization", "")
    if token is not None and header[:7].lower() == "bearer ":
        expected = token.get_secret_value().encode()
        if hmac.compare_digest(header[7:].strip().encode(), expected):
            return
    principal = await authenticate(request, state)
    await _metrics_permission(principal, state)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format."},
        401: {"description": "Missing or invalid credentials."},
        403: {"description": "The caller is not an admin."},
    },
)
async def get_metrics(_: Annotated[None, Depends(metrics_access)], state: State) -> Response:
    """Counters of every worker, and gauges read now (open holds, outbox depth, breaker states)."""
    body, content_type = await monitor.metrics_exposition(state)
    return Response(content=body, media_type=content_type)
