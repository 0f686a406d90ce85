"""Routes: administration of accounts, credits, roles and the audit log.

Every route needs the operator's ADMIN_API_KEY or a key whose owner's role grants the route's
permission (read fresh from the database on each request), and a key scope that allows /admin.

Why 401/403 always come before 400: FastAPI runs every dependency before it reports parameter or
body validation errors (it collects those and raises them together afterwards), so an
authentication or permission dependency that raises wins over any invalid query or body.
`authenticate` is also a router-level dependency, which FastAPI runs before the endpoint's own:
a later route whose dependency raises by itself (say, one that loads an object and answers 404)
still cannot answer anyone before the caller is known. `require_permission` is each route's
first parameter, so no pooled connection is taken for a refused caller; `authenticate` is cached
per request, so it runs once. The one check FastAPI does before any dependency is decoding the
body's JSON: a body that is not JSON at all answers 400 to anyone, which says nothing the public
OpenAPI page does not.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse

from src.deps import Conn, State
from src.schemas.admin import (
    AddCredits,
    AssignRole,
    AuditEntry,
    AuditSweep,
    AuthFailure,
    AuthFailureList,
    CreatedUser,
    CreateRole,
    CreateUser,
    CreditsAdded,
    PermissionList,
    PermissionOut,
    RoleAssigned,
    RoleDeleted,
    RoleList,
    RoleOut,
    UpdateRole,
)
from src.schemas.common import Page, Paging
from src.schemas.users import Balance
from src.security.deps import Principal, authenticate, request_meta, require_permission
from src.services import admin as admin_service
from src.services import idempotency
from src.services import roles as roles_service
from src.services import users as users_service

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authenticate)])

UsersWriter = Annotated[Principal, Depends(require_permission("users.write"))]
CreditsWriter = Annotated[Principal, Depends(require_permission("credits.write"))]
RolesReader = Annotated[Principal, Depends(require_permission("roles.read"))]
RolesWriter = Annotated[Principal, Depends(require_permission("roles.write"))]
AuditReader = Annotated[Principal, Depends(require_permission("audit.read"))]
AuditSweeper = Annotated[Principal, Depends(require_permission("audit.sweep"))]
SecurityReader = Annotated[Principal, Depends(require_permission("security.read"))]

RoleNameParam = Annotated[str, Path(max_length=40, description="The role's name.")]

Responses = dict[int | str, dict[str, Any]]
DENIED: Responses = {
    401: {"description": "Missing or invalid credentials."},
    403: {"description": "The caller's role lacks the permission, or the key's scopes exclude /admin."},
}
INVALID: Responses = {400: {"description": "An unknown field or an invalid value; `param` names it."}}
USER_NOT_FOUND: Responses = {404: {"description": "No such user."}}
ROLE_NOT_FOUND: Responses = {404: {"description": "No such role."}}


@router.post(
    "/users",
    status_code=201,
    responses={**INVALID, **DENIED, 409: {"description": "The e-mail belongs to another account."}},
)
async def create_user(
    actor: UsersWriter, body: CreateUser, conn: Conn, state: State, request: Request
) -> CreatedUser:
    """Create an account with a primary API key, shown in this answer only."""
    user, api_key = await admin_service.create_user(
        conn,
        state,
        email=body.email,
        credits=body.credits,
        role=body.role,
        actor=actor,
        meta=request_meta(request, state),
        trial=body.trial,
    )
    assert user.email is not None
    return CreatedUser(
        user_id=user.id,
        email=user.email,
        role=user.role,
        api_key=api_key,
        balance=Balance.model_validate(users_service.balance_of(user), from_attributes=True),
    )


@router.post(
    "/add_credits",
    response_model=CreditsAdded,
    responses={
        **INVALID,
        **DENIED,
        **USER_NOT_FOUND,
        409: {
            "description": "A removal larger than the available balance (nothing changed), or an"
            " Idempotency-Key reused with another body or still in progress."
        },
    },
)
async def add_credits(
    actor: CreditsWriter,
    body: AddCredits,
    conn: Conn,
    state: State,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Retries with the same key apply the change once."),
    ] = None,
) -> JSONResponse:
    """Add credits to an account, or remove them with a negative amount, through the ledger."""

    async def run() -> tuple[int, Any]:
        transaction, user = await admin_service.add_credits(
            conn,
            user_id=body.user_id,
            amount=body.amount,
            reason=body.reason,
            actor=actor,
            meta=request_meta(request, state),
        )
        added = CreditsAdded(
            user_id=user.id,
            amount=transaction.amount,
            balance=Balance.model_validate(users_service.balance_of(user), from_attributes=True),
            transaction_id=transaction.id,
        )
        return 200, added.model_dump(mode="json")

    status, answer = await idempotency.once(
        state.pool,
        scope=f"admin:{actor.actor}",
        key=idempotency_key,
        fingerprint=idempotency.fingerprint("POST /admin/add_credits", body.model_dump(mode="json")),
        run=run,
        ttl_hours=state.settings.idempotency_key_ttl_hours,
    )
    return JSONResponse(answer, status_code=status)


@router.get("/roles", responses=DENIED)
async def list_roles(actor: RolesReader, conn: Conn) -> RoleList:
    """Every role with its permissions."""
    roles = await roles_service.list_roles(conn)
    return RoleList(data=[RoleOut.model_validate(role, from_attributes=True) for role in roles])


@router.get("/roles/permissions", responses=DENIED)
async def list_permissions(actor: RolesReader) -> PermissionList:
    """The permissions a role can grant."""
    return PermissionList(
        data=[PermissionOut(name=name, description=text) for name, text in roles_service.catalogue().items()]
    )


@router.post(
    "/roles",
    status_code=201,
    responses={**INVALID, **DENIED, 409: {"description": "A role with this name exists."}},
)
async def create_role(
    actor: RolesWriter, body: CreateRole, conn: Conn, state: State, request: Request
) -> RoleOut:
    """Create a custom role from named permissions."""
    role = await roles_service.create_role(
        conn,
        name=body.name,
        description=body.description,
        permission_names=body.permissions,
        actor=actor,
        meta=request_meta(request, state),
    )
    return RoleOut.model_validate(role, from_attributes=True)


@router.put(
    "/roles/{name}",
    responses={
        **INVALID,
        **DENIED,
        **ROLE_NOT_FOUND,
        409: {"description": "Built-in roles cannot be changed."},
    },
)
async def update_role(
    actor: RolesWriter, name: RoleNameParam, body: UpdateRole, conn: Conn, state: State, request: Request
) -> RoleOut:
    """Change a custom role's description or permissions; holders see the change on their next request."""
    role = await roles_service.update_role(
        conn,
        name=name,
        description=body.description,
        permission_names=body.permissions,
        actor=actor,
        meta=request_meta(request, state),
    )
    return RoleOut.model_validate(role, from_attributes=True)


@router.delete(
    "/roles/{name}",
    responses={
        **DENIED,
        **ROLE_NOT_FOUND,
        409: {"description": "A built-in role, or a role some user still holds."},
    },
)
async def delete_role(
    actor: RolesWriter, name: RoleNameParam, conn: Conn, state: State, request: Request
) -> RoleDeleted:
    """Delete a custom role that no user holds."""
    await roles_service.delete_role(conn, name=name, actor=actor, meta=request_meta(request, state))
    return RoleDeleted(name=name, deleted=True)


@router.post("/roles/assign", responses={**INVALID, **DENIED, **USER_NOT_FOUND})
async def assign_role(
    actor: RolesWriter, body: AssignRole, conn: Conn, state: State, request: Request
) -> RoleAssigned:
    """Give a user a role; it applies from their next request."""
    user, previous = await roles_service.assign_role(
        conn,
        state,
        user_id=body.user_id,
        role_name=body.role,
        actor=actor,
        meta=request_meta(request, state),
    )
    return RoleAssigned(user_id=user.id, role=user.role, previous_role=previous)


@router.get("/audit-logs", responses={**INVALID, **DENIED})
async def list_audit_logs(
    actor: AuditReader,
    conn: Conn,
    paging: Paging,
    user_id: Annotated[UUID | None, Query(description="Rows about this user, or made by them.")] = None,
    action: Annotated[str | None, Query(max_length=100, description="Only this action.")] = None,
    since: Annotated[
        datetime | None, Query(description="ISO 8601; rows at or after it (UTC without an offset).")
    ] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601; rows before it.")] = None,
) -> Page[AuditEntry]:
    """The audit log, newest first."""
    rows, total = await admin_service.list_audit_logs(
        conn,
        limit=paging.limit,
        offset=paging.offset,
        user_id=user_id,
        action=action,
        since=since,
        until=until,
    )
    return Page[AuditEntry](
        data=[AuditEntry.model_validate(row, from_attributes=True) for row in rows],
        total=total,
        limit=paging.limit,
        offset=paging.offset,
    )


@router.post("/audit-logs/sweep", responses=DENIED)
async def sweep_audit_logs(actor: AuditSweeper, conn: Conn, state: State, request: Request) -> AuditSweep:
    """Delete audit rows older than AUDIT_RETENTION_DAYS; run it on a schedule of your choosing."""
    days = state.settings.audit_retention_days
    deleted = await admin_service.sweep_audit_logs(
        conn, days=days, actor=actor, meta=request_meta(request, state)
    )
    return AuditSweep(deleted=deleted, retention_days=days)


@router.get("/security/auth-failures", responses={**INVALID, **DENIED})
async def auth_failures(
    actor: SecurityReader,
    state: State,
    minutes: Annotated[int, Query(ge=1, le=60, description="The window, in minutes.")] = 60,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="At most this many IPs, most failures first.")
    ] = 100,
) -> AuthFailureList:
    """Failed authentications per client IP seen by this instance, most first."""
    stats = admin_service.auth_failures(state, minutes=minutes, limit=limit)
    return AuthFailureList(
        window_minutes=minutes,
        data=[
            AuthFailure(
                ip=stat.ip, failures=stat.failures, last_seen=datetime.fromtimestamp(stat.last_minute, UTC)
            )
            for stat in stats
        ],
    )
