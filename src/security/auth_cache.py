"""The in-process cache of verified keys, and its invalidation across instances.

A key's record is cached for at most AUTH_CACHE_TTL_SECONDS. A revocation, rotation, deactivation
or owner change drops the entries in this process at once and, with Redis, publishes the change so
every other instance drops them too; without Redis the TTL is the bound.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from uuid import UUID

import orjson
from redis.asyncio import Redis

from src.cache import Clock, TTLCache
from src.db.api_keys import AuthRecord
from src.redis_config import Subscriber

logger = logging.getLogger("gatewayz.auth")

CHANNEL = "gatewayz:auth:invalidate"
TOUCH_INTERVAL_SECONDS = 60.0
MAX_TOUCH_ENTRIES = 100_000


class AuthCache:
    def __init__(self, *, ttl: float, max_size: int = 50_000, clock: Clock = time.monotonic) -> None:
        self.records: TTLCache[bytes, AuthRecord] = TTLCache(ttl=ttl, max_size=max_size, clock=clock)
        self.clock = clock
        self._touched: OrderedDict[UUID, float] = OrderedDict()
        # Messages may have been missed while disconnected: start again from an empty cache.
        self._subscriber = Subscriber(CHANNEL, self._apply, on_subscribed=self.clear)
        # Bumped by every invalidation. A lookup that read the database before an invalidation
        # landed must not cache what it read: it may be the row as it was before the change.
        self.generation = 0

    def get(self, digest: bytes) -> AuthRecord | None:
        return self.records.get(digest)

    def set(self, digest: bytes, record: AuthRecord, *, generation: int | None = None) -> None:
        """Cache `record`, unless an invalidation happened since `generation` was read."""
        if generation is not None and generation != self.generation:
            return
        self.records.set(digest, record)

    def drop(self, *, digests: Sequence[bytes] = (), user_id: UUID | None = None) -> None:
        self.generation += 1
        for digest in digests:
            self.records.pop(digest)
        if user_id is not None:
            self.records.pop_where(lambda _, record: record.key.user_id == user_id)

    def clear(self) -> None:
        self.generation += 1
        self.records.clear()

    async def invalidate(
        self,
        redis: Redis | None,
        *,
        digests: Sequence[bytes] = (),
        user_id: UUID | None = None,
    ) -> None:
        """Drop here now, and tell the other instances (after the change has committed)."""
        self.drop(digests=list(digests), user_id=user_id)
        if redis is None:
            return
        message = orjson.dumps(
            {"digests": [d.hex() for d in digests], "user_id": str(user_id) if user_id else None}
        )
        try:
            await redis.publish(CHANNEL, message)
        except Exception as exc:  # Redis down: the TTL still bounds the staleness elsewhere
            logger.warning("could not publish key invalidation: %s", type(exc).__name__)

    def should_touch(self, key_id: UUID) -> bool:
        """True at most once a minute per key: last_used_at is coalesced, not written per request."""
        now = self.clock()
        last = self._touched.get(key_id)
        if last is not None and now - last < TOUCH_INTERVAL_SECONDS:
            return False
        self._touched[key_id] = now
        self._touched.move_to_end(key_id)
        while len(self._touched) > MAX_TOUCH_ENTRIES:
            self._touched.popitem(last=False)
        return True

    def start_listener(self, redis: Redis) -> None:
        self._subscriber.start(redis)

    async def stop_listener(self) -> None:
        await self._subscriber.stop()

    def _apply(self, data: bytes) -> None:
        try:
            payload = orjson.loads(data)
            digests = [bytes.fromhex(d) for d in payload.get("digests", [])]
            user_id = UUID(payload["user_id"]) if payload.get("user_id") else None
        except (ValueError, TypeError, KeyError):
            logger.warning("ignored a malformed key invalidation message")
            return
        self.drop(digests=digests, user_id=user_id)
