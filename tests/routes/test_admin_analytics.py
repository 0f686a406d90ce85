"""GET /admin/transactions/analytics: every figure over a seeded window, checked exactly; bounds and
permissions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from src.errors import InvalidRequest
from src.services import analytics as analytics_service
from src.services import grants
from src.services import trials as trials_service
from tests.conftest import TEST_ADMIN_KEY
from tests.factories import TestUser, app_state, create_user, create_user_with_permissions
from tests.money import assert_money_invariants

OPERATOR = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
URL = "/admin/transactions/analytics"
WINDOW = {"start": "2026-03-01", "end": "2026-03-03"}


def at(day: int, hour: int = 12, minute: int = 0, second: int = 0, *, month: int = 3) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


@pytest.fixture(autouse=True)
async def _money_invariants(db: asyncpg.Connection) -> AsyncIterator[None]:
    yield
    await assert_money_invariants(db)


async def pay(
    db: asyncpg.Connection,
    user: TestUser,
    cents: int,
    paid_at: datetime | None,
    *,
    discount: int = 0,
    refunded: int = 0,
    kind: str = "topup",
    currency: str = "usd",
    livemode: bool = False,
) -> None:
    """A payment row as the Stripe code leaves it once paid (and perhaps refunded)."""
    status = "pending" if paid_at is None else "partially_refunded" if refunded else "paid"
    await db.execute(
        """INSERT INTO payments (user_id, kind, amount_cents, discount_cents, currency, credits, status,
                livemode, paid_at, granted_at, refunded_cents, created_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, COALESCE($9, now()))""",
        user.id,
        kind,
        cents,
        discount,
        currency,
        Decimal(cents) / 100,
        status,
        livemode,
        paid_at,
        refunded,
    )


async def grant(
    app: FastAPI, db: asyncpg.Connection, user: TestUser, amount: str, source: Any, made_at: datetime
) -> None:
    async with app_state(app).pool.acquire() as conn:
        granted = await grants.grant(
            conn,
            user_id=user.id,
            amount=Decimal(amount),
            source=source,
            reference=f"{source}-{user.id}-{made_at.isoformat()}",
            actor="test",
        )
    assert granted is not None
    await db.execute("UPDATE credit_grants SET created_at = $2 WHERE id = $1", granted.grant_id, made_at)


async def trial(
    app: FastAPI, db: asyncpg.Connection, user: TestUser, started_at: datetime, *, converted: bool = False
) -> None:
    async with app_state(app).pool.acquire() as conn:
        await trials_service.grant_trial(
            conn,
            app_state(app).settings,
            user_id=user.id,
            credits=Decimal(1),
            days=None,
            max_tokens=None,
            max_requests=None,
            reason="test",
            actor=None,
            meta=None,
        )
        if converted:
            await trials_service.record_conversion(conn, user_id=user.id, payment_reference=f"cs_{user.id}")
    await db.execute("UPDATE trials SET started_at = $2 WHERE user_id = $1", user.id, started_at)
    await db.execute(
        "UPDATE credit_grants SET created_at = $2 WHERE user_id = $1 AND source = 'trial'",
        user.id,
        started_at,
    )


async def usage(db: asyncpg.Connection, user: TestUser, charged: str, created_at: datetime) -> None:
    await db.execute(
        """INSERT INTO usage_records (request_id, user_id, model, request_type, cost, charged, status,
                created_at)
            VALUES (gen_random_uuid(), $1, 'openai/gpt-4o-mini', 'chat', $2, $2, 'success', $3)""",
        user.id,
        Decimal(charged),
        created_at,
    )


def revenue(paid: int, refunded: int, payments: int) -> dict[str, int]:
    return {
        "paid_cents": paid,
        "refunded_cents": refunded,
        "net_cents": paid - refunded,
        "payments": payments,
    }


def money(value: str) -> str:
    return format(Decimal(value).quantize(Decimal("0.0000000001")), "f")


class TestReport:
    async def test_every_figure_over_the_window(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        a = await create_user(app, email="a@example.com")
        b = await create_user(app, email="b@example.com")
        c = await create_user(app, email="c@example.com")
        d = await create_user(app, email="d@example.com")

        await pay(db, a, 1000, at(1, 10))
        await pay(db, a, 300, at(2, 23, 59, 59))
        await pay(db, b, 2500, at(2, 0), refunded=500)
        await pay(db, b, 1200, at(3), kind="subscription")
        await pay(db, d, 2000, at(3), discount=500)
        # Left out: unpaid, paid before or after the window, another currency, the other Stripe mode.
        await pay(db, c, 9999, None)
        await pay(db, c, 7777, at(28, 23, 59, 59, month=2))
        await pay(db, c, 8888, at(4, 0))
        await pay(db, c, 6666, at(2), currency="eur")
        await pay(db, c, 5555, at(2), livemode=True)

        await grant(app, db, a, "10", "purchase", at(1))
        await grant(app, db, a, "5", "admin", at(2))
        await grant(app, db, b, "2.5", "coupon", at(2))
        await grant(app, db, b, "25", "purchase", at(2, 23))
        await grant(app, db, c, "1", "referral", at(28, month=2))

        await trial(app, db, a, at(1), converted=True)
        await trial(app, db, b, at(3))
        await trial(app, db, d, at(3, 23, 59, 59))
        await trial(app, db, c, at(20, month=2), converted=True)

        await usage(db, a, "0.5", at(1, 1))
        await usage(db, a, "0.25", at(1, 23))
        await usage(db, b, "1.125", at(3))
        await usage(db, c, "9", at(4, 0, 0, 1))

        response = await client.get(URL, headers=OPERATOR, params={**WINDOW, "top": 2})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["object"], body["start"], body["end"], body["currency"]) == (
            "billing.analytics",
            "2026-03-01",
            "2026-03-03",
            "usd",
        )
        assert body["revenue"] == {
            "paid_cents": 6500,
            "refunded_cents": 500,
            "net_cents": 6000,
            "payments": 5,
        }
        assert body["revenue_by_day"] == [
            {"date": "2026-03-01", "kind": "topup", **revenue(1000, 0, 1)},
            {"date": "2026-03-02", "kind": "topup", **revenue(2800, 500, 2)},
            {"date": "2026-03-03", "kind": "subscription", **revenue(1200, 0, 1)},
            {"date": "2026-03-03", "kind": "topup", **revenue(1500, 0, 1)},
        ]
        assert body["top_payers"] == [
            {"user_id": str(b.id), "email": "b@example.com", **revenue(3700, 500, 2)},
            {"user_id": str(d.id), "email": "d@example.com", **revenue(1500, 0, 1)},
        ]
        assert body["refunds"] == {"count": 1, "amount_cents": 500}

        assert body["credits_granted"] == {
            "total": money("45.5"),
            "by_source": {
                "admin": money("5"),
                "coupon": money("2.5"),
                "purchase": money("35"),
                "trial": money("3"),
            },
        }
        assert body["credits_granted_by_day"] == [
            {"date": "2026-03-01", "source": "purchase", "amount": money("10"), "grants": 1},
            {"date": "2026-03-01", "source": "trial", "amount": money("1"), "grants": 1},
            {"date": "2026-03-02", "source": "admin", "amount": money("5"), "grants": 1},
            {"date": "2026-03-02", "source": "coupon", "amount": money("2.5"), "grants": 1},
            {"date": "2026-03-02", "source": "purchase", "amount": money("25"), "grants": 1},
            {"date": "2026-03-03", "source": "trial", "amount": money("2"), "grants": 2},
        ]
        assert body["usage"] == {"charged": money("1.875"), "requests": 3}
        assert body["usage_by_day"] == [
            {"date": "2026-03-01", "charged": money("0.75"), "requests": 2},
            {"date": "2026-03-03", "charged": money("1.125"), "requests": 1},
        ]
        assert body["trials"] == {"started": 3, "converted": 1, "conversion_rate": 0.3333}

    async def test_an_empty_window(self, client: httpx.AsyncClient) -> None:
        response = await client.get(URL, headers=OPERATOR, params=WINDOW)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["revenue"] == revenue(0, 0, 0)
        assert body["credits_granted"] == {"total": money("0"), "by_source": {}}
        assert body["usage"] == {"charged": money("0"), "requests": 0}
        assert (body["top_payers"], body["revenue_by_day"], body["usage_by_day"]) == ([], [], [])
        assert body["refunds"] == {"count": 0, "amount_cents": 0}
        assert body["trials"] == {"started": 0, "converted": 0, "conversion_rate": None}

    async def test_default_window_is_the_last_30_days(self, client: httpx.AsyncClient) -> None:
        response = await client.get(URL, headers=OPERATOR)
        assert response.status_code == 200, response.text
        body = response.json()
        assert date.fromisoformat(body["end"]) - date.fromisoformat(body["start"]) == timedelta(days=29)


class TestWindow:
    def test_defaults(self) -> None:
        today = date(2026, 3, 31)
        assert analytics_service.window(None, None, today=today) == (date(2026, 3, 2), today)
        assert analytics_service.window(date(2026, 1, 1), None, today=today) == (
            date(2026, 1, 1),
            date(2026, 1, 30),
        )
        assert analytics_service.window(None, date(2026, 2, 1), today=today) == (
            date(2026, 1, 3),
            date(2026, 2, 1),
        )
        assert analytics_service.window(date(2025, 3, 31), today, today=today) == (date(2025, 3, 31), today)
        with pytest.raises(InvalidRequest):
            analytics_service.window(date(2025, 3, 30), today, today=today)

    @pytest.mark.parametrize(
        ("params", "code"),
        [
            ({"start": "2026-03-03", "end": "2026-03-01"}, "invalid_range"),
            ({"start": "2025-01-01", "end": "2026-01-02"}, "window_too_large"),
            ({"start": "yesterday"}, None),
            ({"top": 0}, None),
        ],
    )
    async def test_refused(self, client: httpx.AsyncClient, params: dict[str, Any], code: str | None) -> None:
        response = await client.get(URL, headers=OPERATOR, params=params)
        assert response.status_code == 400, response.text
        if code is not None:
            assert response.json()["error"]["code"] == code

    async def test_a_year_is_allowed(self, client: httpx.AsyncClient) -> None:
        response = await client.get(
            URL, headers=OPERATOR, params={"start": "2025-01-01", "end": "2026-01-01"}
        )
        assert response.status_code == 200, response.text


class TestPermission:
    async def test_needs_billing_read(self, app: FastAPI, client: httpx.AsyncClient) -> None:

        plain = await create_user(app)
        other = await create_user_with_permissions(app, client, ["trials.write", "billing.write"])
        reader = await create_user_with_permissions(app, client, ["billing.read"])
        assert (await client.get(URL, params=WINDOW)).status_code == 401
        for user in (plain, other):
            refused = await client.get(URL, headers=user.headers, params=WINDOW)
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "permission_denied"
        allowed = await client.get(URL, headers=reader.headers, params=WINDOW)
        assert allowed.status_code == 200, allowed.text
