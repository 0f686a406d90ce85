"""Who is calling: the `authenticate` dependency and the admin permission check.

Bearer key -> HMAC-SHA256(SECRET_KEY, key) -> one indexed lookup, cached in process for at most
AUTH_CACHE_TTL_SECONDS -> key checks (active, not expired, scope, IP allowlist, Origin/Referer
domain) -> owner checks (active, not banned). Every unknown, revoked, deactivated or expired key
gets the same 401 body. Admin checks read the role fresh from the database, never from the cache.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Annotated
from urllib.parse import urlsplit
from uuid import UUID

from fastapi import Depends, Request

from src.db import api_keys as keys_db
from src.db import users as users_db
from src.db.api_keys import AuthRecord
from src.errors import AuthenticationFailed, PermissionDenied, RateLimited
from src.logging_config import bind_request_context
from src.security import permissions
from src.security.client_ip import client_ip
from src.security.security import digests_match, key_digest, looks_like_key
from src.services import limits as limits_service
from src.services import rate_limit
from src.services.rate_limit import Admission
from src.state import AppState, get_state

logger = logging.getLogger("gatewayz.auth")

# One message for a missing, malformed, unknown, revoked, deactivated or expired key: the body
# must not tell a key guesser which of these it hit.
INVALID_KEY = "Invalid or missing API key. Send a valid key as 'Authorization: Bearer <key>'."


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user's key, or the operator's ADMIN_API_KEY."""

    user_id: UUID | None
    key_id: UUID | None
    is_operator: bool
    record: AuthRecord | None = None

    @property
    def actor(self) -> str:
        return "operator" if self.is_operator else f"user:{self.user_id}"


@dataclass(frozen=True)
class RequestMeta:
    """Where a request came from, for the audit log."""

    ip: str | None
    user_agent: str | None
    request_id: str | None


def request_meta(request: Request, state: AppState) -> RequestMeta:
    return RequestMeta(
        ip=client_ip(request.scope, state.trusted_proxies),
        user_agent=(request.headers.get("user-agent") or "")[:512] or None,
        request_id=request.scope.get("state", {}).get("request_id"),
    )


def _bearer_token(request: Request) -> str:
    values = request.headers.getlist("authorization")
    if len(values) != 1:
        raise AuthenticationFailed(INVALID_KEY)
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token or token != token.strip() or " " in token:
        raise AuthenticationFailed(INVALID_KEY)
    return token


def _is_operator_key(state: AppState, token: str) -> bool:
    admin_key = state.settings.admin_api_key
    return admin_key is not None and hmac.compare_digest(
        token.encode(), admin_key.get_secret_value().encode()
    )


async def _lookup(state: AppState, token: str) -> AuthRecord | None:
    assert state.settings.secret_key is not None
    digest = key_digest(state.settings.secret_key.get_secret_value(), token)
    record = state.auth_cache.get(digest)
    if record is None:
        generation = state.auth_cache.generation
        async with state.pool.acquire() as conn:
            record = await keys_db.get_auth_record(conn, key_hash=digest)
        if record is None:
            return None
        state.auth_cache.set(digest, record, generation=generation)
    return record if digests_match(record.key_hash, digest) else None


def _domain_allowed(request: Request, patterns: list[str]) -> bool:
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return False
    try:
        host = (urlsplit(source).hostname or "").rstrip(".")
    except ValueError:  # a malformed header is a refusal, not a 500
        return False
    if not host:
        return False
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
        if host == pattern:
            return True
    return False


def _check_key(request: Request, state: AppState, record: AuthRecord, ip: str | None) -> None:
    key = record.key
    now = datetime.now(UTC)
    if (
        not key.is_active
        or key.revoked_at is not None
        or (key.expires_at is not None and key.expires_at <= now)
    ):
        raise AuthenticationFailed(INVALID_KEY)
    if not record.user_is_active or record.user_banned or record.user_deleted:
        raise PermissionDenied("This account is disabled.", code="account_disabled")
    needed = permissions.scope_for(request.method, request.url.path)
    if not permissions.scope_allows(key.scopes, needed):
        raise PermissionDenied(f"This API key does not have the '{needed}' scope.", code="insufficient_scope")
    if key.ip_allowlist:
        try:
            address: IPv4Address | IPv6Address | None = ip_address(ip or "")
        except ValueError:
            address = None
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
            address = address.ipv4_mapped
        if address is None or not any(address in network for network in key.ip_allowlist):
            raise PermissionDenied(
                "This API key may not be used from this IP address.", code="ip_not_allowed"
            )
    if key.domain_restrictions and not _domain_allowed(request, key.domain_restrictions):
        raise PermissionDenied("This API key may not be used from this origin.", code="domain_not_allowed")


async def authenticate(request: Request, state: Annotated[AppState, Depends(get_state)]) -> Principal:
    """The caller, verified; raises 401 or 403."""
    ip = client_ip(request.scope, state.trusted_proxies)
    blocked = state.auth_blocked.get(ip or "")
    if blocked is not None:
        # This IP has been guessing keys: it gets no lookups until the window passes.
        raise _throttled(blocked)
    try:
        token = _bearer_token(request)
        if _is_operator_key(state, token):
            principal = Principal(user_id=None, key_id=None, is_operator=True)
            request.state.user_id = "operator"
            return principal
        record = await _lookup(state, token) if looks_like_key(token) else None
        if record is None:
            raise AuthenticationFailed(INVALID_KEY)
        _check_key(request, state, record, ip)
    except AuthenticationFailed:
        state.auth_failures.record(ip)
        retry_after = await state.limiter.record_ip_failure(ip)
        if retry_after is not None:
            state.auth_blocked.set(ip or "", retry_after, ttl=retry_after)
        raise
    key = record.key
    request.state.user_id = str(key.user_id)
    request.state.key_id = str(key.id)
    bind_request_context(user_id=str(key.user_id), key_id=str(key.id))
    if state.auth_cache.should_touch(key.id):
        state.spawn(_touch(state, key.id))
    return Principal(user_id=key.user_id, key_id=key.id, is_operator=False, record=record)


def _throttled(retry_after: float) -> RateLimited:
    return RateLimited(
        "Too many failed authentications from this address; retry later.",
        code="too_many_auth_failures",
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


async def _touch(state: AppState, key_id: UUID) -> None:
    try:
        async with state.pool.acquire() as conn:
            await keys_db.touch_last_used(conn, key_id=key_id)
    except Exception as exc:  # last_used_at is informational: never fail anything over it
        logger.warning("could not record key use: %s", type(exc).__name__)


async def authenticate_user(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """A user's key; the operator key has no account to act on."""
    if principal.is_operator:
        raise PermissionDenied("The operator key only works on /admin routes.", code="operator_not_allowed")
    return principal


def require_permission(permission: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency for admin routes: the operator key, or a key whose owner's role allows it."""
    assert permission in permissions.PERMISSIONS, permission

    async def dependency(
        principal: Annotated[Principal, Depends(authenticate)],
        state: Annotated[AppState, Depends(get_state)],
    ) -> Principal:
        if principal.is_operator:
            return principal
        assert principal.user_id is not None
        async with state.pool.acquire() as conn:
            role = await users_db.role_permissions(conn, user_id=principal.user_id)
        if role is None or not permissions.has_permission(role[1], permission):
            raise PermissionDenied(f"This requires the '{permission}' permission.")
        return principal

    dependency.__name__ = f"require_{permission.replace('.', '_')}"
    return dependency


CurrentUser = Annotated[Principal, Depends(authenticate_user)]
AnyPrincipal = Annotated[Principal, Depends(authenticate)]


@dataclass(frozen=True)
class Limited:
    """An authenticated caller admitted by the rate limiter, holding a concurrency slot."""

    principal: Principal
    admission: Admission


async def rate_limited(
    request: Request,
    principal: Annotated[Principal, Depends(authenticate_user)],
    state: Annotated[AppState, Depends(get_state)],
) -> AsyncIterator[Limited]:
    """Requests per window and the concurrency slot, per key and per user, decided together.

    The slot is released by whoever finishes the request (the inference service, or the
    `rate_limited_quick` variant below); a slot that is never released expires with its lease.
    """
    assert principal.record is not None and principal.user_id is not None
    record = principal.record
    ceiling = limits_service.ceiling(state.settings, record.user_limits, record.plan_limits)
    own = {name: getattr(record.key, name) for name in limits_service.LIMIT_NAMES}
    subjects = rate_limit.subjects_for(
        key_id=principal.key_id,
        user_id=principal.user_id,
        key_limits=limits_service.effective_key_limits(own, ceiling),
        user_limits=ceiling,
    )
    admission = await state.limiter.admit(subjects)
    request.state.rate_limit_headers = admission.headers
    try:
        yield Limited(principal=principal, admission=admission)
    except BaseException:
        # The route failed before it handed the slot on (a body too large, a client gone while
        # the body was read): free it now, not when its lease expires. Once the route has
        # returned, a stream owns the slot; the "function" scope below keeps this block out of
        # the response's own failures. Idempotent where the route already freed it.
        await state.limiter.finish(admission, actual_tokens=0)
        raise


# Exits when the route returns, before the response is sent (see the comment in rate_limited).
_Admitted = Depends(rate_limited, scope="function")


async def rate_limited_quick(
    limited: Annotated[Limited, _Admitted], state: Annotated[AppState, Depends(get_state)]
) -> Principal:
    """For /v1 routes that do no upstream work: counted, then the slot is freed at once."""
    await state.limiter.finish(limited.admission)
    return limited.principal


async def public_ip_limit(request: Request, state: Annotated[AppState, Depends(get_state)]) -> None:
    """Requests per IP on unauthenticated routes (POST /auth)."""
    ip = client_ip(request.scope, state.trusted_proxies) or "unknown"
    subject = rate_limit.Subject(
        kind="ip",
        id=ip,
        limits=limits_service.Limits(
            rpm_limit=state.settings.public_rpm_per_ip,
            rpd_limit=state.settings.public_rpm_per_ip * 60 * 24,
            tpm_limit=1,
            tpd_limit=1,
            concurrency_limit=state.settings.public_rpm_per_ip,
        ),
    )
    admission = await state.limiter.admit((subject,))
    await state.limiter.finish(admission)


RateLimitedUser = Annotated[Limited, _Admitted]
LimitedPrincipal = Annotated[Principal, Depends(rate_limited_quick)]
