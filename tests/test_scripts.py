"""Operator scripts, run as real processes against the test's database."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import httpx
import pytest

from src.config import Settings
from tests.conftest import REPO_ROOT, TEST_ADMIN_KEY, TEST_SECRET_KEY


@pytest.fixture
def script_env(database_url: str, settings: Settings, tmp_path: Path) -> dict[str, str]:
    assert settings.encryption_keys is not None
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "SECRET_KEY": TEST_SECRET_KEY,
        "ENCRYPTION_KEYS": settings.encryption_keys.get_secret_value(),
        "ADMIN_API_KEY": TEST_ADMIN_KEY,
        "GATEWAY_DATA_DIR": str(tmp_path / "script-data"),
    }


async def run_script(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(REPO_ROOT / ".venv" / "bin" / "python"),
        "-m",
        "scripts.create_user",
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


class TestCreateUser:
    async def test_prints_a_working_key_once(
        self, client: httpx.AsyncClient, db: asyncpg.Connection, script_env: dict[str, str]
    ) -> None:
        code, out, err = await run_script(script_env, "--email", "Ops@Example.com", "--credits", "5")
        assert code == 0, err
        lines = out.splitlines()
        assert len(lines) == 1 and lines[0].startswith("gw_live_")
        api_key = lines[0]
        assert api_key not in err
        user = await db.fetchrow("SELECT id, email, role FROM users")
        assert user is not None
        assert (user["email"], user["role"]) == ("ops@example.com", "user")
        assert str(user["id"]) in err

        response = await client.get("/user/balance", headers={"Authorization": f"Bearer {api_key}"})
        assert response.status_code == 200
        body = response.json()
        assert {k: body[k] for k in ("balance", "held", "available")} == {
            "balance": "5.0000000000",
            "held": "0.0000000000",
            "available": "5.0000000000",
        }
        # The starting credits are an admin grant that never expires.
        assert [(g["source"], g["remaining"], g["expires_at"]) for g in body["grants"]] == [
            ("admin", "5.0000000000", None)
        ]
        created = await db.fetchrow(
            "SELECT actor_type, actor_id FROM audit_logs WHERE action = 'user.create'"
        )
        assert created is not None
        assert (created["actor_type"], created["actor_id"]) == ("system", None)
        assert await db.fetchval("SELECT actor FROM credit_transactions") == "system"

        again, out, err = await run_script(script_env, "--email", "ops@example.com")
        assert again == 1
        assert out == ""
        assert "already exists" in err
        assert await db.fetchval("SELECT count(*) FROM users") == 1

    async def test_admin_flag_gives_the_admin_role(
        self, db: asyncpg.Connection, script_env: dict[str, str]
    ) -> None:
        code, _out, err = await run_script(script_env, "--email", "root@example.com", "--admin")
        assert code == 0, err
        assert await db.fetchval("SELECT role FROM users WHERE email = 'root@example.com'") == "admin"
        assert await db.fetchval("SELECT credits FROM users") == 0
        assert await db.fetchval("SELECT count(*) FROM credit_transactions") == 0

    async def test_refuses_to_start_without_secrets(
        self, db: asyncpg.Connection, script_env: dict[str, str]
    ) -> None:
        env = {k: v for k, v in script_env.items() if k != "SECRET_KEY"}
        code, out, err = await run_script(env, "--email", "x@example.com")
        assert code == 2
        assert out == ""
        assert "SECRET_KEY" in err
        assert await db.fetchval("SELECT count(*) FROM users") == 0
