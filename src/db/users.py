"""SQL for users and their balance row."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

# `credits` as read excludes grants past their expiry that no balance change has written off yet.
USER_COLUMNS = (
    "id, email, contact_email, privy_id, username, credits - gw_due_expiry(id) AS credits, held, role,"
    " is_active, banned_at, referral_code, referred_by, preferences, deleted_at, created_at, updated_at"
)


@dataclass(frozen=True)
class User:
    id: UUID
    # Verified addresses only (Privy identity token or admin creation).
    email: str | None
    # Typed by the user, never verified: shown back to them, trusted for nothing.
    contact_email: str | None
    privy_id: str | None
    username: str | None
    credits: Decimal
    held: Decimal
    role: str
    is_active: bool
    banned_at: datetime | None
    referral_code: str | None
    referred_by: UUID | None
    preferences: dict[str, Any]
    deleted_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @property
    def available(self) -> Decimal:
        return self.credits - self.held

    @property
    def can_act(self) -> bool:
        return self.is_active and self.banned_at is None and self.deleted_at is None


def _user(row: asyncpg.Record | None) -> User | None:
    return User(**dict(row)) if row is not None else None


async def create_user(
    conn: asyncpg.Connection,
    *,
    email: str | None,
    privy_id: str | None,
    username: str | None,
    role: str = "user",
) -> User:
    row = await conn.fetchrow(
        f"INSERT INTO users (email, privy_id, username, role) VALUES ($1, $2, $3, $4)"
        f" RETURNING {USER_COLUMNS}",
        email,
        privy_id,
        username,
        role,
    )
    user = _user(row)
    assert user is not None
    return user


async def get_user(conn: asyncpg.Connection, *, user_id: UUID, for_update: bool = False) -> User | None:
    lock = " FOR UPDATE" if for_update else ""
    return _user(await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1{lock}", user_id))


async def get_user_by_privy_id(conn: asyncpg.Connection, *, privy_id: str) -> User | None:
    return _user(await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE privy_id = $1", privy_id))


async def get_user_by_email(conn: asyncpg.Connection, *, email: str) -> User | None:
    return _user(await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE email = $1", email))


async def email_taken(conn: asyncpg.Connection, *, email: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM users WHERE email = $1", email))


async def update_profile(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    username: str | None,
    contact_email: str | None,
    preferences: dict[str, Any] | None,
    set_username: bool,
    set_contact_email: bool,
) -> User | None:
    """The fields a user may change themselves; a None preferences keeps the current ones."""
    row = await conn.fetchrow(
        f"""UPDATE users SET
                username = CASE WHEN $2 THEN $3 ELSE username END,
                contact_email = CASE WHEN $4 THEN $5 ELSE contact_email END,
                preferences = COALESCE($6, preferences),
                updated_at = now()
            WHERE id = $1 RETURNING {USER_COLUMNS}""",
        user_id,
        set_username,
        username,
        set_contact_email,
        contact_email,
        preferences,
    )
    return _user(row)


async def set_verified_email(conn: asyncpg.Connection, *, user_id: UUID, email: str) -> User | None:
    return _user(
        await conn.fetchrow(
            f"UPDATE users SET email = $2, updated_at = now() WHERE id = $1 RETURNING {USER_COLUMNS}",
            user_id,
            email,
        )
    )


async def lock_identity(conn: asyncpg.Connection, *, name: str) -> None:
    """A transaction-scoped lock on a name (a Privy id, an e-mail), so racing sign-ups serialise."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)


async def role_exists(conn: asyncpg.Connection, *, role: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM roles WHERE name = $1", role))


async def set_role(conn: asyncpg.Connection, *, user_id: UUID, role: str) -> User | None:
    return _user(
        await conn.fetchrow(
            f"UPDATE users SET role = $2, updated_at = now() WHERE id = $1 RETURNING {USER_COLUMNS}",
            user_id,
            role,
        )
    )


async def anonymise_user(conn: asyncpg.Connection, *, user_id: UUID) -> None:
    """Remove personal data, keep the row (the ledger and usage still point at it)."""
    await conn.execute(
        """UPDATE users SET email = NULL, contact_email = NULL, privy_id = NULL, username = NULL,
                preferences = '{}', referral_code = NULL, is_active = false, deleted_at = now(),
                updated_at = now()
            WHERE id = $1""",
        user_id,
    )


async def role_permissions(conn: asyncpg.Connection, *, user_id: UUID) -> tuple[str, list[str]] | None:
    """The user's role and its permissions, read fresh; None for an inactive or missing user."""
    row = await conn.fetchrow(
        """SELECT u.role, r.permissions FROM users u JOIN roles r ON r.name = u.role
            WHERE u.id = $1 AND u.is_active AND u.banned_at IS NULL AND u.deleted_at IS NULL""",
        user_id,
    )
    return (row["role"], list(row["permissions"])) if row else None
