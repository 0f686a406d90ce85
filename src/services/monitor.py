"""What operators watch: the /metrics exposition (and the admin monitor's figures)."""

from __future__ import annotations

import time
from typing import Any

from src.config import VERSION
from src.db import monitor as monitor_db
from src.services import health as health_service
from src.services import metrics
from src.services.provider_health import CLOSED, HALF_OPEN, OPEN
from src.state import AppState

BREAKER_VALUES = {CLOSED: 0.0, HALF_OPEN: 1.0, OPEN: 2.0}


async def metrics_exposition(state: AppState) -> tuple[bytes, str]:
    """Prometheus text: the counters, plus gauges read now from the database and this process."""
    async with state.pool.acquire() as conn:
        holds = await monitor_db.open_holds(conn)
        outbox = await monitor_db.outbox_depth(conn)
    breakers = {name: BREAKER_VALUES[state.health.state_of(name)] for name in sorted(state.providers)}
    snapshot: dict[str, tuple[str, float | dict[str, float]]] = {
        "gatewayz_open_holds": ("Credit holds of requests in flight.", float(holds)),
        "gatewayz_notification_outbox_depth": ("E-mails queued and not yet delivered.", float(outbox)),
        "gatewayz_provider_breaker_state": (
            "Circuit state per provider: 0 closed, 1 half-open (probing), 2 open.",
            breakers,
        ),
    }
    return metrics.render(snapshot), metrics.CONTENT_TYPE_LATEST


WINDOWS = {"5m": 300, "1h": 3600, "24h": 86400}
TOP_TODAY = 10


def _ms(value: float | None) -> float | None:
    return round(float(value), 1) if value is not None else None


async def monitor(state: AppState) -> dict[str, Any]:
    """Everything an operator checks first, in one answer (figures of inference requests)."""
    readiness = await health_service.readiness(state)
    windows: dict[str, dict[str, Any]] = {}
    async with state.pool.acquire() as conn:
        for name, seconds in WINDOWS.items():
            row = await monitor_db.request_window(conn, seconds=seconds)
            requests = int(row["requests"])
            windows[name] = {
                "requests": requests,
                "requests_per_minute": round(requests / (seconds / 60), 2),
                "error_rate": round(int(row["errors"]) / requests, 4) if requests else 0.0,
                "latency_ms": {"p50": _ms(row["p50"]), "p95": _ms(row["p95"]), "p99": _ms(row["p99"])},
            }
        spent = await monitor_db.spent_today(conn)
        holds = await monitor_db.open_holds(conn)
        users = await monitor_db.top_users_today(conn, limit=TOP_TODAY)
        models = await monitor_db.top_models_today(conn, limit=TOP_TODAY)
    pool = state.pool
    return {
        "version": VERSION,
        "uptime_seconds": round(time.time() - state.started_at, 1),
        "database": {
            "status": "ok" if readiness.database else "unavailable",
            "pool_size": pool.get_size(),
            "pool_idle": pool.get_idle_size(),
            "pool_in_use": pool.get_size() - pool.get_idle_size(),
            "pool_max": pool.get_max_size(),
        },
        "redis": readiness.as_dict()["redis"],
        "providers": health_service.providers_report(state),
        "requests": windows,
        "credits_spent_today": spent,
        "open_holds": holds,
        "top_users_today": [dict(row) for row in users],
        "top_models_today": [dict(row) for row in models],
    }
