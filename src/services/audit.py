"""Audit rows, written in the caller's transaction so the change and its record commit together."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from src.db import audit as audit_db
from src.security.deps import Principal, RequestMeta

# Fields that must never reach an audit row, whatever a caller passes in before/after.
_FORBIDDEN = {"key", "api_key", "plaintext", "key_hash", "key_encrypted", "token", "secret", "password"}


def _clean(values: dict[str, Any] | None) -> dict[str, Any] | None:
    if values is None:
        return None
    return {k: (str(v) if isinstance(v, UUID) else v) for k, v in values.items() if k not in _FORBIDDEN}


async def record(
    conn: asyncpg.Connection,
    *,
    action: str,
    actor: Principal | None,
    meta: RequestMeta | None,
    user_id: UUID | None = None,
    subject_type: str | None = None,
    subject_id: str | UUID | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    actor_type: str | None = None,
) -> None:
    if actor_type is None:
        actor_type = "anonymous" if actor is None else ("operator" if actor.is_operator else "user")
    await audit_db.insert_audit(
        conn,
        actor_type=actor_type,
        actor_id=actor.user_id if actor is not None else None,
        user_id=user_id,
        action=action,
        subject_type=subject_type,
        subject_id=str(subject_id) if subject_id is not None else None,
        before=_clean(before),
        after=_clean(after),
        metadata=_clean(metadata),
        ip=meta.ip if meta else None,
        user_agent=meta.user_agent if meta else None,
        request_id=meta.request_id if meta else None,
    )
