"""The e-mails Gatewayz sends, each as an HTML and a plain-text body rendered from its context.

Every message is built from one `Content` (subject, heading, paragraphs, a table of details, an
optional button) and laid out by `_html` and `_text`, so all of them share one look: a dark header
with the product name, a white card, and a footer that says why the reader got the message.
Every value that comes from a user or an operator (names, key names, announcement text) is
escaped for HTML; subjects lose control characters, so nothing can break a header.
A context comes from the outbox's JSON column: numbers arrive as strings and dates as ISO 8601.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

PRODUCT_NAME = "Gatewayz"
SITE_URL = "https://gatewayz.ai"
DASHBOARD_URL = f"{SITE_URL}/dashboard"
CREDITS_URL = f"{SITE_URL}/settings/credits"
KEYS_URL = f"{SITE_URL}/settings/keys"
PREFERENCES_URL = f"{SITE_URL}/settings/notifications"
DOCS_URL = "https://docs.gatewayz.ai"

MAX_SUBJECT_LENGTH = 200
# Currencies whose Stripe amounts are whole units, not hundredths.
ZERO_DECIMAL_CURRENCIES = frozenset(
    {
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    }
)
CURRENCY_SYMBOLS = {"usd": "$", "eur": "€", "gbp": "£"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


@dataclass(frozen=True)
class Content:
    """What one message says; `_html` and `_text` lay it out."""

    subject: str
    heading: str
    # The inbox preview line.
    preheader: str
    paragraphs: list[str]
    details: list[tuple[str, str]] = field(default_factory=list)
    action: tuple[str, str] | None = None
    after: list[str] = field(default_factory=list)
    # Why the reader got this message.
    reason: str = "You receive this e-mail because you have a Gatewayz account."
    # Optional messages link to the preferences that turn them off.
    optional: bool = False


class TemplateError(ValueError):
    """A message cannot be rendered from its context (an unknown type or a malformed value)."""


def clean_subject(value: str) -> str:
    """One line, no control characters, at most MAX_SUBJECT_LENGTH characters."""
    return " ".join(_CONTROL.sub(" ", value).split())[:MAX_SUBJECT_LENGTH]


def _greeting(context: dict[str, Any]) -> str:
    name = context.get("name")
    name = " ".join(_CONTROL.sub(" ", name).split()) if isinstance(name, str) else ""
    return f"Hi {name}," if name else "Hi there,"


def _decimal(value: Any) -> Decimal:
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise TemplateError(f"not a number: {value!r}") from None
    if not number.is_finite():
        raise TemplateError(f"not a finite number: {value!r}")
    return number


def format_credits(value: Any) -> str:
    """Credits as dollars (1 credit = 1 USD): two decimals, cut down rather than rounded up."""
    amount = _decimal(value)
    places = Decimal("0.0001") if 0 < abs(amount) < Decimal("0.01") else Decimal("0.01")
    shown = amount.quantize(places, rounding=ROUND_DOWN)
    sign = "-" if shown < 0 else ""
    return f"{sign}${abs(shown):,}"


def format_money(amount_minor: Any, currency: str) -> str:
    """A Stripe amount (in the currency's smallest unit) with its symbol or code."""
    code = currency.lower()
    minor = _decimal(amount_minor)
    amount = (
        minor if code in ZERO_DECIMAL_CURRENCIES else (minor / 100).quantize(Decimal("0.01"), ROUND_HALF_UP)
    )
    symbol = CURRENCY_SYMBOLS.get(code)
    return f"{symbol}{amount:,}" if symbol else f"{amount:,} {code.upper()}"


def format_time(value: Any) -> str:
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            raise TemplateError(f"not a date: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return f"{moment.day} {moment:%B %Y, %H:%M} UTC"


# -- layout -------------------------------------------------------------------------------

_FONT = "-apple-system,BlinkMacSystemFont,'Segoe UI',Roboto,Helvetica,Arial,sans-serif"


def _html(content: Content) -> str:
    e = html.escape
    blocks = [f'<p style="margin:0 0 16px;line-height:1.6;">{e(p)}</p>' for p in content.paragraphs]
    if content.details:
        rows = "".join(
            '<tr><td style="padding:8px 12px;color:#6b7280;border-bottom:1px solid #e5e7eb;'
            f'white-space:nowrap;">{e(label)}</td><td style="padding:8px 12px;border-bottom:1px solid '
            f'#e5e7eb;font-weight:600;">{e(value)}</td></tr>'
            for label, value in content.details
        )
        blocks.append(
            '<table role="presentation" cellpadding="0" cellspacing="0" width="100%" style="margin:8px 0 '
            f'24px;border-collapse:collapse;border:1px solid #e5e7eb;border-radius:6px;">{rows}</table>'
        )
    if content.action:
        label, url = content.action
        blocks.append(
            '<p style="margin:8px 0 24px;"><a href="'
            + e(url, quote=True)
            + '" style="display:inline-block;background:#4f46e5;color:#ffffff;text-decoration:none;'
            f'font-weight:600;padding:12px 22px;border-radius:6px;">{e(label)}</a></p>'
        )
    blocks += [f'<p style="margin:0 0 16px;line-height:1.6;">{e(p)}</p>' for p in content.after]
    blocks.append(f'<p style="margin:24px 0 0;line-height:1.6;">The {PRODUCT_NAME} team</p>')
    footer = e(content.reason)
    if content.optional:
        footer += (
            ' <a href="' + e(PREFERENCES_URL, quote=True) + '" style="color:#6b7280;">'
            "Manage your notification settings</a>."
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{e(content.subject)}</title></head>"
        '<body style="margin:0;padding:0;background:#f3f4f6;">'
        '<div style="display:none;max-height:0;overflow:hidden;opacity:0;">'
        f"{e(content.preheader)}</div>"
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0" '
        'style="background:#f3f4f6;padding:32px 12px;"><tr><td align="center">'
        '<table role="presentation" width="600" cellpadding="0" cellspacing="0" '
        f'style="max-width:600px;width:100%;background:#ffffff;border-radius:10px;overflow:hidden;'
        f'font-family:{_FONT};font-size:15px;color:#111827;">'
        '<tr><td style="background:#111827;padding:22px 32px;">'
        f'<a href="{e(SITE_URL, quote=True)}" style="color:#ffffff;text-decoration:none;font-size:20px;'
        f'font-weight:700;letter-spacing:0.3px;">{PRODUCT_NAME}</a></td></tr>'
        '<tr><td style="padding:32px;">'
        f'<h1 style="margin:0 0 20px;font-size:22px;line-height:1.3;">{e(content.heading)}</h1>'
        + "".join(blocks)
        + "</td></tr>"
        '<tr><td style="padding:20px 32px;background:#f9fafb;border-top:1px solid #e5e7eb;'
        f'font-size:12px;line-height:1.5;color:#6b7280;">{footer}<br>'
        f"{PRODUCT_NAME} &middot; One API for hundreds of AI models &middot; "
        f'<a href="{e(SITE_URL, quote=True)}" style="color:#6b7280;">gatewayz.ai</a></td></tr>'
        "</table></td></tr></table></body></html>"
    )


def _text(content: Content) -> str:
    lines = [content.heading, "=" * len(content.heading), ""]
    for paragraph in content.paragraphs:
        lines += [paragraph, ""]
    if content.details:
        width = max(len(label) for label, _ in content.details)
        lines += [f"  {label.ljust(width)}  {value}" for label, value in content.details]
        lines.append("")
    if content.action:
        label, url = content.action
        lines += [f"{label}: {url}", ""]
    for paragraph in content.after:
        lines += [paragraph, ""]
    lines += [f"The {PRODUCT_NAME} team", "", "--", content.reason]
    if content.optional:
        lines.append(f"Manage your notification settings: {PREFERENCES_URL}")
    lines.append(f"{PRODUCT_NAME} - {SITE_URL}")
    return "\n".join(lines) + "\n"


# -- the messages ---------------------------------------------------------------------------


def _welcome(context: dict[str, Any]) -> Content:
    return Content(
        subject=f"Welcome to {PRODUCT_NAME}",
        heading=f"Welcome to {PRODUCT_NAME}",
        preheader="Your account is ready: one API key for hundreds of AI models.",
        paragraphs=[
            _greeting(context),
            f"Your {PRODUCT_NAME} account is ready. One OpenAI-compatible API and one key give you"
            " hundreds of models from many providers, paid for with prepaid credits.",
            "Your primary API key is waiting in your dashboard. Use it with any OpenAI SDK by"
            " pointing the SDK's base URL at Gatewayz.",
        ],
        action=("Open your dashboard", DASHBOARD_URL),
        after=[f"The documentation has a quick start for every language: {DOCS_URL}"],
    )


def _api_key_created(context: dict[str, Any]) -> Content:
    details = [
        ("Name", str(context.get("key_name") or "")),
        ("Key", str(context.get("masked_key") or "")),
        ("Environment", str(context.get("environment") or "live")),
    ]
    if context.get("created_at"):
        details.append(("Created", format_time(context["created_at"])))
    paragraphs = [_greeting(context), "A new API key was created on your Gatewayz account."]
    if context.get("by_admin"):
        paragraphs.append("It was created for you by a Gatewayz administrator.")
    return Content(
        subject=f"A new API key was created on your {PRODUCT_NAME} account",
        heading="New API key created",
        preheader=f"The key '{context.get('key_name') or ''}' can now call the API.",
        paragraphs=paragraphs,
        details=details,
        action=("Review your API keys", KEYS_URL),
        after=[
            "If you did not create this key, revoke it in your dashboard right away and rotate"
            " your other keys."
        ],
        reason="You receive this security notice for every new API key on your Gatewayz account.",
    )


def _low_balance(context: dict[str, Any]) -> Content:
    balance = format_credits(context["balance"])
    threshold = format_credits(context["threshold"])
    return Content(
        subject=f"Your {PRODUCT_NAME} balance is low ({balance})",
        heading="Your balance is running low",
        preheader=f"Your credit balance is {balance}, below your alert threshold of {threshold}.",
        paragraphs=[
            _greeting(context),
            f"Your credit balance is now {balance}, below your alert threshold of {threshold}.",
            "When it runs out, API requests are refused (HTTP 402) until you add credits.",
        ],
        details=[("Balance", balance), ("Alert threshold", threshold)],
        action=("Add credits", CREDITS_URL),
        reason="You receive this alert once each time your balance falls below your threshold.",
        optional=True,
    )


def _payment_confirmation(context: dict[str, Any]) -> Content:
    paid = format_money(context["amount_cents"], str(context.get("currency") or "usd"))
    credits = format_credits(context["credits"])
    details = [("Amount paid", paid), ("Credits added", credits)]
    if context.get("description"):
        details.insert(0, ("For", str(context["description"])))
    details.append(("Reference", str(context.get("payment_reference") or "")))
    return Content(
        subject=f"Payment received: {paid}",
        heading="Thank you for your payment",
        preheader=f"We received {paid}; {credits} in credits are on your account.",
        paragraphs=[
            _greeting(context),
            f"We received your payment of {paid}. The credits are on your account and ready to use.",
        ],
        details=details,
        action=("View your balance", CREDITS_URL),
        after=["Keep this e-mail as your receipt."],
        reason="You receive this receipt for every payment on your Gatewayz account.",
    )


def _trial_expiring(context: dict[str, Any]) -> Content:
    ends = format_time(context["ends_at"])
    return Content(
        subject=f"Your {PRODUCT_NAME} trial ends on {ends}",
        heading="Your trial ends soon",
        preheader=f"Your free trial ends on {ends}. Add credits to keep going.",
        paragraphs=[
            _greeting(context),
            f"Your free {PRODUCT_NAME} trial ends on {ends}. Trial credits you have not used by then expire.",
            "To keep your apps running without a pause, add credits or choose a plan before then.",
        ],
        details=[("Trial ends", ends)],
        action=("Add credits", CREDITS_URL),
        reason="You receive this reminder because your Gatewayz trial is about to end.",
        optional=True,
    )


def _trial_ended(context: dict[str, Any]) -> Content:
    reason = (
        "You have used everything your trial allows."
        if context.get("reason") == "used_up"
        else "Its time is up, and unused trial credits have expired."
    )
    return Content(
        subject=f"Your {PRODUCT_NAME} trial has ended",
        heading="Your trial has ended",
        preheader="Add credits to keep using Gatewayz.",
        paragraphs=[
            _greeting(context),
            f"Your free {PRODUCT_NAME} trial has ended. {reason}",
            "Your account and API keys stay as they are: add credits or choose a plan and your"
            " requests go through again at once.",
        ],
        action=("Add credits", CREDITS_URL),
        reason="You receive this e-mail because your Gatewayz trial ended.",
        optional=True,
    )


def _announcement(context: dict[str, Any]) -> Content:
    subject = clean_subject(str(context.get("subject") or ""))
    if not subject:
        raise TemplateError("an announcement needs a subject")
    body = str(context.get("body") or "").replace("\r\n", "\n").strip()
    paragraphs = [" ".join(p.split()) for p in _PARAGRAPH_BREAK.split(body) if p.strip()]
    return Content(
        subject=subject,
        heading=subject,
        preheader=paragraphs[0][:140] if paragraphs else subject,
        paragraphs=[_greeting(context), *paragraphs],
        reason="You receive product announcements because you have a Gatewayz account.",
        optional=True,
    )


def _test(context: dict[str, Any]) -> Content:
    details = []
    if context.get("requested_at"):
        details.append(("Requested", format_time(context["requested_at"])))
    return Content(
        subject=f"{PRODUCT_NAME} test e-mail",
        heading="E-mail delivery works",
        preheader="A test message from the Gatewayz admin API.",
        paragraphs=[
            "This is a test message sent from the Gatewayz admin API to check that e-mail reaches"
            " this address.",
            "There is nothing you need to do.",
        ],
        details=details,
        reason="You receive this e-mail because an administrator sent a test message to this address.",
    )


TEMPLATES: dict[str, Callable[[dict[str, Any]], Content]] = {
    "welcome": _welcome,
    "api_key_created": _api_key_created,
    "low_balance": _low_balance,
    "payment_confirmation": _payment_confirmation,
    "trial_expiring": _trial_expiring,
    "trial_ended": _trial_ended,
    "announcement": _announcement,
    "test": _test,
}


def content(type: str, context: dict[str, Any]) -> Content:
    template = TEMPLATES.get(type)
    if template is None:
        raise TemplateError(f"no template for {type!r}")
    try:
        return template(context)
    except KeyError as exc:
        raise TemplateError(f"the {type} context lacks {exc}") from None


def render(type: str, context: dict[str, Any]) -> RenderedEmail:
    """The message of this type, in both formats; raises TemplateError."""
    built = content(type, context)
    subject = clean_subject(built.subject)
    return RenderedEmail(subject=subject, html=_html(built), text=_text(built))


def subject_of(type: str, context: dict[str, Any]) -> str | None:
    """The subject a queued message will have, or None when it cannot be rendered."""
    try:
        return clean_subject(content(type, context).subject)
    except TemplateError:
        return None
