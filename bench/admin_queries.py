"""Time every admin list and the monitor's queries on tables seeded with millions of rows.

    .venv/bin/python -m bench.admin_queries --database-url postgresql://postgres@127.0.0.1:5432/postgres \
        [--usage-rows 1000000] [--users 10000]

Creates a scratch database (dropped at the end unless --keep), applies the migrations, seeds users,
usage records spread over 30 days (a busy last day) and one ledger row per usage record, ANALYZEs,
then runs each query the admin routes run (the same functions) several times and prints the
median and worst time in milliseconds, as a table and as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from src import db_config
from src.db import admin_ops, monitor

RUNS = 5


async def seed(conn: asyncpg.Connection, *, users: int, usage_rows: int) -> None:
    await conn.execute(
        """INSERT INTO users (email, credits, role)
            SELECT 'user' || i || '@example.com', 1000, CASE WHEN i % 100 = 0 THEN 'admin' ELSE 'user' END
            FROM generate_series(1, $1) AS i""",
        users,
    )
    # Spread over 30 days, with a tenth of the rows in the last 24 hours.
    await conn.execute(
        """INSERT INTO usage_records (request_id, user_id, api_key_id, model, provider, request_type,
                input_tokens, output_tokens, cost, charged, status, error_code, latency_ms, created_at)
            SELECT gen_random_uuid(), ids.a[1 + i % $2], NULL, 'model-' || (i % 50), 'provider-' || (i % 4),
                   'chat', 100 + i % 900, 50 + i % 400, 0.001, 0.001,
                   CASE WHEN i % 50 = 0 THEN 'upstream_error' ELSE 'success' END,
                   CASE WHEN i % 50 = 0 THEN 'upstream_error' END,
                   20 + i % 2000,
                   CASE WHEN i % 10 = 0 THEN now() - (i % 86400) * interval '1 second'
                        ELSE now() - interval '1 day' - (i % (29 * 86400)) * interval '1 second' END
            FROM generate_series(1, $1) AS i, (SELECT array_agg(id) AS a FROM users) AS ids""",
        usage_rows,
        users,
    )
    await conn.execute(
        """INSERT INTO credit_transactions (user_id, amount, balance_after, type, reason, actor, reference,
                created_at)
            SELECT user_id, -charged, 1000, 'usage', model, 'bench', request_id::text, created_at
            FROM usage_records"""
    )
    # What the settlement keeps as requests are settled, built here in one go.
    await conn.execute(
        """INSERT INTO usage_daily (day, user_id, api_key_id, model, provider, requests, errors,
                input_tokens, output_tokens, spent, shortfall)
            SELECT (created_at AT TIME ZONE 'UTC')::date, user_id,
                   COALESCE(api_key_id, '00000000-0000-0000-0000-000000000000'), model,
                   COALESCE(provider, ''),
                   count(*), count(*) FILTER (WHERE error_code IS NOT NULL OR status = 'upstream_error'),
                   sum(input_tokens), sum(output_tokens), sum(charged), sum(shortfall)
            FROM usage_records GROUP BY 1, 2, 3, 4, 5"""
    )
    await conn.execute("ANALYZE")


async def timed(run: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        await run()
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}


async def measure(conn: asyncpg.Connection) -> dict[str, dict[str, float]]:
    some_user = await conn.fetchval("SELECT user_id FROM usage_records ORDER BY created_at DESC LIMIT 1")
    now = datetime.now(UTC)
    week = now - timedelta(days=7)
    today = now.date()
    queries: dict[str, Callable[[], Awaitable[Any]]] = {
        "users: search by e-mail prefix": lambda: admin_ops.search_users(
            conn, email="user12", role=None, active=None, limit=50, offset=0
        ),
        "users: all, first page": lambda: admin_ops.search_users(
            conn, email=None, role=None, active=None, limit=50, offset=0
        ),
        "users: one user's recent usage": lambda: admin_ops.recent_usage(conn, user_id=some_user, limit=20),
        "ledger: all users, first page": lambda: admin_ops.credit_transactions(
            conn, user_id=None, type=None, since=None, until=None, limit=50, offset=0
        ),
        "ledger: all users, page 100": lambda: admin_ops.credit_transactions(
            conn, user_id=None, type=None, since=None, until=None, limit=50, offset=5000
        ),
        "ledger: one user": lambda: admin_ops.credit_transactions(
            conn, user_id=some_user, type=None, since=None, until=None, limit=50, offset=0
        ),
        "ledger: one type, last 7 days": lambda: admin_ops.credit_transactions(
            conn, user_id=None, type="usage", since=week, until=None, limit=50, offset=0
        ),
        "usage: by day, 7 days": lambda: admin_ops.usage_summary(
            conn, group_by="day", since=today - timedelta(days=6), until=today, user_id=None, limit=100
        ),
        "usage: by model, 7 days": lambda: admin_ops.usage_summary(
            conn, group_by="model", since=today - timedelta(days=6), until=today, user_id=None, limit=100
        ),
        "usage: by user, 7 days": lambda: admin_ops.usage_summary(
            conn, group_by="user", since=today - timedelta(days=6), until=today, user_id=None, limit=100
        ),
        "usage: one user by day, 30 days": lambda: admin_ops.usage_summary(
            conn, group_by="day", since=today - timedelta(days=29), until=today, user_id=some_user, limit=100
        ),
        "monitor: 5 min window": lambda: monitor.request_window(conn, seconds=300),
        "monitor: 1 h window": lambda: monitor.request_window(conn, seconds=3600),
        "monitor: 24 h window": lambda: monitor.request_window(conn, seconds=86400),
        "monitor: spent today": lambda: monitor.spent_today(conn),
        "monitor: top users today": lambda: monitor.top_users_today(conn, limit=10),
        "monitor: top models today": lambda: monitor.top_models_today(conn, limit=10),
    }
    return {name: await timed(run) for name, run in queries.items()}


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url", required=True, help="a PostgreSQL URL whose user may create databases"
    )
    parser.add_argument("--usage-rows", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--json", default="bench/admin_queries.json", help="where to write the figures")
    args = parser.parse_args(argv)

    name = f"gw_admin_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = db_config.with_database(args.database_url, name)
    try:
        await db_config.migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            started = time.perf_counter()
            await seed(conn, users=args.users, usage_rows=args.usage_rows)
            seconds = time.perf_counter() - started
            print(f"seeded {args.usage_rows:,} usage rows and as many ledger rows in {seconds:.0f} s")
            results = await measure(conn)
        finally:
            await conn.close()
    finally:
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"\n| query ({args.usage_rows:,} usage rows) | median ms | max ms |\n|---|---|---|")
    for query, figures in results.items():
        print(f"| {query} | {figures['median_ms']} | {figures['max_ms']} |")
    report = {"usage_rows": args.usage_rows, "users": args.users, "results": results}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
