"""The benchmark database: create and drop it, and check the money against the counted requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from src import db_config


@dataclass(frozen=True)
class UsageCounts:
    success: int
    other: int


def create_database(admin_dsn: str, name: str) -> str:
    """A fresh, empty database for this run (the gateway migrates it on start); returns its DSN."""

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return db_config.with_database(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    async def drop() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


async def _fetchrow(dsn: str, sql: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql)
    finally:
        await conn.close()


def usage_counts(dsn: str) -> UsageCounts:
    row = asyncio.run(
        _fetchrow(
            dsn,
            "SELECT count(*) FILTER (WHERE status = 'success') AS success,"
            " count(*) FILTER (WHERE status <> 'success') AS other FROM usage_records",
        )
    )
    return UsageCounts(success=row["success"], other=row["other"])


def check(
    dsn: str, *, expected_success: int, unit_cost: Decimal, starting_credits: Decimal
) -> dict[str, Any]:
    """Every invariant of the ledger after the run, each with what it expected and what it found."""

    async def gather() -> dict[str, Any]:
        conn = await asyncpg.connect(dsn)
        try:
            usage = await conn.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'success') AS success,"
                " count(*) FILTER (WHERE status <> 'success') AS other,"
                " coalesce(sum(charged), 0) AS charged,"
                " count(*) FILTER (WHERE charged > 0) AS charged_rows,"
                " count(*) FILTER (WHERE shortfall > 0 OR estimated) AS irregular"
                " FROM usage_records"
            )
            ledger = await conn.fetchrow(
                "SELECT coalesce(sum(-amount), 0) AS charged, count(*) AS rows"
                " FROM credit_transactions WHERE type = 'usage'"
            )
            users = await conn.fetchrow(
                "SELECT count(*) AS users, coalesce(sum(credits), 0) AS credits,"
                " coalesce(sum(held), 0) AS held,"
                " count(*) FILTER (WHERE credits <> (SELECT coalesce(sum(t.amount), 0)"
                "   FROM credit_transactions t WHERE t.user_id = u.id)) AS unbalanced"
                " FROM users u"
            )
            holds = await conn.fetchval("SELECT count(*) FROM credit_holds")
        finally:
            await conn.close()
        return {"usage": dict(usage), "ledger": dict(ledger), "users": dict(users), "holds": holds}

    found = asyncio.run(gather())
    usage, ledger, users = found["usage"], found["ledger"], found["users"]
    expected_charge = unit_cost * expected_success
    checks = {
        "usage records with status success == successful responses counted": (
            expected_success,
            usage["success"],
        ),
        "usage records with any other status": (0, usage["other"]),
        "records with a shortfall or an estimated count": (0, usage["irregular"]),
        "sum(usage_records.charged) == successes x unit cost": (expected_charge, usage["charged"]),
        "sum(usage ledger rows) == sum(usage_records.charged)": (usage["charged"], ledger["charged"]),
        "usage ledger rows == charged usage records": (usage["charged_rows"], ledger["rows"]),
        "users whose credits != sum(credit_transactions)": (0, users["unbalanced"]),
        "sum(users.credits) == starting credits - charged": (
            starting_credits * users["users"] - expected_charge,
            users["credits"],
        ),
        "sum(users.held)": (0, users["held"]),
        "open credit_holds": (0, found["holds"]),
    }
    results = [
        {"check": name, "expected": str(want), "found": str(got), "ok": Decimal(want) == Decimal(got)}
        for name, (want, got) in checks.items()
    ]
    return {"pass": all(r["ok"] for r in results), "checks": results}
