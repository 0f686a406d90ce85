"""Routes: login and sign-up with Privy."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request

from src.deps import Conn, State
from src.errors import InvalidRequest
from src.schemas.users import Balance, LoginResponse, PrivyLogin, Profile
from src.security.deps import public_ip_limit, request_meta
from src.services import users as users_service

router = APIRouter(tags=["auth"])


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    # A malformed header is an unusable token, refused (and audited) like any other.
    return token.strip() if scheme.lower() == "bearer" else ""


@router.post(
    "/auth",
    dependencies=[Depends(public_ip_limit)],
    responses={
        429: {"description": "Too many requests from this address."},
        400: {"description": "The body has unknown fields, or two different access tokens."},
        401: {"description": "A missing, invalid, expired or forged Privy token."},
        403: {"description": "The account is disabled."},
        503: {"description": "Privy login is not configured."},
    },
)
async def login(
    state: State,
    conn: Conn,
    request: Request,
    body: PrivyLogin | None = None,
    authorization: Annotated[str | None, Header(description="Bearer <Privy access token>.")] = None,
) -> LoginResponse:
    """Log in or sign up with a Privy access token; answers the account's primary API key."""
    header_token = _bearer(authorization)
    body_token = body.access_token if body else None
    if header_token is not None and body_token is not None and header_token != body_token:
        raise InvalidRequest(
            "Send the Privy access token once: in the Authorization header or in 'access_token'.",
            param="access_token",
            code="conflicting_tokens",
        )
    result = await users_service.login_with_privy(
        conn,
        state,
        access_token=body_token or header_token,
        identity_token=body.identity_token if body else None,
        meta=request_meta(request, state),
        referral_code=body.referral_code if body else None,
    )
    return LoginResponse(
        user=Profile.model_validate(users_service.public_profile(result.user)),
        balance=Balance.model_validate(users_service.balance_of(result.user), from_attributes=True),
        api_key=result.api_key,
        is_new_user=result.is_new,
        referral=result.referral,
    )
