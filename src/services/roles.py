"""Roles: the permission catalogue, custom roles, and assigning a role to a user.

Nobody grants what they do not hold: a caller whose role is not `admin` (or the operator) may only
create, change, delete or assign roles whose permissions are all their own, and may only change the
role of a user whose current permissions are all their own. Without this, `roles.write` alone would
be a path to every other permission.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

import asyncpg

from src.db import roles as roles_db
from src.db import users as users_db
from src.db.roles import Role
from src.db.users import User
from src.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from src.security import permissions
from src.security.deps import Principal, RequestMeta
from src.services import audit
from src.state import AppState


def catalogue() -> dict[str, str]:
    return dict(permissions.PERMISSIONS)


async def granted_permissions(conn: asyncpg.Connection, actor: Principal) -> list[str]:
    """What the actor holds, read fresh: everything for the operator, else their role's list."""
    if actor.is_operator:
        return [permissions.ALL]
    assert actor.user_id is not None
    role = await users_db.role_permissions(conn, user_id=actor.user_id)
    return role[1] if role is not None else []


def ensure_may_grant(granted: list[str], wanted: Iterable[str]) -> None:
    """Refuse (403) when `wanted` holds a permission the actor does not."""
    if permissions.ALL in granted:
        return
    missing = sorted(p for p in set(wanted) if p == permissions.ALL or p not in granted)
    if missing:
        raise PermissionDenied(
            f"You cannot grant or take away permissions you do not hold yourself ({', '.join(missing)}).",
            code="permission_escalation",
        )


def validate_permissions(values: list[str]) -> list[str]:
    """Known permission names, de-duplicated and sorted; '*' belongs to the built-in admin role only."""
    unknown = [value for value in values if value not in permissions.PERMISSIONS]
    if unknown:
        raise InvalidRequest(
            f"Unknown permission '{unknown[0]}'; see GET /admin/roles/permissions.",
            param="permissions",
            code="unknown_permission",
        )
    return sorted(set(values))


async def get_role(conn: asyncpg.Connection, *, name: str) -> Role:
    role = await roles_db.get_role(conn, name=name)
    if role is None:
        raise NotFound(f"No role named '{name}'.", code="role_not_found")
    return role


async def list_roles(conn: asyncpg.Connection) -> list[Role]:
    return await roles_db.list_roles(conn)


def _view(role: Role) -> dict[str, object]:
    return {"name": role.name, "description": role.description, "permissions": role.permissions}


async def create_role(
    conn: asyncpg.Connection,
    *,
    name: str,
    description: str,
    permission_names: list[str],
    actor: Principal,
    meta: RequestMeta,
) -> Role:
    wanted = validate_permissions(permission_names)
    async with conn.transaction():
        ensure_may_grant(await granted_permissions(conn, actor), wanted)
        role = await roles_db.insert_role(conn, name=name, description=description, permissions=wanted)
        if role is None:
            raise Conflict(f"A role named '{name}' already exists.", param="name", code="role_exists")
        await audit.record(
            conn,
            action="role.create",
            actor=actor,
            meta=meta,
            subject_type="role",
            subject_id=name,
            after=_view(role),
        )
    return role


async def _custom_role_for_update(conn: asyncpg.Connection, *, name: str) -> Role:
    role = await roles_db.get_role(conn, name=name, for_update=True)
    if role is None:
        raise NotFound(f"No role named '{name}'.", code="role_not_found")
    if role.is_builtin:
        raise Conflict(f"'{name}' is a built-in role and cannot be changed.", code="builtin_role")
    return role


async def update_role(
    conn: asyncpg.Connection,
    *,
    name: str,
    description: str | None,
    permission_names: list[str] | None,
    actor: Principal,
    meta: RequestMeta,
) -> Role:
    """Change a custom role; its holders get the new permissions on their next request."""
    if description is None and permission_names is None:
        raise InvalidRequest("Nothing to update: send 'description' or 'permissions'.", code="empty_update")
    wanted = validate_permissions(permission_names) if permission_names is not None else None
    async with conn.transaction():
        before = await _custom_role_for_update(conn, name=name)
        granted = await granted_permissions(conn, actor)
        ensure_may_grant(granted, before.permissions)
        if wanted is not None:
            ensure_may_grant(granted, wanted)
        role = await roles_db.update_role(
            conn,
            name=name,
            description=before.description if description is None else description,
            permissions=before.permissions if wanted is None else wanted,
        )
        assert role is not None
        await audit.record(
            conn,
            action="role.update",
            actor=actor,
            meta=meta,
            subject_type="role",
            subject_id=name,
            before=_view(before),
            after=_view(role),
        )
    return role


async def delete_role(conn: asyncpg.Connection, *, name: str, actor: Principal, meta: RequestMeta) -> None:
    """Delete a custom role that no user holds."""
    try:
        async with conn.transaction():
            role = await _custom_role_for_update(conn, name=name)
            ensure_may_grant(await granted_permissions(conn, actor), role.permissions)
            holders = await roles_db.count_holders(conn, name=name)
            if holders:
                raise Conflict(
                    f"{holders} user(s) still hold the role '{name}'; assign them another role first.",
                    code="role_in_use",
                )
            await roles_db.delete_role(conn, name=name)
            await audit.record(
                conn,
                action="role.delete",
                actor=actor,
                meta=meta,
                subject_type="role",
                subject_id=name,
                before=_view(role),
            )
    except asyncpg.ForeignKeyViolationError as exc:
        # A user was given the role between the count and the delete.
        raise Conflict(f"Users still hold the role '{name}'.", code="role_in_use") from exc


async def assign_role(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    user_id: UUID,
    role_name: str,
    actor: Principal,
    meta: RequestMeta,
) -> tuple[User, str]:
    """Give the user `role_name`; returns the user and their previous role."""
    try:
        async with conn.transaction():
            user = await users_db.get_user(conn, user_id=user_id, for_update=True)
            if user is None or user.deleted_at is not None:
                raise NotFound("No such user.", param="user_id", code="user_not_found")
            role = await roles_db.get_role(conn, name=role_name)
            if role is None:
                raise InvalidRequest(f"Unknown role '{role_name}'.", param="role", code="unknown_role")
            current = await roles_db.get_role(conn, name=user.role)
            granted = await granted_permissions(conn, actor)
            ensure_may_grant(granted, current.permissions if current is not None else [])
            ensure_may_grant(granted, role.permissions)
            updated = await users_db.set_role(conn, user_id=user_id, role=role_name)
            assert updated is not None
            await audit.record(
                conn,
                action="role.assign",
                actor=actor,
                meta=meta,
                user_id=user_id,
                subject_type="user",
                subject_id=user_id,
                before={"role": user.role},
                after={"role": role_name},
            )
    except asyncpg.ForeignKeyViolationError as exc:
        # The role was deleted between the lookup and the update.
        raise InvalidRequest(f"Unknown role '{role_name}'.", param="role", code="unknown_role") from exc
    # Permissions are read fresh on every admin request; dropping the cached keys as well means no
    # instance keeps serving this user from a record that predates the change.
    await state.auth_cache.invalidate(state.redis, user_id=user_id)
    return updated, user.role
