"""Settings: every environment variable the gateway reads, in one class.

Secrets are never generated outside the embedded development default: with `APP_ENV=production`,
or whenever `DATABASE_URL`, `VERCEL` or `RAILWAY_ENVIRONMENT` is set, a missing secret stops the
start with its name. Only the embedded default (development, no `DATABASE_URL`) generates the
missing ones, once, into `GATEWAY_DATA_DIR/secrets.json` (mode 0600) and reuses them afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from cryptography.fernet import Fernet
from filelock import FileLock
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

VERSION = "2.0.1"
REQUIRED_SECRETS = ("SECRET_KEY", "ENCRYPTION_KEYS", "ADMIN_API_KEY", "DATABASE_URL")
GENERATED_SECRETS = ("SECRET_KEY", "ENCRYPTION_KEYS", "ADMIN_API_KEY")
PLACEHOLDERS = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "secret",
        "password",
        "test",
        "dev",
        "example",
        "xxx",
    }
)
MIN_SECRET_LENGTH = 32


class MissingSecretsError(ValueError):
    """A deployment that must bring its own secrets started without one of them."""


class Settings(BaseSettings):
    """The gateway's configuration, read from the environment (and `.env`)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Process
    app_env: Literal["development", "production"] = "development"
    host: str = "0.0.0.0"  # noqa: S104 - a server in a container or platform listens on every interface
    port: int = Field(8000, ge=1, le=65535)
    web_concurrency: int = Field(1, ge=1, le=64)
    log_level: str = "INFO"
    log_json: bool = True
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    vercel: str | None = None
    railway_environment: str | None = None

    # Storage
    database_url: SecretStr | None = None
    database_pool_min_size: int = Field(1, ge=0)
    database_pool_max_size: int = Field(10, ge=1)
    database_statement_timeout_ms: int = Field(30_000, ge=0)
    gateway_data_dir: Path = Path(".gatewayz")
    redis_url: SecretStr | None = None

    # Secrets
    secret_key: SecretStr | None = None
    encryption_keys: SecretStr | None = None
    admin_api_key: SecretStr | None = None

    # HTTP edge
    cors_origins: str = "*"
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    trusted_proxies: str = ""
    auth_cache_ttl_seconds: float = Field(5.0, ge=0, le=60)

    # Default limits: the ceiling of every user until a plan or an admin sets another.
    default_rpm: int = Field(600, ge=1)
    default_rpd: int = Field(100_000, ge=1)
    default_tpm: int = Field(1_000_000, ge=1)
    default_tpd: int = Field(20_000_000, ge=1)
    default_concurrency: int = Field(50, ge=1)
    audit_retention_days: int = Field(365, ge=1)
    # How many instances share the limits when they must be kept per process (no Redis, or Redis
    # unreachable): each process then enforces limit / (WEB_CONCURRENCY x RATE_LIMIT_INSTANCES).
    rate_limit_instances: int = Field(1, ge=1)
    rate_limit_redis_retry_seconds: float = Field(5.0, gt=0)
    # Failed authentications per IP and minute before that IP is throttled (key guessing).
    auth_failure_limit_per_minute: int = Field(30, ge=1)
    # Requests per IP and minute on unauthenticated routes (POST /auth).
    public_rpm_per_ip: int = Field(60, ge=1)

    # Providers: each is enabled by its key; the custom one by its base URL.
    openrouter_api_key: SecretStr | None = None
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    portkey_api_key: SecretStr | None = None
    portkey_base_url: str = "https://api.portkey.ai/v1"
    portkey_virtual_key: SecretStr | None = None
    featherless_api_key: SecretStr | None = None
    featherless_base_url: str = "https://api.featherless.ai/v1"
    chutes_api_key: SecretStr | None = None
    chutes_base_url: str = "https://llm.chutes.ai/v1"
    custom_provider_base_url: str | None = None
    custom_provider_api_key: SecretStr | None = None
    custom_provider_name: str = "custom"
    pricing_markup: Decimal = Field(Decimal("1.0"), gt=0)

    # Inference
    upstream_connect_timeout_seconds: float = Field(5.0, gt=0)
    upstream_first_byte_timeout_seconds: float = Field(60.0, gt=0)
    upstream_total_timeout_seconds: float = Field(600.0, gt=0)
    default_max_output_tokens: int = Field(4096, ge=1)
    media_part_token_allowance: int = Field(1500, ge=0)
    hold_sweep_interval_seconds: float = Field(60.0, gt=0)
    # Failover: a provider's circuit opens after this many consecutive failures, for this long;
    # an upstream Retry-After cools that provider and model down for at most the cap.
    breaker_failure_threshold: int = Field(5, ge=1)
    breaker_open_seconds: float = Field(30.0, gt=0)
    provider_cooldown_max_seconds: float = Field(60.0, gt=0)

    # Identity
    privy_app_id: str | None = None
    privy_verification_key: SecretStr | None = None

    # Payments, e-mail, metrics, storage
    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_api_base: str | None = None
    # Checkout: the currency, the bounds of a custom top-up, and the origins success/cancel URLs may use.
    stripe_currency: str = Field("usd", min_length=3, max_length=3)
    stripe_min_topup_cents: int = Field(500, ge=50)
    stripe_max_topup_cents: int = Field(1_000_000, ge=50)
    # JSON list of credit packages: [{"id", "name", "amount_cents", "credits"}]; empty: the built-in set.
    credit_packages: str = ""
    checkout_allowed_origins: str = "http://localhost:3000"
    stripe_webhook_tolerance_seconds: int = Field(300, ge=1)
    # Money-moving POSTs remember an Idempotency-Key for this long.
    idempotency_key_ttl_hours: int = Field(24, ge=1)
    # Trials: granted once per person at sign-up through POST /auth.
    trial_on_signup: bool = True
    trial_credits: Decimal = Field(Decimal("5"), ge=0)
    trial_days: int = Field(7, ge=1)
    trial_max_tokens: int = Field(1_000_000, ge=1)
    trial_max_requests: int = Field(1_000, ge=1)
    # Referrals: rewards once per referred user, on a first paid purchase of at least the minimum.
    referral_reward_referrer: Decimal = Field(Decimal("10"), ge=0)
    referral_reward_referred: Decimal = Field(Decimal("10"), ge=0)
    referral_min_purchase: Decimal = Field(Decimal("10"), ge=0)
    referral_max_uses: int = Field(100, ge=1)
    # Failed coupon codes per user and per IP and minute before redemption is throttled.
    coupon_failures_per_minute: int = Field(10, ge=1)
    resend_api_key: SecretStr | None = None
    resend_api_url: str | None = None
    email_from: str = "Gatewayz <noreply@gatewayz.ai>"
    # Signing secret of the Resend webhook (whsec_...): delivery and bounce events are refused without it.
    resend_webhook_secret: SecretStr | None = None
    # Days before a trial's end that the "trial expiring" e-mail goes out (0: none).
    notify_trial_expiring_days: int = Field(3, ge=0, le=60)
    # How often the outbox worker looks for due messages, in seconds.
    notify_poll_interval_seconds: float = Field(5.0, gt=0)
    metrics_token: SecretStr | None = None
    supabase_url: str | None = None
    supabase_service_key: SecretStr | None = None
    # The Storage bucket that keeps generated images (created in the Supabase project beforehand).
    supabase_storage_bucket: str = Field("generated-images", min_length=1, max_length=100)

    @field_validator("log_level")
    @classmethod
    def _upper_level(cls, value: str) -> str:
        return value.upper()

    @model_validator(mode="after")
    def _secrets_present(self) -> Settings:
        if self.generates_secrets:
            # The embedded development default: the database is the embedded one.
            self._load_or_generate_secrets()
            missing = [name for name in GENERATED_SECRETS if not self._secret_value(name)]
        else:
            missing = [name for name in REQUIRED_SECRETS if not self._secret_value(name)]
        if missing:
            raise MissingSecretsError(
                "missing required secret(s): " + ", ".join(missing) + " (set them in the environment)"
            )
        self._check_secret_quality()
        return self

    @property
    def generates_secrets(self) -> bool:
        """True only for the embedded development default."""
        return (
            self.app_env == "development"
            and self.database_url is None
            and not self.vercel
            and not self.railway_environment
        )

    @property
    def uses_embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def checkout_origin_list(self) -> list[str]:
        origins = self.checkout_allowed_origins.split(",")
        return [origin.strip().rstrip("/") for origin in origins if origin.strip()]

    @property
    def trusted_proxy_list(self) -> list[str]:
        return [proxy.strip() for proxy in self.trusted_proxies.split(",") if proxy.strip()]

    @property
    def fernet_keys(self) -> list[bytes]:
        assert self.encryption_keys is not None
        return [key.strip().encode() for key in self.encryption_keys.get_secret_value().split(",")]

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redaction filter."""
        values: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
                values.extend(part.strip() for part in raw.split(",") if part.strip())
        return values

    def _secret_value(self, env_name: str) -> str | None:
        value = getattr(self, env_name.lower())
        if value is None:
            return None
        raw: str = value.get_secret_value()
        return raw or None

    def _check_secret_quality(self) -> None:
        for key in self.fernet_keys:
            try:
                Fernet(key)
            except ValueError as exc:
                raise ValueError(
                    "ENCRYPTION_KEYS must be comma-separated Fernet keys (32 url-safe base64 bytes)"
                ) from exc
        if self.app_env != "production":
            return
        for name in ("SECRET_KEY", "ADMIN_API_KEY"):
            raw = self._secret_value(name) or ""
            if raw.lower() in PLACEHOLDERS or len(raw) < MIN_SECRET_LENGTH:
                raise ValueError(
                    f"{name} looks like a placeholder: use at least {MIN_SECRET_LENGTH} random characters"
                )

    def _load_or_generate_secrets(self) -> None:
        path = self.gateway_data_dir / "secrets.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several workers may start at once: one of them generates, the others read its file.
        with FileLock(str(path) + ".lock"):
            stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
            changed = False
            for name in GENERATED_SECRETS:
                if self._secret_value(name):
                    continue
                if name not in stored:
                    stored[name] = _generate_secret(name)
                    changed = True
                setattr(self, name.lower(), SecretStr(stored[name]))
            if changed:
                _write_private(path, json.dumps(stored, indent=2) + "\n")


def _generate_secret(name: str) -> str:
    if name == "ENCRYPTION_KEYS":
        return Fernet.generate_key().decode()
    if name == "ADMIN_API_KEY":
        return "gw_admin_" + secrets.token_urlsafe(32)
    return secrets.token_urlsafe(48)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
