"""SQL for the append-only audit log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

AUDIT_COLUMNS = (
    "id, created_at, actor_type, actor_id, user_id, action, subject_type, subject_id, before, after,"
    " metadata, host(ip) AS ip, user_agent, request_id"
)


@dataclass(frozen=True)
class AuditRow:
    id: int
    created_at: datetime
    actor_type: str
    actor_id: UUID | None
    user_id: UUID | None
    action: str
    subject_type: str | None
    subject_id: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    metadata: dict[str, Any] | None
    ip: str | None
    user_agent: str | None
    request_id: str | None


async def insert_audit(
    conn: asyncpg.Connection,
    *,
    actor_type: str,
    actor_id: UUID | None,
    user_id: UUID | None,
    action: str,
    subject_type: str | None,
    subject_id: str | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    metadata: dict[str, Any] | None,
    ip: str | None,
    user_agent: str | None,
    request_id: str | None,
) -> None:
    await conn.execute(
        """INSERT INTO audit_logs (actor_type, actor_id, user_id, action, subject_type, subject_id,
                before, after, metadata, ip, user_agent, request_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::inet, $11, $12)""",
        actor_type,
        actor_id,
        user_id,
        action,
        subject_type,
        subject_id,
        before,
        after,
        metadata,
        ip,
        user_agent,
        request_id,
    )


async def list_audit(
    conn: asyncpg.Connection,
    *,
    limit: int,
    offset: int,
    user_id: UUID | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> tuple[list[AuditRow], int]:
    rows = await conn.fetch(
        f"""SELECT {AUDIT_COLUMNS}, count(*) OVER () AS total FROM audit_logs
            WHERE ($1::uuid IS NULL OR user_id = $1 OR actor_id = $1)
              AND ($2::text IS NULL OR action = $2)
              AND ($3::timestamptz IS NULL OR created_at >= $3)
              AND ($4::timestamptz IS NULL OR created_at < $4)
            ORDER BY created_at DESC, id DESC LIMIT $5 OFFSET $6""",
        user_id,
        action,
        since,
        until,
        limit,
        offset,
    )
    total = rows[0]["total"] if rows else 0
    return [AuditRow(**{k: v for k, v in dict(r).items() if k != "total"}) for r in rows], total


async def purge_older_than(conn: asyncpg.Connection, *, days: int) -> int:
    """The retention sweep: the only delete the append-only trigger lets through."""
    if days < 1:
        raise ValueError("the audit retention must be at least one day")
    async with conn.transaction():
        await conn.execute("SELECT set_config('gatewayz.audit_retention_days', $1, true)", str(days))
        result: str = await conn.execute(
            "DELETE FROM audit_logs WHERE created_at < now() - make_interval(days => $1)", days
        )
        # A transaction-local setting outlives a savepoint: when the caller's transaction goes on,
        # later statements in it must not inherit the sweep's permission to delete.
        await conn.execute("SELECT set_config('gatewayz.audit_retention_days', '', true)")
    return int(result.split()[-1])
