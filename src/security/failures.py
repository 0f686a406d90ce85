"""Failed authentications counted per client IP, in one-minute buckets kept for an hour.

The counts are what admins see, and what the IP throttle for key guessing reads.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from src.cache import Clock

BUCKET_SECONDS = 60
KEEP_BUCKETS = 60
MAX_IPS_PER_BUCKET = 50_000


@dataclass(frozen=True)
class FailureStat:
    ip: str
    failures: int
    last_minute: int


class AuthFailureCounter:
    def __init__(self, *, clock: Clock = time.time) -> None:
        self.clock = clock
        self._buckets: OrderedDict[int, Counter[str]] = OrderedDict()

    def _bucket(self) -> int:
        return int(self.clock() // BUCKET_SECONDS)

    def record(self, ip: str | None) -> None:
        bucket = self._bucket()
        counts = self._buckets.get(bucket)
        if counts is None:
            counts = self._buckets[bucket] = Counter()
            while len(self._buckets) > KEEP_BUCKETS:
                self._buckets.popitem(last=False)
        if len(counts) < MAX_IPS_PER_BUCKET or (ip or "unknown") in counts:
            counts[ip or "unknown"] += 1

    def recent(self, ip: str | None, *, minutes: int = 1) -> int:
        """Failures from `ip` in the current bucket and the `minutes - 1` before it."""
        current = self._bucket()
        return sum(
            counts.get(ip or "unknown", 0)
            for bucket, counts in self._buckets.items()
            if bucket > current - minutes
        )

    def snapshot(self, *, minutes: int = 60, limit: int = 100) -> list[FailureStat]:
        current = self._bucket()
        totals: Counter[str] = Counter()
        last: dict[str, int] = {}
        for bucket, counts in self._buckets.items():
            if bucket <= current - minutes:
                continue
            for ip, count in counts.items():
                totals[ip] += count
                last[ip] = max(last.get(ip, 0), bucket * BUCKET_SECONDS)
        return [FailureStat(ip=ip, failures=n, last_minute=last[ip]) for ip, n in totals.most_common(limit)]
