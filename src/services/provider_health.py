"""Provider health: cool-downs after an upstream 429, a circuit breaker per provider, recent stats.

- Cool-down: an upstream 429 with Retry-After makes that (provider, model) pair skipped until then,
  capped by PROVIDER_COOLDOWN_MAX_SECONDS, so one model's 429 does not take a whole provider away.
- Breaker: BREAKER_FAILURE_THRESHOLD consecutive failures (connect errors, timeouts, 5xx, refused
  credentials) open it for BREAKER_OPEN_SECONDS; then one request may probe it (half-open); a
  success closes it, a failure opens it again.
- With Redis, every transition is published and applied by every instance (and stored with its
  expiry, for instances that start later), so the hot path reads only process memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from src.cache import Clock
from src.redis_config import Subscriber
from src.services import metrics

logger = logging.getLogger("gatewayz.providers.health")

CHANNEL = "gatewayz:provider-health"
STATS_WINDOW_SECONDS = 300.0
MAX_SAMPLES = 2_000

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class Breaker:
    state: str = CLOSED
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False


@dataclass
class Stats:
    samples: deque[tuple[float, bool, float]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))


class ProviderHealth:
    def __init__(
        self,
        *,
        redis: Redis | None,
        failure_threshold: int,
        open_seconds: float,
        cooldown_cap_seconds: float,
        clock: Clock = time.time,
    ) -> None:
        self.redis = redis
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.cooldown_cap_seconds = cooldown_cap_seconds
        self.clock = clock
        self.breakers: dict[str, Breaker] = {}
        self.cooldowns: dict[tuple[str, str], float] = {}
        self.stats: dict[str, Stats] = {}
        self._subscriber = Subscriber(CHANNEL, self._apply_raw)
        self._sending: set[asyncio.Task[None]] = set()

    # -- decisions (hot path: memory only) -------------------------------------------------

    def breaker(self, provider: str) -> Breaker:
        breaker = self.breakers.get(provider)
        if breaker is None:
            breaker = self.breakers[provider] = Breaker()
        return breaker

    def state_of(self, provider: str) -> str:
        breaker = self.breaker(provider)
        if breaker.state == OPEN and self.clock() >= breaker.open_until:
            return HALF_OPEN
        return breaker.state

    def cooling_until(self, provider: str, model: str) -> float | None:
        until = self.cooldowns.get((provider, model))
        if until is None:
            return None
        if until <= self.clock():
            self.cooldowns.pop((provider, model), None)
            return None
        return until

    def try_acquire(self, provider: str, model: str) -> str | None:
        """None when a request may go to this provider and model now, else why not."""
        if self.cooling_until(provider, model) is not None:
            return "cooling_down"
        breaker = self.breaker(provider)
        state = self.state_of(provider)
        if state == OPEN:
            return "circuit_open"
        if state == HALF_OPEN:
            if breaker.probing:
                return "circuit_open"
            # This request is the probe; the others keep skipping the provider until it reports.
            breaker.probing = True
            breaker.state = HALF_OPEN
        return None

    # -- outcomes ---------------------------------------------------------------------------

    def record_success(self, provider: str, latency: float) -> None:
        self._sample(provider, ok=True, latency=latency)
        metrics.UPSTREAM_LATENCY.labels(provider, "success").observe(latency)
        breaker = self.breaker(provider)
        was = breaker.state
        breaker.failures = 0
        breaker.probing = False
        if was != CLOSED:
            breaker.state = CLOSED
            logger.warning("provider %s recovered: circuit closed", provider)
            self._publish({"kind": "breaker", "provider": provider, "state": CLOSED, "until": 0})

    def record_failure(self, provider: str, latency: float) -> None:
        self._sample(provider, ok=False, latency=latency)
        metrics.UPSTREAM_LATENCY.labels(provider, "failure").observe(latency)
        metrics.UPSTREAM_ERRORS.labels(provider, "failure").inc()
        breaker = self.breaker(provider)
        breaker.failures += 1
        if breaker.state == HALF_OPEN or breaker.failures >= self.failure_threshold:
            self._open(provider, self.clock() + self.open_seconds)

    def record_rate_limited(
        self, provider: str, model: str, retry_after: float | None, latency: float
    ) -> float:
        """Cool this provider and model down; returns the cool-down in seconds."""
        self._sample(provider, ok=False, latency=latency)
        metrics.UPSTREAM_LATENCY.labels(provider, "rate_limited").observe(latency)
        metrics.UPSTREAM_ERRORS.labels(provider, "rate_limited").inc()
        breaker = self.breaker(provider)
        breaker.probing = False
        seconds = min(retry_after if retry_after is not None else 1.0, self.cooldown_cap_seconds)
        until = self.clock() + max(seconds, 0.0)
        self.cooldowns[(provider, model)] = until
        self._publish({"kind": "cooldown", "provider": provider, "model": model, "until": until})
        return seconds

    def release_probe(self, provider: str) -> None:
        """A probe that ended without a verdict (client went away) lets another request probe."""
        self.breaker(provider).probing = False

    def _open(self, provider: str, until: float) -> None:
        breaker = self.breaker(provider)
        if breaker.state != OPEN:
            logger.error("provider %s failing: circuit open for %.0f s", provider, until - self.clock())
        breaker.state = OPEN
        breaker.open_until = until
        breaker.probing = False
        self._publish({"kind": "breaker", "provider": provider, "state": OPEN, "until": until})

    def _sample(self, provider: str, *, ok: bool, latency: float) -> None:
        stats = self.stats.get(provider)
        if stats is None:
            stats = self.stats[provider] = Stats()
        stats.samples.append((self.clock(), ok, latency))

    # -- reporting --------------------------------------------------------------------------

    def report(self, provider: str) -> dict[str, Any]:
        now = self.clock()
        stats = self.stats.get(provider)
        recent = [s for s in stats.samples if now - s[0] <= STATS_WINDOW_SECONDS] if stats else []
        latencies = sorted(s[2] for s in recent if s[1])
        breaker = self.breaker(provider)
        return {
            "state": self.state_of(provider),
            "consecutive_failures": breaker.failures,
            "requests_5m": len(recent),
            "error_rate_5m": round(sum(1 for s in recent if not s[1]) / len(recent), 4) if recent else 0.0,
            "latency_p50_ms": round(latencies[len(latencies) // 2] * 1000, 1) if latencies else None,
            "cooling_models": sorted(
                m for (p, m), until in self.cooldowns.items() if p == provider and until > now
            ),
        }

    # -- sharing across instances ------------------------------------------------------------

    def _publish(self, message: dict[str, Any]) -> None:
        if self.redis is None:
            return
        redis = self.redis
        payload = orjson.dumps(message)

        async def send() -> None:
            try:
                await redis.publish(CHANNEL, payload)
            except Exception as exc:  # shared health is best effort; each instance still learns alone
                logger.warning("could not publish provider health: %s", type(exc).__name__)

        with contextlib.suppress(RuntimeError):
            task = asyncio.get_running_loop().create_task(send())
            # The loop keeps only weak references to tasks: hold this one until it is done.
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    def apply(self, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        provider = str(message.get("provider", ""))
        until = float(message.get("until", 0))
        if kind == "cooldown":
            model = str(message.get("model", ""))
            if until > self.cooldowns.get((provider, model), 0):
                self.cooldowns[(provider, model)] = until
        elif kind == "breaker":
            breaker = self.breaker(provider)
            if message.get("state") == OPEN:
                breaker.state, breaker.open_until, breaker.probing = OPEN, until, False
            else:
                breaker.state, breaker.failures, breaker.probing = CLOSED, 0, False

    def _apply_raw(self, data: bytes) -> None:
        with contextlib.suppress(ValueError, TypeError):
            self.apply(orjson.loads(data))

    def start_listener(self, redis: Redis) -> None:
        self._subscriber.start(redis)

    async def stop_listener(self) -> None:
        await self._subscriber.stop()
