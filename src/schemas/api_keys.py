"""Bodies and views of the API-key routes. A key's plaintext appears only in `ApiKeyCreated`."""

from __future__ import annotations

import re
from datetime import datetime
from ipaddress import ip_network
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field, StringConstraints, field_validator

from src.schemas.common import Strict
from src.security import permissions
from src.security.security import Environment

MAX_ALLOWLIST_ENTRIES = 50
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

KeyName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    Field(description="A name to recognise the key by.", examples=["production server"]),
]
Scopes = Annotated[
    list[str],
    Field(
        min_length=1,
        max_length=len(permissions.SCOPES) + 1,
        description="What the key may call: " + ", ".join(permissions.SCOPES) + ", or '*' for everything.",
        examples=[["inference"], ["*"]],
    ),
]
IpAllowlist = Annotated[
    list[str],
    Field(
        max_length=MAX_ALLOWLIST_ENTRIES,
        description="IP addresses or CIDR networks the key may be used from; empty allows any.",
        examples=[["203.0.113.7", "10.0.0.0/8"]],
    ),
]
DomainRestrictions = Annotated[
    list[str],
    Field(
        max_length=MAX_ALLOWLIST_ENTRIES,
        description=(
            "Hostnames (or '*.example.com') the request's Origin or Referer must name; empty allows any."
        ),
        examples=[["app.example.com", "*.example.com"]],
    ),
]
RequestLimit = Annotated[int, Field(gt=0, le=INT4_MAX)]
TokenLimit = Annotated[int, Field(gt=0, le=INT8_MAX)]


def _scopes(values: list[str]) -> list[str]:
    for value in values:
        if value != permissions.ALL and value not in permissions.SCOPES:
            raise ValueError(f"unknown scope '{value}' (known: {', '.join(permissions.SCOPES)}, '*')")
    return sorted(set(values))


def _networks(values: list[str]) -> list[str]:
    networks: list[str] = []
    for value in values:
        try:
            network = ip_network(value.strip(), strict=True)
        except ValueError:
            raise ValueError(
                f"'{value}' is not an IP address or CIDR network (host bits must be zero, e.g. 10.0.0.0/8)"
            ) from None
        if str(network) not in networks:
            networks.append(str(network))
    return networks


def _hostname(value: str) -> str:
    candidate = value.strip().lower().rstrip(".")
    body = candidate[2:] if candidate.startswith("*.") else candidate
    labels = body.split(".")
    if (
        not body
        or len(body) > 253
        or not all(_LABEL.match(label) for label in labels)
        or (candidate.startswith("*.") and len(labels) < 2)
    ):
        raise ValueError(f"'{value}' is not a hostname or '*.domain' pattern (no scheme, port or path)")
    return candidate


def _domains(values: list[str]) -> list[str]:
    domains: list[str] = []
    for value in values:
        domain = _hostname(value)
        if domain not in domains:
            domains.append(domain)
    return domains


class ApiKeyCreate(Strict):
    name: KeyName
    environment: Environment = Field(
        "live", description="The environment the key's prefix names (gw_live_, gw_test_, ...)."
    )
    scopes: Scopes = Field(default_factory=lambda: [permissions.ALL])
    expires_in_days: int | None = Field(
        None, ge=1, le=3650, description="Days until the key stops working; none means never."
    )
    ip_allowlist: IpAllowlist = Field(default_factory=list)
    domain_restrictions: DomainRestrictions = Field(default_factory=list)
    rpm_limit: RequestLimit | None = Field(None, description="Requests per minute (at most your limit).")
    rpd_limit: RequestLimit | None = Field(None, description="Requests per day (at most your limit).")
    tpm_limit: TokenLimit | None = Field(None, description="Tokens per minute (at most your limit).")
    tpd_limit: TokenLimit | None = Field(None, description="Tokens per day (at most your limit).")
    concurrency_limit: RequestLimit | None = Field(
        None, description="Requests in flight at once (at most your limit)."
    )

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: list[str]) -> list[str]:
        return _scopes(value)

    @field_validator("ip_allowlist")
    @classmethod
    def _check_ips(cls, value: list[str]) -> list[str]:
        return _networks(value)

    @field_validator("domain_restrictions")
    @classmethod
    def _check_domains(cls, value: list[str]) -> list[str]:
        return _domains(value)

    def limits(self) -> dict[str, int | None]:
        return {
            "rpm_limit": self.rpm_limit,
            "rpd_limit": self.rpd_limit,
            "tpm_limit": self.tpm_limit,
            "tpd_limit": self.tpd_limit,
            "concurrency_limit": self.concurrency_limit,
        }


_NOT_NULLABLE = ("name", "scopes", "ip_allowlist", "domain_restrictions", "is_active")


class ApiKeyUpdate(Strict):
    """Only the fields sent are changed; a limit sent as null goes back to your own limit."""

    name: KeyName | None = None
    scopes: Scopes | None = None
    ip_allowlist: IpAllowlist | None = Field(None, description="The new allowlist; [] removes it.")
    domain_restrictions: DomainRestrictions | None = Field(None, description="The new list; [] removes it.")
    rpm_limit: RequestLimit | None = None
    rpd_limit: RequestLimit | None = None
    tpm_limit: TokenLimit | None = None
    tpd_limit: TokenLimit | None = None
    concurrency_limit: RequestLimit | None = None
    is_active: bool | None = Field(None, description="false deactivates the key; true activates it again.")

    @field_validator(*_NOT_NULLABLE)
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # Only runs for fields that were sent: null is "clear" for limits, meaningless here.
        if value is None:
            raise ValueError("may not be null")
        return value

    @field_validator("scopes")
    @classmethod
    def _check_scopes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _scopes(value)

    @field_validator("ip_allowlist")
    @classmethod
    def _check_ips(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _networks(value)

    @field_validator("domain_restrictions")
    @classmethod
    def _check_domains(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _domains(value)

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class ApiKeyView(BaseModel):
    """A key as its owner sees it: a display prefix and the last four characters, never the key."""

    object: Literal["api_key"] = "api_key"
    id: UUID
    name: str
    masked_key: str = Field(
        description="The key's prefix and last four characters.", examples=["gw_live_Ab3x...9fQz"]
    )
    key_prefix: str
    key_last4: str
    environment: Environment
    is_primary: bool
    scopes: list[str]
    ip_allowlist: list[str]
    domain_restrictions: list[str]
    rpm_limit: int | None = Field(description="This key's own limit; null means your account's limit.")
    rpd_limit: int | None
    tpm_limit: int | None
    tpd_limit: int | None
    concurrency_limit: int | None
    is_active: bool
    expires_at: datetime | None
    last_used_at: datetime | None = Field(description="Updated at most once a minute.")
    created_at: datetime
    updated_at: datetime


class ApiKeyCreated(ApiKeyView):
    api_key: str = Field(description="The key itself. Shown only in this response: store it now.")


class ApiKeyDeleted(BaseModel):
    object: Literal["api_key"] = "api_key"
    id: UUID
    deleted: bool = True
