"""SQL over usage records: the public model ranking and a user's own activity."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import asyncpg


@dataclass(frozen=True)
class ModelUsage:
    model: str
    requests: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class UsageGroup:
    """Usage summed over one group: a day, a model, an API key, or everything."""

    dimension: str  # "day", "model", "api_key" or "total"
    day: date | None
    model: str | None
    api_key_id: UUID | None
    requests: int
    successful: int
    input_tokens: int
    output_tokens: int
    spend: Decimal


@dataclass(frozen=True)
class KeyLabel:
    id: UUID
    name: str
    key_prefix: str
    key_last4: str


@dataclass(frozen=True)
class UsageEntry:
    request_id: UUID
    client_request_id: str | None
    api_key_id: UUID | None
    model: str
    provider: str | None
    request_type: str
    status: str
    error_code: str | None
    input_tokens: int
    output_tokens: int
    cost: Decimal
    charged: Decimal
    estimated: bool
    latency_ms: int | None
    created_at: datetime


async def model_ranking(
    conn: asyncpg.Connection, *, window: timedelta, order_by_tokens: bool, limit: int
) -> list[ModelUsage]:
    """Successful requests per model over the last `window`, most used first.

    Served by usage_records_ranking_idx (created_at, partial on status = 'success', covering the
    model and token columns): an index-only scan of the window, never the wide heap.
    """
    order = "tokens DESC, requests DESC" if order_by_tokens else "requests DESC, tokens DESC"
    rows = await conn.fetch(
        f"""SELECT model, count(*) AS requests, sum(input_tokens)::bigint AS input_tokens,
                sum(output_tokens)::bigint AS output_tokens,
                sum(input_tokens)::bigint + sum(output_tokens)::bigint AS tokens
            FROM usage_records
            WHERE status = 'success' AND created_at >= now() - $1::interval
            GROUP BY model ORDER BY {order}, model LIMIT $2""",
        window,
        limit,
    )
    return [
        ModelUsage(
            model=row["model"],
            requests=row["requests"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
        )
        for row in rows
    ]


async def usage_groups(conn: asyncpg.Connection, *, user_id: UUID, since: datetime) -> list[UsageGroup]:
    """The user's usage since `since`, summed per UTC day, per model, per key and in total, in one scan."""
    rows = await conn.fetch(
        """SELECT day, model, api_key_id,
                GROUPING(day) = 0 AS by_day, GROUPING(model) = 0 AS by_model,
                GROUPING(api_key_id) = 0 AS by_key,
                count(*) AS requests, count(*) FILTER (WHERE status = 'success') AS successful,
                sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens,
                sum(charged) AS spend
            FROM (
                SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model, api_key_id, status,
                    input_tokens, output_tokens, charged
                FROM usage_records WHERE user_id = $1 AND created_at >= $2
            ) mine
            GROUP BY GROUPING SETS ((day), (model), (api_key_id), ())""",
        user_id,
        since,
    )
    return [
        UsageGroup(
            dimension=(
                "day"
                if row["by_day"]
                else "model"
                if row["by_model"]
                else "api_key"
                if row["by_key"]
                else "total"
            ),
            day=row["day"] if row["by_day"] else None,
            model=row["model"] if row["by_model"] else None,
            api_key_id=row["api_key_id"] if row["by_key"] else None,
            requests=row["requests"],
            successful=row["successful"],
            input_tokens=row["input_tokens"] or 0,
            output_tokens=row["output_tokens"] or 0,
            spend=row["spend"] if row["spend"] is not None else Decimal(0),
        )
        for row in rows
    ]


async def key_labels(conn: asyncpg.Connection, *, user_id: UUID, key_ids: list[UUID]) -> list[KeyLabel]:
    rows = await conn.fetch(
        "SELECT id, name, key_prefix, key_last4 FROM api_keys WHERE user_id = $1 AND id = ANY($2::uuid[])",
        user_id,
        key_ids,
    )
    return [KeyLabel(**dict(row)) for row in rows]


async def usage_log(
    conn: asyncpg.Connection, *, user_id: UUID, limit: int, offset: int
) -> tuple[list[UsageEntry], int]:
    rows = await conn.fetch(
        """SELECT request_id, client_request_id, api_key_id, model, provider, request_type, status,
                error_code, input_tokens, output_tokens, cost, charged, estimated, latency_ms, created_at,
                count(*) OVER () AS total
            FROM usage_records WHERE user_id = $1
            ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3""",
        user_id,
        limit,
        offset,
    )
    entries = [UsageEntry(**{k: v for k, v in dict(row).items() if k != "total"}) for row in rows]
    return entries, (rows[0]["total"] if rows else 0)
