from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from src import logging_config as lc
from src.logging_config import (
    JsonFormatter,
    PlainFormatter,
    bind_request_context,
    clear_request_context,
    configure_logging,
    redact,
    request_id_var,
)

GW_KEY = "gw_live_AbC123xyz_-987QwErTy"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dBjftJeZ4CVPmB92K27uhbUJU1p1r_wW1gFWFOEjXk"

SECRETS = {
    "gw_live": GW_KEY,
    "gw_test": "gw_test_Zz9Yy8Xx7Ww6",
    "gw_staging": "gw_staging_Q1w2E3r4T5y6",
    "gw_dev": "gw_dev_a1b2c3d4e5",
    "gw_generic": "gw_0123456789abcdefXYZ",
    "openai": "sk-abcdefghijklmnopqrstuvwxyz012345",
    "openai_proj": "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12",
    "openrouter": "sk-or-v1-0123456789abcdef0123456789abcdef",
    "stripe_sk_live": "sk_live_51HxYzAbCdEf123456",
    "stripe_sk_test": "sk_test_51HxYzAbCdEf123456",
    "stripe_rk_live": "rk_live_51HxYzAbCdEf123456",
    "stripe_rk_test": "rk_test_51HxYzAbCdEf123456",
    "stripe_pk_live": "pk_live_51HxYzAbCdEf123456",
    "stripe_whsec": "whsec_AbCdEf0123456789+/xyz=",
    "resend": "re_c1tpEyD8_NKFusih9vKVQknRAQfmFcWCv",
    "jwt": JWT,
}


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    clear_request_context()
    lc._set_secrets(())
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    clear_request_context()
    lc._set_secrets(())


def make_logger(
    formatter: logging.Formatter | None = None,
) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter or JsonFormatter())
    logger = logging.getLogger("test.logging_config")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("secret", list(SECRETS.values()), ids=list(SECRETS))
def test_key_shapes_are_masked_in_message(secret: str) -> None:
    logger, stream = make_logger()
    logger.info(f"calling upstream with {secret} now")
    [record] = lines(stream)
    assert secret not in record["message"]
    assert record["message"] == "calling upstream with [REDACTED] now"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def-123", "Authorization: Bearer [REDACTED]"),
        ("authorization: bearer " + GW_KEY, "authorization: bearer [REDACTED]"),
        (
            "Authorization: Basic dXNlcjpwYXNzd29yZA==",
            "Authorization: Basic [REDACTED]",
        ),
        (
            "GET /v1/x?api_key=hunter2&model=gpt",
            "GET /v1/x?api_key=[REDACTED]&model=gpt",
        ),
        ("u?apikey=abc123 done", "u?apikey=[REDACTED] done"),
        ("u?key=abc123&x=1", "u?key=[REDACTED]&x=1"),
        ("u?token=abc123", "u?token=[REDACTED]"),
        ("u?access_token=abc123", "u?access_token=[REDACTED]"),
        ("secret=abc123 password=p4ss", "secret=[REDACTED] password=[REDACTED]"),
        ("'signature=abcd'", "'signature=[REDACTED]'"),
    ],
)
def test_schemes_and_params_keep_their_name(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_configured_secret_value_is_masked_longest_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(secrets=["supersecretvalue", "supersecretvalue-extended", "abc"])
    logging.getLogger("app").warning("db pass supersecretvalue-extended / supersecretvalue / abc")
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["message"] == "db pass [REDACTED] / [REDACTED] / abc"
    assert redact("x supersecretvalue y") == "x [REDACTED] y"


def test_percent_args_are_masked() -> None:
    logger, stream = make_logger()
    logger.info("key for user %s is %s", 42, GW_KEY)
    assert lines(stream)[0]["message"] == "key for user 42 is [REDACTED]"


def test_extras_are_included_and_masked() -> None:
    logger, stream = make_logger()
    logger.info(
        "request",
        extra={
            "method": "GET",
            "path": f"/v1/x?api_key={GW_KEY}&stream=true",
            "status": 200,
            "duration_ms": 12.5,
            "client_ip": "10.0.0.1",
            "obj": object(),
            "nested": {"auth": f"Bearer {GW_KEY}"},
        },
    )
    [record] = lines(stream)
    assert record["path"] == "/v1/x?api_key=[REDACTED]&stream=true"
    assert record["method"] == "GET" and record["status"] == 200 and record["duration_ms"] == 12.5
    assert record["client_ip"] == "10.0.0.1"
    assert record["obj"].startswith("<object object")
    assert record["nested"] == {"auth": "Bearer [REDACTED]"}
    assert GW_KEY not in stream.getvalue()


def test_access_log_line_is_masked(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    access = logging.getLogger("gatewayz.access")
    access.info(
        '%s - "%s %s HTTP/%s" %d',
        "1.2.3.4:5678",
        "GET",
        f"/v1/models?key={GW_KEY}&token=sk-abcdefghijklmnopqrstuv",
        "1.1",
        200,
    )
    [line] = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["logger"] == "gatewayz.access"
    assert record["message"] == '1.2.3.4:5678 - "GET /v1/models?key=[REDACTED]&token=[REDACTED] HTTP/1.1" 200'


def test_exception_text_is_masked() -> None:
    logger, stream = make_logger()
    try:
        raise ValueError(f"upstream rejected {GW_KEY}")
    except ValueError:
        logger.exception("call failed")
    [record] = lines(stream)
    assert "ValueError: upstream rejected [REDACTED]" in record["exc"]
    assert "Traceback" in record["exc"]
    assert GW_KEY not in stream.getvalue()


def test_lines_are_valid_json_with_request_context() -> None:
    logger, stream = make_logger()
    logger.info("before")
    bind_request_context(request_id="req-1", user_id="7")
    logger.info('quotes " and \\ and newline\n and Bearer %s', GW_KEY)
    token = request_id_var.set("req-2")
    logger.info("after")
    request_id_var.reset(token)
    first, second, third = lines(stream)
    assert "request_id" not in first and "user_id" not in first
    assert second["request_id"] == "req-1" and second["user_id"] == "7"
    assert second["message"] == 'quotes " and \\ and newline\n and Bearer [REDACTED]'
    assert third["request_id"] == "req-2"
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2024-01-01T00:00:00.000Z")
    assert first["level"] == "INFO" and first["logger"] == "test.logging_config"


@pytest.mark.parametrize(
    "text",
    [
        "are_you_ok",
        "skipped",
        "the gw_ prefix",
        "Bearer",
        "missing Bearer token",
        "Basic usage",
        "Basic authentication failed",
        "re_raise_errors",
        "pre_release_notes_v2",
        "task-manager-subprocess",
        "sk-learn",
        "monkey=banana",
        "whsec_ prefix",
        "key_id=7",
    ],
)
def test_ordinary_text_is_not_mangled(text: str) -> None:
    assert redact(text) == text


def test_configure_twice_keeps_one_handler_and_updates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logging.getLogger("uvicorn.access").addHandler(logging.StreamHandler())
    configure_logging(level="INFO", secrets=["first-secret"])
    configure_logging(level="debug", secrets=["second-secret"])
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == "gatewayz"]
    assert len(ours) == 1
    assert root.level == logging.DEBUG
    for name in ("uvicorn", "uvicorn.error", "asyncpg", "httpx"):
        assert logging.getLogger(name).handlers == [] and logging.getLogger(name).propagate
    # uvicorn's own access log is silenced: the gateway writes a richer one itself.
    assert not logging.getLogger("uvicorn.access").hasHandlers()
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
    logging.getLogger("app").debug("first-secret second-secret")
    assert json.loads(capsys.readouterr().err)["message"] == "first-secret [REDACTED]"


def test_plain_output_is_redacted() -> None:
    logger, stream = make_logger(PlainFormatter())
    bind_request_context(request_id="req-9")
    logger.info("hello %s", GW_KEY, extra={"status": 401})
    out = stream.getvalue().strip()
    assert "hello [REDACTED]" in out and "request_id=req-9" in out and "status=401" in out
    assert GW_KEY not in out
