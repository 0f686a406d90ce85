"""Public service routes: the root, liveness, readiness and ping."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import Response

from src.config import VERSION
from src.deps import Conn, State
from src.errors import error_body
from src.services import health as health_service

router = APIRouter(tags=["service"])


class RootInfo(BaseModel):
    name: str
    version: str
    docs: str
    openapi: str
    health: str


class Liveness(BaseModel):
    status: str


class PingResult(BaseModel):
    message: str
    total_pings: int
    last_ping_at: datetime


@router.get("/")
async def root() -> RootInfo:
    """The service's name, version and where its documentation lives."""
    return RootInfo(
        name="Gatewayz Universal Inference API",
        version=VERSION,
        docs="/docs",
        openapi="/openapi.json",
        health="/health",
    )


@router.get("/health")
async def health() -> Liveness:
    """Liveness: 200 while the process serves, whatever its dependencies do."""
    return Liveness(status="ok")


@router.get("/health/ready", responses={503: {"description": "The database is unreachable."}})
async def ready(state: State) -> Response:
    """Readiness: the database and Redis answer."""
    checks = await health_service.readiness(state)
    body: dict[str, Any] = {
        "status": "ready" if checks.ready else "not_ready",
        "checks": checks.as_dict(),
    }
    if checks.ready:
        return Response(orjson.dumps(body), media_type="application/json")
    body.update(error_body("The database is unreachable.", "api_error", code="not_ready"))
    return Response(orjson.dumps(body), status_code=503, media_type="application/json")


@router.get("/health/providers")
async def providers(state: State) -> dict[str, Any]:
    """Each configured provider's circuit state, recent error rate and latency (no secrets)."""
    return {"object": "list", "data": health_service.providers_report(state)}


@router.get("/ping")
async def ping(conn: Conn) -> PingResult:
    """Pong, with the number of pings so far (kept in PostgreSQL)."""
    stats = await health_service.ping(conn)
    return PingResult(message="pong", total_pings=stats.total_pings, last_ping_at=stats.last_ping_at)
