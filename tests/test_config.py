"""Settings: secrets are required where they must be, generated only for the embedded default."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from src.config import Settings
from tests.conftest import REPO_ROOT

GOOD = {
    "secret_key": "k" * 48,
    "encryption_keys": Fernet.generate_key().decode(),
    "admin_api_key": "a" * 48,
    "database_url": "postgresql://u:p@db.example:5432/app",
}


def build(tmp_path: Path, **values: Any) -> Settings:
    return Settings(_env_file=None, gateway_data_dir=tmp_path, **values)  # type: ignore[call-arg]


class TestRequiredSecrets:
    @pytest.mark.parametrize("missing", ["secret_key", "encryption_keys", "admin_api_key", "database_url"])
    def test_production_names_the_missing_secret(self, tmp_path: Path, missing: str) -> None:
        values = {k: v for k, v in GOOD.items() if k != missing}
        with pytest.raises(ValidationError, match=missing.upper()):
            build(tmp_path, app_env="production", **values)
        assert not (tmp_path / "secrets.json").exists()

    @pytest.mark.parametrize(
        "trigger",
        [
            {"database_url": GOOD["database_url"]},
            {"vercel": "1"},
            {"railway_environment": "production"},
        ],
    )
    def test_hosted_or_external_database_requires_secrets(
        self, tmp_path: Path, trigger: dict[str, str]
    ) -> None:
        with pytest.raises(ValidationError, match="SECRET_KEY"):
            build(tmp_path, **trigger)
        assert not (tmp_path / "secrets.json").exists()

    def test_production_accepts_complete_settings(self, tmp_path: Path) -> None:
        settings = build(tmp_path, app_env="production", **GOOD)
        assert settings.secret_key is not None
        assert "k" * 48 not in repr(settings)

    def test_production_refuses_placeholder_secrets(self, tmp_path: Path) -> None:
        with pytest.raises(ValidationError, match="placeholder"):
            build(tmp_path, app_env="production", **{**GOOD, "secret_key": "changeme"})

    def test_invalid_fernet_key_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValidationError, match="Fernet"):
            build(tmp_path, **{**GOOD, "encryption_keys": "not-a-key"})

    def test_process_refuses_to_start_and_names_the_secret(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items()}
        env.update(
            APP_ENV="production",
            DATABASE_URL=GOOD["database_url"],
            ENCRYPTION_KEYS=GOOD["encryption_keys"],
            ADMIN_API_KEY=GOOD["admin_api_key"],
            GATEWAY_DATA_DIR=str(tmp_path),
        )
        env.pop("SECRET_KEY", None)
        result = subprocess.run(
            [sys.executable, "-m", "scripts.prestart"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert "SECRET_KEY" in result.stderr
        assert GOOD["admin_api_key"] not in result.stderr


class TestDevelopmentDefault:
    def test_generates_secrets_once_and_reuses_them(self, tmp_path: Path) -> None:
        first = build(tmp_path)
        path = tmp_path / "secrets.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        stored = json.loads(path.read_text())
        assert set(stored) == {"SECRET_KEY", "ENCRYPTION_KEYS", "ADMIN_API_KEY"}
        Fernet(stored["ENCRYPTION_KEYS"].encode())
        second = build(tmp_path)
        for name in ("secret_key", "encryption_keys", "admin_api_key"):
            assert getattr(first, name).get_secret_value() == getattr(second, name).get_secret_value()
        assert first.admin_api_key is not None
        assert first.admin_api_key.get_secret_value() == stored["ADMIN_API_KEY"]

    def test_explicit_secret_wins_and_is_not_stored(self, tmp_path: Path) -> None:
        settings = build(tmp_path, secret_key="m" * 40)
        assert settings.secret_key is not None and settings.secret_key.get_secret_value() == "m" * 40
        assert "SECRET_KEY" not in json.loads((tmp_path / "secrets.json").read_text())

    def test_no_setting_grants_anything_without_credentials(self, tmp_path: Path) -> None:
        settings = build(tmp_path)
        dumped = settings.model_dump()
        assert not any("dev_user" in name or "bypass" in name or "disable_auth" in name for name in dumped)

    def test_secret_values_feed_the_redaction(self, tmp_path: Path) -> None:
        settings = build(tmp_path, openrouter_api_key="sk-or-v1-" + "x" * 30)
        values = settings.secret_values()
        assert "sk-or-v1-" + "x" * 30 in values
        assert settings.admin_api_key is not None and settings.admin_api_key.get_secret_value() in values


def test_env_example_lists_every_setting() -> None:
    text = (REPO_ROOT / ".env.example").read_text()
    listed = {line.lstrip("# ").split("=", 1)[0] for line in text.splitlines() if "=" in line}
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in listed]
    assert not missing, f".env.example does not list {missing}"
