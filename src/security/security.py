"""API-key material: generation, the HMAC digest used for lookup, and Fernet encryption.

A key is `gw_<env>_` + 32 random bytes (URL-safe base64). The database keeps only
HMAC-SHA256(SECRET_KEY, key) for lookup, a Fernet token of the key (its keys live outside the
database, in ENCRYPTION_KEYS) and a display prefix, so a copy of the database alone cannot
authenticate as anyone.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

Environment = Literal["live", "test", "staging", "dev"]
ENVIRONMENTS: tuple[Environment, ...] = ("live", "test", "staging", "dev")
KEY_RANDOM_BYTES = 32
# 32 bytes in unpadded URL-safe base64 are 43 characters.
KEY_PATTERN = re.compile(r"^gw_(live|test|staging|dev)_[A-Za-z0-9_\-]{43}$")
DISPLAY_PREFIX_CHARS = 4


@dataclass(frozen=True)
class NewKey:
    """A freshly generated key: the plaintext (shown once) and what is stored."""

    plaintext: str
    digest: bytes
    encrypted: str
    prefix: str
    last4: str
    environment: Environment


def generate_key(environment: Environment = "live") -> str:
    return f"gw_{environment}_{secrets.token_urlsafe(KEY_RANDOM_BYTES)}"


def looks_like_key(candidate: str) -> bool:
    return KEY_PATTERN.match(candidate) is not None


def key_digest(secret_key: str, key: str) -> bytes:
    return hmac.new(secret_key.encode(), key.encode(), hashlib.sha256).digest()


def digests_match(a: bytes, b: bytes) -> bool:
    """Constant-time comparison, so the time taken says nothing about how much matched."""
    return hmac.compare_digest(a, b)


def display_prefix(key: str) -> str:
    # The random part is URL-safe base64 and may itself contain "_": split after the environment.
    brand, environment, random_part = key.split("_", 2)
    return f"{brand}_{environment}_{random_part[:DISPLAY_PREFIX_CHARS]}"


class KeyCipher:
    """Fernet encryption with rotation: the first key encrypts, every key decrypts."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one Fernet key is required")
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        """The plaintext; raises `InvalidToken` for a tampered or foreign token."""
        return self._fernet.decrypt(token.encode()).decode()

    def rotate(self, token: str) -> str:
        """Re-encrypt under the newest key (after a new key was prepended to ENCRYPTION_KEYS)."""
        return self._fernet.rotate(token.encode()).decode()


def new_key(*, secret_key: str, cipher: KeyCipher, environment: Environment = "live") -> NewKey:
    plaintext = generate_key(environment)
    return NewKey(
        plaintext=plaintext,
        digest=key_digest(secret_key, plaintext),
        encrypted=cipher.encrypt(plaintext),
        prefix=display_prefix(plaintext),
        last4=plaintext[-4:],
        environment=environment,
    )


__all__ = [
    "ENVIRONMENTS",
    "Environment",
    "InvalidToken",
    "KeyCipher",
    "NewKey",
    "digests_match",
    "display_prefix",
    "generate_key",
    "key_digest",
    "looks_like_key",
    "new_key",
]
