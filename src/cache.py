"""Small in-process TTL caches (model lists, provider status, key lookups).

Bounded in size (oldest entry evicted first) and read against an injectable clock, so tests can
move time instead of sleeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

Clock = Callable[[], float]


class TTLCache(Generic[K, V]):
    """A dict whose entries expire `ttl` seconds after they were set."""

    def __init__(self, *, ttl: float, max_size: int = 10_000, clock: Clock = time.monotonic) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self.clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if expires_at <= self.clock():
            self._entries.pop(key, None)
            return None
        return value

    def set(self, key: K, value: V, *, ttl: float | None = None) -> None:
        if self.ttl <= 0 and ttl is None:
            return
        self._entries.pop(key, None)
        self._entries[key] = (self.clock() + (self.ttl if ttl is None else ttl), value)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        return entry[1] if entry else None

    def pop_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry for which `predicate(key, value)` holds; return how many."""
        doomed = [key for key, (_, value) in self._entries.items() if predicate(key, value)]
        for key in doomed:
            self._entries.pop(key, None)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
