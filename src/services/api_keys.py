"""API keys: create, list, update, rotate, revoke. Plaintext leaves only on create and rotate."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from src.db import api_keys as keys_db
from src.db import users as users_db
from src.db.api_keys import LIMIT_FIELDS, ApiKey
from src.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from src.security import permissions
from src.security.deps import Principal, RequestMeta
from src.security.security import Environment, KeyCipher, NewKey, new_key
from src.services import audit, notifications
from src.services import limits as limits_service
from src.state import AppState

# Each key is a row and a rate-limit bucket: an account needs a handful, never thousands.
MAX_KEYS_PER_USER = 100


def cipher_for(state: AppState) -> KeyCipher:
    return KeyCipher(state.settings.fernet_keys)


def generate(state: AppState, environment: Environment) -> NewKey:
    assert state.settings.secret_key is not None
    return new_key(
        secret_key=state.settings.secret_key.get_secret_value(),
        cipher=cipher_for(state),
        environment=environment,
    )


def public_view(key: ApiKey) -> dict[str, Any]:
    """What a key looks like to its owner: masked, never the digest or the token."""
    view = asdict(key)
    view["ip_allowlist"] = [str(network) for network in key.ip_allowlist]
    view["masked_key"] = f"{key.key_prefix}...{key.key_last4}"
    return view


def _validate_scopes(scopes: list[str]) -> list[str]:
    unknown = [s for s in scopes if s != permissions.ALL and s not in permissions.SCOPES]
    if unknown:
        raise InvalidRequest(f"Unknown scope '{unknown[0]}'.", param="scopes", code="invalid_scope")
    if not scopes:
        raise InvalidRequest("A key needs at least one scope.", param="scopes", code="invalid_scope")
    return sorted(set(scopes))


def _held_scopes(actor: Principal | None, owner_id: UUID) -> list[str] | None:
    """The scopes of the owner's key making the call; None when no key of the owner limits it."""
    if (
        actor is None
        or actor.record is None
        or actor.user_id != owner_id  # an admin acting on someone else's keys: roles decide
        or permissions.ALL in actor.record.key.scopes
    ):
        return None
    return actor.record.key.scopes


def _ensure_grantable(actor: Principal | None, owner_id: UUID, scopes: list[str]) -> None:
    """A key may not hand out scopes it does not hold itself, or it could mint a stronger key."""
    held = _held_scopes(actor, owner_id)
    if held is None:
        return
    beyond = [scope for scope in scopes if scope not in held]
    if beyond:
        raise PermissionDenied(
            f"This API key cannot grant the '{beyond[0]}' scope, which it does not hold.",
            param="scopes",
            code="scope_not_held",
        )


def _not_found() -> NotFound:
    # The same answer for a key that does not exist and one that belongs to someone else.
    return NotFound("No such API key.", param="key_id", code="api_key_not_found")


async def _check_limits(
    conn: asyncpg.Connection, state: AppState, *, user_id: UUID, limits: dict[str, int | None]
) -> None:
    ceiling = await limits_service.user_ceiling(conn, state.settings, user_id=user_id)
    for field in LIMIT_FIELDS:
        value = limits.get(field)
        cap = getattr(ceiling, field)
        if value is not None and value > cap:
            raise InvalidRequest(
                f"'{field}' may not exceed your limit of {cap}.", param=field, code="limit_above_ceiling"
            )


async def create_key(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    owner_id: UUID,
    actor: Principal | None,
    meta: RequestMeta | None,
    name: str,
    environment: Environment = "live",
    scopes: list[str] | None = None,
    ip_allowlist: list[str] | None = None,
    domain_restrictions: list[str] | None = None,
    limits: dict[str, int | None] | None = None,
    expires_in_days: int | None = None,
    is_primary: bool = False,
) -> tuple[ApiKey, str]:
    """A new key for `owner_id`, with its plaintext (a savepoint inside a caller's transaction)."""
    limits = limits or {}
    scopes = _validate_scopes(scopes if scopes is not None else [permissions.ALL])
    _ensure_grantable(actor, owner_id, scopes)
    async with conn.transaction():
        # Serialises concurrent creations for one owner, so the cap holds under races.
        await users_db.lock_identity(conn, name=f"api_keys:{owner_id}")
        # The primary key is exempt: login must always be able to replace a revoked one.
        if not is_primary and len(await keys_db.list_keys(conn, user_id=owner_id)) >= MAX_KEYS_PER_USER:
            raise Conflict(
                f"An account may have at most {MAX_KEYS_PER_USER} keys: delete one first.",
                code="too_many_api_keys",
            )
        await _check_limits(conn, state, user_id=owner_id, limits=limits)
        material = generate(state, environment)
        expires_at = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
        key = await keys_db.insert_key(
            conn,
            user_id=owner_id,
            name=name,
            material=material,
            scopes=scopes,
            ip_allowlist=ip_allowlist or [],
            domain_restrictions=[d.lower() for d in domain_restrictions or []],
            limits=limits,
            expires_at=expires_at,
            is_primary=is_primary,
        )
        await audit.record(
            conn,
            action="api_key.create",
            actor=actor,
            meta=meta,
            user_id=owner_id,
            subject_type="api_key",
            subject_id=key.id,
            after=_audit_view(key),
            actor_type="system" if actor is None else None,
        )
        if not is_primary:
            # The primary key comes with sign-up, which the welcome e-mail covers.
            by_admin = actor is not None and actor.user_id != owner_id
            await notifications.api_key_created(conn, key=key, by_admin=by_admin)
    return key, material.plaintext


def _audit_view(key: ApiKey) -> dict[str, Any]:
    view = public_view(key)
    for name in ("created_at", "updated_at", "last_used_at", "expires_at", "revoked_at"):
        value = view.get(name)
        view[name] = value.isoformat() if isinstance(value, datetime) else value
    view["id"] = str(key.id)
    view["user_id"] = str(key.user_id)
    return view


async def list_keys(
    conn: asyncpg.Connection, *, owner_id: UUID, limit: int | None = None, offset: int = 0
) -> tuple[list[ApiKey], int]:
    """One page of the owner's unrevoked keys, oldest first, and how many there are in all."""
    # At most MAX_KEYS_PER_USER rows: paging in memory costs less than a second query.
    keys = await keys_db.list_keys(conn, user_id=owner_id)
    end = None if limit is None else offset + limit
    return keys[offset:end], len(keys)


async def get_key(conn: asyncpg.Connection, *, owner_id: UUID, key_id: UUID) -> ApiKey:
    key = await keys_db.get_key(conn, user_id=owner_id, key_id=key_id)
    if key is None:
        raise _not_found()
    return key


async def update_key(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    owner_id: UUID,
    key_id: UUID,
    actor: Principal,
    meta: RequestMeta,
    changes: dict[str, Any],
) -> ApiKey:
    """Apply `changes` (only the fields the owner sent); a limit of None means the ceiling."""
    if not changes:
        return await get_key(conn, owner_id=owner_id, key_id=key_id)
    async with conn.transaction():
        before = await keys_db.get_key(conn, user_id=owner_id, key_id=key_id, for_update=True)
        if before is None:
            raise _not_found()
        if "scopes" in changes:
            changes["scopes"] = _validate_scopes(changes["scopes"])
            _ensure_grantable(actor, owner_id, changes["scopes"])
        if "domain_restrictions" in changes:
            changes["domain_restrictions"] = [d.lower() for d in changes["domain_restrictions"]]
        await _check_limits(conn, state, user_id=owner_id, limits={f: changes.get(f) for f in LIMIT_FIELDS})
        after = await keys_db.update_key(conn, key_id=key_id, changes=changes)
        assert after is not None
        await audit.record(
            conn,
            action="api_key.update",
            actor=actor,
            meta=meta,
            user_id=owner_id,
            subject_type="api_key",
            subject_id=key_id,
            before=_audit_view(before),
            after=_audit_view(after),
        )
    await state.auth_cache.invalidate(state.redis, user_id=owner_id)
    return after


async def rotate_key(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    owner_id: UUID,
    key_id: UUID,
    actor: Principal,
    meta: RequestMeta,
) -> tuple[ApiKey, str]:
    """A new secret for the key; the old one stops working at once. Returns the new plaintext."""
    async with conn.transaction():
        current = await keys_db.get_key(conn, user_id=owner_id, key_id=key_id, for_update=True)
        if current is None:
            raise _not_found()
        held = _held_scopes(actor, owner_id)
        if held is not None and not set(current.scopes) <= set(held):
            # Rotation hands out the plaintext: a narrower key must not obtain a broader one.
            raise PermissionDenied(
                "This API key cannot rotate a key with scopes it does not hold.", code="scope_not_held"
            )
        material = generate(state, current.environment)  # type: ignore[arg-type]
        rotated = await keys_db.replace_secret(conn, key_id=key_id, material=material)
        assert rotated is not None
        key, old_digest = rotated
        await audit.record(
            conn,
            action="api_key.rotate",
            actor=actor,
            meta=meta,
            user_id=owner_id,
            subject_type="api_key",
            subject_id=key_id,
            before={"key_prefix": current.key_prefix, "key_last4": current.key_last4},
            after={"key_prefix": key.key_prefix, "key_last4": key.key_last4},
        )
    await state.auth_cache.invalidate(state.redis, digests=[old_digest])
    return key, material.plaintext


async def revoke_key(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    owner_id: UUID,
    key_id: UUID,
    actor: Principal,
    meta: RequestMeta,
) -> None:
    """Revoke for good: the key answers 401 here at once, and everywhere within the cache bound."""
    async with conn.transaction():
        current = await keys_db.get_key(conn, user_id=owner_id, key_id=key_id, for_update=True)
        if current is None:
            raise _not_found()
        digest = await keys_db.revoke_key(conn, key_id=key_id)
        await audit.record(
            conn,
            action="api_key.revoke",
            actor=actor,
            meta=meta,
            user_id=owner_id,
            subject_type="api_key",
            subject_id=key_id,
            before=_audit_view(current),
        )
    await state.auth_cache.invalidate(state.redis, digests=[digest] if digest else [])


async def reveal_primary(
    conn: asyncpg.Connection, state: AppState, *, owner_id: UUID
) -> tuple[ApiKey, str] | None:
    """The primary key and its plaintext, decrypted for its owner at login."""
    found = await keys_db.get_primary_key(conn, user_id=owner_id)
    if found is None:
        return None
    key, token = found
    return key, cipher_for(state).decrypt(token)


async def reencrypt_all(conn: asyncpg.Connection, cipher: KeyCipher) -> int:
    """After a new Fernet key was prepended: re-encrypt every stored key under it."""
    count = 0
    async with conn.transaction():
        for key_id, token in await keys_db.all_encrypted(conn):
            await keys_db.set_encrypted(conn, key_id=key_id, token=cipher.rotate(token))
            count += 1
    return count
