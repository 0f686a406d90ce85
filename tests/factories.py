"""Factories for tests: users with keys and credits, made through the real services."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast
from uuid import UUID

import asyncpg
import httpx
from fastapi import FastAPI

from src import db_config
from src.config import Settings
from src.security.security import Environment
from src.services import api_keys as keys_service
from src.services import users as users_service
from src.state import AppState
from tests.conftest import TEST_ADMIN_KEY


@dataclass(frozen=True)
class TestUser:
    __test__ = False  # not a pytest test class

    id: UUID
    email: str
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def app_state(app: FastAPI) -> AppState:
    state: AppState | None = app.state.gateway
    assert state is not None, "the app's lifespan is not running"
    return state


async def create_user(
    app: FastAPI, *, email: str | None = None, credits: Decimal | str = Decimal("0"), role: str = "user"
) -> TestUser:
    """A user with a primary key (returned in plaintext) and `credits` added through the ledger."""
    state = app_state(app)
    email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
    async with state.pool.acquire() as conn:
        user, plaintext = await users_service.create_user_as_admin(
            conn, state, email=email, credits=Decimal(credits), role=role, actor=None, meta=None
        )
    return TestUser(id=user.id, email=email, api_key=plaintext)


async def create_user_with_permissions(
    app: FastAPI, client: httpx.AsyncClient, permissions: list[str]
) -> TestUser:
    """A user holding a new role with exactly `permissions`, made through the admin routes."""
    operator = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
    name = f"role-{uuid.uuid4().hex[:8]}"
    made = await client.post(
        "/admin/roles", headers=operator, json={"name": name, "description": name, "permissions": permissions}
    )
    assert made.status_code == 201, made.text
    user = await create_user(app)
    assigned = await client.post(
        "/admin/roles/assign", headers=operator, json={"user_id": str(user.id), "role": name}
    )
    assert assigned.status_code == 200, assigned.text
    return user


async def create_user_for(
    settings: Settings, *, email: str | None = None, credits: Decimal | str = Decimal("0"), role: str = "user"
) -> TestUser:
    """The same, through a connection of its own: for an app served on another event loop."""
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    await db_config.init_connection(conn)
    try:
        # The services only read settings from the state they are given.
        state = cast(AppState, SimpleNamespace(settings=settings))
        email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        user, plaintext = await users_service.create_user_as_admin(
            conn, state, email=email, credits=Decimal(credits), role=role, actor=None, meta=None
        )
    finally:
        await conn.close()
    return TestUser(id=user.id, email=email, api_key=plaintext)


async def create_key(
    app: FastAPI, user: TestUser, *, name: str = "test key", environment: Environment = "live", **options: Any
) -> tuple[UUID, str]:
    """Another key for `user`; options as for the key service (scopes, ip_allowlist, ...)."""
    state = app_state(app)
    async with state.pool.acquire() as conn, conn.transaction():
        key, plaintext = await keys_service.create_key(
            conn,
            state,
            owner_id=user.id,
            actor=None,
            meta=None,
            name=name,
            environment=environment,
            **options,
        )
    return key.id, plaintext
