"""Admin monitor and account views: the monitor's figures match the requests the test made; users
are searched, shown (keys masked, plan, recent usage) and banned with an audit row and at once;
the ledger and usage across users filter and group as asked."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import TEST_ADMIN_KEY
from tests.factories import create_user
from tests.fakes.upstream import FakeUpstream, Fault

OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
MODEL = "openai/gpt-4o-mini"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}


@pytest.fixture
def settings_overrides(upstream: FakeUpstream) -> dict[str, Any]:
    return {"custom_provider_base_url": upstream.base_url, "custom_provider_name": "fake"}


async def test_monitor_figures_match_the_requests_made(
    app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    user = await create_user(app, credits="10", email="monitor@example.com")
    spent = Decimal(0)
    for _ in range(3):
        answer = await client.post("/v1/chat/completions", headers=user.headers, json=BODY)
        assert answer.status_code == 200
        spent += Decimal(str(answer.json()["usage"]["cost"]))
    upstream.set_fault(Fault(status=500, times=1))
    failed = await client.post("/v1/chat/completions", headers=user.headers, json=BODY)
    assert failed.status_code == 502

    monitor = await client.get("/admin/monitor", headers=OPERATOR)
    assert monitor.status_code == 200, monitor.text
    body = monitor.json()
    for window in ("5m", "1h", "24h"):
        figures = body["requests"][window]
        assert figures["requests"] == 4
        assert figures["error_rate"] == 0.25
        assert figures["latency_ms"]["p50"] is not None
    assert body["requests"]["5m"]["requests_per_minute"] == 0.8
    assert Decimal(body["credits_spent_today"]) == spent
    assert body["open_holds"] == 0
    assert body["top_users_today"][0]["user_id"] == str(user.id)
    assert body["top_users_today"][0]["requests"] == 4
    assert [(m["model"], m["requests"]) for m in body["top_models_today"]] == [(MODEL, 4)]
    assert body["database"]["status"] == "ok" and body["database"]["pool_max"] >= 1
    assert body["redis"] in {"disabled", "ok"}
    assert [p["provider"] for p in body["providers"]] == ["fake"]
    assert body["version"] and body["uptime_seconds"] >= 0


async def test_user_search_detail_and_ban(
    app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    alice = await create_user(app, credits="3", email="alice@example.com")
    await create_user(app, email="bob@example.com")
    await create_user(app, email="alfred@example.com", role="admin")

    found = await client.get("/admin/users", headers=OPERATOR, params={"email": "AL"})
    assert found.status_code == 200
    assert sorted(u["email"] for u in found.json()["data"]) == ["alfred@example.com", "alice@example.com"]
    assert found.json()["total"] == 2
    admins = await client.get("/admin/users", headers=OPERATOR, params={"role": "admin", "email": "al"})
    assert [u["email"] for u in admins.json()["data"]] == ["alfred@example.com"]

    await client.post("/v1/chat/completions", headers=alice.headers, json=BODY)
    detail = await client.get(f"/admin/users/{alice.id}", headers=OPERATOR)
    assert detail.status_code == 200
    shown = detail.json()
    assert shown["email"] == "alice@example.com"
    assert Decimal(shown["balance"]["balance"]) < 3
    assert len(shown["api_keys"]) == 1 and "..." in shown["api_keys"][0]["masked_key"]
    assert alice.api_key not in detail.text
    assert shown["plan"]["status"] == "active"
    assert [(u["model"], u["status"]) for u in shown["recent_usage"]] == [(MODEL, "success")]

    banned = await client.put(
        f"/admin/users/{alice.id}", headers=OPERATOR, json={"banned": True, "reason": "abuse"}
    )
    assert banned.status_code == 200 and banned.json()["banned_at"] is not None
    refused = await client.post("/v1/chat/completions", headers=alice.headers, json=BODY)
    assert refused.status_code in {401, 403}
    audit = await db.fetchrow("SELECT before, after FROM audit_logs WHERE action = 'user.standing'")
    assert audit is not None
    inactive = await client.get("/admin/users", headers=OPERATOR, params={"active": "false"})
    assert [u["email"] for u in inactive.json()["data"]] == ["alice@example.com"]

    assert (await client.put(f"/admin/users/{alice.id}", headers=OPERATOR, json={})).status_code == 400
    assert (await client.get("/admin/users/not-a-uuid", headers=OPERATOR)).status_code == 404


async def test_ledger_and_usage_across_users(
    app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    first = await create_user(app, credits="5")
    second = await create_user(app, credits="7")
    for user in (first, second, second):
        assert (await client.post("/v1/chat/completions", headers=user.headers, json=BODY)).status_code == 200

    everything = await client.get("/admin/credit-transactions", headers=OPERATOR, params={"limit": 2})
    assert everything.status_code == 200
    assert len(everything.json()["data"]) == 2 and everything.json()["has_more"] is True
    usage_rows = await client.get(
        "/admin/credit-transactions", headers=OPERATOR, params={"user_id": str(second.id), "type": "usage"}
    )
    assert len(usage_rows.json()["data"]) == 2 and usage_rows.json()["has_more"] is False

    by_user = await client.get("/admin/usage", headers=OPERATOR, params={"group_by": "user"})
    assert by_user.status_code == 200
    counts = {row["key"]: row["requests"] for row in by_user.json()["data"]}
    assert counts == {str(first.id): 1, str(second.id): 2}
    by_model = await client.get("/admin/usage", headers=OPERATOR, params={"group_by": "model"})
    assert [(row["key"], row["requests"]) for row in by_model.json()["data"]] == [(MODEL, 3)]
    by_day = await client.get("/admin/usage", headers=OPERATOR, params={"group_by": "day"})
    assert sum(row["requests"] for row in by_day.json()["data"]) == 3
    bad = await client.get("/admin/usage", headers=OPERATOR, params={"group_by": "planet"})
    assert bad.status_code == 400
    # The daily rollup the settlement keeps adds up to exactly the usage records.
    rollup = await db.fetchrow(
        "SELECT sum(requests) AS r, sum(input_tokens) AS i, sum(output_tokens) AS o, sum(spent) AS s"
        " FROM usage_daily"
    )
    raw = await db.fetchrow(
        """SELECT count(*) AS r, sum(input_tokens) AS i, sum(output_tokens) AS o, sum(charged) AS s
            FROM usage_records"""
    )
    assert rollup is not None and raw is not None and dict(rollup) == dict(raw)
