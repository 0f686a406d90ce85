"""Which limits apply to a user and a key: the one place the limiter and the key routes read.

The effective limit of a request is the minimum of the key's own limit and its owner's ceiling.
The ceiling is the settings defaults today; plans and admin-set ceilings plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

from src.config import Settings


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


async def user_ceiling(conn: asyncpg.Connection, settings: Settings, *, user_id: UUID) -> Limits:
    """The most any key of this user may be allowed."""
    return default_limits(settings)
