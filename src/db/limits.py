"""SQL for the admin-set limits of users (ceilings) and keys."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

LIMIT_COLUMNS = ("rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit", "concurrency_limit")
_SELECT = ", ".join(LIMIT_COLUMNS)


async def user_limits(
    conn: asyncpg.Connection, *, user_id: UUID, for_update: bool = False
) -> dict[str, int | None] | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_SELECT} FROM users WHERE id = $1{lock}", user_id)
    return dict(row) if row is not None else None


async def key_limits(
    conn: asyncpg.Connection, *, key_id: UUID, for_update: bool = False
) -> tuple[UUID, dict[str, int | None]] | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT user_id, {_SELECT} FROM api_keys WHERE id = $1 AND revoked_at IS NULL{lock}", key_id
    )
    if row is None:
        return None
    values = dict(row)
    return values.pop("user_id"), values


async def set_user_limits(conn: asyncpg.Connection, *, user_id: UUID, limits: dict[str, Any]) -> bool:
    assert set(limits) <= set(LIMIT_COLUMNS)
    assignments = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(limits))
    result: str = await conn.execute(
        f"UPDATE users SET {assignments}, updated_at = now() WHERE id = $1", user_id, *limits.values()
    )
    return result.endswith(" 1")


async def set_key_limits(conn: asyncpg.Connection, *, key_id: UUID, limits: dict[str, Any]) -> bool:
    assert set(limits) <= set(LIMIT_COLUMNS)
    assignments = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(limits))
    result: str = await conn.execute(
        f"UPDATE api_keys SET {assignments}, updated_at = now() WHERE id = $1 AND revoked_at IS NULL",
        key_id,
        *limits.values(),
    )
    return result.endswith(" 1")
