"""Idempotency-Key on a money-moving POST (admin credit adjustments): a retry applies once and gets
the first answer, the same key with another body is refused, concurrent duplicates apply once, a
failed request keeps nothing, and keys are scoped to the caller."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import httpx
from fastapi import FastAPI

from tests.conftest import TEST_ADMIN_KEY
from tests.factories import create_user
from tests.money import assert_money_invariants

OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}


def _keyed(key: str) -> dict[str, str]:
    return {**OPERATOR, "Idempotency-Key": key}


async def _ledger_rows(db: asyncpg.Connection, user_id: object) -> int:
    return int(await db.fetchval("SELECT count(*) FROM credit_transactions WHERE user_id = $1", user_id))


async def test_retry_with_the_same_key_applies_once_and_answers_the_same(
    app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    user = await create_user(app)
    body = {"user_id": str(user.id), "amount": "10", "reason": "goodwill"}
    first = await client.post("/admin/add_credits", headers=_keyed("adj-1"), json=body)
    second = await client.post("/admin/add_credits", headers=_keyed("adj-1"), json=body)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert await _ledger_rows(db, user.id) == 1
    # Another key is another adjustment.
    third = await client.post("/admin/add_credits", headers=_keyed("adj-2"), json=body)
    assert third.status_code == 200 and third.json()["transaction_id"] != first.json()["transaction_id"]
    assert Decimal(await db.fetchval("SELECT credits FROM users WHERE id = $1", user.id)) == 20
    await assert_money_invariants(db)


async def test_same_key_with_another_body_is_refused(
    app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    user = await create_user(app)
    body = {"user_id": str(user.id), "amount": "10", "reason": "goodwill"}
    assert (await client.post("/admin/add_credits", headers=_keyed("adj-3"), json=body)).status_code == 200
    other = await client.post("/admin/add_credits", headers=_keyed("adj-3"), json={**body, "amount": "99"})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert other.json()["error"]["param"] == "Idempotency-Key"
    assert await _ledger_rows(db, user.id) == 1


async def test_concurrent_duplicates_apply_once(
    app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    user = await create_user(app)
    body = {"user_id": str(user.id), "amount": "5", "reason": "goodwill"}
    answers = await asyncio.gather(
        *(client.post("/admin/add_credits", headers=_keyed("adj-4"), json=body) for _ in range(10))
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert set(statuses) <= {200, 409}
    assert statuses.count(200) >= 1
    for answer in answers:
        if answer.status_code == 409:
            assert answer.json()["error"]["code"] == "idempotency_request_in_progress"
    assert len({a.json()["transaction_id"] for a in answers if a.status_code == 200}) == 1
    assert await _ledger_rows(db, user.id) == 1
    await assert_money_invariants(db)


async def test_a_failed_request_keeps_nothing(
    app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    user = await create_user(app, credits="1")
    removal = {"user_id": str(user.id), "amount": "-5", "reason": "too much"}
    refused = await client.post("/admin/add_credits", headers=_keyed("adj-5"), json=removal)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "insufficient_available_balance"
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    # After a top-up the same request with the same key runs for real.
    await client.post(
        "/admin/add_credits",
        headers=OPERATOR,
        json={"user_id": str(user.id), "amount": "10", "reason": "top-up"},
    )
    retried = await client.post("/admin/add_credits", headers=_keyed("adj-5"), json=removal)
    assert retried.status_code == 200
    assert Decimal(retried.json()["balance"]["balance"]) == 6


async def test_invalid_key_is_a_400(app: FastAPI, client: httpx.AsyncClient) -> None:
    user = await create_user(app)
    body = {"user_id": str(user.id), "amount": "1", "reason": "x"}
    answer = await client.post("/admin/add_credits", headers=_keyed("k" * 256), json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_idempotency_key"
