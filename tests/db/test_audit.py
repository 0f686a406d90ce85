"""The audit log is append-only in the database; only the retention sweep deletes, and only old rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from src.db import audit as audit_db
from src.services import admin as admin_service


async def insert_row(db: asyncpg.Connection, *, action: str, age_days: float = 0) -> int:
    """An audit row written `age_days` ago (created_at cannot be updated later, so it is set here)."""
    row_id: int = await db.fetchval(
        """INSERT INTO audit_logs (created_at, actor_type, action, after)
            VALUES ($1, 'system', $2, $3) RETURNING id""",
        datetime.now(UTC) - timedelta(days=age_days),
        action,
        {"n": 1},
    )
    return row_id


async def actions(db: asyncpg.Connection) -> list[str]:
    return [r["action"] for r in await db.fetch("SELECT action FROM audit_logs ORDER BY id")]


class TestAppendOnly:
    async def test_update_is_refused(self, db: asyncpg.Connection) -> None:
        row_id = await insert_row(db, action="test.event")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute("UPDATE audit_logs SET action = 'forged' WHERE id = $1", row_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute("UPDATE audit_logs SET created_at = now() - interval '1000 days'")
        assert await actions(db) == ["test.event"]

    async def test_delete_is_refused(self, db: asyncpg.Connection) -> None:
        await insert_row(db, action="young")
        await insert_row(db, action="old", age_days=5000)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute("DELETE FROM audit_logs")
        assert await actions(db) == ["young", "old"]

    async def test_truncate_is_refused(self, db: asyncpg.Connection) -> None:
        await insert_row(db, action="test.event")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.execute("TRUNCATE audit_logs")
        assert await actions(db) == ["test.event"]

    async def test_insert_through_db_layer(self, db: asyncpg.Connection) -> None:
        await audit_db.insert_audit(
            db,
            actor_type="operator",
            actor_id=None,
            user_id=None,
            action="test.insert",
            subject_type="user",
            subject_id="x",
            before={"a": 1},
            after={"a": 2},
            metadata=None,
            ip="203.0.113.9",
            user_agent="tests",
            request_id="req-1",
        )
        rows, total = await audit_db.list_audit(db, limit=10, offset=0)
        assert total == 1
        assert rows[0].ip == "203.0.113.9"
        assert (rows[0].before, rows[0].after) == ({"a": 1}, {"a": 2})


class TestRetentionSweep:
    async def test_sweep_deletes_only_rows_older_than_retention(self, db: asyncpg.Connection) -> None:
        await insert_row(db, action="ancient", age_days=1000)
        await insert_row(db, action="just-expired", age_days=30.1)
        await insert_row(db, action="just-inside", age_days=29.9)
        await insert_row(db, action="today")

        deleted = await admin_service.sweep_audit_logs(db, days=30)

        assert deleted == 2
        assert await actions(db) == ["just-inside", "today", "audit.sweep"]
        sweep = await db.fetchrow("SELECT actor_type, metadata FROM audit_logs WHERE action = 'audit.sweep'")
        assert sweep["actor_type"] == "system"
        assert sweep["metadata"] == {"deleted": 2, "retention_days": 30}

    async def test_sweep_with_nothing_old_deletes_nothing(self, db: asyncpg.Connection) -> None:
        await insert_row(db, action="today")
        assert await admin_service.sweep_audit_logs(db, days=1) == 0
        assert await actions(db) == ["today", "audit.sweep"]

    async def test_delete_of_a_young_row_is_refused_even_with_the_setting(
        self, db: asyncpg.Connection
    ) -> None:
        young = await insert_row(db, action="young", age_days=10)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.transaction():
                await db.execute("SELECT set_config('gatewayz.audit_retention_days', '30', true)")
                await db.execute("DELETE FROM audit_logs WHERE id = $1", young)
        assert await actions(db) == ["young"]

    async def test_setting_does_not_outlive_the_sweep_in_an_outer_transaction(
        self, db: asyncpg.Connection
    ) -> None:
        await insert_row(db, action="old-1", age_days=400)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.transaction():
                assert await audit_db.purge_older_than(db, days=365) == 1
                # Written after the sweep in the same transaction; the sweep's permission is gone.
                await insert_row(db, action="old-2", age_days=400)
                await db.execute("DELETE FROM audit_logs WHERE action = 'old-2'")
        # The whole transaction rolled back: the first old row is still there.
        assert await actions(db) == ["old-1"]

    async def test_retention_below_one_day_is_refused(self, db: asyncpg.Connection) -> None:
        await insert_row(db, action="today")
        with pytest.raises(ValueError):
            await audit_db.purge_older_than(db, days=0)
        assert await actions(db) == ["today"]
