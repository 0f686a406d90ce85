"""Routes: subscribing to a plan through Stripe, and changing or cancelling the subscription.

These ask Stripe for the change and answer with what Stripe returned; the caller's plan
(user_plans) and allowance follow from Stripe's webhook events (src/services/subscriptions.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from src.deps import Conn, State
from src.routes.plans import plan_view
from src.schemas.subscriptions import (
    Allowance,
    CancelSubscription,
    ChangeSubscription,
    SubscriptionCheckout,
    SubscriptionCheckoutRequest,
    SubscriptionOut,
)
from src.security.deps import CurrentUser
from src.services import idempotency
from src.services import subscriptions as subscriptions_service

router = APIRouter(prefix="/api/stripe", tags=["subscriptions"])

Responses = dict[int | str, dict[str, Any]]
CALLER: Responses = {
    401: {"description": "Missing or invalid API key."},
    403: {"description": "The key may not act on the account, or it is the operator key."},
}
STRIPE: Responses = {
    502: {"description": "Stripe could not be reached or failed."},
    503: {"description": "Payments are not configured on this server."},
}
NO_SUBSCRIPTION: Responses = {404: {"description": "The caller has no subscription."}}
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", description="Retries with the same key get the first answer."),
]


def _view(view: subscriptions_service.SubscriptionView, state: State) -> SubscriptionOut:
    return SubscriptionOut(
        id=view.id,
        plan=plan_view(view.plan, state.settings),
        status=view.status,
        current_period_start=view.current_period_start,
        current_period_end=view.current_period_end,
        cancel_at_period_end=view.cancel_at_period_end,
        allowances=[
            Allowance(
                invoice=grant.reference,
                amount=grant.amount,
                remaining=grant.remaining,
                expires_at=grant.expires_at,
            )
            for grant in view.allowances
        ],
    )


@router.post(
    "/subscription-checkout",
    responses={
        **CALLER,
        **STRIPE,
        400: {"description": "The plan is not sold as a subscription, or a URL is on another origin."},
        404: {"description": "No such plan on offer."},
        409: {
            "description": "The caller already has a subscription, or the Idempotency-Key was reused"
            " with another body or is still in progress."
        },
    },
)
async def subscription_checkout(
    body: SubscriptionCheckoutRequest,
    user: CurrentUser,
    conn: Conn,
    state: State,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Start a Stripe Checkout for a subscription to a plan."""
    assert user.user_id is not None
    user_id = user.user_id

    async def run() -> tuple[int, Any]:
        started = await subscriptions_service.start_checkout(
            conn,
            state,
            user_id=user_id,
            plan_id=body.plan_id,
            success_url=body.success_url,
            cancel_url=body.cancel_url,
            idempotency_key=idempotency_key,
        )
        answer = SubscriptionCheckout(id=started.id, url=started.url, plan_id=started.plan_id)
        return 200, answer.model_dump(mode="json")

    status, answer = await idempotency.once(
        state.pool,
        scope=f"user:{user_id}",
        key=idempotency_key,
        fingerprint=idempotency.fingerprint("POST /api/stripe/subscription-checkout", body.model_dump()),
        run=run,
        ttl_hours=state.settings.idempotency_key_ttl_hours,
    )
    return JSONResponse(answer, status_code=status)


@router.get("/subscription", responses={**CALLER, **NO_SUBSCRIPTION})
async def get_subscription(user: CurrentUser, conn: Conn, state: State) -> SubscriptionOut:
    """The caller's subscription: the current one, else the latest."""
    assert user.user_id is not None
    view = await subscriptions_service.get_subscription(conn, user_id=user.user_id)
    return _view(view, state)


@router.post("/subscription/cancel", responses={**CALLER, **STRIPE, **NO_SUBSCRIPTION})
async def cancel_subscription(
    user: CurrentUser, conn: Conn, state: State, body: CancelSubscription | None = None
) -> SubscriptionOut:
    """Cancel the caller's subscription at the end of the paid period, or now."""
    assert user.user_id is not None
    immediately = body.immediately if body is not None else False
    view = await subscriptions_service.cancel(conn, state, user_id=user.user_id, immediately=immediately)
    return _view(view, state)


@router.post(
    "/subscription/change",
    responses={
        **CALLER,
        **STRIPE,
        400: {"description": "The plan is the current one or is not sold as a subscription."},
        404: {"description": "The caller has no subscription, or no such plan on offer."},
        409: {"description": "The Idempotency-Key was reused with another body or is still in progress."},
    },
)
async def change_subscription(
    body: ChangeSubscription,
    user: CurrentUser,
    conn: Conn,
    state: State,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Move the caller's subscription to another plan (upgrade or downgrade), prorated."""
    assert user.user_id is not None
    user_id = user.user_id

    async def run() -> tuple[int, Any]:
        view = await subscriptions_service.change_plan(
            conn, state, user_id=user_id, plan_id=body.plan_id, idempotency_key=idempotency_key
        )
        return 200, _view(view, state).model_dump(mode="json")

    status, answer = await idempotency.once(
        state.pool,
        scope=f"user:{user_id}",
        key=idempotency_key,
        fingerprint=idempotency.fingerprint("POST /api/stripe/subscription/change", body.model_dump()),
        run=run,
        ttl_hours=state.settings.idempotency_key_ttl_hours,
    )
    return JSONResponse(answer, status_code=status)
