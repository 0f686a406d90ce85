"""The limiter itself, on both backends: exact counts, sliding windows, tokens, leases, fallback."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from src.errors import RateLimited
from src.services.limits import Limits
from src.services.rate_limit import RateLimiter, Subject
from tests.fakes.tcp_proxy import TcpProxy

BIG = 1_000_000


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limits(**values: int) -> Limits:
    base = {"rpm_limit": BIG, "rpd_limit": BIG, "tpm_limit": BIG, "tpd_limit": BIG, "concurrency_limit": BIG}
    base.update(values)
    return Limits(**base)


def subject(kind: str = "k", **values: int) -> Subject:
    return Subject(kind=kind, id=uuid.uuid4().hex, limits=limits(**values))


@pytest.fixture(params=["memory", "redis"])
async def limiter_factory(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    clients: list[Redis] = []

    def make(clock: Clock, **options: object) -> RateLimiter:
        redis = None
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")
            redis = Redis.from_url(url)
            clients.append(redis)
        return RateLimiter(
            redis=redis,
            divisor=int(options.pop("divisor", 1)),  # type: ignore[call-overload]
            lease_seconds=float(options.pop("lease_seconds", 600)),  # type: ignore[arg-type]
            clock=clock,
            prefix=f"test:{uuid.uuid4().hex}",
            **options,  # type: ignore[arg-type]
        )

    yield make
    for client in clients:
        await client.aclose()


async def admit_ok(limiter: RateLimiter, *subjects: Subject) -> bool:
    try:
        await limiter.admit(tuple(subjects))
    except RateLimited:
        return False
    return True


class TestRequests:
    async def test_exactly_n_of_3n_concurrent(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        limiter = limiter_factory(Clock())
        key = subject(rpm_limit=10)
        results = await asyncio.gather(*(admit_ok(limiter, key) for _ in range(30)))
        assert sum(results) == 10

    async def test_user_limit_applies_across_keys(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        limiter = limiter_factory(Clock())
        user = subject("u", rpm_limit=5)
        keys = [subject(rpm_limit=100) for _ in range(3)]
        results = [await admit_ok(limiter, keys[i % 3], user) for i in range(12)]
        assert sum(results) == 5

    async def test_sliding_window_has_no_boundary_burst(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        clock = Clock(1_800_000_000.0 - 0.5)  # half a second before a minute boundary
        limiter = limiter_factory(clock)
        key = subject(rpm_limit=10)
        assert sum([await admit_ok(limiter, key) for _ in range(10)]) == 10
        clock.now += 1.0  # half a second into the next minute
        assert sum([await admit_ok(limiter, key) for _ in range(10)]) <= 1
        clock.now += 60.0  # a full window later, the old requests no longer count
        assert sum([await admit_ok(limiter, key) for _ in range(10)]) == 10

    async def test_refusal_consumes_nothing_and_says_which_limit(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        limiter = limiter_factory(Clock())
        key = subject(rpm_limit=2)
        await limiter.admit((key,))
        await limiter.admit((key,))
        for _ in range(5):
            with pytest.raises(RateLimited) as refused:
                await limiter.admit((key,))
        assert refused.value.param == "rpm"
        assert int(refused.value.headers["Retry-After"]) >= 1
        assert refused.value.headers["X-RateLimit-Remaining-Requests"] == "0"
        assert (await limiter.usage(key))["rpm"] == 2

    async def test_daily_limit(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        clock = Clock()
        limiter = limiter_factory(clock)
        key = subject(rpd_limit=3)
        for _ in range(3):
            assert await admit_ok(limiter, key)
            clock.now += 61
        with pytest.raises(RateLimited) as refused:
            await limiter.admit((key,))
        assert refused.value.param == "rpd"

    async def test_headers_count_down(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        limiter = limiter_factory(Clock())
        key = subject(rpm_limit=5)
        first = await limiter.admit((key,))
        second = await limiter.admit((key,))
        assert first.headers["X-RateLimit-Limit-Requests"] == "5"
        assert first.headers["X-RateLimit-Remaining-Requests"] == "4"
        assert second.headers["X-RateLimit-Remaining-Requests"] == "3"


class TestConcurrency:
    async def test_cap_and_release(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        limiter = limiter_factory(Clock())
        key = subject(concurrency_limit=3)
        admitted = [await limiter.admit((key,)) for _ in range(3)]
        with pytest.raises(RateLimited) as refused:
            await limiter.admit((key,))
        assert refused.value.param == "conc"
        for admission in admitted:
            await limiter.finish(admission)
            await limiter.finish(admission)  # twice is harmless
        assert (await limiter.usage(key))["concurrency"] == 0
        assert await admit_ok(limiter, key)

    async def test_leases_of_a_dead_instance_expire(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        clock = Clock()
        limiter = limiter_factory(clock, lease_seconds=30)
        key = subject(concurrency_limit=2, rpm_limit=BIG)
        await limiter.admit((key,))
        await limiter.admit((key,))
        assert not await admit_ok(limiter, key)
        clock.now += 31
        assert await admit_ok(limiter, key)


class TestTokens:
    async def test_estimate_above_remaining_is_refused_without_counting(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        limiter = limiter_factory(Clock())
        key = subject(tpm_limit=1000)
        first = await limiter.admit((key,))
        await limiter.reserve_tokens(first, 800)
        second = await limiter.admit((key,))
        with pytest.raises(RateLimited) as refused:
            await limiter.reserve_tokens(second, 300)
        assert refused.value.param == "tpm"
        await limiter.finish(second)
        usage = await limiter.usage(key)
        assert usage["tpm"] == 800  # the refused estimate was not counted
        assert usage["rpm"] == 2  # but its request was
        assert usage["concurrency"] == 1  # and its slot is free again

    async def test_actual_usage_corrects_the_counter(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        limiter = limiter_factory(Clock())
        key = subject(tpm_limit=1000)
        admission = await limiter.admit((key,))
        headers = await limiter.reserve_tokens(admission, 900)
        assert headers["X-RateLimit-Remaining-Tokens"] == "100"
        await limiter.finish(admission, actual_tokens=150)
        assert (await limiter.usage(key))["tpm"] == 150
        follow = await limiter.admit((key,))
        await limiter.reserve_tokens(follow, 800)  # fits only because of the correction


class TestFallback:
    async def test_process_share_without_redis(self) -> None:
        limiter = RateLimiter(redis=None, divisor=4, lease_seconds=60, clock=Clock())
        key = subject(rpm_limit=10)
        assert sum([await admit_ok(limiter, key) for _ in range(10)]) == 2  # 10 // 4

    async def test_redis_cut_falls_back_then_recovers(self, redis_url: str) -> None:
        host, port = redis_url.split("//")[1].split("/")[0].split(":")
        with TcpProxy(host, int(port)) as proxy:
            db = redis_url.rsplit("/", 1)[1] if redis_url.count("/") >= 3 else "0"
            client = Redis.from_url(
                f"redis://127.0.0.1:{proxy.port}/{db}", socket_timeout=0.5, socket_connect_timeout=0.5
            )
            clock = Clock()
            limiter = RateLimiter(
                redis=client,
                divisor=2,
                lease_seconds=60,
                clock=clock,
                redis_retry_seconds=5,
                prefix=f"t:{uuid.uuid4().hex}",
            )
            key = subject(rpm_limit=10)
            assert sum([await admit_ok(limiter, key) for _ in range(4)]) == 4
            assert limiter.redis_healthy
            proxy.cut()
            results = [await admit_ok(limiter, key) for _ in range(10)]
            assert not limiter.redis_healthy
            assert sum(results) == 5  # the per-process share (10 // 2), not the full limit
            proxy.restore()
            clock.now += 6  # past the retry interval: Redis is used again, with its own count
            assert await admit_ok(limiter, key)
            assert limiter.redis_healthy
            await client.aclose()


class TestScripts:
    async def test_scripts_run_by_sha_and_reload_after_a_flush(self, redis_url: str) -> None:
        client = Redis.from_url(redis_url)
        limiter = RateLimiter(
            redis=client, divisor=1, lease_seconds=60, clock=Clock(), prefix=f"t:{uuid.uuid4().hex}"
        )
        key = subject(rpm_limit=3, concurrency_limit=5)
        await client.script_flush()
        first = await limiter.admit((key,))  # Redis has not seen the script: sent by its body
        await limiter.reserve_tokens(first, 10)
        await limiter.finish(first, actual_tokens=5)
        assert limiter.redis_healthy
        calls_before = await _evalsha_calls(client)
        second = await limiter.admit((key,))  # loaded now: by its SHA1 alone
        assert await _evalsha_calls(client) == calls_before + 1
        await limiter.finish(second)
        await client.script_flush()  # a restarted Redis: loaded again, nothing lost
        assert await admit_ok(limiter, key)
        assert not await admit_ok(limiter, key)  # the fourth request of the minute
        assert limiter.redis_healthy
        usage = await limiter.usage(key)
        assert (usage["rpm"], usage["tpm"]) == (3, 5)
        await client.aclose()


async def _evalsha_calls(client: Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


class TestIpThrottle:
    async def test_failures_throttle_that_ip_only(self, limiter_factory) -> None:  # type: ignore[no-untyped-def]
        limiter = limiter_factory(Clock(), ip_failure_limit=5)
        for _ in range(5):
            assert await limiter.ip_throttled("10.0.0.1") is None
            await limiter.record_ip_failure("10.0.0.1")
        assert (await limiter.ip_throttled("10.0.0.1") or 0) >= 1
        assert await limiter.ip_throttled("10.0.0.2") is None
