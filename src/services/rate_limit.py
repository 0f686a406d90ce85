"""Rate limits that hold across instances: requests, tokens and concurrent requests, per key and per user.

Algorithm: a sliding-window counter. Each limit keeps a count for the current fixed window and the
previous one; the count that decides is `current + previous x (the share of the previous window
still inside the sliding window)`. That has no 2x burst at a window boundary (N at the end of one
minute and N at the start of the next do not all pass), costs two integers per window, and is exact
for the first window. Concurrency slots are leases with an expiry, so an instance that dies cannot
leak them.

Each check is atomic: with Redis one Lua script decides requests and the concurrency slot together
(another one tokens); in memory the same logic runs without an await between check and update. A
check that refuses consumes nothing it covers.

Redis layout (all keys expire on their own):
    gatewayz:rl:{k|u}:{id}:{rpm|rpd|tpm|tpd}:{window start}   counters (INCRBY), TTL 2 windows
    gatewayz:rl:{k|u}:{id}:conc                               ZSET lease id -> expiry (ms)
    gatewayz:rl:ip:{ip}:{window start}                        failed authentications per IP
    gatewayz:rl:coupon:{u|ip}:{id}:{window start}             failed coupon codes per user / per IP

Without Redis, or while Redis is unreachable, the limits are kept per process and divided by the
number of processes that share them (WEB_CONCURRENCY x RATE_LIMIT_INSTANCES), never the full limit
per process; Redis is tried again every RATE_LIMIT_REDIS_RETRY_SECONDS.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from src.errors import RateLimited
from src.services import metrics
from src.services.limits import Limits

logger = logging.getLogger("gatewayz.ratelimit")

MINUTE = 60
DAY = 86_400
PREFIX = "gatewayz:rl"

Clock = Callable[[], float]


@dataclass(frozen=True)
class Subject:
    """Whose counters: a key ('k') or a user ('u'), with that subject's limits."""

    kind: str
    id: str
    limits: Limits


@dataclass
class Admission:
    """An admitted request: its concurrency leases and the tokens reserved for it."""

    subjects: tuple[Subject, ...]
    lease_id: str
    reserved_tokens: int = 0
    released: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def _windows(now: float, size: int) -> tuple[int, int, float]:
    """Current window start, previous window start, and the weight of the previous window."""
    start = int(now // size) * size
    elapsed = now - start
    return start, start - size, (size - elapsed) / size


def _reset_after(now: float, size: int) -> float:
    return size - (now % size)


def _weighted(current: int, previous: int, weight: float) -> int:
    return current + math.floor(previous * weight)


def _limit_name(metric: str) -> str:
    return {
        "rpm": "requests per minute",
        "rpd": "requests per day",
        "tpm": "tokens per minute",
        "tpd": "tokens per day",
        "conc": "concurrent requests",
    }[metric]


def _refusal(subject: Subject, metric: str, retry_after: float, headers: dict[str, str]) -> RateLimited:
    who = "API key" if subject.kind == "k" else "account"
    metrics.RATE_LIMITED.labels("key" if subject.kind == "k" else "user", metric).inc()
    retry = max(1, math.ceil(retry_after))
    return RateLimited(
        f"Rate limit reached for this {who}: {_limit_name(metric)}. Retry after {retry} s.",
        code="rate_limit_exceeded",
        param=metric,
        headers={**headers, "Retry-After": str(retry)},
    )


# Requests and the concurrency slot, for every subject at once: all pass or nothing changes.
# KEYS: per subject 5 keys (rpm cur, rpm prev, rpd cur, rpd prev, conc zset)
# ARGV: now_ms, w_min, w_day, lease, lease_expiry_ms, ttl_min, ttl_day, then per subject
#       rpm limit, rpd limit, conc limit
ADMIT_SCRIPT = """
local now = tonumber(ARGV[1])
local wmin = tonumber(ARGV[2])
local wday = tonumber(ARGV[3])
local n = #KEYS / 5
local result = {}
for i = 0, n - 1 do
  local k = i * 5
  local a = 8 + i * 3
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
  local rpm = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
    + math.floor(tonumber(redis.call('GET', KEYS[k + 2]) or '0') * wmin)
  local rpd = tonumber(redis.call('GET', KEYS[k + 3]) or '0')
    + math.floor(tonumber(redis.call('GET', KEYS[k + 4]) or '0') * wday)
  local conc = redis.call('ZCARD', KEYS[k + 5])
  if rpm >= tonumber(ARGV[a]) then return {0, i, 'rpm', rpm} end
  if rpd >= tonumber(ARGV[a + 1]) then return {0, i, 'rpd', rpd} end
  if conc >= tonumber(ARGV[a + 2]) then return {0, i, 'conc', conc} end
  result[#result + 1] = rpm
  result[#result + 1] = rpd
end
for i = 0, n - 1 do
  local k = i * 5
  redis.call('INCR', KEYS[k + 1])
  redis.call('EXPIRE', KEYS[k + 1], ARGV[6])
  redis.call('INCR', KEYS[k + 3])
  redis.call('EXPIRE', KEYS[k + 3], ARGV[7])
  redis.call('ZADD', KEYS[k + 5], ARGV[5], ARGV[4])
  redis.call('PEXPIREAT', KEYS[k + 5], ARGV[5])
end
local out = {1, -1, 'ok'}
for _, v in ipairs(result) do out[#out + 1] = v end
return out
"""

# Tokens for every subject at once. KEYS: per subject 4 (tpm cur, tpm prev, tpd cur, tpd prev)
# ARGV: amount, w_min, w_day, ttl_min, ttl_day, then per subject tpm limit, tpd limit
TOKENS_SCRIPT = """
local amount = tonumber(ARGV[1])
local wmin = tonumber(ARGV[2])
local wday = tonumber(ARGV[3])
local n = #KEYS / 4
local used = {}
for i = 0, n - 1 do
  local k = i * 4
  local a = 6 + i * 2
  local tpm = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
    + math.floor(tonumber(redis.call('GET', KEYS[k + 2]) or '0') * wmin)
  local tpd = tonumber(redis.call('GET', KEYS[k + 3]) or '0')
    + math.floor(tonumber(redis.call('GET', KEYS[k + 4]) or '0') * wday)
  if tpm + amount > tonumber(ARGV[a]) then return {0, i, 'tpm', tpm} end
  if tpd + amount > tonumber(ARGV[a + 1]) then return {0, i, 'tpd', tpd} end
  used[#used + 1] = tpm
end
for i = 0, n - 1 do
  local k = i * 4
  redis.call('INCRBY', KEYS[k + 1], amount)
  redis.call('EXPIRE', KEYS[k + 1], ARGV[4])
  redis.call('INCRBY', KEYS[k + 3], amount)
  redis.call('EXPIRE', KEYS[k + 3], ARGV[5])
end
local out = {1, -1, 'ok'}
for _, v in ipairs(used) do out[#out + 1] = v end
return out
"""

# Release the concurrency leases and correct the token counters by a delta, in one round trip.
# KEYS: per subject 3 (conc zset, tpm cur, tpd cur); ARGV: lease, delta, ttl_min, ttl_day
FINISH_SCRIPT = """
local delta = tonumber(ARGV[2])
for i = 0, #KEYS / 3 - 1 do
  local k = i * 3
  redis.call('ZREM', KEYS[k + 1], ARGV[1])
  if delta ~= 0 then
    redis.call('INCRBY', KEYS[k + 2], delta)
    redis.call('EXPIRE', KEYS[k + 2], ARGV[3])
    redis.call('INCRBY', KEYS[k + 3], delta)
    redis.call('EXPIRE', KEYS[k + 3], ARGV[4])
  end
end
return 1
"""

# Redis names a loaded script by the SHA1 of its body (an identifier, not a security use).
_SCRIPT_SHA = {
    script: hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
    for script in (ADMIT_SCRIPT, TOKENS_SCRIPT, FINISH_SCRIPT)
}


class MemoryCounters:
    """The same algorithm in one process's memory (no await between check and update)."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.expiry: dict[str, float] = {}
        self.leases: dict[str, dict[str, float]] = {}

    def _get(self, key: str, now: float) -> int:
        if self.expiry.get(key, math.inf) <= now:
            self.counters.pop(key, None)
            self.expiry.pop(key, None)
        return self.counters.get(key, 0)

    def _add(self, key: str, amount: int, now: float, ttl: int) -> None:
        self.counters[key] = self._get(key, now) + amount
        self.expiry[key] = now + ttl

    def _leases(self, key: str, now: float) -> dict[str, float]:
        """The live leases of `key`. Every lease lasts the same time, so insertion order is expiry
        order and the expired ones lead: dropping them costs nothing per live lease."""
        leases = self.leases.setdefault(key, {})
        while leases:
            lease, expires = next(iter(leases.items()))
            if expires > now:
                break
            del leases[lease]
        return leases

    def sweep(self, now: float) -> None:
        for key in [k for k, expires in self.expiry.items() if expires <= now]:
            self.counters.pop(key, None)
            self.expiry.pop(key, None)
        for key in list(self.leases):
            # A full pass, in case the clock stepped back and left an expired lease behind a live one.
            leases = self.leases[key]
            for lease in [lease for lease, expires in leases.items() if expires <= now]:
                del leases[lease]
            if not leases:
                del self.leases[key]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    subject_index: int
    metric: str
    used: list[int]


class RateLimiter:
    def __init__(
        self,
        *,
        redis: Redis | None,
        divisor: int,
        lease_seconds: float,
        redis_retry_seconds: float = 5.0,
        ip_failure_limit: int = 30,
        clock: Clock = time.time,
        prefix: str = PREFIX,
    ) -> None:
        self.prefix = prefix
        self.redis = redis
        self.divisor = max(1, divisor)
        self.lease_seconds = lease_seconds
        self.redis_retry_seconds = redis_retry_seconds
        self.ip_failure_limit = ip_failure_limit
        self.clock = clock
        self.memory = MemoryCounters()
        self.redis_down_until = 0.0
        self.redis_healthy = redis is not None
        self.rejections = 0
        self._sweep_at = 0.0

    # -- backend selection ------------------------------------------------------------------

    async def _script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script by its SHA1 (its body is not sent again); by its body the first time
        this Redis sees it, or after a restart or SCRIPT FLUSH."""
        assert self.redis is not None
        try:
            return await self.redis.evalsha(_SCRIPT_SHA[script], len(keys), *keys, *args)
        except NoScriptError:
            return await self.redis.eval(script, len(keys), *keys, *args)

    def _use_redis(self, now: float) -> bool:
        return self.redis is not None and now >= self.redis_down_until

    def _redis_failed(self, exc: BaseException, now: float) -> None:
        if self.redis_healthy:
            logger.error(
                "Redis unreachable (%s): rate limits fall back to per-process limits / %d",
                type(exc).__name__,
                self.divisor,
            )
        self.redis_healthy = False
        # From when the failure was seen, not when the call began: a call that timed out (after
        # the client's own retries) may have taken longer than the whole retry interval.
        self.redis_down_until = max(now, self.clock()) + self.redis_retry_seconds

    def _redis_ok(self) -> None:
        if not self.redis_healthy and self.redis is not None:
            logger.warning("Redis is back: rate limits are shared again")
        self.redis_healthy = self.redis is not None

    def _local(self, limit: int) -> int:
        """A limit kept in one process: its share, never the whole (at least 1)."""
        return max(1, limit // self.divisor)

    def _key(self, subject: Subject, metric: str, window: int | None = None) -> str:
        base = f"{self.prefix}:{subject.kind}:{subject.id}:{metric}"
        return base if window is None else f"{base}:{window}"

    # -- admission: requests and the concurrency slot ----------------------------------------

    async def admit(self, subjects: tuple[Subject, ...]) -> Admission:
        now = self.clock()
        admission = Admission(subjects=subjects, lease_id=uuid.uuid4().hex)
        decision: Decision | None = None
        if self._use_redis(now):
            try:
                decision = await self._admit_redis(subjects, admission.lease_id, now)
                self._redis_ok()
            except Exception as exc:
                self._redis_failed(exc, now)
        if decision is None:
            decision = self._admit_memory(subjects, admission.lease_id, now)
        headers = self._request_headers(subjects, decision, now)
        if not decision.allowed:
            self.rejections += 1
            subject = subjects[decision.subject_index]
            raise _refusal(subject, decision.metric, self._retry_after(decision.metric, now), headers)
        admission.headers = headers
        return admission

    def _retry_after(self, metric: str, now: float) -> float:
        if metric in {"rpm", "tpm"}:
            return _reset_after(now, MINUTE)
        if metric in {"rpd", "tpd"}:
            return _reset_after(now, DAY)
        return 1.0

    def _request_headers(
        self, subjects: tuple[Subject, ...], decision: Decision, now: float
    ) -> dict[str, str]:
        # The tightest per-minute request limit is the one a client must pace itself by.
        limits = [self._effective(s.limits.rpm_limit) for s in subjects]
        index = min(range(len(subjects)), key=lambda i: limits[i])
        limit = limits[index]
        used = decision.used[index * 2] if decision.allowed and len(decision.used) > index * 2 else limit
        remaining = max(0, limit - used - (1 if decision.allowed else 0))
        return {
            "X-RateLimit-Limit-Requests": str(limit),
            "X-RateLimit-Remaining-Requests": str(remaining),
            "X-RateLimit-Reset-Requests": f"{_reset_after(now, MINUTE):.0f}s",
        }

    def _effective(self, limit: int) -> int:
        return limit if self._use_redis(self.clock()) and self.redis_healthy else self._local(limit)

    async def _admit_redis(self, subjects: tuple[Subject, ...], lease: str, now: float) -> Decision:
        assert self.redis is not None
        minute, prev_minute, w_min = _windows(now, MINUTE)
        day, prev_day, w_day = _windows(now, DAY)
        keys: list[str] = []
        args: list[Any] = [
            int(now * 1000),
            w_min,
            w_day,
            lease,
            int((now + self.lease_seconds) * 1000),
            2 * MINUTE,
            2 * DAY,
        ]
        for s in subjects:
            keys += [
                self._key(s, "rpm", minute),
                self._key(s, "rpm", prev_minute),
                self._key(s, "rpd", day),
                self._key(s, "rpd", prev_day),
                self._key(s, "conc"),
            ]
            args += [s.limits.rpm_limit, s.limits.rpd_limit, s.limits.concurrency_limit]
        raw = await self._script(ADMIT_SCRIPT, keys, args)
        return _decision(raw)

    def _admit_memory(self, subjects: tuple[Subject, ...], lease: str, now: float) -> Decision:
        self._maybe_sweep(now)
        minute, prev_minute, w_min = _windows(now, MINUTE)
        day, prev_day, w_day = _windows(now, DAY)
        memory = self.memory
        used: list[int] = []
        for index, s in enumerate(subjects):
            rpm = self._memory_count(s, "rpm", minute, prev_minute, w_min, now)
            rpd = self._memory_count(s, "rpd", day, prev_day, w_day, now)
            conc = len(memory._leases(self._key(s, "conc"), now))
            if rpm >= self._local(s.limits.rpm_limit):
                return Decision(False, index, "rpm", used)
            if rpd >= self._local(s.limits.rpd_limit):
                return Decision(False, index, "rpd", used)
            if conc >= self._local(s.limits.concurrency_limit):
                return Decision(False, index, "conc", used)
            used += [rpm, rpd]
        for s in subjects:
            memory._add(self._key(s, "rpm", minute), 1, now, 2 * MINUTE)
            memory._add(self._key(s, "rpd", day), 1, now, 2 * DAY)
            memory._leases(self._key(s, "conc"), now)[lease] = now + self.lease_seconds
        return Decision(True, -1, "ok", used)

    def _memory_count(
        self, s: Subject, metric: str, current: int, previous: int, weight: float, now: float
    ) -> int:
        """The sliding-window count of one subject's metric, from process memory."""
        return _weighted(
            self.memory._get(self._key(s, metric, current), now),
            self.memory._get(self._key(s, metric, previous), now),
            weight,
        )

    def _maybe_sweep(self, now: float) -> None:
        if now >= self._sweep_at:
            self.memory.sweep(now)
            self._sweep_at = now + MINUTE

    # -- tokens ------------------------------------------------------------------------------

    async def reserve_tokens(self, admission: Admission, amount: int) -> dict[str, str]:
        """Count the request's estimated tokens, or refuse (429) without counting them."""
        now = self.clock()
        decision: Decision | None = None
        if self._use_redis(now):
            try:
                decision = await self._tokens_redis(admission.subjects, amount, now)
                self._redis_ok()
            except Exception as exc:
                self._redis_failed(exc, now)
        if decision is None:
            decision = self._tokens_memory(admission.subjects, amount, now)
        headers = self._token_headers(admission.subjects, decision, amount, now)
        admission.headers.update(headers)
        if not decision.allowed:
            self.rejections += 1
            subject = admission.subjects[decision.subject_index]
            raise _refusal(
                subject, decision.metric, self._retry_after(decision.metric, now), admission.headers
            )
        admission.reserved_tokens = amount
        return headers

    def _token_headers(
        self, subjects: tuple[Subject, ...], decision: Decision, amount: int, now: float
    ) -> dict[str, str]:
        limits = [self._effective(s.limits.tpm_limit) for s in subjects]
        index = min(range(len(subjects)), key=lambda i: limits[i])
        limit = limits[index]
        if decision.allowed and len(decision.used) > index:
            remaining = max(0, limit - decision.used[index] - amount)
        else:
            remaining = max(0, limit - (decision.used[index] if len(decision.used) > index else limit))
        return {
            "X-RateLimit-Limit-Tokens": str(limit),
            "X-RateLimit-Remaining-Tokens": str(remaining),
            "X-RateLimit-Reset-Tokens": f"{_reset_after(now, MINUTE):.0f}s",
        }

    async def _tokens_redis(self, subjects: tuple[Subject, ...], amount: int, now: float) -> Decision:
        assert self.redis is not None
        minute, prev_minute, w_min = _windows(now, MINUTE)
        day, prev_day, w_day = _windows(now, DAY)
        keys: list[str] = []
        args: list[Any] = [amount, w_min, w_day, 2 * MINUTE, 2 * DAY]
        for s in subjects:
            keys += [
                self._key(s, "tpm", minute),
                self._key(s, "tpm", prev_minute),
                self._key(s, "tpd", day),
                self._key(s, "tpd", prev_day),
            ]
            args += [s.limits.tpm_limit, s.limits.tpd_limit]
        raw = await self._script(TOKENS_SCRIPT, keys, args)
        return _decision(raw)

    def _tokens_memory(self, subjects: tuple[Subject, ...], amount: int, now: float) -> Decision:
        minute, prev_minute, w_min = _windows(now, MINUTE)
        day, prev_day, w_day = _windows(now, DAY)
        memory = self.memory
        used: list[int] = []
        for index, s in enumerate(subjects):
            tpm = self._memory_count(s, "tpm", minute, prev_minute, w_min, now)
            tpd = self._memory_count(s, "tpd", day, prev_day, w_day, now)
            if tpm + amount > self._local(s.limits.tpm_limit):
                return Decision(False, index, "tpm", [*used, tpm])
            if tpd + amount > self._local(s.limits.tpd_limit):
                return Decision(False, index, "tpd", [*used, tpm])
            used.append(tpm)
        for s in subjects:
            memory._add(self._key(s, "tpm", minute), amount, now, 2 * MINUTE)
            memory._add(self._key(s, "tpd", day), amount, now, 2 * DAY)
        return Decision(True, -1, "ok", used)

    # -- the end of a request ----------------------------------------------------------------

    async def finish(self, admission: Admission, *, actual_tokens: int | None = None) -> None:
        """Release the concurrency slot and correct the token count with the real usage (once)."""
        if admission.released:
            return
        admission.released = True
        delta = (
            0
            if actual_tokens is None or not admission.reserved_tokens
            else actual_tokens - admission.reserved_tokens
        )
        now = self.clock()
        minute, _, _ = _windows(now, MINUTE)
        day, _, _ = _windows(now, DAY)
        if self._use_redis(now):
            try:
                assert self.redis is not None
                keys: list[str] = []
                for s in admission.subjects:
                    keys += [self._key(s, "conc"), self._key(s, "tpm", minute), self._key(s, "tpd", day)]
                await self._script(FINISH_SCRIPT, keys, [admission.lease_id, delta, 2 * MINUTE, 2 * DAY])
                self._redis_ok()
            except Exception as exc:
                self._redis_failed(exc, now)
        # The lease may have been taken in memory (during an outage): drop it there too.
        for s in admission.subjects:
            self.memory._leases(self._key(s, "conc"), now).pop(admission.lease_id, None)
            if delta and not (self._use_redis(now) and self.redis_healthy):
                self.memory._add(self._key(s, "tpm", minute), delta, now, 2 * MINUTE)
                self.memory._add(self._key(s, "tpd", day), delta, now, 2 * DAY)

    # -- failures counted per minute (key guessing per IP, coupon-code guessing) --------------

    def _failure_key(self, name: str, now: float) -> str:
        minute, _, _ = _windows(now, MINUTE)
        return f"{self.prefix}:{name}:{minute}"

    async def failures_throttled(self, name: str, *, limit: int) -> float | None:
        """Seconds to wait when `name` has failed `limit` times this minute; None while under."""
        now = self.clock()
        key = self._failure_key(name, now)
        count: int | None = None
        if self._use_redis(now):
            try:
                assert self.redis is not None
                value = await self.redis.get(key)
                count = int(value or 0)
                self._redis_ok()
            except Exception as exc:
                self._redis_failed(exc, now)
        if count is None:
            count = self.memory._get(key, now)
        return _reset_after(now, MINUTE) if count >= limit else None

    async def record_failure(self, name: str, *, limit: int) -> float | None:
        """Count a failure of `name`; seconds until the window ends once it is over `limit`."""
        now = self.clock()
        key = self._failure_key(name, now)
        count: int | None = None
        if self._use_redis(now):
            try:
                assert self.redis is not None
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.incr(key)
                    pipe.expire(key, 2 * MINUTE)
                    count = int((await pipe.execute())[0])
                self._redis_ok()
            except Exception as exc:
                self._redis_failed(exc, now)
        if count is None:
            self.memory._add(key, 1, now, 2 * MINUTE)
            count = self.memory._get(key, now)
        return _reset_after(now, MINUTE) if count >= limit else None

    async def ip_throttled(self, ip: str | None) -> float | None:
        """Seconds to wait when this IP has failed authentication too often this minute."""
        return await self.failures_throttled(f"ip:{ip or 'unknown'}", limit=self.ip_failure_limit)

    async def record_ip_failure(self, ip: str | None) -> float | None:
        """Count a failed authentication; seconds until the window ends once the IP is over the limit."""
        return await self.record_failure(f"ip:{ip or 'unknown'}", limit=self.ip_failure_limit)

    async def usage(self, subject: Subject) -> dict[str, int]:
        """Current counts for one subject (for GET /user/limit)."""
        now = self.clock()
        minute, prev_minute, w_min = _windows(now, MINUTE)
        day, prev_day, w_day = _windows(now, DAY)
        names = [
            ("rpm", minute, prev_minute, w_min),
            ("rpd", day, prev_day, w_day),
            ("tpm", minute, prev_minute, w_min),
            ("tpd", day, prev_day, w_day),
        ]
        result: dict[str, int] = {}
        if self._use_redis(now):
            try:
                assert self.redis is not None
                keys = [self._key(subject, m, w) for m, cur, prev, _ in names for w in (cur, prev)]
                values = await self.redis.mget(keys)
                conc = await self.redis.zcount(self._key(subject, "conc"), int(now * 1000), "+inf")
                for i, (metric, _, _, weight) in enumerate(names):
                    result[metric] = _weighted(int(values[2 * i] or 0), int(values[2 * i + 1] or 0), weight)
                result["concurrency"] = int(conc)
                return result
            except Exception as exc:
                self._redis_failed(exc, now)
        for metric, cur, prev, weight in names:
            result[metric] = self._memory_count(subject, metric, cur, prev, weight, now)
        result["concurrency"] = len(self.memory._leases(self._key(subject, "conc"), now))
        return result


def _decision(raw: list[Any]) -> Decision:
    allowed = int(raw[0]) == 1
    metric = raw[2].decode() if isinstance(raw[2], bytes) else str(raw[2])
    used = [int(v) for v in raw[3:]]
    return Decision(allowed, int(raw[1]), metric, used)


def subjects_for(
    *, key_id: UUID | None, user_id: UUID, key_limits: Limits, user_limits: Limits
) -> tuple[Subject, ...]:
    subjects = [Subject(kind="u", id=str(user_id), limits=user_limits)]
    if key_id is not None:
        subjects.insert(0, Subject(kind="k", id=str(key_id), limits=key_limits))
    return tuple(subjects)
