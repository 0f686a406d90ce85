"""Without DATABASE_URL the gateway starts an embedded PostgreSQL and reuses it on the next start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx

from src import db_config
from src.main import create_app
from tests.conftest import REPO_ROOT, make_settings


def prestart(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "APP_ENV", "SECRET_KEY"}}
    env["GATEWAY_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "scripts.prestart"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "postgres" / "postmaster.pid").read_text().splitlines()[0])


async def test_embedded_database_starts_and_is_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = prestart(data_dir)
    try:
        assert first.returncode == 0, first.stderr
        assert "embedded PostgreSQL" in first.stderr
        assert (data_dir / "postgres" / "PG_VERSION").exists()
        assert (data_dir / "secrets.json").exists()
        pid = postmaster_pid(data_dir)

        second = prestart(data_dir)
        assert second.returncode == 0, second.stderr
        assert "0 migration(s) applied" in second.stderr
        assert postmaster_pid(data_dir) == pid

        # The app itself, with no DATABASE_URL, finds the same server and its migrated database.
        settings = make_settings(None, data_dir)
        assert settings.uses_embedded_database
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/ping")).json()["total_pings"] == 1
            dsn = app.state.gateway.database_url
        assert postmaster_pid(data_dir) == pid
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT count(*) FROM supabase_migrations.schema_migrations") >= 1
        await conn.close()
    finally:
        db_config.stop_embedded_server((data_dir / "postgres").resolve())
