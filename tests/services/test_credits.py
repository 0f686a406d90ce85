"""Holds and settlement against a real database: exact prices, 402 refusals, one-statement settlement,
settle-once, shortfall without a negative balance, and the sweeper for holds of dead processes."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest
from fastapi import FastAPI

from src.db import holds as holds_db
from src.errors import InsufficientCredits
from src.services import chat, credits
from src.services.catalog import Candidate, Price
from src.services.credits import Cost, Hold, Usage
from tests.factories import app_state, create_user
from tests.fakes.upstream import FakeUpstream

MODEL = "openai/gpt-4o-mini"  # the fake upstream's price: 0.000001 per prompt, 0.000002 per completion token


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest, upstream: FakeUpstream) -> dict[str, Any]:
    """The fake upstream as the only provider, plus whatever a test parametrises."""
    extra: dict[str, Any] = getattr(request, "param", {})
    return {
        "custom_provider_base_url": upstream.base_url,
        "custom_provider_name": "fake",
        **extra,
    }


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


async def hold_for(app: FastAPI, user_id: UUID, amount: str, *, ttl: float = 600.0) -> Hold:
    return await credits.place_hold(
        app_state(app).pool,
        user_id=user_id,
        api_key_id=None,
        amount=Decimal(amount),
        model=MODEL,
        request_type="chat",
        ttl_seconds=ttl,
    )


def usage(cost: str, *, status: str = "success", input_tokens: int = 10, output_tokens: int = 5) -> Usage:
    total = Decimal(cost)
    return Usage(
        provider="fake",
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=Cost(input_cost=Decimal(0), output_cost=total, total=total),
        estimated=False,
        status=status,
    )


def candidate(provider: str, prompt: str, completion: str, request: str = "0") -> Candidate:
    return Candidate(
        provider=provider,
        model_id=MODEL,
        upstream_id=MODEL,
        price=Price(prompt=Decimal(prompt), completion=Decimal(completion), request=Decimal(request)),
        context_length=None,
        max_output_tokens=None,
    )


# -- prices ---------------------------------------------------------------------------------------


def test_cost_of_is_exact_decimal_quantised_half_up() -> None:
    # 0.00000000025 per token is half a quantum: ROUND_HALF_UP gives 3, banker's rounding would give 2.
    price = Price(prompt=Decimal("0.00000000025"), completion=Decimal("0.00000000035"))
    cost = credits.cost_of(price, input_tokens=1, output_tokens=1)
    assert cost.input_cost == Decimal("0.0000000003")
    assert cost.output_cost == Decimal("0.0000000004")
    assert cost.total == Decimal("0.0000000007")
    assert all(isinstance(v, Decimal) for v in (cost.input_cost, cost.output_cost, cost.total))
    # Values that are inexact in binary floating point stay exact.
    exact = credits.cost_of(
        Price(prompt=Decimal("0.0000001"), completion=Decimal("0.0000003"), request=Decimal("0.1")),
        input_tokens=3,
        output_tokens=7,
    )
    assert exact.total == Decimal("0.1000024000")
    assert exact.total.as_tuple().exponent == -10


@pytest.mark.parametrize("settings_overrides", [{"pricing_markup": Decimal("1.5")}], indirect=True)
async def test_cost_of_includes_the_markup(app: FastAPI) -> None:
    (found,) = await app_state(app).catalog.resolve(MODEL)
    assert found.price.prompt == Decimal("0.0000015")
    assert found.price.completion == Decimal("0.000003")
    cost = credits.cost_of(found.price, input_tokens=1234, output_tokens=567)
    assert cost.input_cost == Decimal("0.0018510000")
    assert cost.output_cost == Decimal("0.0017010000")
    assert cost.total == Decimal("0.0035520000")


def test_worst_case_uses_the_dearest_candidate() -> None:
    cheap = candidate("cheap", "0.000001", "0.000002")
    # Dearer prompt but cheaper output: with a long output allowance the other candidate is dearer.
    prompt_heavy = candidate("prompt-heavy", "0.00001", "0.0000001")
    output_heavy = candidate("output-heavy", "0.000001", "0.00001", request="0.001")
    amount = credits.worst_case(
        [cheap, prompt_heavy, output_heavy],
        prompt_tokens=100,
        media_parts=2,
        media_allowance=1000,
        output_tokens=1000,
    )
    # prompt = 100 x 1.25 + 2 x 1000 = 2125 tokens.
    by_candidate = {
        "cheap": Decimal(2125) * Decimal("0.000001") + 1000 * Decimal("0.000002"),
        "prompt-heavy": Decimal(2125) * Decimal("0.00001") + 1000 * Decimal("0.0000001"),
        "output-heavy": Decimal(2125) * Decimal("0.000001") + 1000 * Decimal("0.00001") + Decimal("0.001"),
    }
    assert by_candidate["prompt-heavy"] > by_candidate["output-heavy"] > by_candidate["cheap"]
    assert amount == Decimal("0.0213500000") == by_candidate["prompt-heavy"]
    # Order does not matter (the catalog lists cheapest first).
    assert amount == credits.worst_case(
        [output_heavy, prompt_heavy, cheap],
        prompt_tokens=100,
        media_parts=2,
        media_allowance=1000,
        output_tokens=1000,
    )
    only_output = credits.worst_case(
        [cheap, output_heavy], prompt_tokens=100, media_parts=2, media_allowance=1000, output_tokens=1000
    )
    assert only_output == by_candidate["output-heavy"]


async def test_the_hold_covers_max_tokens_times_n(app: FastAPI) -> None:
    state = app_state(app)

    def body(n: int) -> bytes:
        return orjson.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 100, "n": n}
        )

    one = await chat.prepare(state, body(1), client_request_id=None)
    three = await chat.prepare(state, body(3), client_request_id=None)
    assert one.output_allowance == 100
    assert three.output_allowance == 300
    assert one.prompt_tokens == three.prompt_tokens > 0
    # Two more completions of 100 tokens at 0.000002 each.
    assert three.hold_amount - one.hold_amount == Decimal("0.0004")
    expected = Decimal(one.prompt_tokens) * Decimal("1.25") * Decimal("0.000001") + 300 * Decimal("0.000002")
    assert three.hold_amount == expected


# -- holds ----------------------------------------------------------------------------------------


async def test_place_hold_refuses_with_402_naming_both_amounts(app: FastAPI, db: asyncpg.Connection) -> None:
    user = await create_user(app, credits="1")
    first = await hold_for(app, user.id, "0.6")
    assert await balance(db, user.id) == (Decimal("1"), Decimal("0.6"))

    with pytest.raises(InsufficientCredits) as refused:
        await hold_for(app, user.id, "0.5")
    assert refused.value.status_code == 402
    assert refused.value.error_type == "insufficient_quota"
    message = str(refused.value.message)
    assert "0.5 credits" in message and "0.4 are available" in message

    # Nothing was written: the refused hold left no row and no held amount.
    assert await balance(db, user.id) == (Decimal("1"), Decimal("0.6"))
    assert await db.fetchval("SELECT array_agg(id) FROM credit_holds") == [first.id]
    assert await db.fetchval("SELECT count(*) FROM usage_records") == 0
    # Exactly the available amount is still accepted.
    await hold_for(app, user.id, "0.4")
    assert await balance(db, user.id) == (Decimal("1"), Decimal("1.0"))
    await assert_ledger(db)


async def test_concurrent_holds_never_exceed_the_balance(app: FastAPI, db: asyncpg.Connection) -> None:
    user = await create_user(app, credits="1")
    results = await asyncio.gather(
        *(hold_for(app, user.id, "0.1") for _ in range(30)), return_exceptions=True
    )
    placed = [r for r in results if isinstance(r, Hold)]
    refused = [r for r in results if isinstance(r, InsufficientCredits)]
    assert len(placed) == 10 and len(refused) == 20
    assert await balance(db, user.id) == (Decimal("1"), Decimal("1.0"))
    await assert_ledger(db)


# -- settlement -----------------------------------------------------------------------------------


async def test_settle_charges_releases_and_records_once(app: FastAPI, db: asyncpg.Connection) -> None:
    user = await create_user(app, credits="1")
    hold = await hold_for(app, user.id, "0.5")
    ledger_before = await db.fetchval("SELECT count(*) FROM credit_transactions")

    result = await credits.settle(app_state(app).pool, hold, usage("0.2"), actor="user:test")
    assert result is not None
    assert (result.charged, result.shortfall, result.balance_after) == (
        Decimal("0.2"),
        Decimal("0"),
        Decimal("0.8"),
    )
    assert await balance(db, user.id) == (Decimal("0.8"), Decimal("0"))
    assert await db.fetchval("SELECT count(*) FROM credit_holds") == 0
    record = await db.fetchrow("SELECT * FROM usage_records")
    assert record["request_id"] == hold.id and record["user_id"] == user.id
    assert (record["cost"], record["charged"], record["held"], record["shortfall"]) == (
        Decimal("0.2"),
        Decimal("0.2"),
        Decimal("0.5"),
        Decimal("0"),
    )
    assert record["status"] == "success" and record["model"] == MODEL
    entries = await db.fetch("SELECT * FROM credit_transactions WHERE type = 'usage'")
    assert len(entries) == 1
    assert entries[0]["amount"] == Decimal("-0.2") and entries[0]["balance_after"] == Decimal("0.8")
    assert entries[0]["reference"] == str(hold.id) and entries[0]["actor"] == "user:test"
    assert await db.fetchval("SELECT count(*) FROM credit_transactions") == ledger_before + 1
    await assert_ledger(db)

    # A second settlement of the same hold changes nothing.
    assert await credits.settle(app_state(app).pool, hold, usage("0.3"), actor="user:test") is None
    assert await balance(db, user.id) == (Decimal("0.8"), Decimal("0"))
    assert await db.fetchval("SELECT count(*) FROM usage_records") == 1
    assert await db.fetchval("SELECT count(*) FROM credit_transactions") == ledger_before + 1
    await assert_ledger(db)


async def test_settle_is_one_statement(app: FastAPI, db: asyncpg.Connection) -> None:
    user = await create_user(app, credits="1")
    hold = await hold_for(app, user.id, "0.5")
    queries: list[str] = []

    def log(record: asyncpg.connection.LoggedQuery) -> None:
        queries.append(record.query)

    db.add_query_logger(log)
    try:
        result = await holds_db.settle(
            db,
            hold_id=hold.id,
            cost=Decimal("0.25"),
            provider="fake",
            input_tokens=1,
            output_tokens=2,
            input_cost=Decimal("0.05"),
            output_cost=Decimal("0.2"),
            estimated=False,
            status="success",
            error_code=None,
            latency_ms=5,
            client_request_id="abc",
            actor="user:test",
        )
        await asyncio.sleep(0)  # asyncpg calls query loggers soon after the query, not during it
    finally:
        db.remove_query_logger(log)
    assert result is not None and result.charged == Decimal("0.25")
    assert len(queries) == 1
    # Outside any transaction block: that one statement did the whole settlement atomically.
    assert not db.is_in_transaction()
    assert await db.fetchval("SELECT count(*) FROM usage_records WHERE client_request_id = 'abc'") == 1
    await assert_ledger(db)


async def test_concurrent_settlements_of_one_hold_charge_once(app: FastAPI, db: asyncpg.Connection) -> None:
    user = await create_user(app, credits="1")
    hold = await hold_for(app, user.id, "0.5")
    pool = app_state(app).pool
    results = await asyncio.gather(*(credits.settle(pool, hold, usage("0.1"), actor="t") for _ in range(10)))
    assert sum(r is not None for r in results) == 1
    assert await balance(db, user.id) == (Decimal("0.9"), Decimal("0"))
    assert await db.fetchval("SELECT count(*) FROM usage_records") == 1
    assert await db.fetchval("SELECT count(*) FROM credit_transactions WHERE type = 'usage'") == 1
    await assert_ledger(db)


async def test_a_zero_charge_writes_a_usage_record_but_no_ledger_row(
    app: FastAPI, db: asyncpg.Connection
) -> None:
    user = await create_user(app, credits="1")
    hold = await hold_for(app, user.id, "0.5")
    failed = usage("0", status="upstream_error", input_tokens=0, output_tokens=0)
    result = await credits.settle(app_state(app).pool, hold, failed, actor="user:test")
    assert result is not None and result.charged == 0
    assert await balance(db, user.id) == (Decimal("1"), Decimal("0"))
    record = await db.fetchrow("SELECT status, charged, held FROM usage_records")
    assert dict(record) == {"status": "upstream_error", "charged": Decimal("0"), "held": Decimal("0.5")}
    assert await db.fetchval("SELECT count(*) FROM credit_transactions WHERE type = 'usage'") == 0
    await assert_ledger(db)


async def test_a_cost_above_the_hold_is_charged_only_from_what_is_available(
    app: FastAPI, db: asyncpg.Connection
) -> None:
    user = await create_user(app, credits="1")
    first = await hold_for(app, user.id, "0.5")
    second = await hold_for(app, user.id, "0.4")
    pool = app_state(app).pool

    # Available for the first: its own hold plus what nobody holds (1 - 0.9) = 0.6; the second's
    # hold stays untouched.
    result = await credits.settle(pool, first, usage("0.7"), actor="user:test")
    assert result is not None
    assert (result.charged, result.shortfall, result.balance_after) == (
        Decimal("0.6"),
        Decimal("0.1"),
        Decimal("0.4"),
    )
    assert await balance(db, user.id) == (Decimal("0.4"), Decimal("0.4"))
    record = await db.fetchrow(
        "SELECT cost, charged, shortfall FROM usage_records WHERE request_id = $1", first.id
    )
    assert dict(record) == {"cost": Decimal("0.7"), "charged": Decimal("0.6"), "shortfall": Decimal("0.1")}
    await assert_ledger(db)

    # A cost far beyond everything: the balance stops at zero, never below.
    result = await credits.settle(pool, second, usage("5"), actor="user:test")
    assert result is not None
    assert (result.charged, result.shortfall, result.balance_after) == (
        Decimal("0.4"),
        Decimal("4.6"),
        Decimal("0"),
    )
    assert await balance(db, user.id) == (Decimal("0"), Decimal("0"))
    await assert_ledger(db)


# -- expired holds --------------------------------------------------------------------------------


async def test_release_expired_releases_only_past_holds(app: FastAPI, db: asyncpg.Connection) -> None:
    user = await create_user(app, credits="1")
    other = await create_user(app, credits="1")
    stale = await hold_for(app, user.id, "0.3", ttl=-1)
    fresh = await hold_for(app, user.id, "0.2")
    fresh_other = await hold_for(app, other.id, "0.1")
    assert await balance(db, user.id) == (Decimal("1"), Decimal("0.5"))
    ledger_before = await db.fetchval("SELECT count(*) FROM credit_transactions")

    assert await credits.release_expired(app_state(app).pool) == 1
    assert await balance(db, user.id) == (Decimal("1"), Decimal("0.2"))
    assert set(await db.fetchval("SELECT array_agg(id) FROM credit_holds")) == {fresh.id, fresh_other.id}
    record = await db.fetchrow("SELECT request_id, status, charged, held FROM usage_records")
    assert dict(record) == {
        "request_id": stale.id,
        "status": "expired",
        "charged": Decimal("0"),
        "held": Decimal("0.3"),
    }
    assert await db.fetchval("SELECT count(*) FROM credit_transactions") == ledger_before
    await assert_ledger(db)

    # Nothing left to release; a late settlement of the swept hold changes nothing.
    assert await credits.release_expired(app_state(app).pool) == 0
    assert await credits.settle(app_state(app).pool, stale, usage("0.1"), actor="user:test") is None
    assert await balance(db, user.id) == (Decimal("1"), Decimal("0.2"))
    await assert_ledger(db)


async def test_place_hold_for_an_unknown_user_is_refused(app: FastAPI, db: asyncpg.Connection) -> None:
    with pytest.raises(InsufficientCredits):
        await hold_for(app, uuid.uuid4(), "0.1")
    assert await db.fetchval("SELECT count(*) FROM credit_holds") == 0
