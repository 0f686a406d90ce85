"""The access log: one JSON line per request, with the request id, and no secret in it."""

from __future__ import annotations

import json

import httpx
import pytest

from src.config import Settings
from tests.conftest import TEST_ADMIN_KEY

KEY = "gw_live_" + "Q" * 43
UPSTREAM = "sk-or-v1-" + "9" * 40


@pytest.fixture
def settings_overrides() -> dict[str, object]:
    return {"openrouter_api_key": UPSTREAM}


async def test_access_log_is_structured_and_redacted(
    settings: Settings, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    response = await client.get(
        f"/health?api_key={KEY}&note={UPSTREAM}&admin={TEST_ADMIN_KEY}",
        headers={"Authorization": f"Bearer {KEY}", "X-Request-ID": "req-log-1"},
    )
    assert response.status_code == 200
    output = capsys.readouterr().err
    assert KEY not in output and UPSTREAM not in output and TEST_ADMIN_KEY not in output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "gatewayz.access"]
    assert len(access) == 1
    record = access[0]
    assert record["request_id"] == "req-log-1"
    assert (record["method"], record["path"], record["status"]) == (
        "GET",
        "/health",
        200,
    )
    assert record["duration_ms"] >= 0
    assert "[REDACTED]" in record["query"]
