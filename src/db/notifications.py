"""SQL for the e-mail outbox, notification preferences, suppressions and Resend webhook events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

OUTBOX_COLUMNS = (
    "id, user_id, to_email, type, context, subject, status, attempts, next_attempt_at, last_error,"
    " provider_message_id, dedupe_key, created_at, sent_at, delivered_at, updated_at"
)


@dataclass(frozen=True)
class OutboxRow:
    """One message as listed: everything but the rendered bodies."""

    id: int
    user_id: UUID | None
    to_email: str
    type: str
    context: dict[str, Any]
    subject: str | None
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    provider_message_id: str | None
    dedupe_key: str | None
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class ClaimedMessage:
    """A message the worker has claimed for one delivery attempt."""

    id: int
    to_email: str
    type: str
    context: dict[str, Any]
    subject: str | None
    html: str | None
    text: str | None
    attempts: int
    idempotency_key: UUID
    suppressed: bool
    # Queued before its recipient deleted the account: it is not sent.
    account_deleted: bool


@dataclass(frozen=True)
class Preferences:
    types: dict[str, bool]
    low_balance_threshold: Decimal


def _outbox(row: asyncpg.Record) -> OutboxRow:
    return OutboxRow(**{k: v for k, v in dict(row).items() if k != "total"})


async def enqueue(
    conn: asyncpg.Connection, *, user_id: UUID, type: str, dedupe_key: str | None, context: dict[str, Any]
) -> int | None:
    """The new outbox id, or None (no address, suppressed, turned off, or queued before)."""
    result: int | None = await conn.fetchval(
        "SELECT gw_enqueue_notification($1, $2, $3, $4)", user_id, type, dedupe_key, context
    )
    return result


async def enqueue_to_address(
    conn: asyncpg.Connection, *, to_email: str, type: str, dedupe_key: str | None, context: dict[str, Any]
) -> int | None:
    """A message to an address of no account (admin tests); None when suppressed or queued before."""
    result: int | None = await conn.fetchval(
        """INSERT INTO notification_outbox (to_email, type, context, dedupe_key)
            SELECT $1, $2, $3, $4
            WHERE NOT EXISTS (SELECT 1 FROM email_suppressions WHERE email = $1)
            ON CONFLICT (dedupe_key) DO NOTHING
            RETURNING id""",
        to_email,
        type,
        context,
        dedupe_key,
    )
    return result


async def notify_low_balance(
    conn: asyncpg.Connection, *, user_id: UUID, balance_before: Decimal, balance_after: Decimal
) -> bool:
    result: bool = await conn.fetchval(
        "SELECT gw_notify_low_balance($1, $2, $3)", user_id, balance_before, balance_after
    )
    return result


async def enqueue_announcement(
    conn: asyncpg.Connection,
    *,
    announcement_id: UUID,
    subject: str,
    body: str,
    user_ids: list[UUID] | None,
) -> int:
    """Queue one announcement per active user with an address who has not turned them off."""
    result: str = await conn.execute(
        """INSERT INTO notification_outbox (user_id, to_email, type, context, dedupe_key)
            SELECT u.id, a.address, 'announcement',
                   jsonb_build_object('name', u.username, 'subject', $2::text, 'body', $3::text),
                   'announcement:' || $1::uuid::text || ':' || u.id::text
            FROM users u
            CROSS JOIN LATERAL (SELECT gw_notification_address(u.id, 'announcement') AS address) a
            WHERE u.is_active AND u.banned_at IS NULL AND u.deleted_at IS NULL
              AND ($4::uuid[] IS NULL OR u.id = ANY($4::uuid[]))
              AND a.address IS NOT NULL
            ON CONFLICT (dedupe_key) DO NOTHING""",
        announcement_id,
        subject,
        body,
        user_ids,
    )
    return int(result.split()[-1])


async def enqueue_trial_notices(conn: asyncpg.Connection, *, now: datetime, expiring_days: int) -> int:
    """Queue 'trial expiring' (within `expiring_days`) and 'trial ended' (in the last week) notices."""
    expiring: str = "INSERT 0 0"
    if expiring_days > 0:
        expiring = await conn.execute(
            """INSERT INTO notification_outbox (user_id, to_email, type, context, dedupe_key)
                SELECT t.user_id, a.address, 'trial_expiring',
                       jsonb_build_object('name', u.username, 'ends_at', t.ends_at,
                                          'credits', t.credits::text),
                       'trial-expiring:' || t.user_id::text || ':'
                           || floor(extract(epoch FROM t.ends_at))::bigint::text
                FROM trials t
                JOIN users u ON u.id = t.user_id
                CROSS JOIN LATERAL (SELECT gw_notification_address(t.user_id, 'trial_expiring') AS address) a
                WHERE t.status = 'active' AND t.converted_at IS NULL
                  AND t.ends_at > $1 AND t.ends_at <= $1 + make_interval(days => $2)
                  AND u.is_active AND u.banned_at IS NULL AND a.address IS NOT NULL
                ON CONFLICT (dedupe_key) DO NOTHING""",
            now,
            expiring_days,
        )
    ended: str = await conn.execute(
        """INSERT INTO notification_outbox (user_id, to_email, type, context, dedupe_key)
            SELECT t.user_id, a.address, 'trial_ended',
                   jsonb_build_object('name', u.username, 'ended_at', COALESCE(t.ended_at, t.ends_at),
                                      'reason', CASE WHEN t.status = 'used_up' THEN 'used_up' ELSE 'expired' END),
                   'trial-ended:' || t.user_id::text || ':'
                       || floor(extract(epoch FROM t.started_at))::bigint::text
            FROM trials t
            JOIN users u ON u.id = t.user_id
            CROSS JOIN LATERAL (SELECT gw_notification_address(t.user_id, 'trial_ended') AS address) a
            WHERE t.converted_at IS NULL
              AND (t.status IN ('ended', 'used_up') OR t.ends_at <= $1)
              AND COALESCE(t.ended_at, t.ends_at) > $1 - interval '7 days'
              AND COALESCE(t.ended_at, t.ends_at) <= $1
              AND u.is_active AND u.banned_at IS NULL AND a.address IS NOT NULL
            ON CONFLICT (dedupe_key) DO NOTHING""",
        now,
    )
    return int(expiring.split()[-1]) + int(ended.split()[-1])


async def claim_due(
    conn: asyncpg.Connection, *, now: datetime, limit: int, lease_seconds: float, max_attempts: int
) -> list[ClaimedMessage]:
    """Claim due messages for one attempt each: 'sending' until the lease runs out.

    A claim whose worker died is due again when its lease ends; SKIP LOCKED lets several workers
    claim side by side without waiting on each other or taking the same row.
    """
    rows = await conn.fetch(
        """UPDATE notification_outbox o
            SET status = 'sending', attempts = o.attempts + 1, updated_at = $1,
                next_attempt_at = $1 + make_interval(secs => $3)
            FROM (
                SELECT id FROM notification_outbox
                WHERE status IN ('queued', 'sending') AND next_attempt_at <= $1 AND attempts < $4
                ORDER BY next_attempt_at, id
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ) due
            WHERE o.id = due.id
            RETURNING o.id, o.to_email, o.type, o.context, o.subject, o.html, o.text, o.attempts,
                o.idempotency_key,
                EXISTS (SELECT 1 FROM email_suppressions s WHERE s.email = o.to_email) AS suppressed,
                EXISTS (
                    SELECT 1 FROM users u WHERE u.id = o.user_id AND u.deleted_at IS NOT NULL
                ) AS account_deleted""",
        now,
        limit,
        lease_seconds,
        max_attempts,
    )
    return sorted((ClaimedMessage(**dict(row)) for row in rows), key=lambda message: message.id)


async def fail_abandoned(conn: asyncpg.Connection, *, now: datetime, max_attempts: int) -> int:
    """Claims whose worker died on the last allowed attempt: failed, with the outcome unknown."""
    result: str = await conn.execute(
        """UPDATE notification_outbox
            SET status = 'failed', updated_at = $1,
                last_error = 'the last delivery attempt was interrupted; its outcome is unknown'
            WHERE status = 'sending' AND next_attempt_at <= $1 AND attempts >= $2""",
        now,
        max_attempts,
    )
    return int(result.split()[-1])


async def set_content(
    conn: asyncpg.Connection, *, message_id: int, subject: str, html: str, text: str
) -> None:
    await conn.execute(
        "UPDATE notification_outbox SET subject = $2, html = $3, text = $4 WHERE id = $1",
        message_id,
        subject,
        html,
        text,
    )


async def record_sent(
    conn: asyncpg.Connection, *, message_id: int, provider_message_id: str, now: datetime
) -> None:
    # A delivery webhook may have overtaken this write: a later status is kept.
    await conn.execute(
        """UPDATE notification_outbox
            SET status = CASE WHEN status = 'sending' THEN 'sent' ELSE status END,
                provider_message_id = COALESCE(provider_message_id, $2),
                sent_at = COALESCE(sent_at, $3), last_error = NULL, updated_at = $3
            WHERE id = $1""",
        message_id,
        provider_message_id,
        now,
    )


async def record_failure(
    conn: asyncpg.Connection, *, message_id: int, error: str, retry_at: datetime | None, now: datetime
) -> None:
    """A failed attempt: queued again for `retry_at`, or failed for good when it is None."""
    await conn.execute(
        """UPDATE notification_outbox
            SET status = CASE WHEN $3::timestamptz IS NULL THEN 'failed' ELSE 'queued' END,
                next_attempt_at = COALESCE($3, next_attempt_at), last_error = $2, updated_at = $4
            WHERE id = $1 AND status = 'sending'""",
        message_id,
        error[:1000],
        retry_at,
        now,
    )


async def list_for_user(
    conn: asyncpg.Connection, *, user_id: UUID, limit: int, offset: int
) -> tuple[list[OutboxRow], int]:
    rows = await conn.fetch(
        f"""SELECT {OUTBOX_COLUMNS}, count(*) OVER () AS total FROM notification_outbox
            WHERE user_id = $1
            ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3""",
        user_id,
        limit,
        offset,
    )
    return [_outbox(row) for row in rows], rows[0]["total"] if rows else 0


async def list_all(
    conn: asyncpg.Connection,
    *,
    limit: int,
    offset: int,
    status: str | None = None,
    type: str | None = None,
    user_id: UUID | None = None,
    to_email: str | None = None,
) -> tuple[list[OutboxRow], int]:
    rows = await conn.fetch(
        f"""SELECT {OUTBOX_COLUMNS}, count(*) OVER () AS total FROM notification_outbox
            WHERE ($1::text IS NULL OR status = $1)
              AND ($2::text IS NULL OR type = $2)
              AND ($3::uuid IS NULL OR user_id = $3)
              AND ($4::text IS NULL OR to_email = $4)
            ORDER BY created_at DESC, id DESC LIMIT $5 OFFSET $6""",
        status,
        type,
        user_id,
        to_email,
        limit,
        offset,
    )
    return [_outbox(row) for row in rows], rows[0]["total"] if rows else 0


async def get_message(conn: asyncpg.Connection, *, message_id: int) -> OutboxRow | None:
    row = await conn.fetchrow(f"SELECT {OUTBOX_COLUMNS} FROM notification_outbox WHERE id = $1", message_id)
    return _outbox(row) if row else None


async def get_preferences(conn: asyncpg.Connection, *, user_id: UUID) -> Preferences | None:
    row = await conn.fetchrow(
        "SELECT types, low_balance_threshold FROM notification_preferences WHERE user_id = $1", user_id
    )
    if row is None:
        return None
    return Preferences(types=dict(row["types"]), low_balance_threshold=row["low_balance_threshold"])


async def save_preferences(
    conn: asyncpg.Connection, *, user_id: UUID, types: dict[str, bool], low_balance_threshold: Decimal | None
) -> Preferences:
    """Merge `types` into the stored map and set the threshold when given."""
    row = await conn.fetchrow(
        """INSERT INTO notification_preferences AS p (user_id, types, low_balance_threshold)
            VALUES ($1, $2, COALESCE($3::numeric, 1))
            ON CONFLICT (user_id) DO UPDATE
                SET types = p.types || $2, updated_at = now(),
                    low_balance_threshold = COALESCE($3::numeric, p.low_balance_threshold)
            RETURNING types, low_balance_threshold""",
        user_id,
        types,
        low_balance_threshold,
    )
    assert row is not None
    return Preferences(types=dict(row["types"]), low_balance_threshold=row["low_balance_threshold"])


async def suppress(conn: asyncpg.Connection, *, email: str, reason: str) -> bool:
    """True when the address was not suppressed before."""
    result: str = await conn.execute(
        "INSERT INTO email_suppressions (email, reason) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING",
        email,
        reason,
    )
    return result.endswith(" 1")


async def record_webhook_event(conn: asyncpg.Connection, *, svix_id: str, type: str) -> bool:
    """True the first time this webhook delivery is seen."""
    result: str = await conn.execute(
        "INSERT INTO resend_webhook_events (svix_id, type) VALUES ($1, $2) ON CONFLICT (svix_id) DO NOTHING",
        svix_id,
        type,
    )
    return result.endswith(" 1")


async def mark_delivered(conn: asyncpg.Connection, *, provider_message_id: str) -> int:
    result: str = await conn.execute(
        """UPDATE notification_outbox
            SET status = 'delivered', delivered_at = now(), updated_at = now()
            WHERE provider_message_id = $1 AND status IN ('sending', 'sent')""",
        provider_message_id,
    )
    return int(result.split()[-1])


async def mark_undelivered(
    conn: asyncpg.Connection, *, provider_message_id: str, status: str, error: str
) -> int:
    """A bounce or a provider-side failure reported after the message was accepted."""
    assert status in {"bounced", "failed"}
    result: str = await conn.execute(
        """UPDATE notification_outbox
            SET status = $2, last_error = $3, updated_at = now()
            WHERE provider_message_id = $1 AND status <> 'bounced'""",
        provider_message_id,
        status,
        error[:1000],
    )
    return int(result.split()[-1])
