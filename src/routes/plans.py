"""Routes: plans, the caller's plan, and their administration (/plans, /user/plan, /admin/plans).

`GET /plans` and `GET /plans/{id}` are public. The /admin routes sit on a router whose
`authenticate` dependency runs first, so no caller is answered (not even 404 or 400) before it is
known; see src/routes/admin.py for why that order holds.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request

from src.config import Settings
from src.deps import Conn, State
from src.routes.path_ids import parse_serial
from src.schemas.limits import LimitSettings, LimitUsage, LimitValues
from src.schemas.plans import (
    AdminPlan,
    AdminPlanList,
    AssignPlan,
    CreatePlan,
    PlanList,
    PlanOut,
    PlanUsage,
    UpdatePlan,
    UserPlanOut,
)
from src.security.deps import CurrentUser, Principal, authenticate, request_meta, require_permission
from src.services import limits as limits_service
from src.services import plans as plans_service

router = APIRouter()
admin = APIRouter(prefix="/admin/plans", tags=["admin"], dependencies=[Depends(authenticate)])

PlansReader = Annotated[Principal, Depends(require_permission("plans.read"))]
PlansWriter = Annotated[Principal, Depends(require_permission("plans.write"))]

Responses = dict[int | str, dict[str, Any]]
DENIED: Responses = {
    401: {"description": "Missing or invalid credentials."},
    403: {"description": "The caller's role lacks the permission, or the key's scopes exclude /admin."},
}
INVALID: Responses = {400: {"description": "An unknown field or an invalid value; `param` names it."}}
PLAN_NOT_FOUND: Responses = {404: {"description": "No such plan."}}
NAME_TAKEN: Responses = {409: {"description": "The name or the Stripe price belongs to another plan."}}


def _plan_id(plan_id: Annotated[str, Path(description="The plan's id.")]) -> int:
    return parse_serial(plan_id, param="plan_id", what="plan", code="plan_not_found")


PlanID = Annotated[int, Depends(_plan_id)]


def plan_view(plan: plans_service.Plan, settings: Settings) -> PlanOut:
    """A plan as the API shows it, with the limits in force (settings defaults where it sets none)."""
    return PlanOut(
        id=plan.id,
        name=plan.name,
        description=plan.description,
        price_cents=plan.price_cents,
        currency=plan.currency,
        billing_interval=plan.billing_interval,
        credits_included=plan.credits_included,
        limits=LimitValues.model_validate(
            limits_service.plan_limits(settings, plan.limits), from_attributes=True
        ),
        features=plan.features,
        is_default=plan.is_default,
    )


def _admin(plan: plans_service.Plan, settings: Settings) -> AdminPlan:
    return AdminPlan(
        **plan_view(plan, settings).model_dump(),
        limit_settings=LimitSettings.model_validate(plan.limits),
        stripe_price_id=plan.stripe_price_id,
        is_active=plan.is_active,
        created_at=plan.created_at,
        updated_at=plan.updated_at,
    )


def _user_plan(view: plans_service.UserPlanView, settings: Settings) -> dict[str, Any]:
    return {
        "user_id": view.user_id,
        "plan": plan_view(view.plan, settings),
        "status": view.status,
        "source": view.source,
        "current_period_start": view.current_period_start,
        "current_period_end": view.current_period_end,
        "auto_renew": view.auto_renew,
    }


@router.get("/plans", tags=["plans"])
async def list_plans(conn: Conn, state: State) -> PlanList:
    """The plans on offer."""
    plans = await plans_service.list_plans(conn, active_only=True)
    return PlanList(data=[plan_view(plan, state.settings) for plan in plans])


@router.get("/plans/{plan_id}", tags=["plans"], responses=PLAN_NOT_FOUND)
async def get_plan(plan_id: PlanID, conn: Conn, state: State) -> PlanOut:
    """One plan on offer."""
    return plan_view(await plans_service.get_public_plan(conn, plan_id=plan_id), state.settings)


@router.get(
    "/user/plan",
    tags=["user"],
    responses={
        401: {"description": "Missing or invalid API key."},
        403: {"description": "The key may not read the account, or it is the operator key."},
    },
)
async def get_my_plan(user: CurrentUser, conn: Conn, state: State) -> PlanUsage:
    """The caller's plan, its period and status, and the account's usage against its limits."""
    assert user.user_id is not None and user.key_id is not None
    found = await plans_service.plan_and_usage(conn, state, user_id=user.user_id, key_id=user.key_id)
    return PlanUsage(
        **_user_plan(found.view, state.settings),
        ceiling=LimitValues.model_validate(found.ceiling, from_attributes=True),
        usage=LimitUsage.model_validate(found.usage),
    )


@admin.get("", responses=DENIED)
async def admin_list_plans(actor: PlansReader, conn: Conn, state: State) -> AdminPlanList:
    """Every plan, retired ones included."""
    plans = await plans_service.list_plans(conn, active_only=False)
    return AdminPlanList(data=[_admin(plan, state.settings) for plan in plans])


@admin.post("", status_code=201, responses={**INVALID, **DENIED, **NAME_TAKEN})
async def create_plan(
    actor: PlansWriter, body: CreatePlan, conn: Conn, state: State, request: Request
) -> AdminPlan:
    """Create a plan; audited."""
    plan = await plans_service.create_plan(
        conn, state, values=body.values(), actor=actor, meta=request_meta(request, state)
    )
    return _admin(plan, state.settings)


@admin.post(
    "/assign",
    responses={
        **INVALID,
        **DENIED,
        404: {"description": "No such user or plan."},
        409: {"description": "The user's plan is paid by a Stripe subscription."},
    },
)
async def assign_plan(
    actor: PlansWriter, body: AssignPlan, conn: Conn, state: State, request: Request
) -> UserPlanOut:
    """Put a user on a plan (the default plan ends theirs); audited, applies at once."""
    view = await plans_service.assign_plan(
        conn,
        state,
        user_id=body.user_id,
        plan_id=body.plan_id,
        period_end=body.current_period_end,
        actor=actor,
        meta=request_meta(request, state),
    )
    return UserPlanOut(**_user_plan(view, state.settings))


@admin.get("/{plan_id}", responses={**DENIED, **PLAN_NOT_FOUND})
async def admin_get_plan(actor: PlansReader, plan_id: PlanID, conn: Conn, state: State) -> AdminPlan:
    """One plan, retired or not."""
    return _admin(await plans_service.get_plan(conn, plan_id=plan_id), state.settings)


@admin.put(
    "/{plan_id}",
    responses={
        **INVALID,
        **DENIED,
        **PLAN_NOT_FOUND,
        409: {"description": "A name or Stripe price in use, or a change the default plan cannot take."},
    },
)
async def update_plan(
    actor: PlansWriter, plan_id: PlanID, body: UpdatePlan, conn: Conn, state: State, request: Request
) -> AdminPlan:
    """Change a plan; audited; its users get new limits from their next request."""
    plan = await plans_service.update_plan(
        conn, state, plan_id=plan_id, changes=body.changes(), actor=actor, meta=request_meta(request, state)
    )
    return _admin(plan, state.settings)


@admin.delete(
    "/{plan_id}",
    responses={**DENIED, **PLAN_NOT_FOUND, 409: {"description": "The default plan cannot be retired."}},
)
async def deactivate_plan(
    actor: PlansWriter, plan_id: PlanID, conn: Conn, state: State, request: Request
) -> AdminPlan:
    """Retire a plan: no longer offered; users already on it keep it."""
    plan = await plans_service.deactivate_plan(
        conn, state, plan_id=plan_id, actor=actor, meta=request_meta(request, state)
    )
    return _admin(plan, state.settings)


router.include_router(admin)
