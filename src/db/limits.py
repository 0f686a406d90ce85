"""SQL for the admin-set limits of users (ceilings) and keys, and the plan limits under them."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from src.db import plans as plans_db

LIMIT_COLUMNS = ("rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit", "concurrency_limit")
_SELECT = ", ".join(LIMIT_COLUMNS)


async def user_limits(
    conn: asyncpg.Connection, *, user_id: UUID, for_update: bool = False
) -> dict[str, int | None] | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {_SELECT} FROM users WHERE id = $1{lock}", user_id)
    return dict(row) if row is not None else None


async def ceiling_inputs(
    conn: asyncpg.Connection, *, user_id: UUID
) -> tuple[dict[str, int | None], dict[str, int | None]] | None:
    """A user's admin-set limits and their current plan's limits, in one query (None: no user)."""
    row = await conn.fetchrow(
        f"""SELECT {", ".join(f"u.{c} AS u_{c}, p.{c} AS p_{c}" for c in LIMIT_COLUMNS)}
            FROM users u {plans_db.current_plan_join("u.id")}
            WHERE u.id = $1""",
        user_id,
    )
    if row is None:
        return None
    return {c: row[f"u_{c}"] for c in LIMIT_COLUMNS}, {c: row[f"p_{c}"] for c in LIMIT_COLUMNS}


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
