"""Verification of Privy access and identity tokens (ES256 JWTs signed with the app's key)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from src.errors import AuthenticationFailed

logger = logging.getLogger("gatewayz.privy")

PRIVY_ISSUER = "privy.io"
PRIVY_ALGORITHM = "ES256"
DEFAULT_LEEWAY_SECONDS = 30.0
REFUSAL_MESSAGE = "Invalid Privy token."
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub")


@dataclass(frozen=True)
class PrivyIdentity:
    privy_id: str
    email: str | None


def normalise_email(value: str) -> str:
    """Return the e-mail address in the one form the gateway stores and compares."""
    return value.strip().lower()


def _load_verification_key(pem: str) -> ec.EllipticCurvePublicKey:
    # Environment variables often carry the PEM on one line with literal "\n" sequences.
    normalised = pem.replace("\\n", "\n").strip()
    try:
        key = load_pem_public_key(normalised.encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise ValueError("The Privy verification key is not a valid PEM public key.") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("The Privy verification key must be an EC P-256 public key.")
    return key


def _refuse(reason: str) -> AuthenticationFailed:
    # The reason stays in the log; the client gets one message whatever went wrong.
    logger.info("privy token refused: %s", reason)
    return AuthenticationFailed(REFUSAL_MESSAGE)


def _email_from_linked_accounts(raw: Any) -> str | None:
    # Privy serialises the claim as a JSON string; tolerate an already decoded list as well.
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise _refuse("linked_accounts is not valid JSON") from None
    if not isinstance(raw, list):
        raise _refuse("linked_accounts is not a list")
    accounts = [account for account in raw if isinstance(account, dict)]
    for account in accounts:
        address = account.get("address")
        if account.get("type") == "email" and isinstance(address, str) and address.strip():
            return normalise_email(address)
    for account in accounts:
        account_type = account.get("type")
        email = account.get("email")
        if (
            isinstance(account_type, str)
            and account_type.endswith("_oauth")
            and isinstance(email, str)
            and email.strip()
        ):
            return normalise_email(email)
    return None


class PrivyVerifier:
    """Verifies tokens Privy issued for one app, against that app's verification key."""

    def __init__(
        self,
        app_id: str,
        verification_key_pem: str,
        *,
        leeway_seconds: float = DEFAULT_LEEWAY_SECONDS,
    ) -> None:
        if not app_id:
            raise ValueError("The Privy app id must not be empty.")
        if leeway_seconds < 0:
            raise ValueError("The leeway must not be negative.")
        self.app_id = app_id
        self.leeway_seconds = leeway_seconds
        self._key = _load_verification_key(verification_key_pem)

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            # Checked before decoding so that no other algorithm (none, or HS256 keyed with the
            # public PEM) can ever reach a verifier, whatever the library would allow.
            header = jwt.get_unverified_header(token)
            if header.get("alg") != PRIVY_ALGORITHM:
                raise _refuse("unexpected algorithm")
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[PRIVY_ALGORITHM],
                audience=self.app_id,
                issuer=PRIVY_ISSUER,
                leeway=self.leeway_seconds,
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True},
            )
        except jwt.PyJWTError as exc:
            raise _refuse(type(exc).__name__) from None
        except (ValueError, TypeError) as exc:
            # Malformed input that slipped past the library's own error types is still a bad token.
            raise _refuse(type(exc).__name__) from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise _refuse("empty subject")
        return claims

    def verify_access_token(self, token: str) -> str:
        """Return the Privy user id of a valid access token, or raise AuthenticationFailed."""
        return str(self._decode(token)["sub"])

    def verify_identity_token(self, token: str, *, expected_sub: str) -> str | None:
        """Return the verified e-mail of a valid identity token for `expected_sub`, if it has one."""
        claims = self._decode(token)
        if claims["sub"] != expected_sub:
            raise _refuse("identity token subject does not match the access token")
        return _email_from_linked_accounts(claims.get("linked_accounts"))


@lru_cache(maxsize=8)
def get_verifier(app_id: str, pem: str) -> PrivyVerifier:
    """Return the verifier for this app and key, parsing the key only once."""
    return PrivyVerifier(app_id, pem)
