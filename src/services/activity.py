"""The public model ranking, and each user's own activity (stats and the usage log).

The ranking is computed from usage records on request, through a partial covering index (see
db/activity.model_ranking), and kept for a minute per window: it is public, so its cost must not
follow its traffic. A rollup table written by every settlement was the alternative; it would add a
write on one hot row per model to the request path, which the ranking does not need.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Literal, TypedDict
from uuid import UUID

import asyncpg

from src.cache import TTLCache
from src.db import activity as activity_db
from src.db.activity import UsageEntry, UsageGroup
from src.state import AppState

Window = Literal["day", "week", "month"]
RankBy = Literal["requests", "tokens"]

WINDOWS: dict[str, timedelta] = {
    "day": timedelta(days=1),
    "week": timedelta(days=7),
    "month": timedelta(days=30),
}
RANKING_SIZE = 100
RANKING_TTL_SECONDS = 60.0


@dataclass(frozen=True)
class RankedModel:
    rank: int
    model: str
    requests: int
    input_tokens: int
    output_tokens: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Ranking:
    window: str
    sort: str
    since: datetime
    data: list[RankedModel]


# Keyed by database too, so apps on different databases in one process never share an answer.
_rankings: TTLCache[tuple[str, str, str], Ranking] = TTLCache(ttl=RANKING_TTL_SECONDS, max_size=64)


async def ranking(state: AppState, *, window: Window, sort: RankBy) -> Ranking:
    """Models by successful requests (or tokens) over the window; aggregate counts only, no user data."""
    key = (state.database_url, window, sort)
    cached = _rankings.get(key)
    if cached is not None:
        return cached
    span = WINDOWS[window]
    async with state.pool.acquire() as conn:
        rows = await activity_db.model_ranking(
            conn, window=span, order_by_tokens=sort == "tokens", limit=RANKING_SIZE
        )
    result = Ranking(
        window=window,
        sort=sort,
        since=datetime.now(UTC) - span,
        data=[
            RankedModel(
                rank=index,
                model=row.model,
                requests=row.requests,
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
            )
            for index, row in enumerate(rows, start=1)
        ],
    )
    _rankings.set(key, result)
    return result


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    successful: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    spend: Decimal = Decimal(0)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class DayTotals(Totals):
    date: dt.date = field(default_factory=lambda: datetime.now(UTC).date())


@dataclass(frozen=True)
class ModelTotals(Totals):
    model: str = ""


@dataclass(frozen=True)
class KeyTotals(Totals):
    api_key_id: UUID | None = None
    name: str | None = None
    masked_key: str | None = None


@dataclass(frozen=True)
class Stats:
    days: int
    since: datetime
    totals: Totals
    by_day: list[DayTotals]
    by_model: list[ModelTotals]
    by_api_key: list[KeyTotals]


class _Sums(TypedDict):
    requests: int
    successful: int
    input_tokens: int
    output_tokens: int
    spend: Decimal


def _sums(group: UsageGroup) -> _Sums:
    return {
        "requests": group.requests,
        "successful": group.successful,
        "input_tokens": group.input_tokens,
        "output_tokens": group.output_tokens,
        "spend": group.spend,
    }


async def stats(conn: asyncpg.Connection, *, user_id: UUID, days: int, today: date | None = None) -> Stats:
    """The caller's requests, tokens and spend over the last `days` UTC days (today included)."""
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    since = datetime.combine(first, time.min, tzinfo=UTC)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        groups = await activity_db.usage_groups(conn, user_id=user_id, since=since)
        key_ids = [g.api_key_id for g in groups if g.dimension == "api_key" and g.api_key_id is not None]
        labels = {
            label.id: label for label in await activity_db.key_labels(conn, user_id=user_id, key_ids=key_ids)
        }
    per_day = {g.day: g for g in groups if g.dimension == "day"}
    total = next((g for g in groups if g.dimension == "total"), None)
    by_day = [
        DayTotals(date=day, **_sums(per_day[day])) if day in per_day else DayTotals(date=day)
        for day in (first + timedelta(days=offset) for offset in range(days))
    ]
    by_model = sorted(
        (ModelTotals(model=g.model or "", **_sums(g)) for g in groups if g.dimension == "model"),
        key=lambda t: (-t.requests, t.model),
    )
    by_key: list[KeyTotals] = []
    for group in groups:
        if group.dimension != "api_key":
            continue
        label = labels.get(group.api_key_id) if group.api_key_id is not None else None
        by_key.append(
            KeyTotals(
                api_key_id=group.api_key_id,
                name=label.name if label else None,
                masked_key=f"{label.key_prefix}...{label.key_last4}" if label else None,
                **_sums(group),
            )
        )
    by_key.sort(key=lambda t: -t.requests)
    return Stats(
        days=days,
        since=since,
        totals=Totals(**_sums(total)) if total is not None and total.requests else Totals(),
        by_day=by_day,
        by_model=by_model,
        by_api_key=by_key,
    )


async def log(
    conn: asyncpg.Connection, *, user_id: UUID, limit: int, offset: int
) -> tuple[list[UsageEntry], int]:
    """The caller's usage records, newest first."""
    return await activity_db.usage_log(conn, user_id=user_id, limit=limit, offset=offset)
