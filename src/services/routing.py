"""Failover across a model's candidates, before anything has reached the client.

Candidates arrive cheapest first (or the pinned provider first). Each is tried at most once, skipped
while cooling down after a 429 or while its provider's circuit is open; connect errors, timeouts,
429 and 5xx move on to the next; any other refusal (a 400, a malformed reply) ends the request. The
whole request has one deadline. When every candidate fails, the client gets 429 with the smallest
Retry-After if every candidate answered 429 or is cooling down after one, else 502/503/504.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from src.errors import (
    GatewayError,
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from src.services.catalog import Candidate
from src.services.provider_health import ProviderHealth
from src.services.providers import ProviderError, ProviderRateLimited, ProviderTimeout

T = TypeVar("T")


@dataclass(frozen=True)
class Routed:
    candidate: Candidate
    attempts: int


def gateway_error(error: ProviderError) -> GatewayError:
    """The client-facing error for an upstream failure: no provider hostname or key in it."""
    if isinstance(error, ProviderRateLimited):
        retry = max(1, math.ceil(error.retry_after)) if error.retry_after is not None else 1
        return RateLimited(
            "The upstream provider is rate limiting requests; retry later.",
            code="upstream_rate_limited",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(error, ProviderTimeout):
        return UpstreamTimeout(error.message)
    if error.status_code == 400:
        return InvalidRequest(error.message, code="upstream_bad_request")
    return UpstreamError(error.message, code=error.code)


def exhausted(errors: list[ProviderError], cooling: list[float], circuit_open: int) -> GatewayError:
    """Every candidate failed or was skipped."""
    rate_limited = [e for e in errors if isinstance(e, ProviderRateLimited)]
    if (rate_limited or cooling) and len(rate_limited) == len(errors) and not circuit_open:
        waits = [e.retry_after if e.retry_after is not None else 1.0 for e in rate_limited] + cooling
        return RateLimited(
            "Every provider of this model is rate limiting requests; retry later.",
            code="upstream_rate_limited",
            headers={"Retry-After": str(max(1, math.ceil(min(waits))))},
        )
    if errors:
        return gateway_error(errors[-1])
    return ServiceUnavailable(
        "No provider is available for this model right now.", code="no_provider_available"
    )


async def first_success(
    health: ProviderHealth,
    candidates: list[Candidate],
    call: Callable[[Candidate], Awaitable[T]],
    *,
    deadline: float,
) -> tuple[Candidate, T]:
    """The first candidate whose `call` succeeds, with its result; raises the client-facing error."""
    loop = asyncio.get_running_loop()
    errors: list[ProviderError] = []
    cooling: list[float] = []
    circuit_open = 0
    for candidate in candidates:
        refusal = health.try_acquire(candidate.provider, candidate.upstream_id)
        if refusal == "cooling_down":
            until = health.cooling_until(candidate.provider, candidate.upstream_id)
            cooling.append(max((until or 0) - health.clock(), 1.0))
            continue
        if refusal is not None:
            circuit_open += 1
            continue
        started = loop.time()
        try:
            async with asyncio.timeout_at(deadline):
                result = await call(candidate)
        except TimeoutError:
            error: ProviderError = ProviderTimeout(candidate.provider, "The upstream provider timed out.")
        except ProviderError as caught:
            error = caught
        except BaseException:
            health.release_probe(candidate.provider)
            raise
        else:
            health.record_success(candidate.provider, loop.time() - started)
            return candidate, result
        elapsed = loop.time() - started
        if isinstance(error, ProviderRateLimited):
            health.record_rate_limited(candidate.provider, candidate.upstream_id, error.retry_after, elapsed)
        elif error.retryable:
            health.record_failure(candidate.provider, elapsed)
        else:
            # The provider answered (a 400): healthy, but the request itself is refused.
            health.record_success(candidate.provider, elapsed)
        errors.append(error)
        if not error.retryable or loop.time() >= deadline:
            break
    raise exhausted(errors, cooling, circuit_open)
