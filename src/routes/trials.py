"""Routes: the caller's trial and its administration (/trial, /admin/trials).

`authenticate` is a router-level dependency, so no caller is answered (not even 404 for an unknown
id, or 400 for a bad body) before it is known; see src/routes/admin.py for why this order holds.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse

from src.deps import Conn, State
from src.routes.path_ids import UserID
from src.schemas.trials import ExtendTrial, GrantTrial, TrialStatus
from src.security.deps import CurrentUser, Principal, authenticate, request_meta, require_permission
from src.services import idempotency
from src.services import trials as trials_service

router = APIRouter(dependencies=[Depends(authenticate)])

TrialsWriter = Annotated[Principal, Depends(require_permission("trials.write"))]

Responses = dict[int | str, dict[str, Any]]
DENIED: Responses = {
    401: {"description": "Missing or invalid credentials."},
    403: {"description": "The caller's role lacks the permission, or the key's scopes exclude /admin."},
}
INVALID: Responses = {400: {"description": "An unknown field or an invalid value; `param` names it."}}


def _view(status: trials_service.TrialStatus) -> TrialStatus:
    return TrialStatus.model_validate(status, from_attributes=True)


@router.get(
    "/trial/status",
    tags=["trials"],
    responses={
        401: {"description": "Missing or invalid API key."},
        403: {"description": "The key may not read the account, or it is the operator key."},
    },
)
async def get_trial_status(user: CurrentUser, conn: Conn) -> TrialStatus:
    """The caller's trial: whether it is active, its credits, end, limits, use and conversion."""
    assert user.user_id is not None
    return _view(await trials_service.get_status(conn, user_id=user.user_id))


@router.post(
    "/admin/trials/{user_id}/grant",
    tags=["admin"],
    status_code=201,
    responses={
        **INVALID,
        **DENIED,
        404: {"description": "No such user."},
        409: {"description": "The user already has or had a trial: extend it instead."},
    },
)
async def grant_trial(
    actor: TrialsWriter, user_id: UserID, body: GrantTrial, conn: Conn, state: State, request: Request
) -> TrialStatus:
    """Give a user a trial (TRIAL_* settings for what the body leaves out); audited."""
    status = await trials_service.grant_trial(
        conn,
        state.settings,
        user_id=user_id,
        credits=body.credits,
        days=body.days,
        max_tokens=body.max_tokens,
        max_requests=body.max_requests,
        reason=body.reason,
        actor=actor,
        meta=request_meta(request, state),
    )
    return _view(status)


@router.post(
    "/admin/trials/{user_id}/extend",
    tags=["admin"],
    response_model=TrialStatus,
    responses={
        **INVALID,
        **DENIED,
        404: {"description": "No such user, or the user has no trial."},
        409: {
            "description": "The trial would still be over after the extension, or an Idempotency-Key"
            " reused with another body or still in progress."
        },
    },
)
async def extend_trial(
    actor: TrialsWriter,
    user_id: UserID,
    body: ExtendTrial,
    conn: Conn,
    state: State,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Retries with the same key extend the trial once."),
    ] = None,
) -> JSONResponse:
    """Extend a user's trial by days, and optionally more credits and limits; audited."""

    async def run() -> tuple[int, Any]:
        status = await trials_service.extend_trial(
            conn,
            user_id=user_id,
            days=body.days,
            credits=body.credits,
            max_tokens=body.max_tokens,
            max_requests=body.max_requests,
            reason=body.reason,
            actor=actor,
            meta=request_meta(request, state),
        )
        return 200, _view(status).model_dump(mode="json")

    status, answer = await idempotency.once(
        state.pool,
        scope=f"admin:{actor.actor}",
        key=idempotency_key,
        fingerprint=idempotency.fingerprint(
            f"POST /admin/trials/{user_id}/extend", body.model_dump(mode="json")
        ),
        run=run,
        ttl_hours=state.settings.idempotency_key_ttl_hours,
    )
    return JSONResponse(answer, status_code=status)
