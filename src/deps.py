"""Typed dependencies shared by the routes: the app state, the pool, a pooled connection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
from fastapi import Depends

from src.config import Settings
from src.state import AppState, get_state

State = Annotated[AppState, Depends(get_state)]


async def get_pool(state: State) -> asyncpg.Pool:
    return state.pool


async def get_settings_dep(state: State) -> Settings:
    return state.settings


async def get_conn(state: State) -> AsyncIterator[asyncpg.Connection]:
    async with state.pool.acquire() as conn:
        yield conn


Pool = Annotated[asyncpg.Pool, Depends(get_pool)]
Conn = Annotated[asyncpg.Connection, Depends(get_conn)]
AppSettings = Annotated[Settings, Depends(get_settings_dep)]
