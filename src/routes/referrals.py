"""Routes: referral codes, validation and stats (/referral/...)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from src.deps import Conn, State
from src.schemas.referrals import CodeValidity, ReferralCode, ReferralStats, ValidateCode
from src.security.deps import CurrentUser, public_ip_limit
from src.services import referrals as referrals_service

router = APIRouter(prefix="/referral", tags=["referrals"])

UNAUTHENTICATED: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key."},
    403: {"description": "The key may not read the account, or it is the operator key."},
}


@router.get(
    "/code", responses={**UNAUTHENTICATED, 503: {"description": "No free code was found; try again."}}
)
async def get_code(user: CurrentUser, conn: Conn) -> ReferralCode:
    """The caller's referral code, created on the first request."""
    assert user.user_id is not None
    return ReferralCode(code=await referrals_service.get_or_create_code(conn, user_id=user.user_id))


@router.post(
    "/validate",
    dependencies=[Depends(public_ip_limit)],
    responses={
        400: {"description": "No code, or an unknown field."},
        429: {"description": "Too many requests from this address."},
    },
)
async def validate_code(body: ValidateCode, conn: Conn, state: State) -> CodeValidity:
    """Whether a code can be used at sign-up (never who owns it); no API key needed."""
    check = await referrals_service.validate(conn, state.settings, code=body.code)
    return CodeValidity.model_validate(check, from_attributes=True)


@router.get("/stats", responses=UNAUTHENTICATED)
async def get_stats(user: CurrentUser, conn: Conn, state: State) -> ReferralStats:
    """How many accounts the caller referred, their state, and the rewards earned."""
    assert user.user_id is not None
    stats = await referrals_service.get_stats(conn, state.settings, user_id=user.user_id)
    return ReferralStats.model_validate(stats, from_attributes=True)
