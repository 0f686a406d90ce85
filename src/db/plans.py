"""SQL for plans and the plan each user is on (user_plans).

A user's current plan is their user_plans row in status active or past_due (at most one, by a
partial unique index), unless it lapsed: a row without a Stripe subscription ends at its
current_period_end. A Stripe subscription's row is moved or ended by Stripe's events only. A user
with no current row is on the default plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

LIMIT_COLUMNS = ("rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit", "concurrency_limit")
PLAN_FIELDS = (
    "id",
    "name",
    "description",
    "price_cents",
    "currency",
    "billing_interval",
    "credits_included",
    *LIMIT_COLUMNS,
    "features",
    "stripe_price_id",
    "is_default",
    "is_active",
    "created_at",
    "updated_at",
)
USER_PLAN_FIELDS = (
    "id",
    "user_id",
    "plan_id",
    "status",
    "current_period_start",
    "current_period_end",
    "auto_renew",
    "stripe_subscription_id",
    "stripe_customer_id",
    "created_at",
    "updated_at",
)
# The columns a plan's create or update may set (names come from code, never from a request).
WRITABLE_PLAN_FIELDS = frozenset(PLAN_FIELDS) - {"id", "created_at", "updated_at"}
CURRENT_STATUSES = ("active", "past_due")


def _columns(fields: tuple[str, ...], alias: str, prefix: str = "") -> str:
    return ", ".join(f"{alias}.{name} AS {prefix}{name}" for name in fields)


PLAN_COLUMNS = _columns(PLAN_FIELDS, "p")
USER_PLAN_COLUMNS = _columns(USER_PLAN_FIELDS, "up")


def is_current(alias: str) -> str:
    """SQL: the user_plans row `alias` is the user's plan now."""
    return (
        f"{alias}.status IN ('active', 'past_due') AND ({alias}.stripe_subscription_id IS NOT NULL"
        f" OR {alias}.current_period_end IS NULL OR {alias}.current_period_end > now())"
    )


def current_plan_join(user_ref: str, *, plan_alias: str = "p", row_alias: str = "cur") -> str:
    """SQL joining the current plan of the user `user_ref` (its row, or the default plan's).

    `row_alias`.id is NULL when the user is on the default plan without a row of their own.
    """
    return f"""LEFT JOIN LATERAL (
            SELECT r.id, r.plan_id FROM user_plans r WHERE r.user_id = {user_ref} AND {is_current("r")}
        ) {row_alias} ON true
        LEFT JOIN plans {plan_alias} ON {plan_alias}.id = COALESCE(
            {row_alias}.plan_id, (SELECT d.id FROM plans d WHERE d.is_default))"""


@dataclass(frozen=True)
class Plan:
    id: int
    name: str
    description: str
    price_cents: int
    currency: str
    billing_interval: str
    credits_included: Decimal
    rpm_limit: int | None
    rpd_limit: int | None
    tpm_limit: int | None
    tpd_limit: int | None
    concurrency_limit: int | None
    features: dict[str, Any]
    stripe_price_id: str | None
    is_default: bool
    is_active: bool
    created_at: datetime
    updated_at: datetime

    @property
    def limits(self) -> dict[str, int | None]:
        """The plan's own limits; None: the settings default."""
        return {name: getattr(self, name) for name in LIMIT_COLUMNS}


@dataclass(frozen=True)
class UserPlan:
    id: int
    user_id: UUID
    plan_id: int
    status: str
    current_period_start: datetime
    current_period_end: datetime | None
    auto_renew: bool
    stripe_subscription_id: str | None
    stripe_customer_id: str | None
    created_at: datetime
    updated_at: datetime


def _plan(row: asyncpg.Record | dict[str, Any] | None) -> Plan | None:
    return None if row is None else Plan(**{name: row[name] for name in PLAN_FIELDS})


def _user_plan(row: asyncpg.Record | dict[str, Any] | None) -> UserPlan | None:
    return None if row is None else UserPlan(**{name: row[name] for name in USER_PLAN_FIELDS})


# -- plans ------------------------------------------------------------------------------------


async def list_plans(conn: asyncpg.Connection, *, active_only: bool) -> list[Plan]:
    where = "WHERE p.is_active" if active_only else ""
    rows = await conn.fetch(
        f"SELECT {PLAN_COLUMNS} FROM plans p {where} ORDER BY p.is_default DESC, p.price_cents, p.id"
    )
    return [plan for plan in map(_plan, rows) if plan is not None]


async def get_plan(conn: asyncpg.Connection, *, plan_id: int, for_update: bool = False) -> Plan | None:
    lock = " FOR UPDATE" if for_update else ""
    return _plan(await conn.fetchrow(f"SELECT {PLAN_COLUMNS} FROM plans p WHERE p.id = $1{lock}", plan_id))


async def get_default_plan(conn: asyncpg.Connection, *, for_update: bool = False) -> Plan | None:
    lock = " FOR UPDATE" if for_update else ""
    return _plan(await conn.fetchrow(f"SELECT {PLAN_COLUMNS} FROM plans p WHERE p.is_default{lock}"))


async def plan_for_stripe_price(conn: asyncpg.Connection, *, price_id: str) -> Plan | None:
    return _plan(
        await conn.fetchrow(f"SELECT {PLAN_COLUMNS} FROM plans p WHERE p.stripe_price_id = $1", price_id)
    )


async def insert_plan(conn: asyncpg.Connection, *, values: dict[str, Any]) -> Plan:
    assert set(values) <= WRITABLE_PLAN_FIELDS, "unexpected column in plan insert"
    names = list(values)
    row = await conn.fetchrow(
        f"""INSERT INTO plans AS p ({", ".join(names)})
            VALUES ({", ".join(f"${i + 1}" for i in range(len(names)))})
            RETURNING {PLAN_COLUMNS}""",
        *values.values(),
    )
    plan = _plan(row)
    assert plan is not None
    return plan


async def update_plan(conn: asyncpg.Connection, *, plan_id: int, changes: dict[str, Any]) -> Plan | None:
    assert set(changes) <= WRITABLE_PLAN_FIELDS, "unexpected column in plan update"
    assignments = "".join(f"{name} = ${i + 2}, " for i, name in enumerate(changes))
    row = await conn.fetchrow(
        f"UPDATE plans AS p SET {assignments}updated_at = now() WHERE p.id = $1 RETURNING {PLAN_COLUMNS}",
        plan_id,
        *changes.values(),
    )
    return _plan(row)


async def clear_default(conn: asyncpg.Connection) -> None:
    """Unmark the default plan (in the transaction that marks another one)."""
    await conn.execute("UPDATE plans SET is_default = false, updated_at = now() WHERE is_default")


async def users_on_plan(conn: asyncpg.Connection, *, plan_id: int) -> list[UUID]:
    """Users whose current plan is `plan_id` through a row of their own."""
    rows = await conn.fetch(
        f"SELECT DISTINCT up.user_id FROM user_plans up WHERE up.plan_id = $1 AND {is_current('up')}",
        plan_id,
    )
    return [row["user_id"] for row in rows]


# -- the plan of a user ------------------------------------------------------------------------


async def current_plan(conn: asyncpg.Connection, *, user_id: UUID) -> tuple[Plan | None, UserPlan | None]:
    """The user's current plan and its row (None: on the default plan without a row)."""
    row = await conn.fetchrow(
        f"""SELECT {PLAN_COLUMNS}, {_columns(USER_PLAN_FIELDS, "up", "up_")}
            FROM (SELECT $1::uuid AS user_id) who
            {current_plan_join("who.user_id")}
            LEFT JOIN user_plans up ON up.id = cur.id""",
        user_id,
    )
    assert row is not None
    values = dict(row)
    user_plan = {name: values.pop(f"up_{name}") for name in USER_PLAN_FIELDS}
    plan = _plan(values) if values["id"] is not None else None
    return plan, _user_plan(user_plan) if user_plan["id"] is not None else None


async def plan_limits(conn: asyncpg.Connection, *, user_id: UUID) -> dict[str, int | None]:
    """The limits of the user's current plan; None fields (or no plan at all): the settings defaults."""
    row = await conn.fetchrow(
        f"""SELECT {", ".join(f"p.{name}" for name in LIMIT_COLUMNS)}
            FROM (SELECT $1::uuid AS user_id) who {current_plan_join("who.user_id")}""",
        user_id,
    )
    assert row is not None
    return dict(row)


async def current_rows(conn: asyncpg.Connection, *, user_id: UUID) -> list[UserPlan]:
    """The user's rows in a current status, lapsed ones included (they still hold the unique slot)."""
    rows = await conn.fetch(
        f"""SELECT {USER_PLAN_COLUMNS} FROM user_plans up
            WHERE up.user_id = $1 AND up.status IN ('active', 'past_due') ORDER BY up.id""",
        user_id,
    )
    return [row for row in map(_user_plan, rows) if row is not None]


async def end_current(
    conn: asyncpg.Connection, *, user_id: UUID, status: str, keep_subscription: str | None = None
) -> list[UserPlan]:
    """End the user's current rows (but the Stripe subscription `keep_subscription`): `status`, or
    'expired' for a row that had already lapsed. Returns the rows as they were."""
    rows = await conn.fetch(
        f"""WITH ended AS (
                SELECT {USER_PLAN_COLUMNS} FROM user_plans up
                WHERE up.user_id = $1 AND up.status IN ('active', 'past_due')
                  AND ($3::text IS NULL OR up.stripe_subscription_id IS DISTINCT FROM $3)
                FOR UPDATE
            ), changed AS (
                UPDATE user_plans up
                SET status = CASE WHEN {is_current("up")} THEN $2 ELSE 'expired' END, updated_at = now()
                FROM ended WHERE up.id = ended.id
            )
            SELECT * FROM ended ORDER BY id""",
        user_id,
        status,
        keep_subscription,
    )
    return [row for row in map(_user_plan, rows) if row is not None]


async def insert_user_plan(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    plan_id: int,
    status: str,
    period_end: datetime | None,
    auto_renew: bool,
) -> UserPlan:
    row = await conn.fetchrow(
        f"""INSERT INTO user_plans AS up (user_id, plan_id, status, current_period_end, auto_renew)
            VALUES ($1, $2, $3, $4, $5) RETURNING {USER_PLAN_COLUMNS}""",
        user_id,
        plan_id,
        status,
        period_end,
        auto_renew,
    )
    user_plan = _user_plan(row)
    assert user_plan is not None
    return user_plan


async def get_subscription(
    conn: asyncpg.Connection, *, stripe_subscription_id: str, for_update: bool = False
) -> UserPlan | None:
    lock = " FOR UPDATE" if for_update else ""
    return _user_plan(
        await conn.fetchrow(
            f"SELECT {USER_PLAN_COLUMNS} FROM user_plans up WHERE up.stripe_subscription_id = $1{lock}",
            stripe_subscription_id,
        )
    )


async def upsert_subscription(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    plan_id: int,
    status: str,
    period_start: datetime | None,
    period_end: datetime | None,
    stripe_subscription_id: str,
    stripe_customer_id: str | None,
    auto_renew: bool,
) -> UserPlan:
    """The row of a Stripe subscription, created or brought up to date (never moved to another user).

    A None period bound or customer keeps what the row has (a new row starts its period now).
    """
    row = await conn.fetchrow(
        f"""INSERT INTO user_plans AS up (user_id, plan_id, status, current_period_start,
                current_period_end, auto_renew, stripe_subscription_id, stripe_customer_id)
            VALUES ($1, $2, $3, COALESCE($4, now()), $5, $6, $7, $8)
            ON CONFLICT (stripe_subscription_id) DO UPDATE SET
                plan_id = EXCLUDED.plan_id,
                status = EXCLUDED.status,
                current_period_start = COALESCE($4, up.current_period_start),
                current_period_end = COALESCE($5, up.current_period_end),
                auto_renew = EXCLUDED.auto_renew,
                stripe_customer_id = COALESCE($8, up.stripe_customer_id),
                updated_at = now()
            RETURNING {USER_PLAN_COLUMNS}""",
        user_id,
        plan_id,
        status,
        period_start,
        period_end,
        auto_renew,
        stripe_subscription_id,
        stripe_customer_id,
    )
    user_plan = _user_plan(row)
    assert user_plan is not None
    return user_plan


async def set_subscription_status(
    conn: asyncpg.Connection, *, stripe_subscription_id: str, status: str
) -> UserPlan | None:
    return _user_plan(
        await conn.fetchrow(
            f"""UPDATE user_plans AS up SET status = $2, updated_at = now()
                WHERE up.stripe_subscription_id = $1 RETURNING {USER_PLAN_COLUMNS}""",
            stripe_subscription_id,
            status,
        )
    )
