"""Operator work on accounts and the audit log: create users, adjust credits, read and sweep the log.

Audit retention is an explicit operation, never a background job: `sweep_audit_logs` (behind
POST /admin/audit-logs/sweep) deletes rows older than AUDIT_RETENTION_DAYS, the only delete the
table's append-only trigger lets through. Run it from a scheduler the deployment already has
(cron, a platform job) as often as the retention needs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID

import asyncpg

from src.db import audit as audit_db
from src.db import roles as roles_db
from src.db import users as users_db
from src.db.audit import AuditRow
from src.db.ledger import CreditTransaction
from src.db.users import User
from src.errors import InvalidRequest
from src.security.deps import Principal, RequestMeta
from src.security.failures import FailureStat
from src.services import audit
from src.services import roles as roles_service
from src.services import users as users_service
from src.state import AppState


async def create_user(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    email: str,
    credits: Decimal,
    role: str,
    actor: Principal,
    meta: RequestMeta,
    trial: bool = False,
) -> tuple[User, str]:
    """A new account with its primary key (plaintext, shown once), optional starting credits and trial."""
    async with conn.transaction():
        target = await roles_db.get_role(conn, name=role)
        if target is None:
            raise InvalidRequest(f"Unknown role '{role}'.", param="role", code="unknown_role")
        granted = await roles_service.granted_permissions(conn, actor)
        # Creating an account with a role, or with credits, is granting them: hold what you give.
        roles_service.ensure_may_grant(granted, target.permissions)
        if credits > 0:
            roles_service.ensure_may_grant(granted, ["credits.write"])
        if trial:
            roles_service.ensure_may_grant(granted, ["trials.write"])
        return await users_service.create_user_as_admin(
            conn, state, email=email, credits=credits, role=role, actor=actor, meta=meta, trial=trial
        )


async def add_credits(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    amount: Decimal,
    reason: str,
    actor: Principal,
    meta: RequestMeta,
) -> tuple[CreditTransaction, User]:
    """Add (or, with a negative amount, remove) credits through the ledger; returns the row and the user."""
    async with conn.transaction():
        transaction = await users_service.change_credits(
            conn, user_id=user_id, amount=amount, reason=reason, actor=actor, meta=meta, in_transaction=True
        )
        user = await users_db.get_user(conn, user_id=user_id)
        assert user is not None  # change_credits found and locked it
    return transaction, user


def _utc(value: datetime | None) -> datetime | None:
    # A time without an offset is read as UTC, the zone every stored timestamp is compared in.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


async def list_audit_logs(
    conn: asyncpg.Connection,
    *,
    limit: int,
    offset: int,
    user_id: UUID | None,
    action: str | None,
    since: datetime | None,
    until: datetime | None,
) -> tuple[list[AuditRow], int]:
    """Audit rows, newest first, with the total that match the filters."""
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and until <= since:
        raise InvalidRequest("'until' must be later than 'since'.", param="until", code="invalid_range")
    return await audit_db.list_audit(
        conn, limit=limit, offset=offset, user_id=user_id, action=action, since=since, until=until
    )


async def sweep_audit_logs(
    conn: asyncpg.Connection,
    *,
    days: int,
    actor: Principal | None = None,
    meta: RequestMeta | None = None,
) -> int:
    """Delete audit rows older than `days`; the sweep itself is audited. Returns how many went."""
    if days < 1:
        raise InvalidRequest("The audit retention must be at least one day.", code="invalid_retention")
    async with conn.transaction():
        deleted = await audit_db.purge_older_than(conn, days=days)
        await audit.record(
            conn,
            action="audit.sweep",
            actor=actor,
            meta=meta,
            metadata={"deleted": deleted, "retention_days": days},
            actor_type="system" if actor is None else None,
        )
    return deleted


def auth_failures(state: AppState, *, minutes: int, limit: int) -> list[FailureStat]:
    """Failed authentications per client IP seen by this instance in the last `minutes`."""
    return state.auth_failures.snapshot(minutes=minutes, limit=limit)
