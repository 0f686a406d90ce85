"""Privy tokens: only ES256 tokens signed by the configured key, for this app, are accepted."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from src.errors import AuthenticationFailed
from src.services.privy import (
    PrivyIdentity,
    PrivyVerifier,
    get_verifier,
    normalise_email,
)

APP_ID = "cm-gatewayz-test"
OTHER_APP_ID = "cm-someone-else"
SUB = "did:privy:cm1234567890abcdef"
REFUSAL = "Invalid Privy token."
MISSING = object()

SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())


def public_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


PUBLIC_PEM = public_pem(SIGNING_KEY)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "sid": "session-1",
        "iss": "privy.io",
        "aud": APP_ID,
        "sub": SUB,
        "iat": now,
        "exp": now + 3600,
    }
    for name, value in overrides.items():
        if value is MISSING:
            payload.pop(name, None)
        else:
            payload[name] = value
    return payload


def sign(payload: dict[str, Any], *, key: Any = SIGNING_KEY, algorithm: str = "ES256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unsigned_token(payload: dict[str, Any]) -> str:
    return f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(payload)}."


def hs256_token(payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def make_verifier(**kwargs: Any) -> PrivyVerifier:
    return PrivyVerifier(APP_ID, PUBLIC_PEM, **kwargs)


def assert_refused(token: str, verifier: PrivyVerifier | None = None) -> None:
    with pytest.raises(AuthenticationFailed) as exc_info:
        (verifier or make_verifier()).verify_access_token(token)
    assert exc_info.value.message == REFUSAL
    assert exc_info.value.status_code == 401


class TestVerifyAccessToken:
    def test_valid_token_returns_subject(self) -> None:
        assert make_verifier().verify_access_token(sign(claims())) == SUB

    def test_audience_list_containing_app_id(self) -> None:
        token = sign(claims(aud=[OTHER_APP_ID, APP_ID]))
        assert make_verifier().verify_access_token(token) == SUB

    def test_expired_within_leeway(self) -> None:
        token = sign(claims(exp=int(time.time()) - 10))
        assert make_verifier().verify_access_token(token) == SUB

    def test_expired_within_leeway_refused_without_leeway(self) -> None:
        assert_refused(sign(claims(exp=int(time.time()) - 10)), make_verifier(leeway_seconds=0))

    def test_wrong_signing_key(self) -> None:
        assert_refused(sign(claims(), key=OTHER_KEY))

    def test_alg_none(self) -> None:
        token = unsigned_token(claims())
        # Well formed, so the refusal is about the algorithm and not the encoding.
        assert jwt.decode(token, options={"verify_signature": False})["sub"] == SUB
        assert_refused(token)

    def test_hs256_keyed_with_public_pem(self) -> None:
        token = hs256_token(claims(), PUBLIC_PEM.encode())
        assert jwt.get_unverified_header(token)["alg"] == "HS256"
        assert jwt.decode(token, options={"verify_signature": False})["sub"] == SUB
        assert_refused(token)

    def test_es384_token(self) -> None:
        assert_refused(sign(claims(), key=ec.generate_private_key(ec.SECP384R1()), algorithm="ES384"))

    def test_rs256_token(self) -> None:
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        assert_refused(sign(claims(), key=rsa_key, algorithm="RS256"))

    def test_es256_signature_under_another_alg_header(self) -> None:
        _, payload, signature = sign(claims()).split(".")
        relabelled = segment({"alg": "ES384", "typ": "JWT"})
        assert_refused(f"{relabelled}.{payload}.{signature}")

    def test_wrong_issuer(self) -> None:
        assert_refused(sign(claims(iss="evil.io")))

    def test_issuer_substring(self) -> None:
        assert_refused(sign(claims(iss="privy")))

    def test_missing_issuer(self) -> None:
        assert_refused(sign(claims(iss=MISSING)))

    def test_wrong_audience(self) -> None:
        assert_refused(sign(claims(aud=OTHER_APP_ID)))

    def test_audience_list_without_app_id(self) -> None:
        assert_refused(sign(claims(aud=[OTHER_APP_ID, "cm-third"])))

    def test_missing_audience(self) -> None:
        assert_refused(sign(claims(aud=MISSING)))

    def test_token_for_another_app(self) -> None:
        # Another Privy app's genuine token: its own key and its own audience.
        assert_refused(sign(claims(aud=OTHER_APP_ID), key=OTHER_KEY))

    def test_another_apps_verifier_refuses_our_token(self) -> None:
        other = PrivyVerifier(OTHER_APP_ID, PUBLIC_PEM)
        assert_refused(sign(claims()), other)

    def test_expired(self) -> None:
        assert_refused(sign(claims(exp=int(time.time()) - 120)))

    def test_missing_exp(self) -> None:
        assert_refused(sign(claims(exp=MISSING)))

    def test_missing_iat(self) -> None:
        assert_refused(sign(claims(iat=MISSING)))

    def test_iat_in_the_future(self) -> None:
        assert_refused(sign(claims(iat=int(time.time()) + 3600)))

    def test_missing_sub(self) -> None:
        assert_refused(sign(claims(sub=MISSING)))

    @pytest.mark.parametrize("sub", ["", "   "])
    def test_empty_sub(self, sub: str) -> None:
        assert_refused(sign(claims(sub=sub)))

    def test_non_string_sub(self) -> None:
        assert_refused(sign(claims(sub=12345)))

    @pytest.mark.parametrize(
        "token",
        ["", "garbage", "a.b.c", "....", "not.a.jwt.at.all", "eyJhbGciOiJFUzI1NiJ9.e30.", "é.é.é"],
    )
    def test_garbage(self, token: str) -> None:
        assert_refused(token)

    def test_refusal_logged_without_token(self, caplog: pytest.LogCaptureFixture) -> None:
        token = sign(claims(), key=OTHER_KEY)
        with caplog.at_level(logging.INFO, logger="gatewayz.privy"):
            assert_refused(token)
        messages = [record.getMessage() for record in caplog.records if record.name == "gatewayz.privy"]
        assert messages
        assert all(token not in message and token.split(".")[2] not in message for message in messages)


class TestVerifyIdentityToken:
    def test_email_from_linked_accounts_json_string(self) -> None:
        accounts = [
            {"type": "wallet", "address": "0xabc", "verified_at": 1700000000},
            {"type": "email", "address": "user@example.com", "verified_at": 1700000000},
        ]
        token = sign(claims(linked_accounts=json.dumps(accounts)))
        assert make_verifier().verify_identity_token(token, expected_sub=SUB) == "user@example.com"

    def test_email_from_linked_accounts_list(self) -> None:
        accounts = [{"type": "email", "address": "list@example.com", "verified_at": 1700000000}]
        token = sign(claims(linked_accounts=accounts))
        assert make_verifier().verify_identity_token(token, expected_sub=SUB) == "list@example.com"

    def test_email_account_preferred_over_oauth(self) -> None:
        accounts = [
            {"type": "google_oauth", "email": "oauth@gmail.com", "subject": "1"},
            {"type": "email", "address": "direct@example.com"},
        ]
        token = sign(claims(linked_accounts=json.dumps(accounts)))
        assert make_verifier().verify_identity_token(token, expected_sub=SUB) == "direct@example.com"

    @pytest.mark.parametrize("account_type", ["google_oauth", "apple_oauth", "github_oauth"])
    def test_oauth_email_fallback(self, account_type: str) -> None:
        accounts = [
            {"type": "wallet", "address": "0xabc"},
            {"type": "twitter_oauth", "username": "someone", "subject": "2"},
            {"type": account_type, "email": "oauth@example.com", "subject": "1"},
        ]
        token = sign(claims(linked_accounts=json.dumps(accounts)))
        assert make_verifier().verify_identity_token(token, expected_sub=SUB) == "oauth@example.com"

    def test_no_email_returns_none(self) -> None:
        accounts = [{"type": "wallet", "address": "0xabc"}, {"type": "phone", "phoneNumber": "+1555"}]
        token = sign(claims(linked_accounts=json.dumps(accounts)))
        assert make_verifier().verify_identity_token(token, expected_sub=SUB) is None

    def test_missing_linked_accounts_returns_none(self) -> None:
        token = sign(claims())
        assert make_verifier().verify_identity_token(token, expected_sub=SUB) is None

    def test_email_normalised(self) -> None:
        accounts = [{"type": "email", "address": "  A@B.C "}]
        token = sign(claims(linked_accounts=json.dumps(accounts)))
        assert make_verifier().verify_identity_token(token, expected_sub=SUB) == "a@b.c"

    def test_sub_mismatch(self) -> None:
        accounts = [{"type": "email", "address": "victim@example.com"}]
        token = sign(claims(sub="did:privy:someone-else", linked_accounts=json.dumps(accounts)))
        with pytest.raises(AuthenticationFailed) as exc_info:
            make_verifier().verify_identity_token(token, expected_sub=SUB)
        assert exc_info.value.message == REFUSAL

    @pytest.mark.parametrize(
        "overrides",
        [
            {"aud": OTHER_APP_ID},
            {"iss": "evil.io"},
            {"exp": int(time.time()) - 120},
            {"exp": MISSING},
        ],
    )
    def test_invalid_claims_refused(self, overrides: dict[str, Any]) -> None:
        accounts = [{"type": "email", "address": "user@example.com"}]
        token = sign(claims(linked_accounts=json.dumps(accounts), **overrides))
        with pytest.raises(AuthenticationFailed) as exc_info:
            make_verifier().verify_identity_token(token, expected_sub=SUB)
        assert exc_info.value.message == REFUSAL

    def test_forged_identity_token_refused(self) -> None:
        accounts = [{"type": "email", "address": "victim@example.com"}]
        for token in (
            sign(claims(linked_accounts=json.dumps(accounts)), key=OTHER_KEY),
            unsigned_token(claims(linked_accounts=json.dumps(accounts))),
            hs256_token(claims(linked_accounts=json.dumps(accounts)), PUBLIC_PEM.encode()),
        ):
            with pytest.raises(AuthenticationFailed):
                make_verifier().verify_identity_token(token, expected_sub=SUB)

    @pytest.mark.parametrize("linked_accounts", ["not json", json.dumps({"type": "email"}), 42])
    def test_malformed_linked_accounts_refused(self, linked_accounts: Any) -> None:
        token = sign(claims(linked_accounts=linked_accounts))
        with pytest.raises(AuthenticationFailed):
            make_verifier().verify_identity_token(token, expected_sub=SUB)


class TestConstruction:
    def test_pem_with_literal_newlines(self) -> None:
        one_line = PUBLIC_PEM.strip().replace("\n", "\\n")
        assert "\n" not in one_line
        verifier = PrivyVerifier(APP_ID, one_line)
        assert verifier.verify_access_token(sign(claims())) == SUB

    def test_rsa_key_refused(self) -> None:
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with pytest.raises(ValueError, match="P-256"):
            PrivyVerifier(APP_ID, public_pem(rsa_key))

    def test_p384_key_refused(self) -> None:
        with pytest.raises(ValueError, match="P-256"):
            PrivyVerifier(APP_ID, public_pem(ec.generate_private_key(ec.SECP384R1())))

    @pytest.mark.parametrize(
        "pem", ["", "not a pem", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"]
    )
    def test_invalid_pem_refused(self, pem: str) -> None:
        with pytest.raises(ValueError):
            PrivyVerifier(APP_ID, pem)

    def test_empty_app_id_refused(self) -> None:
        with pytest.raises(ValueError):
            PrivyVerifier("", PUBLIC_PEM)


class TestGetVerifier:
    def test_cached_per_app_and_key(self) -> None:
        get_verifier.cache_clear()
        first = get_verifier(APP_ID, PUBLIC_PEM)
        assert get_verifier(APP_ID, PUBLIC_PEM) is first
        other = get_verifier(OTHER_APP_ID, PUBLIC_PEM)
        assert other is not first
        assert other.app_id == OTHER_APP_ID
        assert first.verify_access_token(sign(claims())) == SUB


class TestNormaliseEmail:
    def test_strips_and_lower_cases(self) -> None:
        assert normalise_email("  Alice@Example.COM \n") == "alice@example.com"


class TestPrivyIdentity:
    def test_frozen(self) -> None:
        identity = PrivyIdentity(privy_id=SUB, email="a@b.c")
        with pytest.raises(dataclasses.FrozenInstanceError):
            identity.email = "x@y.z"  # type: ignore[misc]
