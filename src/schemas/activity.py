"""Answers of the model ranking and of the caller's activity routes."""

from __future__ import annotations

import datetime as dt
from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, Field

from src.schemas.users import Money


class RankedModel(BaseModel):
    rank: int
    model: str
    requests: int = Field(description="Successful requests in the window.")
    tokens: int = Field(description="Input plus output tokens of those requests.")
    input_tokens: int
    output_tokens: int


class ModelRanking(BaseModel):
    object: Literal["list"] = "list"
    window: Literal["day", "week", "month"]
    sort: Literal["requests", "tokens"]
    since: datetime = Field(description="The window's start.")
    data: list[RankedModel]


class UsageTotals(BaseModel):
    requests: int = Field(description="Requests of every outcome.")
    successful: int
    tokens: int
    input_tokens: int
    output_tokens: int
    spend: Money = Field(description="Credits charged.")


class DayUsage(UsageTotals):
    date: dt.date = Field(description="A UTC day.")


class ModelUsage(UsageTotals):
    model: str


class KeyUsage(UsageTotals):
    api_key_id: UUID | None = Field(description="One of your keys (null: requests made without one).")
    name: str | None
    masked_key: str | None


class ActivityStats(BaseModel):
    days: int
    since: datetime
    totals: UsageTotals
    by_day: list[DayUsage] = Field(description="Every day of the period, oldest first, empty ones included.")
    by_model: list[ModelUsage]
    by_api_key: list[KeyUsage]


class ActivityEntry(BaseModel):
    request_id: UUID = Field(description="The request's id (chat turns it saved carry the same one).")
    client_request_id: str | None = Field(description="The X-Request-ID the response carried.")
    api_key_id: UUID | None
    model: str
    provider: str | None
    request_type: str
    status: str
    error_code: str | None
    input_tokens: int
    output_tokens: int
    cost: Money = Field(description="What the request cost.")
    charged: Money = Field(description="What was taken from the balance.")
    estimated: bool = Field(description="Tokens were counted by the gateway, not reported by the provider.")
    latency_ms: int | None
    created_at: datetime
