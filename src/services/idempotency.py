"""Idempotency-Key for money-moving POSTs (checkout creation, coupon redemption, admin credit changes).

The first request with a key (per caller) runs and its answer (status and JSON body) is kept for
IDEMPOTENCY_KEY_TTL_HOURS; a retry with the same key gets that same answer without running again.
The same key with a different request body is refused (409 `idempotency_key_reused`), and so is a
retry that arrives while the first is still running (409 `idempotency_request_in_progress`). A
request that fails keeps nothing, so the client may retry it with the same key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from src.db import idempotency as idempotency_db
from src.errors import Conflict, InvalidRequest

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


def fingerprint(*parts: Any) -> str:
    """A digest of what identifies the request (route, body): the same key must carry the same one."""
    return hashlib.sha256(orjson.dumps(parts, default=str, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def once(
    pool: asyncpg.Pool,
    *,
    scope: str,
    key: str | None,
    fingerprint: str,
    run: Callable[[], Awaitable[tuple[int, Any]]],
    ttl_hours: int = 24,
) -> tuple[int, Any]:
    """Run `run` once per (scope, key) and return its (status, body); without a key, just run it."""
    if key is None:
        return await run()
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(
            f"The {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable characters.",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    async with pool.acquire() as conn:
        claimed = await idempotency_db.claim(
            conn, scope=scope, key=key, fingerprint=fingerprint, ttl_hours=ttl_hours
        )
        if not claimed:
            stored = await idempotency_db.get(conn, scope=scope, key=key)
    if not claimed:
        if stored is None:  # completed and swept between the two statements: a new request
            return await once(
                pool, scope=scope, key=key, fingerprint=fingerprint, run=run, ttl_hours=ttl_hours
            )
        if stored["fingerprint"] != fingerprint:
            raise Conflict(
                f"This {HEADER} was already used with a different request.",
                param=HEADER,
                code="idempotency_key_reused",
            )
        if stored["status_code"] is None:
            raise Conflict(
                f"A request with this {HEADER} is still being processed; retry later.",
                param=HEADER,
                code="idempotency_request_in_progress",
            )
        return int(stored["status_code"]), orjson.loads(stored["body"])
    try:
        status, body = await run()
    except BaseException:
        async with pool.acquire() as conn:
            await idempotency_db.release(conn, scope=scope, key=key)
        raise
    async with pool.acquire() as conn:
        await idempotency_db.complete(conn, scope=scope, key=key, status_code=status, body=body)
    return status, body
