"""Key material: generation, the HMAC digest, constant-time comparison, Fernet rotation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from cryptography.fernet import Fernet, InvalidToken
from fastapi import FastAPI

from src.config import Settings
from src.security.security import (
    ENVIRONMENTS,
    KEY_PATTERN,
    KeyCipher,
    digests_match,
    display_prefix,
    generate_key,
    key_digest,
    looks_like_key,
    new_key,
)
from src.services import api_keys as keys_service
from tests.conftest import REPO_ROOT, TEST_ADMIN_KEY, TEST_SECRET_KEY
from tests.factories import create_key, create_user


class TestGenerateKey:
    @pytest.mark.parametrize("environment", ENVIRONMENTS)
    def test_prefix_and_32_random_bytes(self, environment: str) -> None:
        key = generate_key(environment)  # type: ignore[arg-type]
        prefix = f"gw_{environment}_"
        assert key.startswith(prefix)
        assert KEY_PATTERN.match(key)
        assert looks_like_key(key)
        random_part = key.removeprefix(prefix)
        assert len(base64.urlsafe_b64decode(random_part + "=")) == 32

    def test_keys_differ(self) -> None:
        assert len({generate_key() for _ in range(200)}) == 200

    @pytest.mark.parametrize(
        "candidate",
        [
            "",
            "gw_live_short",
            "gw_prod_" + "a" * 43,
            "sk-" + "a" * 48,
            "gw_live_" + "a" * 44,
            "gw_live_" + "a" * 42 + "!",
        ],
    )
    def test_malformed_keys_are_not_keys(self, candidate: str) -> None:
        assert not looks_like_key(candidate)

    def test_display_prefix_survives_underscores_in_the_random_part(self) -> None:
        key = "gw_staging_ab_d" + "x" * 39
        assert looks_like_key(key)
        assert display_prefix(key) == "gw_staging_ab_d"
        assert display_prefix("gw_live_" + "Q" * 43) == "gw_live_QQQQ"


class TestDigest:
    def test_is_hmac_sha256_of_the_key_under_the_secret(self) -> None:
        key = generate_key()
        expected = hmac.new(TEST_SECRET_KEY.encode(), key.encode(), hashlib.sha256).digest()
        assert key_digest(TEST_SECRET_KEY, key) == expected
        assert key_digest("another secret", key) != expected
        assert key_digest(TEST_SECRET_KEY, generate_key()) != expected

    def test_digests_match_compares_in_constant_time(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[tuple[bytes, bytes]] = []
        real = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            calls.append((a, b))
            return real(a, b)

        # src.security.security calls hmac.compare_digest through the module: patch it there.
        monkeypatch.setattr(hmac, "compare_digest", spy)
        a = key_digest(TEST_SECRET_KEY, "gw_live_x")
        b = key_digest(TEST_SECRET_KEY, "gw_live_y")
        assert digests_match(a, a) is True
        assert digests_match(a, b) is False
        assert calls == [(a, a), (a, b)]

    def test_new_key_material_stores_no_plaintext(self) -> None:
        cipher = KeyCipher([Fernet.generate_key()])
        material = new_key(secret_key=TEST_SECRET_KEY, cipher=cipher, environment="test")
        assert material.digest == key_digest(TEST_SECRET_KEY, material.plaintext)
        assert material.plaintext not in material.encrypted
        assert cipher.decrypt(material.encrypted) == material.plaintext
        assert material.prefix == material.plaintext[: len("gw_test_") + 4]
        assert material.last4 == material.plaintext[-4:]


class TestFernetRotation:
    def test_prepended_key_encrypts_old_tokens_still_decrypt(self) -> None:
        key_a, key_b = Fernet.generate_key(), Fernet.generate_key()
        old_token = KeyCipher([key_a]).encrypt("secret one")
        both = KeyCipher([key_b, key_a])
        assert both.decrypt(old_token) == "secret one"
        new_token = both.encrypt("secret two")
        # New writes use B: B alone decrypts them, A alone does not.
        assert KeyCipher([key_b]).decrypt(new_token) == "secret two"
        with pytest.raises(InvalidToken):
            KeyCipher([key_a]).decrypt(new_token)

    def test_rotate_then_drop_the_old_key(self) -> None:
        key_a, key_b = Fernet.generate_key(), Fernet.generate_key()
        tokens = [KeyCipher([key_a]).encrypt(f"secret {i}") for i in range(3)]
        rotated = [KeyCipher([key_b, key_a]).rotate(token) for token in tokens]
        only_b = KeyCipher([key_b])
        assert [only_b.decrypt(token) for token in rotated] == ["secret 0", "secret 1", "secret 2"]
        with pytest.raises(InvalidToken):
            only_b.decrypt(tokens[0])

    def test_tampered_or_foreign_token_is_refused(self) -> None:
        cipher = KeyCipher([Fernet.generate_key()])
        token = cipher.encrypt("secret")
        raw = bytearray(base64.urlsafe_b64decode(token))
        raw[-40] ^= 0x01
        tampered = base64.urlsafe_b64encode(bytes(raw)).decode()
        with pytest.raises(InvalidToken):
            cipher.decrypt(tampered)
        with pytest.raises(InvalidToken):
            cipher.decrypt(KeyCipher([Fernet.generate_key()]).encrypt("secret"))
        with pytest.raises(InvalidToken):
            cipher.decrypt("not a token")

    def test_needs_a_key(self) -> None:
        with pytest.raises(ValueError):
            KeyCipher([])


async def _stored_tokens(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT id, key_encrypted FROM api_keys")
    return {str(row["id"]): row["key_encrypted"] for row in rows}


class TestReencryptAll:
    async def test_every_stored_key_moves_to_the_newest_key(
        self, app: FastAPI, db: asyncpg.Connection, settings: Settings
    ) -> None:
        user = await create_user(app)
        other = await create_user(app)
        key_id, plaintext = await create_key(app, user, name="second")
        revoked_id, revoked_plaintext = await create_key(app, other, name="revoked")
        await db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", revoked_id)
        old_key = settings.fernet_keys[0]
        new_fernet_key = Fernet.generate_key()
        before = await _stored_tokens(db)
        assert len(before) == 4

        count = await keys_service.reencrypt_all(db, KeyCipher([new_fernet_key, old_key]))

        assert count == 4
        after = await _stored_tokens(db)
        assert after.keys() == before.keys()
        only_new = KeyCipher([new_fernet_key])
        decrypted = {key: only_new.decrypt(token) for key, token in after.items()}
        assert decrypted[str(key_id)] == plaintext
        assert decrypted[str(revoked_id)] == revoked_plaintext
        assert user.api_key in decrypted.values() and other.api_key in decrypted.values()
        with pytest.raises(InvalidToken):
            KeyCipher([old_key]).decrypt(after[str(key_id)])

    async def test_rotation_script(
        self, app: FastAPI, db: asyncpg.Connection, settings: Settings, tmp_path: Path
    ) -> None:
        user = await create_user(app)
        old_key = settings.fernet_keys[0].decode()
        new_fernet_key = Fernet.generate_key().decode()
        env = {
            **os.environ,
            "DATABASE_URL": settings.database_url.get_secret_value() if settings.database_url else "",
            "SECRET_KEY": TEST_SECRET_KEY,
            "ADMIN_API_KEY": TEST_ADMIN_KEY,
            "ENCRYPTION_KEYS": f"{new_fernet_key},{old_key}",
            "GATEWAY_DATA_DIR": str(tmp_path),
            "LOG_LEVEL": "WARNING",
        }
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "scripts.rotate_encryption_keys"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "re-encrypted 1 " in result.stdout
        token = await db.fetchval("SELECT key_encrypted FROM api_keys WHERE user_id = $1", user.id)
        assert KeyCipher([new_fernet_key.encode()]).decrypt(token) == user.api_key
        # The output names no key material.
        assert user.api_key not in result.stdout + result.stderr
        assert new_fernet_key not in result.stdout + result.stderr
