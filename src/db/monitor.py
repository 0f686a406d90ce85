"""SQL for what operators watch: open holds, the e-mail outbox, request figures over a window."""

from __future__ import annotations

import asyncpg


async def open_holds(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM credit_holds"))


async def outbox_depth(conn: asyncpg.Connection) -> int:
    """Messages waiting for delivery (0 where the notification tables do not exist)."""
    if await conn.fetchval("SELECT to_regclass('notification_outbox')") is None:
        return 0
    return int(
        await conn.fetchval("SELECT count(*) FROM notification_outbox WHERE status IN ('queued', 'sending')")
    )
