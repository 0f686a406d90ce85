"""What operators watch: the /metrics exposition (and the admin monitor's figures)."""

from __future__ import annotations

from src.db import monitor as monitor_db
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
