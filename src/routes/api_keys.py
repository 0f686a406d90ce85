"""Routes: the caller's own API keys. The plaintext is returned only on create and rotate."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from src.deps import Conn, State
from src.routes.path_ids import KeyID
from src.schemas.api_keys import ApiKeyCreate, ApiKeyCreated, ApiKeyDeleted, ApiKeyUpdate, ApiKeyView
from src.schemas.common import Page, Paging
from src.security.deps import CurrentUser, request_meta
from src.services import api_keys as keys_service

router = APIRouter(prefix="/user/api-keys", tags=["api-keys"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid body, unknown scope, or a limit above your own"},
    401: {"description": "Missing or invalid API key"},
    403: {"description": "The key lacks the 'keys' scope, or the account is disabled"},
}
_KEY_ERRORS: dict[int | str, dict[str, Any]] = {**_ERRORS, 404: {"description": "No such key among yours"}}


# Routes declare the caller before the key id, so a request without a valid key gets 401 first.


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyCreated,
    responses={**_ERRORS, 409: {"description": "The account has too many keys"}},
)
async def create_api_key(
    body: ApiKeyCreate, user: CurrentUser, conn: Conn, state: State, request: Request
) -> dict[str, Any]:
    """Create a key; its plaintext is in this response only."""
    assert user.user_id is not None
    key, plaintext = await keys_service.create_key(
        conn,
        state,
        owner_id=user.user_id,
        actor=user,
        meta=request_meta(request, state),
        name=body.name,
        environment=body.environment,
        scopes=body.scopes,
        ip_allowlist=body.ip_allowlist,
        domain_restrictions=body.domain_restrictions,
        limits=body.limits(),
        expires_in_days=body.expires_in_days,
    )
    return {**keys_service.public_view(key), "api_key": plaintext}


@router.get("", response_model=Page[ApiKeyView], responses=_ERRORS)
async def list_api_keys(user: CurrentUser, conn: Conn, paging: Paging) -> dict[str, Any]:
    """List your keys, masked."""
    assert user.user_id is not None
    keys, total = await keys_service.list_keys(
        conn, owner_id=user.user_id, limit=paging.limit, offset=paging.offset
    )
    return {
        "data": [keys_service.public_view(key) for key in keys],
        "total": total,
        "limit": paging.limit,
        "offset": paging.offset,
    }


@router.get("/{key_id}", response_model=ApiKeyView, responses=_KEY_ERRORS)
async def get_api_key(user: CurrentUser, key_id: KeyID, conn: Conn) -> dict[str, Any]:
    """One of your keys, masked."""
    assert user.user_id is not None
    return keys_service.public_view(await keys_service.get_key(conn, owner_id=user.user_id, key_id=key_id))


@router.put("/{key_id}", response_model=ApiKeyView, responses=_KEY_ERRORS)
async def update_api_key(
    user: CurrentUser, key_id: KeyID, body: ApiKeyUpdate, conn: Conn, state: State, request: Request
) -> dict[str, Any]:
    """Change the fields sent; the others stay as they are."""
    assert user.user_id is not None
    key = await keys_service.update_key(
        conn,
        state,
        owner_id=user.user_id,
        key_id=key_id,
        actor=user,
        meta=request_meta(request, state),
        changes=body.changes(),
    )
    return keys_service.public_view(key)


@router.post("/{key_id}/rotate", response_model=ApiKeyCreated, responses=_KEY_ERRORS)
async def rotate_api_key(
    user: CurrentUser, key_id: KeyID, conn: Conn, state: State, request: Request
) -> dict[str, Any]:
    """Replace the key's secret: the old one stops working now; the new one is in this response only."""
    assert user.user_id is not None
    key, plaintext = await keys_service.rotate_key(
        conn,
        state,
        owner_id=user.user_id,
        key_id=key_id,
        actor=user,
        meta=request_meta(request, state),
    )
    return {**keys_service.public_view(key), "api_key": plaintext}


@router.delete("/{key_id}", response_model=ApiKeyDeleted, responses=_KEY_ERRORS)
async def delete_api_key(
    user: CurrentUser, key_id: KeyID, conn: Conn, state: State, request: Request
) -> ApiKeyDeleted:
    """Revoke the key for good."""
    assert user.user_id is not None
    await keys_service.revoke_key(
        conn,
        state,
        owner_id=user.user_id,
        key_id=key_id,
        actor=user,
        meta=request_meta(request, state),
    )
    return ApiKeyDeleted(id=key_id)
