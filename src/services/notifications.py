"""E-mail notifications: an outbox written with the event, delivered by a background worker.

Sending never happens on a request path. The event that causes a message (a sign-up, a new key,
a payment, a settlement that crosses the low-balance threshold) queues it with `enqueue` (or a SQL
function) in its own transaction, so the message exists exactly when the event committed, and a
`dedupe_key` per event makes it exactly-once. The worker (`run_worker`, started with the app;
`deliver_due` is one pass of it) claims due rows with FOR UPDATE SKIP LOCKED, renders them, sends
them through the backend and records the outcome:

    queued --claim--> sending --ok--> sent --webhook--> delivered | bounced
                         |  \\--error, attempts left--> queued (exponential backoff)
                         \\---error, none left or permanent--> failed

A claim is a lease: a worker that dies mid-send leaves the row 'sending' until the lease ends and
another worker takes it again. A success is recorded before anything else can claim the row, and
the provider gets the row's idempotency key, so a message is never sent twice after a success,
even when recording that success failed. Backends: Resend (the `resend` SDK, when RESEND_API_KEY
is set) and a log backend that records messages in memory (the default, and what tests inspect).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, cast
from uuid import UUID, uuid4

import asyncpg
import resend
from resend.exceptions import ResendError

from src.config import Settings
from src.db import notifications as notifications_db
from src.db.api_keys import ApiKey
from src.db.notifications import ClaimedMessage, OutboxRow
from src.errors import Conflict, InvalidRequest, ServiceUnavailable
from src.services import email_templates
from src.services.email_templates import TemplateError

if TYPE_CHECKING:
    from src.security.deps import Principal, RequestMeta

logger = logging.getLogger("gatewayz.notifications")

TYPES = (
    "welcome",
    "api_key_created",
    "low_balance",
    "payment_confirmation",
    "trial_expiring",
    "trial_ended",
    "announcement",
    "test",
)
# Receipts and security notices: always sent, whatever the preferences say.
RECEIPT_TYPES = ("payment_confirmation", "api_key_created")
# What a user may turn off (the SQL function gw_notification_address reads the same list).
OPTIONAL_TYPES = ("low_balance", "trial_expiring", "trial_ended", "announcement")
PREFERENCE_TYPES = OPTIONAL_TYPES + RECEIPT_TYPES
# The notification_preferences column default, for users who never saved preferences.
DEFAULT_LOW_BALANCE_THRESHOLD = Decimal("1")

# Delivery: attempts per message, exponential backoff between them, and the claim's lease.
MAX_ATTEMPTS = 10
BACKOFF_BASE_SECONDS = 60.0
BACKOFF_CAP_SECONDS = 3600.0
LEASE_SECONDS = 120.0
BATCH_SIZE = 20
# At most this many batches per pass, so the worker's other duties get their turn.
MAX_BATCHES_PER_PASS = 50
TRIAL_CHECK_INTERVAL_SECONDS = 600.0
RESEND_DEFAULT_URL = "https://api.resend.com"
# Resend answers these for a message it will never accept; anything else may succeed later.
PERMANENT_STATUSES = frozenset({400, 422})


# -- enqueueing (in the caller's transaction) -----------------------------------------------


def _json_safe(context: Mapping[str, Any]) -> dict[str, Any]:
    """Decimals as strings (JSON has no exact decimal), datetimes as ISO 8601, UUIDs as text."""
    safe: dict[str, Any] = {}
    for key, value in context.items():
        if isinstance(value, Decimal):
            value = format(value, "f")
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, UUID):
            value = str(value)
        safe[key] = value
    return safe


async def enqueue(
    conn: asyncpg.Connection, *, user_id: UUID, type: str, dedupe_key: str | None, context: dict[str, Any]
) -> bool:
    """Queue a message to a user in the caller's transaction; False when nothing was queued.

    Nothing is queued when the user has no address, the address is suppressed, the user turned an
    optional type off, or a message with this dedupe key exists already.
    """
    assert type in TYPES, type
    message_id = await notifications_db.enqueue(
        conn, user_id=user_id, type=type, dedupe_key=dedupe_key, context=_json_safe(context)
    )
    return message_id is not None


async def welcome(conn: asyncpg.Connection, *, user_id: UUID) -> bool:
    """The welcome e-mail of a new account (its first login)."""
    return await enqueue(conn, user_id=user_id, type="welcome", dedupe_key=f"welcome:{user_id}", context={})


async def api_key_created(conn: asyncpg.Connection, *, key: ApiKey, by_admin: bool) -> bool:
    """The security notice for a new API key: its name and masked form, never the key itself."""
    return await enqueue(
        conn,
        user_id=key.user_id,
        type="api_key_created",
        dedupe_key=f"api-key:{key.id}",
        context={
            "key_name": key.name,
            "masked_key": f"{key.key_prefix}...{key.key_last4}",
            "environment": key.environment,
            "created_at": key.created_at,
            "by_admin": by_admin,
        },
    )


async def low_balance_check(
    conn: asyncpg.Connection, *, user_id: UUID, balance_before: Decimal, balance_after: Decimal
) -> bool:
    """Queue the low-balance e-mail when the settled balance crosses below the user's threshold.

    Once per crossing: call it under the user's row lock with the balance before and after the
    change (the same rule runs inside SQL as gw_notify_low_balance, which this calls).
    """
    return await notifications_db.notify_low_balance(
        conn, user_id=user_id, balance_before=balance_before, balance_after=balance_after
    )


async def payment_confirmed(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    payment_reference: str,
    amount_cents: int,
    currency: str,
    credits: Decimal,
    description: str | None = None,
) -> bool:
    """The receipt of a payment (a top-up or a subscription invoice), once per payment reference."""
    return await enqueue(
        conn,
        user_id=user_id,
        type="payment_confirmation",
        dedupe_key=f"payment:{payment_reference}",
        context={
            "payment_reference": payment_reference,
            "amount_cents": amount_cents,
            "currency": currency.lower(),
            "credits": credits,
            "description": description,
        },
    )


# -- backends -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingEmail:
    message_id: int
    type: str
    to: str
    subject: str
    html: str
    text: str
    idempotency_key: str


class DeliveryError(Exception):
    """A send that did not happen; `permanent` when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Backend(Protocol):
    name: str

    async def send(self, email: OutgoingEmail) -> str:
        """Send one message; return the provider's message id or raise DeliveryError."""
        ...


@dataclass(frozen=True)
class RecordedEmail:
    id: str
    sender: str
    email: OutgoingEmail


@dataclass
class LogBackend:
    """Records messages in memory (the most recent `max_messages`) and logs that it did."""

    sender: str = "Gatewayz <noreply@gatewayz.ai>"
    max_messages: int = 1000
    name: str = "log"
    messages: deque[RecordedEmail] = field(init=False)
    _by_key: OrderedDict[str, str] = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.messages = deque(maxlen=self.max_messages)

    async def send(self, email: OutgoingEmail) -> str:
        known = self._by_key.get(email.idempotency_key)
        if known is not None:
            # The same idempotency key answers the same id, as Resend does.
            return known
        message_id = f"log_{uuid4().hex}"
        self.messages.append(RecordedEmail(id=message_id, sender=self.sender, email=email))
        self._by_key[email.idempotency_key] = message_id
        while len(self._by_key) > self.max_messages:
            self._by_key.popitem(last=False)
        logger.info(
            "e-mail %d (%s) recorded by the log backend as %s", email.message_id, email.type, message_id
        )
        return message_id


class ResendBackend:
    """Sends through the `resend` SDK; RESEND_API_URL points it elsewhere (a local fake in tests)."""

    name = "resend"

    def __init__(self, *, api_key: str, api_url: str | None, sender: str) -> None:
        self._api_key = api_key
        self._api_url = (api_url or RESEND_DEFAULT_URL).rstrip("/")
        self.sender = sender

    async def send(self, email: OutgoingEmail) -> str:
        params: resend.Emails.SendParams = {
            "from": self.sender,
            "to": [email.to],
            "subject": email.subject,
            "html": email.html,
            "text": email.text,
            "tags": [{"name": "type", "value": email.type}],
        }
        options: resend.Emails.SendOptions = {"idempotency_key": email.idempotency_key}
        # The SDK reads its key and base URL from module globals. Both are read before the call's
        # first await, so setting them right before it holds even with several backends per process.
        resend.api_key = self._api_key
        resend.api_url = self._api_url
        try:
            response = await resend.Emails.send_async(params, options)
        except ResendError as exc:
            status = _status(exc.code)
            raise DeliveryError(
                f"Resend answered {exc.code}: {exc.message}", permanent=status in PERMANENT_STATUSES
            ) from None
        provider_id = response.get("id")
        if not isinstance(provider_id, str) or not provider_id:
            raise DeliveryError("Resend accepted the message without an id")
        return provider_id


def _status(code: str | int) -> int | None:
    try:
        return int(code)
    except (TypeError, ValueError):
        return None


def backend_for(settings: Settings) -> Backend:
    """Resend when RESEND_API_KEY is set; else the log backend."""
    if settings.resend_api_key is not None and settings.resend_api_key.get_secret_value():
        return ResendBackend(
            api_key=settings.resend_api_key.get_secret_value(),
            api_url=settings.resend_api_url,
            sender=settings.email_from,
        )
    return LogBackend(sender=settings.email_from)


# -- delivery -----------------------------------------------------------------------------


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt: 1, 2, 4, ... minutes, at most an hour."""
    return timedelta(seconds=min(BACKOFF_BASE_SECONDS * 2 ** max(attempts - 1, 0), BACKOFF_CAP_SECONDS))


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


async def deliver_due(pool: asyncpg.Pool, backend: Backend, *, now: datetime | None = None) -> int:
    """One pass of the worker: send every due message; returns how many were sent.

    `now` stands in for the clock (tests move it forward to reach a retry's time).
    """
    sent = 0
    for _ in range(MAX_BATCHES_PER_PASS):
        moment = _now(now)
        async with pool.acquire() as conn:
            await notifications_db.fail_abandoned(conn, now=moment, max_attempts=MAX_ATTEMPTS)
            batch = await notifications_db.claim_due(
                conn, now=moment, limit=BATCH_SIZE, lease_seconds=LEASE_SECONDS, max_attempts=MAX_ATTEMPTS
            )
        for message in batch:
            if await _deliver(pool, backend, message, now=now):
                sent += 1
        if len(batch) < BATCH_SIZE:
            break
    return sent


async def _record_failure(
    pool: asyncpg.Pool, message: ClaimedMessage, error: str, *, permanent: bool, now: datetime | None
) -> None:
    moment = _now(now)
    retry_at = None if permanent or message.attempts >= MAX_ATTEMPTS else moment + backoff(message.attempts)
    async with pool.acquire() as conn:
        await notifications_db.record_failure(
            conn, message_id=message.id, error=error, retry_at=retry_at, now=moment
        )
    logger.warning(
        "e-mail %d (%s) attempt %d failed%s: %s",
        message.id,
        message.type,
        message.attempts,
        "" if retry_at else " for good",
        error,
    )


async def _deliver(
    pool: asyncpg.Pool, backend: Backend, message: ClaimedMessage, *, now: datetime | None
) -> bool:
    if message.suppressed or message.account_deleted:
        reason = (
            "the account was deleted"
            if message.account_deleted
            else "the address is suppressed after a hard bounce or a complaint"
        )
        await _record_failure(pool, message, reason, permanent=True, now=now)
        return False
    if message.subject is None or message.html is None or message.text is None:
        try:
            rendered = email_templates.render(message.type, message.context)
        except TemplateError as exc:
            await _record_failure(pool, message, f"cannot render: {exc}", permanent=True, now=now)
            return False
        async with pool.acquire() as conn:
            await notifications_db.set_content(
                conn, message_id=message.id, subject=rendered.subject, html=rendered.html, text=rendered.text
            )
        subject, html, text = rendered.subject, rendered.html, rendered.text
    else:
        subject, html, text = message.subject, message.html, message.text
    email = OutgoingEmail(
        message_id=message.id,
        type=message.type,
        to=message.to_email,
        subject=subject,
        html=html,
        text=text,
        idempotency_key=f"gatewayz-{message.idempotency_key}",
    )
    try:
        provider_id = await backend.send(email)
    except DeliveryError as exc:
        await _record_failure(pool, message, str(exc), permanent=exc.permanent, now=now)
        return False
    except Exception as exc:  # a backend bug or a network fault: retried like any transient error
        await _record_failure(pool, message, f"{type(exc).__name__}: {exc}", permanent=False, now=now)
        return False
    async with pool.acquire() as conn:
        await notifications_db.record_sent(
            conn, message_id=message.id, provider_message_id=provider_id, now=_now(now)
        )
    return True


async def check_trials(pool: asyncpg.Pool, settings: Settings, *, now: datetime | None = None) -> int:
    """Queue 'trial expiring' and 'trial ended' notices that are due; returns how many."""
    async with pool.acquire() as conn:
        return await notifications_db.enqueue_trial_notices(
            conn, now=_now(now), expiring_days=settings.notify_trial_expiring_days
        )


async def run_worker(pool: asyncpg.Pool, backend: Backend, settings: Settings) -> None:
    """Deliver due messages every NOTIFY_POLL_INTERVAL_SECONDS and check trials every few minutes."""
    loop = asyncio.get_running_loop()
    next_trial_check = loop.time()
    while True:
        # Sleep first: a starting instance serves requests before it turns to the outbox.
        await asyncio.sleep(settings.notify_poll_interval_seconds)
        try:
            if loop.time() >= next_trial_check:
                await check_trials(pool, settings)
                next_trial_check = loop.time() + TRIAL_CHECK_INTERVAL_SECONDS
            await deliver_due(pool, backend)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next round tries again; queued messages wait, never lost
            logger.warning("e-mail delivery round failed: %s", type(exc).__name__)


# -- preferences, lists, admin ----------------------------------------------------------------


@dataclass(frozen=True)
class PreferencesView:
    types: dict[str, bool]
    always_on: list[str]
    low_balance_threshold: Decimal


def _view(stored: notifications_db.Preferences | None) -> PreferencesView:
    types = stored.types if stored else {}
    return PreferencesView(
        types={t: t in RECEIPT_TYPES or types.get(t) is not False for t in PREFERENCE_TYPES},
        always_on=list(RECEIPT_TYPES),
        low_balance_threshold=stored.low_balance_threshold if stored else DEFAULT_LOW_BALANCE_THRESHOLD,
    )


async def get_preferences(conn: asyncpg.Connection, *, user_id: UUID) -> PreferencesView:
    return _view(await notifications_db.get_preferences(conn, user_id=user_id))


async def update_preferences(
    conn: asyncpg.Connection,
    *,
    principal: Principal,
    meta: RequestMeta,
    types: dict[str, bool],
    low_balance_threshold: Decimal | None,
) -> PreferencesView:
    """Turn optional types on or off and set the threshold (audited); receipts cannot be turned off."""
    from src.services import audit  # audit -> security.deps -> state -> this module

    assert principal.user_id is not None
    for name, enabled in types.items():
        if name in RECEIPT_TYPES and not enabled:
            raise InvalidRequest(
                f"'{name}' e-mails are receipts or security notices and cannot be turned off.",
                param=f"types.{name}",
                code="notification_required",
            )
    if not types and low_balance_threshold is None:
        raise InvalidRequest(
            "Nothing to update: send 'types' or 'low_balance_threshold'.", code="empty_update"
        )
    async with conn.transaction():
        before = _view(await notifications_db.get_preferences(conn, user_id=principal.user_id))
        stored = await notifications_db.save_preferences(
            conn,
            user_id=principal.user_id,
            types={name: enabled for name, enabled in types.items() if name in OPTIONAL_TYPES},
            low_balance_threshold=low_balance_threshold,
        )
        after = _view(stored)
        await audit.record(
            conn,
            action="notifications.preferences_update",
            actor=principal,
            meta=meta,
            user_id=principal.user_id,
            subject_type="user",
            subject_id=principal.user_id,
            before=_audit_view(before),
            after=_audit_view(after),
        )
    return after


def _audit_view(view: PreferencesView) -> dict[str, Any]:
    return {"types": view.types, "low_balance_threshold": format(view.low_balance_threshold, "f")}


def with_subject(row: OutboxRow) -> OutboxRow:
    """A queued message is rendered at delivery: show the subject it will have."""
    if row.subject is not None:
        return row
    subject = email_templates.subject_of(row.type, row.context)
    return OutboxRow(**{**row.__dict__, "subject": subject})


async def list_for_user(
    conn: asyncpg.Connection, *, user_id: UUID, limit: int, offset: int
) -> tuple[list[OutboxRow], int]:
    rows, total = await notifications_db.list_for_user(conn, user_id=user_id, limit=limit, offset=offset)
    return [with_subject(row) for row in rows], total


async def list_all(
    conn: asyncpg.Connection,
    *,
    limit: int,
    offset: int,
    status: str | None,
    type: str | None,
    user_id: UUID | None,
    to_email: str | None,
) -> tuple[list[OutboxRow], int]:
    rows, total = await notifications_db.list_all(
        conn,
        limit=limit,
        offset=offset,
        status=status,
        type=type,
        user_id=user_id,
        to_email=to_email.strip().lower() if to_email else None,
    )
    return [with_subject(row) for row in rows], total


async def queue_test(
    conn: asyncpg.Connection, *, to_email: str, actor: Principal, meta: RequestMeta
) -> OutboxRow:
    """Queue a test message to any address (suppressed ones excepted), audited."""
    from src.services import audit  # see update_preferences

    address = to_email.strip().lower()
    async with conn.transaction():
        message_id = await notifications_db.enqueue_to_address(
            conn,
            to_email=address,
            type="test",
            dedupe_key=None,
            context={"requested_at": datetime.now(UTC).isoformat()},
        )
        if message_id is None:
            raise Conflict(
                "This address is suppressed after a hard bounce or a complaint.",
                param="to",
                code="email_suppressed",
            )
        await audit.record(
            conn,
            action="notifications.test",
            actor=actor,
            meta=meta,
            subject_type="notification",
            subject_id=str(message_id),
            metadata={"to": address},
        )
        row = await notifications_db.get_message(conn, message_id=message_id)
    assert row is not None
    return with_subject(row)


async def queue_announcement(
    conn: asyncpg.Connection,
    *,
    subject: str,
    body: str,
    user_ids: list[UUID] | None,
    actor: Principal,
    meta: RequestMeta,
) -> tuple[UUID, int]:
    """Queue an announcement to every active user with an address (or the listed ones), audited."""
    from src.services import audit  # see update_preferences

    announcement_id = uuid4()
    subject = email_templates.clean_subject(subject)
    if not subject:
        raise InvalidRequest("The subject is empty.", param="subject", code="invalid_subject")
    async with conn.transaction():
        queued = await notifications_db.enqueue_announcement(
            conn, announcement_id=announcement_id, subject=subject, body=body, user_ids=user_ids
        )
        await audit.record(
            conn,
            action="notifications.announcement",
            actor=actor,
            meta=meta,
            subject_type="announcement",
            subject_id=str(announcement_id),
            metadata={
                "subject": subject,
                "queued": queued,
                "audience": "all" if user_ids is None else f"{len(user_ids)} listed users",
            },
        )
    return announcement_id, queued


# -- Resend webhooks --------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookOutcome:
    type: str
    duplicate: bool
    updated: int
    suppressed: list[str]


def verify_webhook(settings: Settings, *, payload: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """The event, if the Svix signature (HMAC-SHA256 of 'id.timestamp.body') is genuine and fresh."""
    if settings.resend_webhook_secret is None or not settings.resend_webhook_secret.get_secret_value():
        raise ServiceUnavailable(
            "Resend webhooks are not configured (RESEND_WEBHOOK_SECRET).", code="webhook_not_configured"
        )
    try:
        event = resend.Webhooks.verify(
            {
                "payload": payload.decode("utf-8"),
                "headers": {
                    "id": headers.get("svix-id", ""),
                    "timestamp": headers.get("svix-timestamp", ""),
                    "signature": headers.get("svix-signature", ""),
                },
                "webhook_secret": settings.resend_webhook_secret.get_secret_value(),
            }
        )
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The webhook signature is invalid.", code="invalid_signature") from None
    if not isinstance(event, dict):
        raise InvalidRequest("The webhook body is not an event object.", code="invalid_event")
    return cast(dict[str, Any], event)


def _recipients(data: Mapping[str, Any]) -> list[str]:
    to = data.get("to")
    addresses = [to] if isinstance(to, str) else to if isinstance(to, list) else []
    return sorted({a.strip().lower() for a in addresses if isinstance(a, str) and a.strip()})


def _hard_bounce(data: Mapping[str, Any]) -> bool:
    bounce = data.get("bounce")
    if not isinstance(bounce, dict) or not bounce.get("type"):
        return True  # Resend reports email.bounced for permanent rejections
    return str(bounce["type"]).lower() == "permanent"


async def _suppress_all(conn: asyncpg.Connection, addresses: list[str], reason: str) -> list[str]:
    added = []
    for address in addresses:
        if await notifications_db.suppress(conn, email=address, reason=reason):
            added.append(address)
    return added


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


async def apply_webhook(
    conn: asyncpg.Connection, *, svix_id: str, event: Mapping[str, Any]
) -> WebhookOutcome:
    """Update the message's status from a verified event, once per Svix id; suppress on hard bounces."""
    type = str(event.get("type") or "")
    data = _object(event.get("data"))
    email_id = data.get("email_id")
    provider_id = email_id if isinstance(email_id, str) and email_id else None
    updated = 0
    suppressed: list[str] = []
    async with conn.transaction():
        if not await notifications_db.record_webhook_event(conn, svix_id=svix_id, type=type[:100]):
            return WebhookOutcome(type=type, duplicate=True, updated=0, suppressed=[])
        if type == "email.delivered" and provider_id:
            updated = await notifications_db.mark_delivered(conn, provider_message_id=provider_id)
        elif type == "email.bounced":
            error = str(_object(data.get("bounce")).get("message") or "the receiving server rejected it")
            if provider_id:
                updated = await notifications_db.mark_undelivered(
                    conn, provider_message_id=provider_id, status="bounced", error=error
                )
            if _hard_bounce(data):
                suppressed = await _suppress_all(conn, _recipients(data), "hard_bounce")
        elif type == "email.complained":
            suppressed = await _suppress_all(conn, _recipients(data), "complaint")
        elif type in {"email.failed", "email.suppressed"}:
            default = "suppressed by Resend" if type == "email.suppressed" else "Resend could not send it"
            if provider_id:
                updated = await notifications_db.mark_undelivered(
                    conn,
                    provider_message_id=provider_id,
                    status="failed",
                    error=str(_object(data.get("failed")).get("reason") or default),
                )
            if type == "email.suppressed":
                suppressed = await _suppress_all(conn, _recipients(data), "hard_bounce")
    if suppressed:
        logger.info("suppressed %d address(es) after a Resend %s event", len(suppressed), type)
    return WebhookOutcome(type=type, duplicate=False, updated=updated, suppressed=suppressed)


async def handle_webhook(
    pool: asyncpg.Pool, settings: Settings, *, payload: bytes, headers: Mapping[str, str]
) -> WebhookOutcome:
    """Verify, then apply: an unsigned request never takes a database connection."""
    event = verify_webhook(settings, payload=payload, headers=headers)
    async with pool.acquire() as conn:
        return await apply_webhook(conn, svix_id=headers["svix-id"], event=event)
