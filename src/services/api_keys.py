"""API keys: create, list, update, rotate, revoke. Plaintext leaves only on create and rotate."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from src.db import api_keys as keys_db
from src.db.api_keys import LIMIT_FIELDS, ApiKey
from src.errors import InvalidRequest, NotFound
from src.security import permissions
from src.security.deps import Principal, RequestMeta
from src.security.security import Environment, KeyCipher, NewKey, new_key
from src.services import audit
from src.services import limits as limits_service
from src.state import AppState


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
    """A new key for `owner_id` (inside the caller's transaction); returns it with its plaintext."""
    limits = limits or {}
    await _check_limits(conn, state, user_id=owner_id, limits=limits)
    material = generate(state, environment)
    expires_at = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
    key = await keys_db.insert_key(
        conn,
        user_id=owner_id,
        name=name,
        material=material,
        scopes=_validate_scopes(scopes if scopes is not None else [permissions.ALL]),
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
    return key, material.plaintext


def _audit_view(key: ApiKey) -> dict[str, Any]:
    view = public_view(key)
    for name in ("created_at", "updated_at", "last_used_at", "expires_at", "revoked_at"):
        value = view.get(name)
        view[name] = value.isoformat() if isinstance(value, datetime) else value
    view["id"] = str(key.id)
    view["user_id"] = str(key.user_id)
    return view


async def list_keys(conn: asyncpg.Connection, *, owner_id: UUID) -> list[ApiKey]:
    return await keys_db.list_keys(conn, user_id=owner_id)


async def get_key(conn: asyncpg.Connection, *, owner_id: UUID, key_id: UUID) -> ApiKey:
    key = await keys_db.get_key(conn, user_id=owner_id, key_id=key_id)
    if key is None:
        raise NotFound("No such API key.", param="key_id", code="api_key_not_found")
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
    async with conn.transaction():
        before = await keys_db.get_key(conn, user_id=owner_id, key_id=key_id, for_update=True)
        if before is None:
            raise NotFound("No such API key.", param="key_id", code="api_key_not_found")
        if "scopes" in changes:
            changes["scopes"] = _validate_scopes(changes["scopes"])
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
    async with conn.transaction():
        current = await keys_db.get_key(conn, user_id=owner_id, key_id=key_id, for_update=True)
        if current is None:
            raise NotFound("No such API key.", param="key_id", code="api_key_not_found")
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
    async with conn.transaction():
        current = await keys_db.get_key(conn, user_id=owner_id, key_id=key_id, for_update=True)
        if current is None:
            raise NotFound("No such API key.", param="key_id", code="api_key_not_found")
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
