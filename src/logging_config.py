"""Structured, redacting logging for the gateway.

Every log line, uvicorn's access log included, goes through one formatter that
redacts secrets and anything shaped like a key or token. The gateway handles
customer API keys and provider credentials, so a leaked line is a leaked key.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
user_id_var: ContextVar[str | None] = ContextVar("user_id", default=None)
key_id_var: ContextVar[str | None] = ContextVar("key_id", default=None)

_CONTEXT_VARS: tuple[tuple[str, ContextVar[str | None]], ...] = (
    ("request_id", request_id_var),
    ("user_id", user_id_var),
    ("key_id", key_id_var),
)


def bind_request_context(
    *,
    request_id: str | None = None,
    user_id: str | None = None,
    key_id: str | None = None,
) -> None:
    """Set the given ids for the current context; None leaves a value as it is."""
    for value, var in (
        (request_id, request_id_var),
        (user_id, user_id_var),
        (key_id, key_id_var),
    ):
        if value is not None:
            var.set(value)


def clear_request_context() -> None:
    for _, var in _CONTEXT_VARS:
        var.set(None)


REDACTED = "[REDACTED]"
_MIN_SECRET_LEN = 6  # shorter values would blank out ordinary words
_secret_re: re.Pattern[str] | None = None

# Lookbehinds instead of \b so a key glued to "=" or "/" is caught but a word
# that merely contains the prefix ("are_you_ok", "task-list") is not.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Keep the scheme word so the line still says what kind of credential it was.
    # A few prose words are exempt: "missing Bearer token" is an error message, not a leak.
    (
        re.compile(r"(?i)\b(bearer)\s+(?!(?:token|tokens|auth|authentication|header|scheme)\b)[^\s\"',;]+"),
        r"\1 " + REDACTED,
    ),
    # Base64 credentials practically always contain a digit, +, /, = or an inner
    # capital; requiring one keeps "Basic usage"/"Basic authentication" intact.
    (
        re.compile(r"\b((?i:basic))\s+(?=[A-Za-z0-9+/]*(?:[0-9+/=]|[a-z][A-Z]))[A-Za-z0-9+/]{6,}={0,2}"),
        r"\1 " + REDACTED,
    ),
    # Also covers refresh_token=, client_secret=, x-api-key= via the suffix match.
    (
        re.compile(
            r"(?i)(?<![A-Za-z0-9])(api_key|apikey|access_token|token|key|secret|password|signature)=[^&\s\"']+"
        ),
        r"\1=" + REDACTED,
    ),
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), REDACTED),
    (
        re.compile(r"(?<![A-Za-z0-9_-])gw_(?:(?:live|test|staging|dev)_[A-Za-z0-9_-]+|[A-Za-z0-9_-]{16,})"),
        REDACTED,
    ),
    (re.compile(r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{16,}"), REDACTED),
    (
        re.compile(r"(?<![A-Za-z0-9_])(?:(?:sk|rk|pk)_(?:live|test)|whsec)_[A-Za-z0-9+/=]+"),
        REDACTED,
    ),
    # Resend keys are random base62, so they contain a digit or capital; snake_case
    # identifiers such as "re_raise_errors" do not.
    (
        re.compile(r"(?<![A-Za-z0-9_])re_(?=[A-Za-z0-9_]*[0-9A-Z])[A-Za-z0-9_]{8,}"),
        REDACTED,
    ),
)


def _set_secrets(secrets: Iterable[str]) -> None:
    global _secret_re
    values = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True)
    # Longest first so a secret that contains another is masked whole.
    _secret_re = re.compile("|".join(map(re.escape, values))) if values else None


def redact(text: str) -> str:
    """Mask configured secret values and anything shaped like a key or token."""
    if _secret_re is not None:
        text = _secret_re.sub(REDACTED, text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI duplicate of the message
}


def _clean(value: Any) -> Any:
    """Redact strings and make the value encodable by orjson."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {redact(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    """Renders a record as one redacted JSON line.

    Redaction happens on each string before encoding, so a replacement can never
    break the JSON escaping of the line.
    """

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        ts = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        out: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name, var in _CONTEXT_VARS:
            if (value := var.get()) is not None:
                out[name] = redact(str(value))
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out.setdefault(key, _clean(value))
        if record.exc_info:
            out["exc"] = redact(record.exc_text or self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return out

    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(self.fields(record)).decode()


class PlainFormatter(JsonFormatter):
    """Human-readable variant for local development, redacted the same way."""

    def format(self, record: logging.LogRecord) -> str:
        f = self.fields(record)
        head = " ".join(str(f.pop(k)) for k in ("ts", "level", "logger", "message"))
        exc, stack = f.pop("exc", None), f.pop("stack", None)
        line = " ".join([head, *(f"{k}={v}" for k, v in f.items())])
        return "\n".join(part for part in (line, exc, stack) if part)


_HANDLER_NAME = "gatewayz"
# These libraries ship their own handlers (uvicorn's dictConfig) or log full URLs;
# routing them to root makes them pass through the redacting formatter.
_ROUTED_LOGGERS = (
    "uvicorn",
    "uvicorn.error",
    "asyncpg",
    "httpx",
    "httpcore",
    "stripe",
)
# httpx and httpcore log request URLs (with query strings) at INFO; the stripe SDK logs each call at
# INFO and request bodies (customer e-mails) at DEBUG.
_NOISY_LOGGERS = ("httpx", "httpcore", "stripe")


class _StderrHandler(logging.StreamHandler[Any]):
    """Writes to whatever `sys.stderr` is at the time of the record (test capture swaps it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(*, level: str = "INFO", secrets: Iterable[str] = (), json_output: bool = True) -> None:
    """Install the single redacting stderr handler on the root logger (idempotent)."""
    _set_secrets(secrets)
    root = logging.getLogger()
    # Replace rather than reuse: the old handler may hold a since-replaced sys.stderr.
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if json_output else PlainFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())

    for name in _ROUTED_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.NOTSET)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # The gateway writes its own access log (with status, duration, user and key ids, the query
    # string redacted); uvicorn's would duplicate every line.
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers.clear()
    uvicorn_access.propagate = False
