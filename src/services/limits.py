"""Which limits apply to a user and a key: the one place the limiter and the key routes read.

The effective limit of a request is the minimum of the key's own limit and its owner's ceiling.
The ceiling is the admin-set ceiling of that user where there is one (it may be above the plan),
else the plan's limits (the settings defaults until plans exist). A user may set a key's limits
only at or below the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

from src.config import Settings
from src.db import limits as limits_db

LIMIT_NAMES = limits_db.LIMIT_COLUMNS


@dataclass(frozen=True)
class Limits:
    rpm_limit: int
    rpd_limit: int
    tpm_limit: int
    tpd_limit: int
    concurrency_limit: int


def default_limits(settings: Settings) -> Limits:
    return Limits(
        rpm_limit=settings.default_rpm,
        rpd_limit=settings.default_rpd,
        tpm_limit=settings.default_tpm,
        tpd_limit=settings.default_tpd,
        concurrency_limit=settings.default_concurrency,
    )


def ceiling(settings: Settings, admin_set: dict[str, int | None] | None) -> Limits:
    """A user's ceiling from their admin-set limits (None fields: the plan's / the defaults)."""
    plan = default_limits(settings)
    if not admin_set:
        return plan
    return Limits(**{name: admin_set.get(name) or getattr(plan, name) for name in LIMIT_NAMES})


async def user_ceiling(conn: asyncpg.Connection, settings: Settings, *, user_id: UUID) -> Limits:
    """The most any key of this user may be allowed."""
    return ceiling(settings, await limits_db.user_limits(conn, user_id=user_id))


def effective_key_limits(own: dict[str, int | None], ceiling: Limits) -> Limits:
    """A key's limits: its own where set, never above its owner's ceiling."""

    def pick(name: str) -> int:
        cap: int = getattr(ceiling, name)
        value = own.get(name)
        return cap if value is None else min(value, cap)

    return Limits(**{name: pick(name) for name in LIMIT_NAMES})
