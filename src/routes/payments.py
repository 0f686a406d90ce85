"""Routes: Stripe top-ups (/api/stripe/...), the Stripe webhook, payments, and admin refunds.

The credit packages and the webhook are public (the webhook proves itself with its
Stripe-Signature); everything else needs a user's key, or the billing permissions under /admin.
`authenticate` is a router-level dependency of those routers, so no caller is answered (404, 400)
before it is known; see src/routes/admin.py for why that order holds.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse

from src.deps import Conn, State
from src.routes.path_ids import parse_uuid
from src.schemas.common import Page, Paging
from src.schemas.payments import (
    AdminPaymentOut,
    CheckoutSessionOut,
    CreateCheckout,
    CreditPackageList,
    CreditPackageOut,
    PaymentOut,
    PaymentStatus,
    RefundOut,
    RefundPayment,
    WebhookReceived,
)
from src.security.deps import CurrentUser, Principal, authenticate, request_meta, require_permission
from src.services import idempotency
from src.services import payments as payments_service
from src.services.payments import Payment

router = APIRouter()
user_router = APIRouter(prefix="/api/stripe", tags=["payments"], dependencies=[Depends(authenticate)])
admin_router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authenticate)])

BillingReader = Annotated[Principal, Depends(require_permission("billing.read"))]
BillingWriter = Annotated[Principal, Depends(require_permission("billing.write"))]

Responses = dict[int | str, dict[str, Any]]
USER: Responses = {
    401: {"description": "Missing or invalid API key."},
    403: {"description": "The key may not act on the account, or it is the operator key."},
}
DENIED: Responses = {
    401: {"description": "Missing or invalid credentials."},
    403: {"description": "The caller's role lacks the permission, or the key's scopes exclude /admin."},
}
PAYMENT_NOT_FOUND: Responses = {404: {"description": "No such payment (or not the caller's)."}}
STRIPE_DOWN: Responses = {
    502: {"description": "Stripe could not be reached or failed."},
    503: {"description": "Payments are not configured on this server."},
}


def _payment_id(payment_id: Annotated[str, Path(description="The payment's id.")]) -> UUID:
    return parse_uuid(payment_id, param="payment_id", what="payment", code="payment_not_found")


PaymentID = Annotated[UUID, Depends(_payment_id)]
SessionID = Annotated[str, Path(max_length=255, description="The Checkout Session's id (cs_...).")]


def _fields(payment: Payment) -> dict[str, Any]:
    return {
        "id": payment.id,
        "kind": payment.kind,
        "status": payment.status,
        "package_id": payment.package_id,
        "amount_cents": payment.amount_cents,
        "discount_cents": payment.discount_cents,
        "amount_paid_cents": payment.amount_paid_cents,
        "refunded_cents": payment.refunded_cents,
        "currency": payment.currency,
        "coupon_code": payment.coupon_code,
        "credits": payment.credits,
        "checkout_session_id": payment.stripe_checkout_session_id,
        "created_at": payment.created_at,
        "paid_at": payment.paid_at,
    }


def _view(payment: Payment) -> PaymentOut:
    return PaymentOut(**_fields(payment))


def _checkout_view(payment: Payment) -> CheckoutSessionOut:
    assert payment.stripe_checkout_session_id is not None
    is_open = payment.status == "pending" and payment.granted_at is None
    return CheckoutSessionOut(
        id=payment.stripe_checkout_session_id,
        url=payment.checkout_url if is_open else None,
        expires_at=payment.checkout_expires_at,
        granted=payment.granted_at is not None,
        payment_id=payment.id,
        payment=_view(payment),
    )


def _admin_view(payment: Payment) -> AdminPaymentOut:
    return AdminPaymentOut(
        **_fields(payment),
        user_id=payment.user_id,
        livemode=payment.livemode,
        stripe_payment_intent_id=payment.stripe_payment_intent_id,
        stripe_charge_id=payment.stripe_charge_id,
        stripe_customer_id=payment.stripe_customer_id,
        stripe_invoice_id=payment.stripe_invoice_id,
        credits_refunded=payment.credits_refunded,
        credits_disputed=payment.credits_disputed,
        granted_at=payment.granted_at,
        updated_at=payment.updated_at,
    )


# -- public -----------------------------------------------------------------------------------


@router.get("/api/stripe/credit-packages", tags=["payments"])
async def list_credit_packages(state: State) -> CreditPackageList:
    """The credit packages on sale, and the bounds of a custom amount."""
    settings = state.settings
    currency = settings.stripe_currency.lower()
    return CreditPackageList(
        data=[
            CreditPackageOut(
                id=p.id, name=p.name, amount_cents=p.amount_cents, currency=currency, credits=p.credits
            )
            for p in payments_service.credit_packages(settings)
        ],
        currency=currency,
        min_amount_cents=settings.stripe_min_topup_cents,
        max_amount_cents=settings.stripe_max_topup_cents,
    )


@router.post(
    "/api/stripe/webhook",
    tags=["payments"],
    responses={
        400: {"description": "A missing, bad or stale Stripe-Signature, or not an event; nothing applied."},
        500: {
            "description": "The event could not be applied now; nothing was kept and Stripe will retry it."
        },
        503: {"description": "Webhooks are not configured on this server."},
    },
)
async def stripe_webhook(
    request: Request,
    state: State,
    stripe_signature: Annotated[str | None, Header(alias="Stripe-Signature")] = None,
) -> WebhookReceived:
    """Stripe's events: verified over the raw body, each applied once, in one transaction."""
    payload = await request.body()
    outcome = await payments_service.receive_webhook(state, payload=payload, signature=stripe_signature)
    return WebhookReceived(id=outcome.event_id, type=outcome.type, outcome=outcome.outcome)


# -- the caller's top-ups ---------------------------------------------------------------------


@user_router.post(
    "/checkout-session",
    response_model=CheckoutSessionOut,
    responses={
        **USER,
        400: {
            "description": "An unknown field (credits and metadata are the server's), an unknown package,"
            " an amount out of bounds, a URL on another origin, or an unusable coupon (`code` says which)."
        },
        409: {"description": "The coupon is used up, or an Idempotency-Key reused with another body."},
        **STRIPE_DOWN,
    },
)
async def create_checkout_session(
    user: CurrentUser,
    body: CreateCheckout,
    state: State,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Retries with the same key get the same checkout."),
    ] = None,
) -> JSONResponse:
    """Start a top-up: a Stripe Checkout Session for a package or an amount; its URL is in the answer."""
    assert user.user_id is not None
    user_id = user.user_id

    async def run() -> tuple[int, Any]:
        payment = await payments_service.create_checkout(
            state,
            user_id=user_id,
            package_id=body.package_id,
            amount_cents=body.amount_cents,
            coupon_code=body.coupon_code,
            success_url=body.success_url,
            cancel_url=body.cancel_url,
        )
        return 200, _checkout_view(payment).model_dump(mode="json")

    status, answer = await idempotency.once(
        state.pool,
        scope=f"user:{user_id}",
        key=idempotency_key,
        fingerprint=idempotency.fingerprint(
            "POST /api/stripe/checkout-session", body.model_dump(mode="json")
        ),
        run=run,
        ttl_hours=state.settings.idempotency_key_ttl_hours,
    )
    return JSONResponse(answer, status_code=status)


@user_router.get(
    "/checkout-session/{session_id}",
    responses={**USER, 404: {"description": "No such checkout (or not the caller's)."}, **STRIPE_DOWN},
)
async def get_checkout_session(user: CurrentUser, session_id: SessionID, state: State) -> CheckoutSessionOut:
    """The caller's checkout; a paid one not yet credited is credited now (once, as by the webhook)."""
    assert user.user_id is not None
    payment = await payments_service.reconcile_checkout(state, user_id=user.user_id, session_id=session_id)
    return _checkout_view(payment)


@user_router.get("/payments", responses=USER)
async def list_my_payments(user: CurrentUser, paging: Paging, conn: Conn) -> Page[PaymentOut]:
    """The caller's payments, newest first."""
    assert user.user_id is not None
    payments, total = await payments_service.list_payments(
        conn, user_id=user.user_id, status=None, limit=paging.limit, offset=paging.offset
    )
    return Page(data=[_view(p) for p in payments], total=total, limit=paging.limit, offset=paging.offset)


@user_router.get("/payments/{payment_id}", responses={**USER, **PAYMENT_NOT_FOUND})
async def get_my_payment(user: CurrentUser, payment_id: PaymentID, conn: Conn) -> PaymentOut:
    """One of the caller's payments."""
    assert user.user_id is not None
    return _view(await payments_service.get_payment(conn, payment_id=payment_id, user_id=user.user_id))


# -- admin ------------------------------------------------------------------------------------


@admin_router.get("/payments", responses=DENIED)
async def list_payments(
    actor: BillingReader,
    paging: Paging,
    conn: Conn,
    user_id: Annotated[UUID | None, Query(description="Only this user's payments.")] = None,
    status: Annotated[PaymentStatus | None, Query(description="Only payments in this status.")] = None,
) -> Page[AdminPaymentOut]:
    """Every payment, newest first."""
    payments, total = await payments_service.list_payments(
        conn, user_id=user_id, status=status, limit=paging.limit, offset=paging.offset
    )
    return Page(
        data=[_admin_view(p) for p in payments], total=total, limit=paging.limit, offset=paging.offset
    )


@admin_router.get("/payments/{payment_id}", responses={**DENIED, **PAYMENT_NOT_FOUND})
async def get_payment(actor: BillingReader, payment_id: PaymentID, conn: Conn) -> AdminPaymentOut:
    """One payment, with its Stripe ids and claw-backs."""
    return _admin_view(await payments_service.get_payment(conn, payment_id=payment_id))


@admin_router.post(
    "/payments/{payment_id}/refund",
    response_model=RefundOut,
    responses={
        **DENIED,
        **PAYMENT_NOT_FOUND,
        400: {"description": "An amount above what is left to refund, or Stripe refused the refund."},
        409: {"description": "Not a paid top-up, already refunded, or an Idempotency-Key reused."},
        **STRIPE_DOWN,
    },
)
async def refund_payment(
    actor: BillingWriter,
    payment_id: PaymentID,
    body: RefundPayment,
    state: State,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Retries with the same key refund once."),
    ] = None,
) -> JSONResponse:
    """Refund a top-up (all that is left, or `amount_cents`) through Stripe; its credits are clawed back."""
    meta = request_meta(request, state)

    async def run() -> tuple[int, Any]:
        refunded = await payments_service.refund_payment(
            state,
            payment_id=payment_id,
            amount_cents=body.amount_cents,
            reason=body.reason,
            actor=actor,
            meta=meta,
        )
        answer = RefundOut(
            id=refunded.refund_id,
            amount_cents=refunded.amount_cents,
            status=refunded.status,
            payment=_admin_view(refunded.payment),
        )
        return 200, answer.model_dump(mode="json")

    status, answer = await idempotency.once(
        state.pool,
        scope=f"admin:{actor.actor}",
        key=idempotency_key,
        fingerprint=idempotency.fingerprint(
            "POST /admin/payments/refund", str(payment_id), body.model_dump(mode="json")
        ),
        run=run,
        ttl_hours=state.settings.idempotency_key_ttl_hours,
    )
    return JSONResponse(answer, status_code=status)


router.include_router(user_router)
router.include_router(admin_router)
