"""Routes: coupon redemption and administration (/coupons, /admin/coupons).

The /admin routes sit on a router whose `authenticate` dependency runs first, so no caller is
answered (not even 404 or 400) before it is known; see src/routes/admin.py for why that order holds.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse

from src.deps import Conn, State
from src.routes.path_ids import parse_serial
from src.schemas.common import Page, Paging
from src.schemas.coupons import (
    AdminCoupon,
    AdminRedemption,
    CouponList,
    CouponOut,
    CreateCoupon,
    RedeemCoupon,
    Redeemed,
    RedemptionOut,
    UpdateCoupon,
)
from src.security.deps import CurrentUser, Principal, authenticate, request_meta, require_permission
from src.services import coupons as coupons_service
from src.services import idempotency

router = APIRouter()
admin = APIRouter(prefix="/admin/coupons", tags=["admin"], dependencies=[Depends(authenticate)])

CouponsReader = Annotated[Principal, Depends(require_permission("coupons.read"))]
CouponsWriter = Annotated[Principal, Depends(require_permission("coupons.write"))]

Responses = dict[int | str, dict[str, Any]]
USER: Responses = {
    401: {"description": "Missing or invalid API key."},
    403: {"description": "The key may not use the account, or it is the operator key."},
}
DENIED: Responses = {
    401: {"description": "Missing or invalid credentials."},
    403: {"description": "The caller's role lacks the permission, or the key's scopes exclude /admin."},
}
INVALID: Responses = {400: {"description": "An unknown field or an invalid value; `param` names it."}}
COUPON_NOT_FOUND: Responses = {404: {"description": "No such coupon."}}
CODE_TAKEN: Responses = {409: {"description": "Another coupon has this code."}}


def _coupon_id(coupon_id: Annotated[str, Path(description="The coupon's id.")]) -> int:
    return parse_serial(coupon_id, param="coupon_id", what="coupon", code="coupon_not_found")


CouponID = Annotated[int, Depends(_coupon_id)]


def _admin(coupon: coupons_service.Coupon) -> AdminCoupon:
    return AdminCoupon.model_validate(coupon, from_attributes=True)


@router.post(
    "/coupons/redeem",
    tags=["coupons"],
    response_model=Redeemed,
    responses={
        **USER,
        400: {
            "description": "Unknown, assigned to another account, inactive, not yet valid or expired"
            " (`code` says which), or a discount coupon (it applies to a top-up checkout)."
        },
        409: {
            "description": "Already redeemed by the caller, fully used, or an Idempotency-Key reused"
            " with another body or still in progress."
        },
        429: {"description": "Too many failed codes from this account or address this minute."},
    },
)
async def redeem_coupon(
    user: CurrentUser,
    body: RedeemCoupon,
    state: State,
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Retries with the same key redeem once."),
    ] = None,
) -> JSONResponse:
    """Redeem a credits coupon: its credits are added to the balance once."""
    assert user.user_id is not None
    user_id = user.user_id
    meta = request_meta(request, state)

    async def run() -> tuple[int, Any]:
        redeemed = await coupons_service.redeem(
            state.pool,
            state.limiter,
            state.settings,
            user_id=user_id,
            code=body.code,
            ip=meta.ip,
            request_id=meta.request_id,
        )
        answer = Redeemed(
            **RedemptionOut.model_validate(redeemed.redemption, from_attributes=True).model_dump(),
            balance=redeemed.balance_after,
        )
        return 200, answer.model_dump(mode="json")

    status, answer = await idempotency.once(
        state.pool,
        scope=f"user:{user_id}",
        key=idempotency_key,
        fingerprint=idempotency.fingerprint(
            "POST /coupons/redeem", coupons_service.normalise_code(body.code) or body.code
        ),
        run=run,
        ttl_hours=state.settings.idempotency_key_ttl_hours,
    )
    return JSONResponse(answer, status_code=status)


@router.get("/coupons/available", tags=["coupons"], responses=USER)
async def available_coupons(user: CurrentUser, conn: Conn) -> CouponList:
    """Coupons the caller may use now: valid, not used up, public or assigned to the caller."""
    assert user.user_id is not None
    coupons = await coupons_service.available(conn, user_id=user.user_id)
    return CouponList(data=[CouponOut.model_validate(c, from_attributes=True) for c in coupons])


@router.get("/coupons/history", tags=["coupons"], responses=USER)
async def coupon_history(user: CurrentUser, paging: Paging, conn: Conn) -> Page[RedemptionOut]:
    """The caller's coupon redemptions, newest first."""
    assert user.user_id is not None
    rows, total = await coupons_service.history(
        conn, user_id=user.user_id, limit=paging.limit, offset=paging.offset
    )
    return Page[RedemptionOut](
        data=[RedemptionOut.model_validate(r, from_attributes=True) for r in rows],
        total=total,
        limit=paging.limit,
        offset=paging.offset,
    )


@admin.get("", responses=DENIED)
async def admin_list_coupons(actor: CouponsReader, paging: Paging, conn: Conn) -> Page[AdminCoupon]:
    """Every coupon, newest first."""
    coupons, total = await coupons_service.list_coupons(conn, limit=paging.limit, offset=paging.offset)
    return Page[AdminCoupon](
        data=[_admin(c) for c in coupons], total=total, limit=paging.limit, offset=paging.offset
    )


@admin.post("", status_code=201, responses={**INVALID, **DENIED, **CODE_TAKEN})
async def create_coupon(
    actor: CouponsWriter, body: CreateCoupon, conn: Conn, state: State, request: Request
) -> AdminCoupon:
    """Create a coupon; audited."""
    coupon = await coupons_service.create_coupon(
        conn, values=body.values(), actor=actor, meta=request_meta(request, state)
    )
    return _admin(coupon)


@admin.get("/{coupon_id}", responses={**DENIED, **COUPON_NOT_FOUND})
async def admin_get_coupon(actor: CouponsReader, coupon_id: CouponID, conn: Conn) -> AdminCoupon:
    """One coupon."""
    return _admin(await coupons_service.get_coupon(conn, coupon_id=coupon_id))


@admin.put("/{coupon_id}", responses={**INVALID, **DENIED, **COUPON_NOT_FOUND, **CODE_TAKEN})
async def update_coupon(
    actor: CouponsWriter, coupon_id: CouponID, body: UpdateCoupon, conn: Conn, state: State, request: Request
) -> AdminCoupon:
    """Change a coupon (not its kind); audited. Uses already taken stay taken."""
    coupon = await coupons_service.update_coupon(
        conn, coupon_id=coupon_id, changes=body.changes(), actor=actor, meta=request_meta(request, state)
    )
    return _admin(coupon)


@admin.delete("/{coupon_id}", responses={**DENIED, **COUPON_NOT_FOUND})
async def deactivate_coupon(
    actor: CouponsWriter, coupon_id: CouponID, conn: Conn, state: State, request: Request
) -> AdminCoupon:
    """Deactivate a coupon: it can no longer be used; its redemptions stay."""
    coupon = await coupons_service.deactivate_coupon(
        conn, coupon_id=coupon_id, actor=actor, meta=request_meta(request, state)
    )
    return _admin(coupon)


@admin.get("/{coupon_id}/redemptions", responses={**DENIED, **COUPON_NOT_FOUND})
async def admin_coupon_redemptions(
    actor: CouponsReader, coupon_id: CouponID, paging: Paging, conn: Conn
) -> Page[AdminRedemption]:
    """A coupon's redemptions, newest first."""
    rows, total = await coupons_service.redemptions_of(
        conn, coupon_id=coupon_id, limit=paging.limit, offset=paging.offset
    )
    return Page[AdminRedemption](
        data=[AdminRedemption.model_validate(r, from_attributes=True) for r in rows],
        total=total,
        limit=paging.limit,
        offset=paging.offset,
    )


router.include_router(admin)
