"""Routes: the caller's own rate limits and usage, and the admin-set limits of users and keys.

`authenticate` is a router-level dependency, so no caller is answered (not even 404 for an unknown
id, or 400 for a bad body) before it is known; see src/routes/admin.py for why this order holds.
An admin-set limit applies at once on this instance and, with Redis, on every other one (the
owner's cached keys are dropped); without Redis within AUTH_CACHE_TTL_SECONDS elsewhere.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from src.deps import Conn, State
from src.routes.path_ids import KeyID, UserID
from src.schemas.limits import (
    AccountLimitsAndUsage,
    CallerLimits,
    KeyLimits,
    KeyLimitsAndUsage,
    LimitSettings,
    LimitUsage,
    LimitValues,
    SetLimits,
    UserLimits,
)
from src.security.deps import CurrentUser, Principal, authenticate, request_meta, require_permission
from src.services import limits as limits_service

router = APIRouter(dependencies=[Depends(authenticate)])

LimitsReader = Annotated[Principal, Depends(require_permission("limits.read"))]
LimitsWriter = Annotated[Principal, Depends(require_permission("limits.write"))]

Responses = dict[int | str, dict[str, Any]]
DENIED: Responses = {
    401: {"description": "Missing or invalid credentials."},
    403: {"description": "The caller's role lacks the permission, or the key's scopes exclude /admin."},
}
INVALID: Responses = {400: {"description": "An unknown field or an invalid value; `param` names it."}}
USER_NOT_FOUND: Responses = {404: {"description": "No such user."}}
KEY_NOT_FOUND: Responses = {404: {"description": "No such API key (or it is revoked)."}}


def _values(limits: limits_service.Limits) -> LimitValues:
    return LimitValues.model_validate(limits, from_attributes=True)


def _user_view(view: limits_service.UserCeiling) -> UserLimits:
    return UserLimits(
        user_id=view.user_id,
        admin_set=LimitSettings.model_validate(view.admin_set),
        plan=_values(view.plan),
        ceiling=_values(view.ceiling),
    )


def _key_view(view: limits_service.KeyLimits) -> KeyLimits:
    return KeyLimits(
        key_id=view.key_id,
        user_id=view.user_id,
        own=LimitSettings.model_validate(view.own),
        effective=_values(view.effective),
        ceiling=_values(view.ceiling),
    )


@router.get(
    "/user/limit",
    tags=["user"],
    responses={
        401: {"description": "Missing or invalid API key."},
        403: {"description": "The key may not read the account, or it is the operator key."},
    },
)
async def get_my_limits(user: CurrentUser, conn: Conn, state: State) -> CallerLimits:
    """The calling key's limits and its account's ceiling, with what each has used now."""
    assert user.user_id is not None and user.key_id is not None
    found = await limits_service.caller_limits(conn, state, user_id=user.user_id, key_id=user.key_id)
    return CallerLimits(
        key=KeyLimitsAndUsage(
            id=found.key_id,
            own=LimitSettings.model_validate(found.key_own),
            limits=_values(found.key.limits),
            usage=LimitUsage.model_validate(found.key.usage),
        ),
        account=AccountLimitsAndUsage(
            limits=_values(found.account.limits), usage=LimitUsage.model_validate(found.account.usage)
        ),
    )


@router.get("/admin/rate-limits/users/{user_id}", tags=["admin"], responses={**DENIED, **USER_NOT_FOUND})
async def get_user_limits(actor: LimitsReader, user_id: UserID, conn: Conn, state: State) -> UserLimits:
    """A user's admin-set ceilings and the ceiling in force."""
    return _user_view(await limits_service.get_user_ceiling(conn, state.settings, user_id=user_id))


@router.put(
    "/admin/rate-limits/users/{user_id}",
    tags=["admin"],
    responses={**INVALID, **DENIED, **USER_NOT_FOUND},
)
async def set_user_limits(
    actor: LimitsWriter, user_id: UserID, body: SetLimits, conn: Conn, state: State, request: Request
) -> UserLimits:
    """Set a user's ceilings (above the plan too) or clear them with null; audited, applies at once."""
    view = await limits_service.set_user_ceiling(
        conn,
        state,
        user_id=user_id,
        changes=body.changes(),
        actor=actor,
        meta=request_meta(request, state),
    )
    return _user_view(view)


@router.get("/admin/rate-limits/keys/{key_id}", tags=["admin"], responses={**DENIED, **KEY_NOT_FOUND})
async def get_key_limits(actor: LimitsReader, key_id: KeyID, conn: Conn, state: State) -> KeyLimits:
    """A key's own limits, its owner's ceiling and the limits in force."""
    return _key_view(await limits_service.get_key_limits(conn, state.settings, key_id=key_id))


@router.put(
    "/admin/rate-limits/keys/{key_id}",
    tags=["admin"],
    responses={**INVALID, **DENIED, **KEY_NOT_FOUND},
)
async def set_key_limits(
    actor: LimitsWriter, key_id: KeyID, body: SetLimits, conn: Conn, state: State, request: Request
) -> KeyLimits:
    """Set a key's own limits or clear them with null; audited; its owner's ceiling still caps them."""
    view = await limits_service.set_key_limits(
        conn,
        state,
        key_id=key_id,
        changes=body.changes(),
        actor=actor,
        meta=request_meta(request, state),
    )
    return _key_view(view)
