"""Upstream providers: one OpenAI-compatible client, a profile per provider.

Failures map to a small tree, so the chat pipeline decides failover and status codes by type:

    ProviderError                   502  any upstream failure
    ├── ProviderConnectError        502  could not connect (or the connection dropped before a byte)
    ├── ProviderTimeout             504  no first byte, or no end, within the deadline
    ├── ProviderRateLimited         429  the upstream answered 429 (retry_after from its header)
    ├── ProviderAuthError           502  our provider key was refused (401/403): never the client's fault
    ├── ProviderBadRequest          400  the upstream refused the request itself (4xx)
    ├── ProviderServerError         502  5xx
    └── ProviderBadResponse         502  HTML, truncated or shapeless JSON

Upstream keys never leave this module: not in responses, errors or logs.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson

from src.config import Settings

logger = logging.getLogger("gatewayz.providers")

RETRY_AFTER_CAP_SECONDS = 3600
_SECRETISH = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+\S+|key[_-]?[A-Za-z0-9]{16,})", re.IGNORECASE)


class ProviderError(Exception):
    """An upstream failure; `message` is safe to show a client."""

    status_code = 502
    code = "upstream_error"
    retryable = True

    def __init__(self, provider: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.message = message
        self.retry_after = retry_after


class ProviderConnectError(ProviderError):
    code = "upstream_unreachable"


class ProviderTimeout(ProviderError):
    status_code = 504
    code = "upstream_timeout"


class ProviderRateLimited(ProviderError):
    status_code = 429
    code = "upstream_rate_limited"


class ProviderAuthError(ProviderError):
    code = "upstream_auth_failed"


class ProviderBadRequest(ProviderError):
    status_code = 400
    code = "upstream_bad_request"
    retryable = False


class ProviderServerError(ProviderError):
    code = "upstream_server_error"


class ProviderBadResponse(ProviderError):
    code = "upstream_bad_response"


@dataclass(frozen=True)
class ProviderProfile:
    """How to reach one provider: base URL, key, extra headers, and how it lists models."""

    name: str
    display_name: str
    base_url: str
    api_key: str | None = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    site_url: str = ""
    logo_url: str = ""
    publishes_prices: bool = False

    def request_headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        headers.update(self.headers)
        return headers


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def build_profiles(settings: Settings) -> dict[str, ProviderProfile]:
    """Every provider the settings enable, by name."""
    profiles: dict[str, ProviderProfile] = {}
    if settings.openrouter_api_key is not None:
        profiles["openrouter"] = ProviderProfile(
            name="openrouter",
            display_name="OpenRouter",
            base_url=settings.openrouter_base_url.rstrip("/"),
            api_key=_secret(settings.openrouter_api_key),
            headers={"http-referer": "https://gatewayz.ai", "x-title": "Gatewayz"},
            site_url="https://openrouter.ai",
            logo_url="https://openrouter.ai/favicon.ico",
            publishes_prices=True,
        )
    if settings.portkey_api_key is not None:
        headers = {"x-portkey-api-key": _secret(settings.portkey_api_key) or ""}
        if settings.portkey_virtual_key is not None:
            headers["x-portkey-virtual-key"] = _secret(settings.portkey_virtual_key) or ""
        profiles["portkey"] = ProviderProfile(
            name="portkey",
            display_name="Portkey",
            base_url=settings.portkey_base_url.rstrip("/"),
            api_key=None,
            headers=headers,
            site_url="https://portkey.ai",
            logo_url="https://portkey.ai/favicon.ico",
        )
    if settings.featherless_api_key is not None:
        profiles["featherless"] = ProviderProfile(
            name="featherless",
            display_name="Featherless",
            base_url=settings.featherless_base_url.rstrip("/"),
            api_key=_secret(settings.featherless_api_key),
            site_url="https://featherless.ai",
            logo_url="https://featherless.ai/favicon.ico",
        )
    if settings.chutes_api_key is not None:
        profiles["chutes"] = ProviderProfile(
            name="chutes",
            display_name="Chutes",
            base_url=settings.chutes_base_url.rstrip("/"),
            api_key=_secret(settings.chutes_api_key),
            site_url="https://chutes.ai",
            logo_url="https://chutes.ai/favicon.ico",
        )
    if settings.custom_provider_base_url:
        name = settings.custom_provider_name
        profiles[name] = ProviderProfile(
            name=name,
            display_name=name,
            base_url=settings.custom_provider_base_url.rstrip("/"),
            api_key=_secret(settings.custom_provider_api_key),
            publishes_prices=True,  # an OpenAI-compatible server may publish OpenRouter-style prices
        )
    return profiles


class _StatusAndHeaders(Protocol):
    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


PROVIDER_CATALOG = ("openrouter", "portkey", "featherless", "chutes")


def _retry_after(response: _StatusAndHeaders) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_SECONDS)


def _upstream_message(body: bytes) -> str | None:
    """The upstream's own error message, without anything that looks like a credential."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return None
    return _SECRETISH.sub("[redacted]", message)[:500]


def error_for_status(provider: str, response: _StatusAndHeaders, body: bytes) -> ProviderError:
    status = response.status_code
    if status == 429:
        return ProviderRateLimited(
            provider, "The upstream provider is rate limiting requests.", retry_after=_retry_after(response)
        )
    if status in (401, 403):
        logger.error("provider %s refused our credentials (HTTP %d)", provider, status)
        return ProviderAuthError(provider, "The upstream provider could not be used.")
    if status == 408:
        return ProviderTimeout(provider, "The upstream provider timed out.")
    if 400 <= status < 500:
        detail = _upstream_message(body)
        return ProviderBadRequest(provider, detail or "The upstream provider refused the request.")
    return ProviderServerError(provider, "The upstream provider failed.", retry_after=_retry_after(response))


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    first_byte: float = 60.0
    total: float = 600.0


def parse_json_body(provider: str, body: bytes, content_type: str) -> dict[str, Any]:
    if "html" in content_type:
        raise ProviderBadResponse(provider, "The upstream provider returned an invalid response.")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProviderBadResponse(provider, "The upstream provider returned an invalid response.") from exc
    if not isinstance(payload, dict):
        raise ProviderBadResponse(provider, "The upstream provider returned an invalid response.")
    return payload


class UpstreamStream:
    """An upstream streaming response: its bytes as they arrive, and a close that frees the connection."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self.response.content.iter_any()

    async def aclose(self) -> None:
        if self.response.content.at_eof():
            self.response.release()  # fully read: the connection goes back to the pool
        else:
            self.response.close()  # cut short: drop the connection, so the upstream stops at once


def _headers_of(response: aiohttp.ClientResponse) -> _Reply:
    return _Reply(status_code=response.status, headers={k.lower(): v for k, v in response.headers.items()})


@dataclass(frozen=True)
class _Reply:
    status_code: int
    headers: dict[str, str]


class ProviderClient:
    """Calls one provider over the shared, pooled aiohttp session.

    aiohttp rather than httpx on this path: per upstream call it costs a fraction of the CPU
    (httpcore scans its whole pool on every request), which is most of what a gateway adds.
    """

    def __init__(self, profile: ProviderProfile, http: aiohttp.ClientSession, timeouts: Timeouts) -> None:
        self.profile = profile
        self.http = http
        self.timeouts = timeouts
        self._headers = profile.request_headers()

    @property
    def name(self) -> str:
        return self.profile.name

    def _timeout(self) -> aiohttp.ClientTimeout:
        # sock_read bounds the wait for each read; the whole-response deadline is the caller's.
        return aiohttp.ClientTimeout(sock_connect=self.timeouts.connect, sock_read=self.timeouts.first_byte)

    async def list_models(self) -> list[dict[str, Any]]:
        try:
            async with (
                asyncio.timeout(self.timeouts.total),
                self.http.get(
                    f"{self.profile.base_url}/models", headers=self._headers, timeout=self._timeout()
                ) as response,
            ):
                content = await response.read()
                reply = _headers_of(response)
        except TimeoutError as exc:
            raise ProviderTimeout(self.name, "The upstream provider timed out.") from exc
        except aiohttp.ClientError as exc:
            raise ProviderConnectError(self.name, "The upstream provider could not be reached.") from exc
        if reply.status_code != 200:
            raise error_for_status(self.name, reply, content)
        payload = parse_json_body(self.name, content, reply.headers.get("content-type", ""))
        data = payload.get("data")
        if not isinstance(data, list):
            raise ProviderBadResponse(self.name, "The upstream provider returned an invalid model list.")
        return [item for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]

    async def post_json(self, path: str, body: bytes) -> tuple[dict[str, Any], float]:
        """POST and parse a JSON reply; returns it with the seconds the upstream took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with (
                asyncio.timeout(self.timeouts.total),
                self.http.post(
                    f"{self.profile.base_url}{path}",
                    data=body,
                    headers=self._headers,
                    timeout=self._timeout(),
                ) as response,
            ):
                content = await response.read()
                reply = _headers_of(response)
        except TimeoutError as exc:
            raise ProviderTimeout(self.name, "The upstream provider timed out.") from exc
        except aiohttp.ClientError as exc:
            raise ProviderConnectError(self.name, "The upstream provider could not be reached.") from exc
        if reply.status_code != 200:
            raise error_for_status(self.name, reply, content)
        payload = parse_json_body(self.name, content, reply.headers.get("content-type", ""))
        return payload, loop.time() - started

    async def open_stream(self, path: str, body: bytes) -> UpstreamStream:
        """Send a streaming request and wait for a 200 with its headers (within the first-byte time)."""
        try:
            async with asyncio.timeout(self.timeouts.first_byte):
                response = await self.http.post(
                    f"{self.profile.base_url}{path}",
                    data=body,
                    headers=self._headers,
                    timeout=self._timeout(),
                )
        except TimeoutError as exc:
            raise ProviderTimeout(self.name, "The upstream provider timed out.") from exc
        except aiohttp.ClientError as exc:
            raise ProviderConnectError(self.name, "The upstream provider could not be reached.") from exc
        reply = _headers_of(response)
        if reply.status_code != 200:
            try:
                async with asyncio.timeout(self.timeouts.first_byte):
                    content = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                content = b""
            finally:
                response.release()
            raise error_for_status(self.name, reply, content)
        if "text/event-stream" not in reply.headers.get("content-type", ""):
            response.close()
            raise ProviderBadResponse(self.name, "The upstream provider returned an invalid response.")
        return UpstreamStream(response)


class _ByteSource(Protocol):
    def aiter_bytes(self) -> AsyncIterator[bytes]: ...


async def sse_events(response: _ByteSource) -> AsyncIterator[bytes]:
    """The `data:` payloads of an SSE response, one per event, as they arrive.

    Comment lines and keep-alives are skipped; a `data:` split across packets (even inside a UTF-8
    character) is reassembled because lines are cut on raw bytes.
    """
    buffer = b""
    data: list[bytes] = []
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while True:
            index = buffer.find(b"\n")
            if index < 0:
                break
            line = buffer[:index].rstrip(b"\r")
            buffer = buffer[index + 1 :]
            if not line:
                if data:
                    yield b"\n".join(data)
                    data = []
                continue
            if line.startswith(b":"):
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield b"\n".join(data)
