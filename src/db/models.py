"""SQL for the model catalog and admin prices."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg


@dataclass(frozen=True)
class ModelRow:
    provider: str
    model_id: str
    upstream_id: str
    name: str | None
    owned_by: str | None
    context_length: int | None
    max_output_tokens: int | None
    prompt_price: Decimal | None
    completion_price: Decimal | None
    image_price: Decimal | None
    request_price: Decimal | None
    created: int


@dataclass(frozen=True)
class PriceOverride:
    model_id: str
    provider: str | None
    prompt_price: Decimal | None
    completion_price: Decimal | None
    image_price: Decimal | None
    request_price: Decimal | None
    is_free: bool
    updated_by: str
    updated_at: datetime


MODEL_COLUMNS = (
    "provider, model_id, upstream_id, name, owned_by, context_length, max_output_tokens, prompt_price,"
    " completion_price, image_price, request_price, created"
)
OVERRIDE_COLUMNS = ", ".join(
    [
        "model_id",
        "provider",
        "prompt_price",
        "completion_price",
        "image_price",
        "request_price",
        "is_free",
        "updated_by",
        "updated_at",
    ]
)


async def replace_provider_models(conn: asyncpg.Connection, *, provider: str, rows: list[ModelRow]) -> None:
    """Upsert a provider's list and deactivate what it no longer lists (in the caller's transaction)."""
    await conn.executemany(
        f"""INSERT INTO models ({MODEL_COLUMNS}, is_active, updated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, true, now())
            ON CONFLICT (provider, model_id) DO UPDATE SET
                upstream_id = EXCLUDED.upstream_id, name = EXCLUDED.name, owned_by = EXCLUDED.owned_by,
                context_length = EXCLUDED.context_length, max_output_tokens = EXCLUDED.max_output_tokens,
                prompt_price = EXCLUDED.prompt_price, completion_price = EXCLUDED.completion_price,
                image_price = EXCLUDED.image_price, request_price = EXCLUDED.request_price,
                created = EXCLUDED.created, is_active = true, updated_at = now()""",
        [
            (
                r.provider,
                r.model_id,
                r.upstream_id,
                r.name,
                r.owned_by,
                r.context_length,
                r.max_output_tokens,
                r.prompt_price,
                r.completion_price,
                r.image_price,
                r.request_price,
                r.created,
            )
            for r in rows
        ],
    )
    await conn.execute(
        "UPDATE models SET is_active = false, updated_at = now()"
        " WHERE provider = $1 AND is_active AND NOT (model_id = ANY($2::text[]))",
        provider,
        [r.model_id for r in rows],
    )


async def active_models(conn: asyncpg.Connection, *, providers: list[str]) -> list[ModelRow]:
    rows = await conn.fetch(
        f"SELECT {MODEL_COLUMNS} FROM models WHERE is_active AND provider = ANY($1::text[])"
        " ORDER BY model_id, provider",
        providers,
    )
    return [ModelRow(**dict(row)) for row in rows]


async def price_overrides(conn: asyncpg.Connection) -> list[PriceOverride]:
    rows = await conn.fetch(
        f"SELECT {OVERRIDE_COLUMNS} FROM model_pricing ORDER BY model_id, provider NULLS FIRST"
    )
    return [PriceOverride(**dict(row)) for row in rows]


async def upsert_override(
    conn: asyncpg.Connection,
    *,
    model_id: str,
    provider: str | None,
    prompt_price: Decimal | None,
    completion_price: Decimal | None,
    image_price: Decimal | None,
    request_price: Decimal | None,
    is_free: bool,
    updated_by: str,
) -> PriceOverride:
    row = await conn.fetchrow(
        f"""INSERT INTO model_pricing (model_id, provider, prompt_price, completion_price, image_price,
                request_price, is_free, updated_by)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (model_id, provider) DO UPDATE SET
                prompt_price = EXCLUDED.prompt_price, completion_price = EXCLUDED.completion_price,
                image_price = EXCLUDED.image_price, request_price = EXCLUDED.request_price,
                is_free = EXCLUDED.is_free, updated_by = EXCLUDED.updated_by, updated_at = now()
            RETURNING {OVERRIDE_COLUMNS}""",
        model_id,
        provider,
        prompt_price,
        completion_price,
        image_price,
        request_price,
        is_free,
        updated_by,
    )
    assert row is not None
    return PriceOverride(**dict(row))


async def get_override(
    conn: asyncpg.Connection, *, model_id: str, provider: str | None, for_update: bool = False
) -> PriceOverride | None:
    """The admin price for exactly (model, provider); provider None is the model-wide one."""
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {OVERRIDE_COLUMNS} FROM model_pricing"
        f" WHERE model_id = $1 AND provider IS NOT DISTINCT FROM $2{lock}",
        model_id,
        provider,
    )
    return PriceOverride(**dict(row)) if row is not None else None


async def list_overrides(
    conn: asyncpg.Connection, *, model_id: str | None, limit: int, offset: int
) -> list[PriceOverride]:
    rows = await conn.fetch(
        f"SELECT {OVERRIDE_COLUMNS} FROM model_pricing WHERE $1::text IS NULL OR model_id = $1"
        " ORDER BY model_id, provider NULLS FIRST LIMIT $2 OFFSET $3",
        model_id,
        limit,
        offset,
    )
    return [PriceOverride(**dict(row)) for row in rows]


async def count_overrides(conn: asyncpg.Connection, *, model_id: str | None) -> int:
    value = await conn.fetchval(
        "SELECT count(*) FROM model_pricing WHERE $1::text IS NULL OR model_id = $1", model_id
    )
    return int(value)


async def overrides_for_model(conn: asyncpg.Connection, *, model_id: str) -> list[PriceOverride]:
    rows = await conn.fetch(
        f"SELECT {OVERRIDE_COLUMNS} FROM model_pricing WHERE model_id = $1 ORDER BY provider NULLS FIRST",
        model_id,
    )
    return [PriceOverride(**dict(row)) for row in rows]


async def active_model_rows(
    conn: asyncpg.Connection, *, model_id: str, providers: list[str]
) -> list[ModelRow]:
    """One model as each of `providers` lists it (active rows only)."""
    rows = await conn.fetch(
        f"SELECT {MODEL_COLUMNS} FROM models"
        " WHERE model_id = $1 AND is_active AND provider = ANY($2::text[]) ORDER BY provider",
        model_id,
        providers,
    )
    return [ModelRow(**dict(row)) for row in rows]
