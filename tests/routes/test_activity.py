"""The public model ranking and each user's own activity, from the usage real requests produced."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.factories import TestUser, create_key, create_user
from tests.fakes.upstream import FakeUpstream

MINI = "openai/gpt-4o-mini"
LLAMA = "meta-llama/llama-3.1-8b-instruct"


@pytest.fixture
def settings_overrides(upstream_server: FakeUpstream) -> dict[str, Any]:
    return {"custom_provider_base_url": upstream_server.base_url, "custom_provider_name": "fake"}


async def call(client: httpx.AsyncClient, key: str, model: str, *, expect: int = 200) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": f"Hello {model}"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == expect, response.text


class Usage:
    """Two users, two models, two keys for Alice, one failed request."""

    alice: TestUser
    bob: TestUser
    alice_second_key: UUID


@pytest.fixture
async def usage(app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream) -> Usage:
    made = Usage()
    made.alice = await create_user(app, credits="5")
    made.bob = await create_user(app, credits="5")
    made.alice_second_key, second = await create_key(app, made.alice, name="batch jobs")
    for _ in range(2):
        await call(client, made.alice.api_key, MINI)
    await call(client, second, MINI)
    await call(client, second, LLAMA)
    await call(client, made.bob.api_key, LLAMA)
    upstream.set_fault(status=400, times=1)
    await call(client, made.alice.api_key, LLAMA, expect=400)  # upstream refused: not a success
    return made


async def db_totals(db: asyncpg.Connection, *, user_id: UUID | None = None) -> dict[str, asyncpg.Record]:
    """Per model: everyone's successful requests, or every request of one user."""
    rows = await db.fetch(
        """SELECT model, count(*) AS requests, sum(input_tokens + output_tokens) AS tokens
            FROM usage_records
            WHERE CASE WHEN $1::uuid IS NULL THEN status = 'success' ELSE user_id = $1 END
            GROUP BY model""",
        user_id,
    )
    return {row["model"]: row for row in rows}


class TestRanking:
    async def test_ranks_successful_usage_of_everyone_without_user_data(
        self, usage: Usage, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        response = await client.get("/ranking/models?window=day")  # no key: public
        assert response.status_code == 200, response.text
        ranking = response.json()
        assert (ranking["window"], ranking["sort"]) == ("day", "requests")
        expected = await db_totals(db)
        assert [(e["rank"], e["model"], e["requests"]) for e in ranking["data"]] == [
            (1, MINI, 3),
            (2, LLAMA, 2),  # Bob's request counts; Alice's refused one does not
        ]
        for entry in ranking["data"]:
            assert entry["tokens"] == expected[entry["model"]]["tokens"]
            assert entry["tokens"] == entry["input_tokens"] + entry["output_tokens"]
            assert set(entry) == {"rank", "model", "requests", "tokens", "input_tokens", "output_tokens"}
        for secret in (str(usage.alice.id), str(usage.bob.id), str(usage.alice_second_key), "@example.com"):
            assert secret not in response.text

    async def test_window_bounds_and_sort_by_tokens(
        self, usage: Usage, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        # Two of Alice's model requests happened three days ago.
        await db.execute(
            """UPDATE usage_records SET created_at = now() - interval '3 days', input_tokens = 100000
               WHERE id IN (SELECT id FROM usage_records WHERE model = $1 ORDER BY id LIMIT 2)""",
            MINI,
        )
        day = (await client.get("/ranking/models?window=day")).json()["data"]
        week = (await client.get("/ranking/models?window=week&sort=tokens")).json()["data"]
        assert [(e["model"], e["requests"]) for e in day] == [(LLAMA, 2), (MINI, 1)]
        assert [(e["model"], e["requests"]) for e in week] == [(MINI, 3), (LLAMA, 2)]
        assert week[0]["tokens"] > 200000

    async def test_invalid_window_is_400(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/ranking/models?window=year")
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "window"

    async def test_ranking_query_can_run_on_its_covering_index(self, db: asyncpg.Connection) -> None:
        async with db.transaction():
            await db.execute("SET LOCAL enable_seqscan = off")
            await db.execute("SET LOCAL enable_bitmapscan = off")
            plan = "\n".join(
                row[0]
                for row in await db.fetch(
                    """EXPLAIN SELECT model, count(*), sum(input_tokens), sum(output_tokens)
                       FROM usage_records WHERE status = 'success' AND created_at >= now() - interval '1 day'
                       GROUP BY model"""
                )
            )
        assert "Index Only Scan using usage_records_ranking_idx" in plan, plan


class TestActivity:
    async def test_stats_are_the_callers_own(
        self, usage: Usage, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        response = await client.get("/user/activity/stats?days=7", headers=usage.alice.headers)
        assert response.status_code == 200, response.text
        stats = response.json()
        spend = await db.fetchval("SELECT sum(charged) FROM usage_records WHERE user_id = $1", usage.alice.id)
        tokens = await db.fetchval(
            "SELECT sum(input_tokens + output_tokens) FROM usage_records WHERE user_id = $1", usage.alice.id
        )
        assert stats["days"] == 7
        totals = stats["totals"]
        assert (totals["requests"], totals["successful"], totals["tokens"]) == (5, 4, tokens)
        assert Decimal(totals["spend"]) == spend > 0

        days = stats["by_day"]
        today = datetime.now(UTC).date()
        assert [d["date"] for d in days] == [str(today - timedelta(days=6 - i)) for i in range(7)]
        assert days[-1]["requests"] == 5 and all(d["requests"] == 0 for d in days[:-1])

        models = {m["model"]: m for m in stats["by_model"]}
        assert (models[MINI]["requests"], models[LLAMA]["requests"], models[LLAMA]["successful"]) == (3, 2, 1)
        for model, row in (await db_totals(db, user_id=usage.alice.id)).items():
            assert models[model]["tokens"] == row["tokens"]

        keys = {k["api_key_id"]: k for k in stats["by_api_key"]}
        assert keys[str(usage.alice_second_key)]["requests"] == 2
        assert keys[str(usage.alice_second_key)]["name"] == "batch jobs"
        assert keys[str(usage.alice_second_key)]["masked_key"].startswith("gw_live_")
        assert sum(k["requests"] for k in keys.values()) == 5 and len(keys) == 2
        assert str(usage.bob.id) not in response.text

        bob = (await client.get("/user/activity/stats", headers=usage.bob.headers)).json()
        assert (bob["totals"]["requests"], [m["model"] for m in bob["by_model"]]) == (1, [LLAMA])

    async def test_log_is_the_callers_own_newest_first(
        self, usage: Usage, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        log = (await client.get("/user/activity/log?limit=2", headers=usage.alice.headers)).json()
        mine = await db.fetch(
            "SELECT request_id, status, model FROM usage_records WHERE user_id = $1 ORDER BY id DESC",
            usage.alice.id,
        )
        assert (log["total"], len(log["data"])) == (5, 2)
        assert [e["request_id"] for e in log["data"]] == [str(r["request_id"]) for r in mine[:2]]
        assert (log["data"][0]["status"], log["data"][0]["model"]) == ("upstream_error", LLAMA)
        rest = (await client.get("/user/activity/log?limit=10&offset=2", headers=usage.alice.headers)).json()
        assert [e["request_id"] for e in rest["data"]] == [str(r["request_id"]) for r in mine[2:]]
        entry = log["data"][0]
        assert "user_id" not in entry and "id" not in entry
        assert entry["api_key_id"] in {
            str(usage.alice_second_key),
            *[str(k) for k in await alice_keys(db, usage)],
        }

        bobs = await db.fetchval("SELECT request_id FROM usage_records WHERE user_id = $1", usage.bob.id)
        everything = (await client.get("/user/activity/log?limit=200", headers=usage.alice.headers)).text
        assert str(bobs) not in everything
        assert str(usage.bob.id) not in everything

    async def test_needs_a_key_and_valid_days(self, usage: Usage, client: httpx.AsyncClient) -> None:
        assert (await client.get("/user/activity/stats")).status_code == 401
        assert (await client.get("/user/activity/log")).status_code == 401
        response = await client.get("/user/activity/stats?days=0", headers=usage.alice.headers)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "days"


async def alice_keys(db: asyncpg.Connection, usage: Usage) -> list[UUID]:
    rows = await db.fetch("SELECT id FROM api_keys WHERE user_id = $1", usage.alice.id)
    return [row["id"] for row in rows]
