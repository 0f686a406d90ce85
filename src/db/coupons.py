"""SQL for coupons and their redemptions.

A use is taken by one conditional UPDATE (`take_use`); the redemption row's partial unique index
(coupon_id, user_id, use_number) WHERE released_at IS NULL decides the per-user limit. Both run in
the caller's transaction, which also holds the coupon's row lock from `take_use` on, so uses of
one coupon are serialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

COUPON_FIELDS = (
    "id",
    "code",
    "kind",
    "value",
    "discount_type",
    "max_uses",
    "max_uses_per_user",
    "uses",
    "valid_from",
    "valid_until",
    "is_active",
    "assigned_user_id",
    "description",
    "created_by",
    "created_at",
    "updated_at",
)
REDEMPTION_FIELDS = (
    "id",
    "coupon_id",
    "user_id",
    "use_number",
    "kind",
    "credits_granted",
    "discount_cents",
    "reference",
    "released_at",
    "created_at",
)
# The columns a coupon's create or update may set (names come from code, never from a request).
WRITABLE_FIELDS = frozenset(COUPON_FIELDS) - {"id", "uses", "created_at", "updated_at"}


def _columns(fields: tuple[str, ...], alias: str) -> str:
    return ", ".join(f"{alias}.{name}" for name in fields)


COUPON_COLUMNS = _columns(COUPON_FIELDS, "c")
REDEMPTION_COLUMNS = _columns(REDEMPTION_FIELDS, "r")

# The coupon `c` may be used now by the user $user (its total allowance aside).
_USABLE = """c.is_active
    AND c.valid_from <= now() AND (c.valid_until IS NULL OR c.valid_until > now())
    AND (c.assigned_user_id IS NULL OR c.assigned_user_id = {user})"""


@dataclass(frozen=True)
class Coupon:
    id: int
    code: str
    kind: str
    value: Decimal
    discount_type: str | None
    max_uses: int | None
    max_uses_per_user: int
    uses: int
    valid_from: datetime
    valid_until: datetime | None
    is_active: bool
    assigned_user_id: UUID | None
    description: str
    created_by: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Redemption:
    id: int
    coupon_id: int
    user_id: UUID
    use_number: int
    kind: str
    credits_granted: Decimal | None
    discount_cents: int | None
    reference: str | None
    released_at: datetime | None
    created_at: datetime
    code: str


@dataclass(frozen=True)
class CouponState:
    """Why a coupon could not be used now, as the database sees it."""

    coupon: Coupon
    not_yet_valid: bool
    expired: bool
    live_uses_by_user: int


def _coupon(row: asyncpg.Record) -> Coupon:
    return Coupon(**{name: row[name] for name in COUPON_FIELDS})


def _redemption(row: asyncpg.Record) -> Redemption:
    return Redemption(**{name: row[name] for name in REDEMPTION_FIELDS}, code=row["code"])


# -- administration --------------------------------------------------------------------------


async def insert_coupon(conn: asyncpg.Connection, *, values: dict[str, Any]) -> Coupon | None:
    """The new coupon; None when its code is taken."""
    names = [name for name in values if name in WRITABLE_FIELDS]
    assert len(names) == len(values), set(values) - WRITABLE_FIELDS
    placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    row = await conn.fetchrow(
        f"""INSERT INTO coupons AS c ({", ".join(names)}) VALUES ({placeholders})
            ON CONFLICT (code) DO NOTHING RETURNING {COUPON_COLUMNS}""",
        *[values[name] for name in names],
    )
    return _coupon(row) if row is not None else None


async def update_coupon(
    conn: asyncpg.Connection, *, coupon_id: int, changes: dict[str, Any]
) -> Coupon | None:
    """The changed coupon; None when there is none. A taken code raises UniqueViolationError."""
    names = [name for name in changes if name in WRITABLE_FIELDS]
    assert len(names) == len(changes), set(changes) - WRITABLE_FIELDS
    sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=2))
    row = await conn.fetchrow(
        f"""UPDATE coupons AS c SET {sets}, updated_at = now()
            WHERE c.id = $1 RETURNING {COUPON_COLUMNS}""",
        coupon_id,
        *[changes[name] for name in names],
    )
    return _coupon(row) if row is not None else None


async def get_coupon(conn: asyncpg.Connection, *, coupon_id: int, for_update: bool = False) -> Coupon | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(f"SELECT {COUPON_COLUMNS} FROM coupons c WHERE c.id = $1{lock}", coupon_id)
    return _coupon(row) if row is not None else None


async def list_coupons(conn: asyncpg.Connection, *, limit: int, offset: int) -> tuple[list[Coupon], int]:
    """A page of coupons, newest first, and how many there are."""
    rows = await conn.fetch(
        f"""SELECT {COUPON_COLUMNS}, count(*) OVER () AS total FROM coupons c
            ORDER BY c.created_at DESC, c.id DESC LIMIT $1 OFFSET $2""",
        limit,
        offset,
    )
    total = rows[0]["total"] if rows else await conn.fetchval("SELECT count(*) FROM coupons")
    return [_coupon(row) for row in rows], int(total)


async def coupon_redemptions(
    conn: asyncpg.Connection, *, coupon_id: int, limit: int, offset: int
) -> tuple[list[Redemption], int]:
    """A page of one coupon's redemptions, newest first, and how many there are."""
    rows = await conn.fetch(
        f"""SELECT {REDEMPTION_COLUMNS}, c.code, count(*) OVER () AS total
            FROM coupon_redemptions r JOIN coupons c ON c.id = r.coupon_id
            WHERE r.coupon_id = $1 ORDER BY r.created_at DESC, r.id DESC LIMIT $2 OFFSET $3""",
        coupon_id,
        limit,
        offset,
    )
    total = (
        rows[0]["total"]
        if rows
        else await conn.fetchval("SELECT count(*) FROM coupon_redemptions WHERE coupon_id = $1", coupon_id)
    )
    return [_redemption(row) for row in rows], int(total)


# -- using a coupon --------------------------------------------------------------------------


async def take_use(conn: asyncpg.Connection, *, code: str, kind: str, user_id: UUID) -> Coupon | None:
    """Take one use of the coupon if this user may use it now; None (nothing changed) otherwise.

    One conditional statement: concurrent callers queue on the row lock and each re-checks
    `uses < max_uses` against the committed count, so the total never exceeds max_uses.
    """
    row = await conn.fetchrow(
        f"""UPDATE coupons AS c SET uses = c.uses + 1
            WHERE c.code = $1 AND c.kind = $2 AND (c.max_uses IS NULL OR c.uses < c.max_uses)
              AND {_USABLE.format(user="$3")}
            RETURNING {COUPON_COLUMNS}""",
        code,
        kind,
        user_id,
    )
    return _coupon(row) if row is not None else None


async def coupon_state(conn: asyncpg.Connection, *, code: str, user_id: UUID) -> CouponState | None:
    """The coupon with this code and what stands in the way of using it; None if there is none."""
    row = await conn.fetchrow(
        f"""SELECT {COUPON_COLUMNS},
                   c.valid_from > now() AS not_yet_valid,
                   c.valid_until IS NOT NULL AND c.valid_until <= now() AS expired,
                   (SELECT count(*) FROM coupon_redemptions r
                     WHERE r.coupon_id = c.id AND r.user_id = $2 AND r.released_at IS NULL) AS live_uses
            FROM coupons c WHERE c.code = $1""",
        code,
        user_id,
    )
    if row is None:
        return None
    return CouponState(
        coupon=_coupon(row),
        not_yet_valid=row["not_yet_valid"],
        expired=row["expired"],
        live_uses_by_user=int(row["live_uses"]),
    )


async def insert_redemption(
    conn: asyncpg.Connection,
    *,
    coupon: Coupon,
    user_id: UUID,
    credits_granted: Decimal | None = None,
    discount_cents: int | None = None,
    reference: str | None = None,
) -> Redemption | None:
    """Record a use under the user's lowest free use number; None when none is free or on a conflict.

    The partial unique index on (coupon_id, user_id, use_number) is what refuses a use beyond
    max_uses_per_user; the unique `reference` refuses a second discount for one checkout.
    """
    row = await conn.fetchrow(
        f"""WITH ins AS (
                INSERT INTO coupon_redemptions
                    (coupon_id, user_id, use_number, kind, credits_granted, discount_cents, reference)
                SELECT $1, $2, n, $4, $5, $6, $7 FROM generate_series(1, $3::integer) AS n
                WHERE NOT EXISTS (
                    SELECT 1 FROM coupon_redemptions x
                    WHERE x.coupon_id = $1 AND x.user_id = $2 AND x.use_number = n AND x.released_at IS NULL
                )
                ORDER BY n LIMIT 1
                ON CONFLICT DO NOTHING
                RETURNING *
            )
            SELECT {REDEMPTION_COLUMNS}, $8::text AS code FROM ins r""",
        coupon.id,
        user_id,
        coupon.max_uses_per_user,
        coupon.kind,
        credits_granted,
        discount_cents,
        reference,
        coupon.code,
    )
    return _redemption(row) if row is not None else None


async def reference_taken(conn: asyncpg.Connection, *, reference: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM coupon_redemptions WHERE reference = $1)", reference
        )
    )


async def release(conn: asyncpg.Connection, *, reference: str) -> int | None:
    """Give back the use of the discount for `reference` (once); the coupon's id, or None."""
    coupon_id: int | None = await conn.fetchval(
        """WITH released AS (
                UPDATE coupon_redemptions SET released_at = now()
                WHERE reference = $1 AND released_at IS NULL
                RETURNING coupon_id
            )
            UPDATE coupons c SET uses = c.uses - 1
            FROM released WHERE c.id = released.coupon_id
            RETURNING c.id""",
        reference,
    )
    return coupon_id


async def available_for(conn: asyncpg.Connection, *, user_id: UUID) -> list[Coupon]:
    """Coupons this user may use now: usable, not exhausted, and not used up by the user."""
    rows = await conn.fetch(
        f"""SELECT {COUPON_COLUMNS} FROM coupons c
            WHERE {_USABLE.format(user="$1")}
              AND (c.max_uses IS NULL OR c.uses < c.max_uses)
              AND (SELECT count(*) FROM coupon_redemptions r
                    WHERE r.coupon_id = c.id AND r.user_id = $1 AND r.released_at IS NULL)
                  < c.max_uses_per_user
            ORDER BY c.valid_until ASC NULLS LAST, c.id
            LIMIT 200""",
        user_id,
    )
    return [_coupon(row) for row in rows]


async def user_redemptions(
    conn: asyncpg.Connection, *, user_id: UUID, limit: int, offset: int
) -> tuple[list[Redemption], int]:
    """A page of the user's redemptions, newest first, and how many there are."""
    rows = await conn.fetch(
        f"""SELECT {REDEMPTION_COLUMNS}, c.code, count(*) OVER () AS total
            FROM coupon_redemptions r JOIN coupons c ON c.id = r.coupon_id
            WHERE r.user_id = $1 ORDER BY r.created_at DESC, r.id DESC LIMIT $2 OFFSET $3""",
        user_id,
        limit,
        offset,
    )
    total = (
        rows[0]["total"]
        if rows
        else await conn.fetchval("SELECT count(*) FROM coupon_redemptions WHERE user_id = $1", user_id)
    )
    return [_redemption(row) for row in rows], int(total)
