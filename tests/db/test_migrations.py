"""The migration runner: each file once, in order, in a transaction, safe under concurrent starts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from src import db_config
from tests.conftest import RUN_ID


@pytest.fixture
async def empty_database(pg_admin_dsn: str) -> AsyncIterator[str]:
    name = f"gwt_{RUN_ID}_empty_{id(object())}"
    dsn = await db_config.ensure_database(pg_admin_dsn, name)
    yield dsn
    conn = await asyncpg.connect(pg_admin_dsn)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


def write_migrations(directory: Path) -> None:
    directory.mkdir()
    # A CREATE TABLE without IF NOT EXISTS fails if it runs twice; the log table counts runs.
    (directory / "20260101000000_first.sql").write_text(
        "CREATE TABLE run_log (version text, at timestamptz DEFAULT clock_timestamp());"
        " INSERT INTO run_log (version) VALUES ('first');"
        " SELECT pg_sleep(0.2);"
    )
    (directory / "20260102000000_second.sql").write_text(
        "CREATE TABLE things (id int PRIMARY KEY); INSERT INTO run_log (version) VALUES ('second');"
    )


async def run_log(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [row["version"] for row in await conn.fetch("SELECT version FROM run_log ORDER BY at")]
    finally:
        await conn.close()


class TestMigrations:
    async def test_applies_each_file_once_in_order(self, empty_database: str, tmp_path: Path) -> None:
        directory = tmp_path / "migrations"
        write_migrations(directory)
        applied = await db_config.migrate(empty_database, directory)
        assert applied == ["20260101000000", "20260102000000"]
        assert await run_log(empty_database) == ["first", "second"]
        conn = await asyncpg.connect(empty_database)
        rows = await conn.fetch(
            "SELECT version, name FROM supabase_migrations.schema_migrations ORDER BY version"
        )
        await conn.close()
        assert [(r["version"], r["name"]) for r in rows] == [
            ("20260101000000", "first"),
            ("20260102000000", "second"),
        ]

    async def test_second_start_applies_nothing(self, empty_database: str, tmp_path: Path) -> None:
        directory = tmp_path / "migrations"
        write_migrations(directory)
        await db_config.migrate(empty_database, directory)
        assert await db_config.migrate(empty_database, directory) == []
        assert await run_log(empty_database) == ["first", "second"]

    async def test_new_file_is_applied_on_next_start(self, empty_database: str, tmp_path: Path) -> None:
        directory = tmp_path / "migrations"
        write_migrations(directory)
        await db_config.migrate(empty_database, directory)
        (directory / "20260103000000_third.sql").write_text("INSERT INTO run_log (version) VALUES ('third');")
        assert await db_config.migrate(empty_database, directory) == ["20260103000000"]
        assert await run_log(empty_database) == ["first", "second", "third"]

    async def test_concurrent_starts_apply_nothing_twice(self, empty_database: str, tmp_path: Path) -> None:
        directory = tmp_path / "migrations"
        write_migrations(directory)
        results = await asyncio.gather(*(db_config.migrate(empty_database, directory) for _ in range(4)))
        assert sorted(v for applied in results for v in applied) == [
            "20260101000000",
            "20260102000000",
        ]
        assert await run_log(empty_database) == ["first", "second"]

    async def test_failing_migration_leaves_nothing_behind(self, empty_database: str, tmp_path: Path) -> None:
        directory = tmp_path / "migrations"
        write_migrations(directory)
        (directory / "20260103000000_broken.sql").write_text(
            "INSERT INTO run_log (version) VALUES ('broken'); SELECT no_such_function();"
        )
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await db_config.migrate(empty_database, directory)
        assert await run_log(empty_database) == ["first", "second"]
        conn = await asyncpg.connect(empty_database)
        versions = await conn.fetchval("SELECT count(*) FROM supabase_migrations.schema_migrations")
        await conn.close()
        assert versions == 2

    def test_badly_named_file_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "create_things.sql").write_text("SELECT 1;")
        with pytest.raises(RuntimeError, match=r"<timestamp>_<name>\.sql"):
            db_config.migration_files(tmp_path)

    def test_project_migrations_are_well_named(self) -> None:
        files = db_config.migration_files()
        assert files and [f[0] for f in files] == sorted(f[0] for f in files)


class TestConnectTarget:
    def test_direct_connection_keeps_statement_cache(self) -> None:
        target = db_config.connect_target("postgresql://u:p@db.example.supabase.co:5432/postgres")
        assert target.statement_cache_size > 0

    @pytest.mark.parametrize(
        "url",
        [
            "postgresql://u:p@aws-0-eu.pooler.supabase.com:6543/postgres",
            "postgresql://u:p@pooler.example:5432/postgres?pgbouncer=true&sslmode=require",
        ],
    )
    def test_transaction_pooler_turns_statement_cache_off(self, url: str) -> None:
        target = db_config.connect_target(url)
        assert target.statement_cache_size == 0
        assert "pgbouncer" not in target.dsn
