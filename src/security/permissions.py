"""Named permissions for admin routes, and the key scopes that apply on every route.

The admin role holds '*' (every permission). Custom roles list the permissions they grant.
"""

from __future__ import annotations

ALL = "*"

PERMISSIONS: dict[str, str] = {
    "users.read": "List and read users",
    "users.write": "Create, activate, deactivate and ban users",
    "credits.write": "Add or remove a user's credits",
    "roles.read": "List roles and permissions",
    "roles.write": "Create roles and assign them to users",
    "audit.read": "Read the audit log",
    "audit.sweep": "Delete audit rows older than the retention period",
    "security.read": "Read authentication-failure statistics",
    "keys.write": "Manage any user's API keys",
    "pricing.read": "Read admin model prices and each provider's effective price",
    "pricing.write": "Set admin model prices",
    "limits.read": "Read users' rate-limit ceilings and keys' limits",
    "limits.write": "Set users' rate-limit ceilings (above the plan too) and keys' limits",
    "plans.read": "Read plans and users' plan assignments",
    "plans.write": "Create, change and retire plans; assign plans to users",
    "billing.read": "Read payments, refunds and billing analytics",
    "billing.write": "Refund payments",
    "coupons.read": "List coupons and their redemptions",
    "coupons.write": "Create, change and deactivate coupons",
    "trials.write": "Grant or extend users' trials",
    "metrics.read": "Read /metrics and the admin monitor",
    "notifications.read": "Read the e-mail outbox and each message's delivery status",
    "notifications.write": "Send test e-mails and announcements",
}

# Key scopes. A key holds '*' (every scope) unless created with a narrower list.
SCOPES: dict[str, str] = {
    "inference": "Call the /v1 inference API",
    "account:read": "Read the account: balance, profile, transactions",
    "account:write": "Change the account: profile, deletion",
    "keys": "Manage the account's API keys",
    "admin": "Call /admin routes (the owner's role must also allow it)",
}


def has_permission(granted: list[str], permission: str) -> bool:
    return ALL in granted or permission in granted


def scope_for(method: str, path: str) -> str:
    """The scope a request needs, from its route: every route is covered, new ones included."""
    if path.startswith("/v1/") or path == "/v1":
        return "inference"
    if path.startswith("/catalog/"):
        # Browsing is public; the cost estimate of an inference request is part of inference.
        return "inference"
    if path.startswith("/admin") or path == "/metrics":
        return "admin"
    if path.startswith("/user/api-keys"):
        return "keys"
    return "account:read" if method in {"GET", "HEAD", "OPTIONS"} else "account:write"


def scope_allows(scopes: list[str], needed: str) -> bool:
    return ALL in scopes or needed in scopes
