"""Routes: the caller's own account (balance, profile, deletion, credit transactions)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from src.deps import Conn, State
from src.schemas.common import Page, Paging
from src.schemas.users import (
    AccountBalance,
    AccountDeleted,
    CreditTransaction,
    DeleteAccount,
    Profile,
    ProfileUpdate,
)
from src.security.deps import CurrentUser, request_meta
from src.services import users as users_service

router = APIRouter(prefix="/user", tags=["user"])

UNAUTHENTICATED: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid API key."},
    403: {"description": "The key may not do this, the account is disabled, or it is the operator key."},
}
INVALID_BODY: dict[int | str, dict[str, Any]] = {
    400: {"description": "An unknown field or an invalid value; `param` names it."}
}


@router.get("/balance", responses=UNAUTHENTICATED)
async def get_balance(user: CurrentUser, conn: Conn) -> AccountBalance:
    """The caller's balance, held credits, what is available to spend, and the grants behind it."""
    assert user.user_id is not None
    balance = await users_service.get_balance(conn, user_id=user.user_id)
    return AccountBalance.model_validate(balance, from_attributes=True)


@router.get("/profile", responses=UNAUTHENTICATED)
async def get_profile(user: CurrentUser, conn: Conn) -> Profile:
    """The caller's profile."""
    assert user.user_id is not None
    account = await users_service.get_user(conn, user_id=user.user_id)
    return Profile.model_validate(users_service.public_profile(account))


@router.put("/profile", responses={**INVALID_BODY, **UNAUTHENTICATED})
async def update_profile(
    body: ProfileUpdate, user: CurrentUser, conn: Conn, state: State, request: Request
) -> Profile:
    """Change the caller's username, contact e-mail or preferences; nothing else can change here."""
    account = await users_service.update_profile(
        conn,
        principal=user,
        meta=request_meta(request, state),
        changes=body.model_dump(include=body.model_fields_set),
    )
    return Profile.model_validate(users_service.public_profile(account))


@router.delete("/account", responses={**INVALID_BODY, **UNAUTHENTICATED})
async def delete_account(
    body: DeleteAccount, user: CurrentUser, conn: Conn, state: State, request: Request
) -> AccountDeleted:
    """Delete the caller's account: personal data removed, every key revoked at once."""
    await users_service.delete_account(conn, state, principal=user, meta=request_meta(request, state))
    return AccountDeleted(deleted=True)


@router.get("/credit-transactions", responses={**INVALID_BODY, **UNAUTHENTICATED})
async def list_credit_transactions(
    user: CurrentUser,
    conn: Conn,
    paging: Paging,
    transaction_type: Annotated[
        str | None, Query(alias="type", max_length=64, description="Only transactions of this type.")
    ] = None,
) -> Page[CreditTransaction]:
    """The caller's credit transactions, newest first."""
    assert user.user_id is not None
    rows, total = await users_service.list_credit_transactions(
        conn, user_id=user.user_id, limit=paging.limit, offset=paging.offset, type=transaction_type
    )
    return Page[CreditTransaction](
        data=[CreditTransaction.model_validate(row, from_attributes=True) for row in rows],
        total=total,
        limit=paging.limit,
        offset=paging.offset,
    )
