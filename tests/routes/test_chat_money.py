"""Money through POST /v1/chat/completions under concurrency, disconnects, upstream failures,
shutdown and crashes: nobody spends more than they have, every hold ends settled or released, and
each user's balance stays the sum of their ledger."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from src.config import Settings
from src.db import holds as holds_db
from src.main import create_app
from src.services import credits, tokens
from tests.factories import TestUser, app_state, create_user, create_user_for
from tests.fakes.live_server import LiveServer
from tests.fakes.upstream import FakeUpstream

MODEL = "openai/gpt-4o-mini"
PROMPT_PRICE = Decimal("0.000001")
COMPLETION_PRICE = Decimal("0.000002")
# A fixed prompt and max_tokens make every request's worst-case hold the same amount.
BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from one to three, please."}],
    "max_tokens": 100,
}
STREAM_BODY: dict[str, Any] = {**BODY, "stream": True}


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    return overrides


def http(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url, timeout=30.0, limits=httpx.Limits(max_connections=200, max_keepalive_connections=0)
    )


async def assert_ledger(db: asyncpg.Connection) -> None:
    """For every user: credits == sum of the ledger, held == sum of open holds, never negative."""
    rows = await db.fetch(
        """SELECT u.id, u.credits, u.held,
                  (SELECT coalesce(sum(amount), 0) FROM credit_transactions t
                   WHERE t.user_id = u.id) AS ledger,
                  (SELECT coalesce(sum(amount), 0) FROM credit_holds h WHERE h.user_id = u.id) AS holds
           FROM users u"""
    )
    assert rows
    for row in rows:
        assert row["credits"] == row["ledger"], dict(row)
        assert row["held"] == row["holds"], dict(row)
        assert row["credits"] >= 0, dict(row)


async def balance(db: asyncpg.Connection, user_id: UUID) -> tuple[Decimal, Decimal]:
    row = await db.fetchrow("SELECT credits, held FROM users WHERE id = $1", user_id)
    assert row is not None
    return row["credits"], row["held"]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    """Poll `check` until it holds (settlements after a disconnect run in a task of their own).

    Generous: a worker's first settlement without provider usage loads the tokenizer first (about
    0.7 s on a quiet machine, several seconds on a busy one); polling returns as soon as it holds.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def usage_rows(db: asyncpg.Connection, user_id: UUID) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM usage_records WHERE user_id = $1 ORDER BY id", user_id)


async def probe_hold(
    gateway: LiveServer, settings: Settings, db: asyncpg.Connection, body: dict[str, Any]
) -> Decimal:
    """The hold one request of `body` takes, read from a request made by another user."""
    prober = await create_user_for(settings, credits="10")
    async with http(gateway.url) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=prober.headers)
        assert response.status_code == 200
        await response.aread()
    rows = await usage_rows(db, prober.id)
    if not rows:  # a stream settles just before its last event; give it a moment
        await eventually(lambda: _has_rows(db, prober.id))
        rows = await usage_rows(db, prober.id)
    (row,) = rows
    held: Decimal = row["held"]
    assert held > 0
    return held


async def _has_rows(db: asyncpg.Connection, user_id: UUID, count: int = 1) -> bool:
    return len(await usage_rows(db, user_id)) >= count


def data_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def assert_insufficient(response: httpx.Response) -> None:
    assert response.status_code == 402
    error = response.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"


# -- concurrency ----------------------------------------------------------------------------------


async def test_fifty_concurrent_requests_admit_exactly_what_the_balance_covers(
    live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream, db: asyncpg.Connection
) -> None:
    hold = await probe_hold(live_gateway, gateway_settings, db, BODY)
    user = await create_user_for(gateway_settings, credits=hold * 10)
    upstream.set_fault(delay=1.0)  # every admitted request stays in flight while the rest arrive
    before = len(upstream.chat_requests)

    async with http(live_gateway.url) as client:
        calls = [
            asyncio.create_task(client.post("/v1/chat/completions", json=BODY, headers=user.headers))
            for _ in range(50)
        ]
        assert await upstream.wait_until_async(lambda: upstream.in_flight == 10, timeout=1.0)
        assert (await balance(db, user.id))[1] == hold * 10
        responses = await asyncio.gather(*calls)

    assert Counter(r.status_code for r in responses) == {200: 10, 402: 40}
    for refused in (r for r in responses if r.status_code == 402):
        assert_insufficient(refused)
    # Refused requests never reached the provider.
    assert len(upstream.chat_requests) - before == 10

    credits_after, held_after = await balance(db, user.id)
    assert held_after == 0 and credits_after >= 0
    rows = await usage_rows(db, user.id)
    assert len(rows) == 10 and all(r["status"] == "success" for r in rows)
    assert all(0 < r["charged"] < hold == r["held"] for r in rows)
    assert hold * 10 - credits_after == sum(r["charged"] for r in rows)
    usage_entries = await db.fetchval(
        "SELECT count(*) FROM credit_transactions WHERE user_id = $1 AND type = 'usage'", user.id
    )
    assert usage_entries == 10
    await assert_ledger(db)


async def run_stream(client: httpx.AsyncClient, user: TestUser) -> tuple[int, list[str], httpx.Response]:
    async with client.stream(
        "POST", "/v1/chat/completions", json=STREAM_BODY, headers=user.headers
    ) as response:
        text = (await response.aread()).decode()
    return response.status_code, data_events(text) if response.status_code == 200 else [], response


async def test_twenty_concurrent_streams_admit_five_and_settle_each_to_its_usage(
    live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream, db: asyncpg.Connection
) -> None:
    upstream.set_reply(chunks=6)
    hold = await probe_hold(live_gateway, gateway_settings, db, STREAM_BODY)
    user = await create_user_for(gateway_settings, credits=hold * 5)
    upstream.set_fault(delay=1.0)

    async with http(live_gateway.url) as client:
        calls = [asyncio.create_task(run_stream(client, user)) for _ in range(20)]
        assert await upstream.wait_until_async(lambda: upstream.in_flight == 5, timeout=1.0)
        results = await asyncio.gather(*calls)

    assert Counter(status for status, _, _ in results) == {200: 5, 402: 15}
    for status, _, response in results:
        if status == 402:
            assert_insufficient(response)
    client_costs: list[Decimal] = []
    for status, events, _ in results:
        if status != 200:
            continue
        assert events[-1] == "[DONE]"
        final = orjson.loads(events[-2])
        assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6
        client_costs.append(Decimal(str(final["usage"]["cost"])))

    credits_after, held_after = await balance(db, user.id)
    assert held_after == 0 and credits_after >= 0
    rows = await usage_rows(db, user.id)
    assert len(rows) == 5
    for row in rows:
        # Settled to what the provider reported, the rest of the hold released.
        assert row["status"] == "success" and row["estimated"] is False
        assert row["output_tokens"] == 6 and row["input_tokens"] > 0
        expected = row["input_tokens"] * PROMPT_PRICE + row["output_tokens"] * COMPLETION_PRICE
        assert row["charged"] == row["cost"] == expected
        assert row["held"] == hold > row["charged"]
    assert sorted(client_costs) == sorted(r["charged"] for r in rows)
    assert hold * 5 - credits_after == sum(r["charged"] for r in rows)
    await assert_ledger(db)


async def test_fast_requests_settle_for_less_than_their_hold_and_admit_more(
    live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream, db: asyncpg.Connection
) -> None:
    hold = await probe_hold(live_gateway, gateway_settings, db, BODY)
    start = hold * 10
    user = await create_user_for(gateway_settings, credits=start)
    statuses: Counter[int] = Counter()
    async with http(live_gateway.url) as client:
        for _ in range(6):
            wave = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=BODY, headers=user.headers) for _ in range(5))
            )
            statuses.update(r.status_code for r in wave)
            for refused in (r for r in wave if r.status_code != 200):
                assert_insufficient(refused)
            credits_now, held_now = await balance(db, user.id)
            assert credits_now >= 0 and held_now == 0

    assert set(statuses) <= {200, 402}
    assert statuses[200] > 10
    rows = await usage_rows(db, user.id)
    assert len(rows) == statuses[200]
    assert start - (await balance(db, user.id))[0] == sum(r["charged"] for r in rows)
    await assert_ledger(db)


# -- disconnects and upstream failures ------------------------------------------------------------


async def test_a_stream_cut_by_the_client_is_billed_for_what_was_generated(
    live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream, db: asyncpg.Connection
) -> None:
    user = await create_user_for(gateway_settings, credits="1")
    upstream.set_reply(chunks=20, chunk_delay=0.2)
    received: list[str] = []
    async with (
        http(live_gateway.url) as client,
        client.stream("POST", "/v1/chat/completions", json=STREAM_BODY, headers=user.headers) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                received.append(line)
            if len(received) == 3:
                break
    # Leaving the block closed the connection with 17 chunks still to come (3.4 s of them).

    # The gateway closed its upstream request at once.
    assert await upstream.wait_until_async(lambda: upstream.in_flight == 0, timeout=3.0)
    assert upstream.disconnects == 1
    await eventually(lambda: _has_rows(db, user.id))
    (row,) = await usage_rows(db, user.id)
    assert row["status"] == "client_disconnect" and row["estimated"] is True
    # The prompt is billed at its real token count, not at the bound the hold was sized with.
    assert row["input_tokens"] == tokens.count_prompt(STREAM_BODY["messages"])
    assert row["output_tokens"] > 0
    assert 0 < row["charged"] <= row["held"]
    expected = row["input_tokens"] * PROMPT_PRICE + row["output_tokens"] * COMPLETION_PRICE
    assert row["charged"] == row["cost"] == expected
    credits_after, held_after = await balance(db, user.id)
    assert held_after == 0 and credits_after == Decimal(1) - row["charged"]
    await assert_ledger(db)


async def test_a_client_gone_before_the_first_byte_leaves_no_hold(
    live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream, db: asyncpg.Connection
) -> None:
    user = await create_user_for(gateway_settings, credits="1")
    upstream.set_fault(delay=1.0)
    upstream.set_reply(chunks=20, chunk_delay=0.2)
    async with httpx.AsyncClient(base_url=live_gateway.url, timeout=30.0) as client:
        call = asyncio.create_task(
            client.post("/v1/chat/completions", json=STREAM_BODY, headers=user.headers)
        )
        # The client leaves once the gateway holds credits and waits on the upstream's first byte.
        assert await upstream.wait_until_async(lambda: upstream.in_flight == 1, timeout=10.0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    # The upstream answers after the client left: the gateway settles and closes it at once.
    await eventually(lambda: _has_rows(db, user.id))
    assert await upstream.wait_until_async(lambda: upstream.in_flight == 0, timeout=3.0)
    (row,) = await usage_rows(db, user.id)
    assert row["status"] == "client_disconnect" and row["output_tokens"] == 0
    assert row["charged"] <= row["held"]
    assert await balance(db, user.id) == (Decimal(1) - row["charged"], Decimal(0))
    await assert_ledger(db)


@pytest.mark.parametrize("body", [BODY, STREAM_BODY], ids=["json", "stream"])
async def test_an_upstream_500_before_any_byte_charges_nothing(
    live_gateway: LiveServer,
    gateway_settings: Settings,
    upstream: FakeUpstream,
    db: asyncpg.Connection,
    body: dict[str, Any],
) -> None:
    user = await create_user_for(gateway_settings, credits="1")
    upstream.set_fault(status=500)
    async with http(live_gateway.url) as client:
        response = await client.post("/v1/chat/completions", json=body, headers=user.headers)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "api_error" and upstream.url not in error["message"]
    assert len(upstream.chat_requests) == 1

    assert await balance(db, user.id) == (Decimal(1), Decimal(0))
    assert await db.fetchval("SELECT count(*) FROM credit_holds") == 0
    (row,) = await usage_rows(db, user.id)
    assert row["status"] == "upstream_error" and row["charged"] == 0 and row["held"] > 0
    usage_entries = await db.fetchval(
        "SELECT count(*) FROM credit_transactions WHERE user_id = $1 AND type = 'usage'", user.id
    )
    assert usage_entries == 0
    await assert_ledger(db)


async def test_a_reused_client_request_id_changes_nothing_about_holds_or_charges(
    live_gateway: LiveServer, gateway_settings: Settings, upstream: FakeUpstream, db: asyncpg.Connection
) -> None:
    user = await create_user_for(gateway_settings, credits="1")
    headers = {**user.headers, "X-Request-ID": "client-chosen-id-1"}
    async with http(live_gateway.url) as client:
        responses = await asyncio.gather(
            client.post("/v1/chat/completions", json=BODY, headers=headers),
            client.post("/v1/chat/completions", json=BODY, headers=headers),
        )
    assert [r.status_code for r in responses] == [200, 200]

    rows = await usage_rows(db, user.id)
    assert len(rows) == 2
    assert rows[0]["request_id"] != rows[1]["request_id"]
    assert {r["client_request_id"] for r in rows} == {"client-chosen-id-1"}
    assert all(r["status"] == "success" and r["charged"] > 0 for r in rows)
    entries = await db.fetch(
        "SELECT amount, reference FROM credit_transactions WHERE user_id = $1 AND type = 'usage'", user.id
    )
    assert sorted(e["reference"] for e in entries) == sorted(str(r["request_id"]) for r in rows)
    assert sum(-e["amount"] for e in entries) == sum(r["charged"] for r in rows)
    assert await balance(db, user.id) == (Decimal(1) - sum(r["charged"] for r in rows), Decimal(0))
    await assert_ledger(db)


# -- shutdown and crashes -------------------------------------------------------------------------


async def test_shutdown_settles_or_releases_every_open_stream(
    gateway_settings: Settings, upstream: FakeUpstream, db: asyncpg.Connection
) -> None:
    user = await create_user_for(gateway_settings, credits="1")
    # Longer than the server's graceful-shutdown window (5 s), so the streams are cut by the shutdown.
    upstream.set_reply(chunks=40, chunk_delay=0.2)
    server = LiveServer(create_app(gateway_settings))
    await asyncio.to_thread(server.start)
    started = asyncio.Event()
    open_streams = 0

    async def stream(client: httpx.AsyncClient) -> str:
        nonlocal open_streams
        try:
            async with client.stream(
                "POST", "/v1/chat/completions", json=STREAM_BODY, headers=user.headers
            ) as response:
                assert response.status_code == 200
                counted = False
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and not counted:
                        counted = True
                        open_streams += 1
                        if open_streams == 5:
                            started.set()
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return "ended"

    try:
        async with http(server.url) as client:
            tasks = [asyncio.create_task(stream(client)) for _ in range(5)]
            await asyncio.wait_for(started.wait(), timeout=5.0)
            assert (await balance(db, user.id))[1] > 0
            await asyncio.to_thread(server.stop)
            outcomes = await asyncio.gather(*tasks)
    finally:
        await asyncio.to_thread(server.stop)

    assert len(outcomes) == 5
    assert await db.fetchval("SELECT count(*) FROM credit_holds") == 0
    credits_after, held_after = await balance(db, user.id)
    assert held_after == 0
    rows = await usage_rows(db, user.id)
    assert len(rows) == 5
    # Cut mid-stream: each billed for what it produced, within its hold.
    assert all(0 < r["charged"] <= r["held"] for r in rows)
    assert credits_after == Decimal(1) - sum(r["charged"] for r in rows)
    await assert_ledger(db)


async def place_orphan_hold(db: asyncpg.Connection, user_id: UUID, *, ttl: float) -> UUID:
    """A hold as a process leaves it when it dies mid-request: placed, never settled."""
    hold_id = uuid.uuid4()
    assert await holds_db.place_hold(
        db,
        hold_id=hold_id,
        user_id=user_id,
        api_key_id=None,
        amount=Decimal("0.4"),
        model=MODEL,
        request_type="chat",
        ttl_seconds=ttl,
    )
    return hold_id


async def test_a_hold_left_by_a_dead_process_is_released(app: FastAPI, db: asyncpg.Connection) -> None:
    user = await create_user(app, credits="1")
    hold_id = await place_orphan_hold(db, user.id, ttl=0.05)
    assert await balance(db, user.id) == (Decimal(1), Decimal("0.4"))
    await asyncio.sleep(0.1)

    assert await credits.release_expired(app_state(app).pool) == 1
    assert await balance(db, user.id) == (Decimal(1), Decimal(0))
    row = await db.fetchrow("SELECT request_id, status, charged FROM usage_records")
    assert dict(row) == {"request_id": hold_id, "status": "expired", "charged": Decimal(0)}
    await assert_ledger(db)


@pytest.mark.parametrize("settings_overrides", [{"hold_sweep_interval_seconds": 0.2}], indirect=True)
async def test_the_sweeper_releases_orphan_holds_on_its_own(app: FastAPI, db: asyncpg.Connection) -> None:
    sweeper = app_state(app).sweeper
    assert sweeper is not None and not sweeper.done()
    user = await create_user(app, credits="1")
    await place_orphan_hold(db, user.id, ttl=0.01)
    assert (await balance(db, user.id))[1] == Decimal("0.4")

    async def released() -> bool:
        return await balance(db, user.id) == (Decimal(1), Decimal(0))

    await eventually(released)
    assert await db.fetchval("SELECT count(*) FROM credit_holds") == 0
    assert await db.fetchval("SELECT status FROM usage_records") == "expired"
    assert not sweeper.done()
    await assert_ledger(db)
