"""Credit grants against a real database: exactly-once grants, soonest-expiring spent first,
expiry as a ledger row (by the sweeper or the next balance change, and left out of every read
before that), expiry under an open hold, claw-backs below zero repaid by the next grant, and a
trial ended by settlement when it reaches its limit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from src.errors import InsufficientCredits
from src.services import credits, grants
from src.services.credits import Cost, Hold, Usage
from tests.factories import app_state, create_user
from tests.money import assert_money_invariants

D = Decimal
MODEL = "openai/gpt-4o-mini"


def _usage(cost: str, *, tokens: int = 10) -> Usage:
    total = D(cost)
    return Usage(
        provider="fake",
        input_tokens=tokens,
        output_tokens=0,
        cost=Cost(input_cost=total, output_cost=D(0), total=total),
        estimated=False,
        status="success",
    )


async def _hold(app: FastAPI, user_id: UUID, amount: str) -> Hold:
    return await credits.place_hold(
        app_state(app).pool,
        user_id=user_id,
        api_key_id=None,
        amount=D(amount),
        model=MODEL,
        request_type="chat",
        ttl_seconds=600,
    )


async def _grant(
    app: FastAPI, user_id: UUID, amount: str, source: grants.GrantSource, reference: str, **kwargs: object
) -> grants.Granted | None:
    async with app_state(app).pool.acquire() as conn:
        return await grants.grant(
            conn,
            user_id=user_id,
            amount=D(amount),
            source=source,
            reference=reference,
            actor="test",
            **kwargs,
        )  # type: ignore[arg-type]


async def _remaining(db: asyncpg.Connection, user_id: UUID) -> dict[str, Decimal]:
    rows = await db.fetch("SELECT source, remaining FROM credit_grants WHERE user_id = $1", user_id)
    return {row["source"]: row["remaining"] for row in rows}


async def _credits(db: asyncpg.Connection, user_id: UUID) -> Decimal:
    value: Decimal = await db.fetchval("SELECT credits FROM users WHERE id = $1", user_id)
    return value


class TestExactlyOnce:
    async def test_same_source_and_reference_grants_once(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app, credits="0")
        first = await _grant(app, user.id, "10", "purchase", "cs_1")
        assert first is not None and first.balance_after == D(10)
        assert await _grant(app, user.id, "10", "purchase", "cs_1") is None
        # The same reference under another source is another grant.
        assert await _grant(app, user.id, "1", "coupon", "cs_1") is not None
        assert await _credits(db, user.id) == D(11)
        await assert_money_invariants(db)

    async def test_ten_concurrent_grants_of_one_reference_apply_once(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="0")
        results = await asyncio.gather(*(_grant(app, user.id, "7", "purchase", "cs_race") for _ in range(10)))
        assert sum(result is not None for result in results) == 1
        assert await _credits(db, user.id) == D(7)
        await assert_money_invariants(db)

    async def test_once_key_debits_once(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app, credits="10")
        taken = await asyncio.gather(*(_debit(app, user.id, "4", once_key="refund:re_1") for _ in range(5)))
        assert sum(result is not None for result in taken) == 1
        assert await _credits(db, user.id) == D(6)
        await assert_money_invariants(db)


async def _debit(app: FastAPI, user_id: UUID, amount: str, **kwargs: object) -> grants.Debited | None:
    async with app_state(app).pool.acquire() as conn:
        return await grants.debit(
            conn, user_id=user_id, amount=D(amount), type="refund", actor="test", **kwargs
        )  # type: ignore[arg-type]


class TestSpendingOrder:
    async def test_usage_spends_the_soonest_expiring_grant_first(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="10")  # an admin grant that never expires
        soon = datetime.now(UTC) + timedelta(days=1)
        later = datetime.now(UTC) + timedelta(days=30)
        await _grant(app, user.id, "2", "subscription", "in_1", expires_at=later)
        await _grant(app, user.id, "3", "trial", "trial:x", expires_at=soon)
        hold = await _hold(app, user.id, "5")
        await credits.settle(app_state(app).pool, hold, _usage("4"), actor="test")
        # 3 from the trial (expires first), 1 from the subscription allowance, none of the admin grant.
        assert await _remaining(db, user.id) == {"trial": D(0), "subscription": D(1), "admin": D(10)}
        assert await _credits(db, user.id) == D(11)
        await assert_money_invariants(db)

    async def test_claw_back_takes_the_named_grant_first(self, app: FastAPI, db: asyncpg.Connection) -> None:
        user = await create_user(app, credits="0")
        await _grant(app, user.id, "5", "trial", "trial:y", expires_at=datetime.now(UTC) + timedelta(days=1))
        await _grant(app, user.id, "10", "purchase", "cs_2")
        result = await _debit(app, user.id, "4", once_key="refund:re_2", from_grant=("purchase", "cs_2"))
        assert result is not None and result.balance_after == D(11)
        assert await _remaining(db, user.id) == {"trial": D(5), "purchase": D(6)}
        await assert_money_invariants(db)


class TestExpiry:
    async def test_expired_grant_is_left_out_before_any_sweep_then_written_off(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="1")
        await _grant(app, user.id, "5", "trial", "trial:z", expires_at=datetime.now(UTC) + timedelta(days=7))
        await db.execute(
            "UPDATE credit_grants SET expires_at = now() - interval '1 second' WHERE source = 'trial'"
        )
        # No sweeper has run: the stored balance still holds the trial, every read leaves it out.
        assert await _credits(db, user.id) == D(6)
        body = (await client.get("/user/balance", headers=user.headers)).json()
        assert (body["balance"], body["available"]) == ("1.0000000000", "1.0000000000")
        assert [g["source"] for g in body["grants"]] == ["admin"]
        # Nor can it be spent: a hold above the live credits is refused.
        with pytest.raises(InsufficientCredits):
            await _hold(app, user.id, "2")
        await assert_money_invariants(db)

        assert await grants.expire_due(app_state(app).pool) == 1
        assert await _credits(db, user.id) == D(1)
        expiry = await db.fetchrow(
            "SELECT amount, balance_after, type FROM credit_transactions"
            " WHERE user_id = $1 AND type = 'expiry'",
            user.id,
        )
        assert expiry is not None and (expiry["amount"], expiry["balance_after"]) == (D(-5), D(1))
        # A second sweep finds nothing more to do.
        assert await grants.expire_due(app_state(app).pool) == 0
        await assert_money_invariants(db)

    async def test_next_balance_change_writes_the_expiry_off(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="0")
        await _grant(
            app, user.id, "5", "trial", "trial:w", expires_at=datetime.now(UTC) - timedelta(seconds=1)
        )
        # A back-dated grant expires at once.
        assert await _credits(db, user.id) == D(0)
        await _grant(
            app, user.id, "3", "subscription", "in_2", expires_at=datetime.now(UTC) + timedelta(days=1)
        )
        await db.execute("UPDATE credit_grants SET expires_at = now() WHERE source = 'subscription'")
        await _grant(app, user.id, "2", "coupon", "c:1")
        assert await _credits(db, user.id) == D(2)
        types = [
            row["type"]
            for row in await db.fetch(
                "SELECT type FROM credit_transactions WHERE user_id = $1 ORDER BY id", user.id
            )
        ]
        assert types == ["trial", "expiry", "subscription", "expiry", "coupon"]
        await assert_money_invariants(db)

    async def test_grant_expiring_under_an_open_hold_settles_from_what_is_left(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="1")
        await _grant(app, user.id, "4", "trial", "trial:v", expires_at=datetime.now(UTC) + timedelta(days=1))
        hold = await _hold(app, user.id, "4")
        await db.execute("UPDATE credit_grants SET expires_at = now() WHERE source = 'trial'")
        settled = await credits.settle(app_state(app).pool, hold, _usage("3"), actor="test")
        assert settled is not None
        assert (settled.charged, settled.shortfall, settled.balance_after) == (D(1), D(2), D(0))
        record = await db.fetchrow(
            "SELECT charged, shortfall FROM usage_records WHERE request_id = $1", hold.id
        )
        assert record is not None and (record["charged"], record["shortfall"]) == (D(1), D(2))
        await assert_money_invariants(db)


class TestNegativeBalance:
    async def test_claw_back_below_zero_refuses_holds_until_repaid(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="0")
        await _grant(app, user.id, "10", "purchase", "cs_3")
        hold = await _hold(app, user.id, "8")
        await credits.settle(app_state(app).pool, hold, _usage("8"), actor="test")
        # The purchase is refunded in full after 8 of its 10 credits were spent.
        refund = await _debit(app, user.id, "10", once_key="refund:re_3", from_grant=("purchase", "cs_3"))
        assert refund is not None and refund.balance_after == D(-8)
        with pytest.raises(InsufficientCredits):
            await _hold(app, user.id, "0.0000000001")
        await assert_money_invariants(db)
        # The next grant repays the debt before anything becomes spendable.
        await _grant(app, user.id, "10", "purchase", "cs_4")
        assert await _credits(db, user.id) == D(2)
        assert (await _remaining(db, user.id))["purchase"] in {D(2), D(0)}
        row = await db.fetchrow("SELECT amount, remaining FROM credit_grants WHERE reference = 'cs_4'")
        assert row is not None and (row["amount"], row["remaining"]) == (D(10), D(2))
        await _hold(app, user.id, "2")
        await assert_money_invariants(db)


class TestTrialLimit:
    async def test_settlement_ends_a_trial_at_its_request_limit(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app, credits="0")
        await _grant(
            app, user.id, "5", "trial", f"trial:{user.id}", expires_at=datetime.now(UTC) + timedelta(days=7)
        )
        await db.execute(
            """INSERT INTO trials (user_id, credits, max_tokens, max_requests, ends_at)
                VALUES ($1, 5, 1000000, 2, now() + interval '7 days')""",
            user.id,
        )
        for _ in range(2):
            hold = await _hold(app, user.id, "1")
            await credits.settle(app_state(app).pool, hold, _usage("0.5"), actor="test")
        trial = await db.fetchrow(
            "SELECT status, used_requests, used_tokens FROM trials WHERE user_id = $1", user.id
        )
        assert trial is not None and dict(trial) == {
            "status": "used_up",
            "used_requests": 2,
            "used_tokens": 20,
        }
        # What was left of the trial grant (5 - 2 x 0.5) expired with it, as a ledger row.
        assert await _credits(db, user.id) == D(0)
        assert await db.fetchval(
            "SELECT amount FROM credit_transactions WHERE user_id = $1 AND type = 'expiry'", user.id
        ) == D(-4)
        with pytest.raises(InsufficientCredits):
            await _hold(app, user.id, "0.1")
        await assert_money_invariants(db)
