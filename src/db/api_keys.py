"""SQL for API keys. Keys are stored as an HMAC digest, a Fernet token and a display prefix."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network
from typing import Any
from uuid import UUID

import asyncpg

from src.db import plans as plans_db
from src.security.security import NewKey

KEY_COLUMNS = (
    "id, user_id, name, key_prefix, key_last4, environment, is_primary, scopes, ip_allowlist,"
    " domain_restrictions, rpm_limit, rpd_limit, tpm_limit, tpd_limit, concurrency_limit, is_active,"
    " expires_at, last_used_at, revoked_at, created_at, updated_at"
)
LIMIT_FIELDS = ("rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit", "concurrency_limit")


@dataclass(frozen=True)
class ApiKey:
    id: UUID
    user_id: UUID
    name: str
    key_prefix: str
    key_last4: str
    environment: str
    is_primary: bool
    scopes: list[str]
    ip_allowlist: list[IPv4Network | IPv6Network]
    domain_restrictions: list[str]
    rpm_limit: int | None
    rpd_limit: int | None
    tpm_limit: int | None
    tpd_limit: int | None
    concurrency_limit: int | None
    is_active: bool
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class AuthRecord:
    """What authentication needs about a key and its owner, fetched in one indexed lookup."""

    key: ApiKey
    key_hash: bytes
    user_is_active: bool
    user_banned: bool
    user_deleted: bool
    role: str
    # The owner's admin-set ceilings (None: the plan's or the defaults), read with the key so that
    # rate limiting costs no extra round trip.
    user_limits: dict[str, int | None]
    # The limits of the owner's current plan (the default plan without one); None: the settings
    # default. Read in the same lookup, for the same reason.
    plan_limits: dict[str, int | None]


USER_LIMIT_COLUMNS = ("rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit", "concurrency_limit")


def _key(row: asyncpg.Record | None) -> ApiKey | None:
    if row is None:
        return None
    values = dict(row)
    values["scopes"] = list(values["scopes"])
    values["ip_allowlist"] = list(values["ip_allowlist"])
    values["domain_restrictions"] = list(values["domain_restrictions"])
    return ApiKey(**values)


async def get_auth_record(conn: asyncpg.Connection, *, key_hash: bytes) -> AuthRecord | None:
    row = await conn.fetchrow(
        f"""SELECT {", ".join("k." + c.strip() for c in KEY_COLUMNS.split(","))}, k.key_hash,
                u.is_active AS user_is_active, u.banned_at IS NOT NULL AS user_banned,
                u.deleted_at IS NOT NULL AS user_deleted, u.role,
                u.rpm_limit AS u_rpm_limit, u.rpd_limit AS u_rpd_limit, u.tpm_limit AS u_tpm_limit,
                u.tpd_limit AS u_tpd_limit, u.concurrency_limit AS u_concurrency_limit,
                p.rpm_limit AS p_rpm_limit, p.rpd_limit AS p_rpd_limit, p.tpm_limit AS p_tpm_limit,
                p.tpd_limit AS p_tpd_limit, p.concurrency_limit AS p_concurrency_limit
            FROM api_keys k JOIN users u ON u.id = k.user_id
            {plans_db.current_plan_join("u.id")}
            WHERE k.key_hash = $1""",
        key_hash,
    )
    if row is None:
        return None
    values = dict(row)
    extra = {
        name: values.pop(name)
        for name in ("key_hash", "user_is_active", "user_banned", "user_deleted", "role")
    }
    user_limits = {name: values.pop(f"u_{name}") for name in USER_LIMIT_COLUMNS}
    plan_limits = {name: values.pop(f"p_{name}") for name in USER_LIMIT_COLUMNS}
    key = _key(values)
    assert key is not None
    return AuthRecord(key=key, user_limits=user_limits, plan_limits=plan_limits, **extra)


async def insert_key(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    name: str,
    material: NewKey,
    scopes: list[str],
    ip_allowlist: list[str],
    domain_restrictions: list[str],
    limits: dict[str, int | None],
    expires_at: datetime | None,
    is_primary: bool = False,
) -> ApiKey:
    row = await conn.fetchrow(
        f"""INSERT INTO api_keys (user_id, name, key_hash, key_encrypted, key_prefix, key_last4,
                environment, is_primary, scopes, ip_allowlist, domain_restrictions, rpm_limit, rpd_limit,
                tpm_limit, tpd_limit, concurrency_limit, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::cidr[], $11, $12, $13, $14, $15, $16, $17)
            RETURNING {KEY_COLUMNS}""",
        user_id,
        name,
        material.digest,
        material.encrypted,
        material.prefix,
        material.last4,
        material.environment,
        is_primary,
        scopes,
        ip_allowlist,
        domain_restrictions,
        *(limits.get(field) for field in LIMIT_FIELDS),
        expires_at,
    )
    key = _key(row)
    assert key is not None
    return key


async def list_keys(conn: asyncpg.Connection, *, user_id: UUID) -> list[ApiKey]:
    rows = await conn.fetch(
        f"SELECT {KEY_COLUMNS} FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL"
        " ORDER BY created_at, id",
        user_id,
    )
    return [key for key in map(_key, rows) if key is not None]


async def get_key(
    conn: asyncpg.Connection, *, user_id: UUID, key_id: UUID, for_update: bool = False
) -> ApiKey | None:
    """The caller's own, unrevoked key; another user's id finds nothing."""
    lock = " FOR UPDATE" if for_update else ""
    return _key(
        await conn.fetchrow(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL{lock}",
            key_id,
            user_id,
        )
    )


async def get_primary_key(conn: asyncpg.Connection, *, user_id: UUID) -> tuple[ApiKey, str] | None:
    """The primary key and its Fernet token (returned to its owner at login)."""
    row = await conn.fetchrow(
        f"""SELECT {KEY_COLUMNS}, key_encrypted FROM api_keys
            WHERE user_id = $1 AND is_primary AND revoked_at IS NULL""",
        user_id,
    )
    if row is None:
        return None
    values = dict(row)
    token = values.pop("key_encrypted")
    key = _key(values)
    assert key is not None
    return key, token


async def update_key(conn: asyncpg.Connection, *, key_id: UUID, changes: dict[str, Any]) -> ApiKey | None:
    """Apply a whitelisted set of column changes (names come from code, never from a request)."""
    allowed = {
        "name",
        "scopes",
        "ip_allowlist",
        "domain_restrictions",
        "is_active",
        "expires_at",
        *LIMIT_FIELDS,
    }
    names = [name for name in changes if name in allowed]
    assert len(names) == len(changes), "unexpected column in key update"
    if not names:
        return _key(await conn.fetchrow(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id))
    assignments = ", ".join(
        f"{name} = ${i + 2}{'::cidr[]' if name == 'ip_allowlist' else ''}" for i, name in enumerate(names)
    )
    row = await conn.fetchrow(
        f"UPDATE api_keys SET {assignments}, updated_at = now() WHERE id = $1 RETURNING {KEY_COLUMNS}",
        key_id,
        *(changes[name] for name in names),
    )
    return _key(row)


async def replace_secret(
    conn: asyncpg.Connection, *, key_id: UUID, material: NewKey
) -> tuple[ApiKey, bytes] | None:
    """Rotate: the new digest replaces the old one, so the old key stops matching at once."""
    row = await conn.fetchrow(
        f"""UPDATE api_keys k SET key_hash = $2, key_encrypted = $3, key_prefix = $4, key_last4 = $5,
                environment = $6, updated_at = now()
            FROM (SELECT key_hash AS old_hash FROM api_keys WHERE id = $1 FOR UPDATE) old
            WHERE k.id = $1
            RETURNING {", ".join("k." + c.strip() for c in KEY_COLUMNS.split(","))}, old.old_hash""",
        key_id,
        material.digest,
        material.encrypted,
        material.prefix,
        material.last4,
        material.environment,
    )
    if row is None:
        return None
    values = dict(row)
    old_hash = values.pop("old_hash")
    key = _key(values)
    assert key is not None
    return key, old_hash


async def revoke_key(conn: asyncpg.Connection, *, key_id: UUID) -> bytes | None:
    """Revoke for good; returns the digest so caches can drop it."""
    digest: bytes | None = await conn.fetchval(
        "UPDATE api_keys SET revoked_at = now(), is_active = false, is_primary = false, updated_at = now()"
        " WHERE id = $1 AND revoked_at IS NULL RETURNING key_hash",
        key_id,
    )
    return digest


async def revoke_all_for_user(conn: asyncpg.Connection, *, user_id: UUID) -> list[bytes]:
    rows = await conn.fetch(
        "UPDATE api_keys SET revoked_at = now(), is_active = false, is_primary = false, updated_at = now()"
        " WHERE user_id = $1 AND revoked_at IS NULL RETURNING key_hash",
        user_id,
    )
    return [row["key_hash"] for row in rows]


async def key_hashes_for_user(conn: asyncpg.Connection, *, user_id: UUID) -> list[bytes]:
    return [
        row["key_hash"]
        for row in await conn.fetch("SELECT key_hash FROM api_keys WHERE user_id = $1", user_id)
    ]


async def touch_last_used(conn: asyncpg.Connection, *, key_id: UUID) -> None:
    await conn.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", key_id)


async def all_encrypted(conn: asyncpg.Connection) -> list[tuple[UUID, str]]:
    return [
        (row["id"], row["key_encrypted"])
        for row in await conn.fetch("SELECT id, key_encrypted FROM api_keys")
    ]


async def set_encrypted(conn: asyncpg.Connection, *, key_id: UUID, token: str) -> None:
    await conn.execute("UPDATE api_keys SET key_encrypted = $2 WHERE id = $1", key_id, token)
