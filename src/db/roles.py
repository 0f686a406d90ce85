"""SQL for roles: named sets of admin permissions that users hold one of."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

ROLE_COLUMNS = "name, description, permissions, is_builtin, created_at, updated_at"


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    permissions: list[str]
    is_builtin: bool
    created_at: datetime
    updated_at: datetime


def _role(row: asyncpg.Record | None) -> Role | None:
    if row is None:
        return None
    values = dict(row)
    values["permissions"] = list(values["permissions"])
    return Role(**values)


async def list_roles(conn: asyncpg.Connection) -> list[Role]:
    rows = await conn.fetch(f"SELECT {ROLE_COLUMNS} FROM roles ORDER BY is_builtin DESC, name")
    return [role for role in map(_role, rows) if role is not None]


async def get_role(conn: asyncpg.Connection, *, name: str, for_update: bool = False) -> Role | None:
    lock = " FOR UPDATE" if for_update else ""
    return _role(await conn.fetchrow(f"SELECT {ROLE_COLUMNS} FROM roles WHERE name = $1{lock}", name))


async def insert_role(
    conn: asyncpg.Connection, *, name: str, description: str, permissions: list[str]
) -> Role | None:
    """The new role, or None when the name is taken."""
    return _role(
        await conn.fetchrow(
            f"""INSERT INTO roles (name, description, permissions) VALUES ($1, $2, $3)
                ON CONFLICT (name) DO NOTHING RETURNING {ROLE_COLUMNS}""",
            name,
            description,
            permissions,
        )
    )


async def update_role(
    conn: asyncpg.Connection, *, name: str, description: str, permissions: list[str]
) -> Role | None:
    return _role(
        await conn.fetchrow(
            f"""UPDATE roles SET description = $2, permissions = $3, updated_at = now()
                WHERE name = $1 RETURNING {ROLE_COLUMNS}""",
            name,
            description,
            permissions,
        )
    )


async def delete_role(conn: asyncpg.Connection, *, name: str) -> bool:
    result: str = await conn.execute("DELETE FROM roles WHERE name = $1", name)
    return result == "DELETE 1"


async def count_holders(conn: asyncpg.Connection, *, name: str) -> int:
    """Users whose row names the role, deleted (anonymised) accounts included: the foreign key counts them."""
    count: int = await conn.fetchval("SELECT count(*) FROM users WHERE role = $1", name)
    return count
