"""POST /v1/images/generations: resolve, hold per image, call the provider (with failover), store, settle.

Prices: an image model is priced per image (`Price.image`, from the provider's list or the admin
price table, markup included) plus its per-request price. A candidate whose image price is 0 serves
images only when an admin marked the model free: a provider that publishes no per-image price must
not give images away, so a model without any such candidate answers 400 model_not_priced. One
price per image, whatever the size or quality asked for.

Money: the hold is n x the image price (+ the request price) at the dearest candidate; the charge
is the images actually returned x the image price (+ the request price) of the provider that
answered, settled in one statement like chat (request_type "images"). A provider's `usage` object
(token counts, as gpt-image models report them) is recorded on the usage record but not billed:
the per-image price is the whole price. Images the provider generated are billed even when the
client went away before the answer; nothing is billed when the provider failed or answered no
usable image, or when the gateway could not store the images.

Storage (SUPABASE_URL and SUPABASE_SERVICE_KEY set, and the client asked for `url`): the provider
is asked for base64, the images are uploaded (src/services/storage.py) and the client receives
signed URLs. Otherwise the request goes upstream as the client sent it and the provider's URLs
(or base64) pass through.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from src.errors import GatewayError, ModelNotPriced, UpstreamError
from src.schemas.chat import GATEWAY_FIELDS
from src.schemas.images import ImageGenerationRequest
from src.security.deps import Limited, Principal
from src.services import chat as chat_service
from src.services import credits, routing, storage
from src.services.catalog import Candidate
from src.services.credits import Hold, Usage
from src.state import AppState

logger = logging.getLogger("gatewayz.images")

# A hold outlives its request's deadline by this much before the sweeper may release it.
HOLD_MARGIN_SECONDS = 120.0


@dataclass
class Prepared:
    request: ImageGenerationRequest
    body: dict[str, Any]
    candidates: list[Candidate]
    hold_amount: Decimal
    store: bool
    client_request_id: str | None
    # The whole request's deadline (event-loop time), across every failover attempt.
    deadline: float


@dataclass
class Outcome:
    """What the call produced so far, for settlement on every path."""

    candidate: Candidate | None = None
    # Images the provider generated that the user pays for (0 when the gateway lost them).
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    status: str = "success"
    error_code: str | None = None
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Generated:
    body: bytes
    headers: dict[str, str]


def parse_body(raw: bytes) -> tuple[dict[str, Any], ImageGenerationRequest]:
    """An image generation request: the client's JSON and its validated view."""
    return chat_service.parse_json_request(raw, ImageGenerationRequest)


def _serves_images(candidate: Candidate) -> bool:
    return candidate.price.image > 0 or candidate.price.free


async def prepare(state: AppState, raw: bytes, *, client_request_id: str | None) -> Prepared:
    body, request = parse_body(raw)
    pinned = request.pinned_provider
    candidates = await state.catalog.resolve(request.model, provider=pinned)
    if pinned is not None and request.allow_fallbacks:
        candidates += [c for c in await state.catalog.resolve(request.model) if c.provider != pinned]
    candidates = [c for c in candidates if _serves_images(c)]
    if not candidates:
        raise ModelNotPriced(
            f"The model '{request.model}' has no per-image price and cannot generate images.", param="model"
        )
    if pinned is None:
        # The catalog orders by token prices; for images the per-image price decides.
        candidates.sort(key=lambda c: (c.price.image + c.price.request, c.provider))
    hold_amount = credits.quantize(
        max(Decimal(request.count) * c.price.image + c.price.request for c in candidates)
    )
    upstream = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
    if isinstance(upstream.get("provider"), str):
        del upstream["provider"]
    store = request.wants_url and storage.configured(state.settings)
    if store:
        upstream["response_format"] = "b64_json"
    return Prepared(
        request=request,
        body=upstream,
        candidates=candidates,
        hold_amount=hold_amount,
        store=store,
        client_request_id=client_request_id,
        deadline=asyncio.get_running_loop().time() + state.settings.upstream_total_timeout_seconds,
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _usable(item: Any, *, decode: bool) -> dict[str, Any] | bytes | None:
    """A provider's image item when it carries an image (its bytes, when `decode` and it has base64)."""
    if not isinstance(item, dict):
        return None
    b64, url = item.get("b64_json"), item.get("url")
    if isinstance(b64, str) and b64:
        if not decode:
            return item
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            pass
    if isinstance(url, str) and url:
        # Without usable base64, the provider's URL is what the client gets.
        return {k: v for k, v in item.items() if k != "b64_json"}
    return None


def _bad_response() -> UpstreamError:
    return UpstreamError("The upstream provider returned an invalid response.", code="upstream_bad_response")


async def _images(
    state: AppState,
    principal: Principal,
    prepared: Prepared,
    hold: Hold,
    payload: dict[str, Any],
    outcome: Outcome,
) -> list[dict[str, Any]]:
    """The client's `data` list: the provider's usable images, uploaded when the gateway stores them."""
    raw = payload.get("data")
    if not isinstance(raw, list):
        raise _bad_response()
    wanted = prepared.request.count
    if len(raw) > wanted:
        # More images than asked for are neither returned nor billed.
        provider = outcome.candidate.provider if outcome.candidate is not None else None
        logger.error("provider %s returned %d images for n=%d", provider, len(raw), wanted)
        raw = raw[:wanted]
    items: list[dict[str, Any]] = []
    uploads: list[tuple[int, storage.Image]] = []
    for entry in raw:
        usable = _usable(entry, decode=prepared.store)
        if usable is None:
            continue
        if isinstance(usable, bytes):
            uploads.append((len(items), storage.image(usable)))
            items.append({k: v for k, v in entry.items() if k != "b64_json"})
        else:
            items.append(dict(usable))
    if not items:
        raise _bad_response()
    outcome.images = len(items)
    if uploads:
        assert principal.user_id is not None
        try:
            urls = await storage.store_images(
                state.settings,
                state.http,
                user_id=principal.user_id,
                request_id=hold.id,
                images=[item for _, item in uploads],
            )
        except storage.StorageFailed as exc:
            # The gateway lost images the user never received: they are not billed.
            outcome.images = 0
            outcome.status, outcome.error_code = "failed", "image_storage_failed"
            raise UpstreamError(
                "The generated images could not be stored; nothing was charged.", code="image_storage_failed"
            ) from exc
        for (index, _), url in zip(uploads, urls, strict=True):
            items[index]["url"] = url
    return items


def _usage(prepared: Prepared, outcome: Outcome) -> Usage:
    candidate = outcome.candidate
    cost = (
        credits.cost_of(candidate.price, input_tokens=0, output_tokens=0, images=outcome.images)
        if candidate is not None and outcome.images
        else credits.NO_COST
    )
    return Usage(
        provider=candidate.provider if candidate is not None else None,
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        cost=cost,
        estimated=False,
        status=outcome.status,
        error_code=outcome.error_code,
        latency_ms=int((time.perf_counter() - outcome.started) * 1000),
        client_request_id=prepared.client_request_id,
    )


async def _settle(state: AppState, principal: Principal, hold: Hold, usage: Usage) -> Decimal:
    result = await credits.settle(state.pool, hold, usage, actor=principal.actor)
    return result.charged if result is not None else Decimal(0)


async def _settle_after_failure(
    state: AppState, principal: Principal, hold: Hold, prepared: Prepared, outcome: Outcome
) -> None:
    try:
        await _settle(state, principal, hold, _usage(prepared, outcome))
    except Exception:
        # The sweeper releases the hold after the maximum request time; nothing is lost.
        logger.exception("settlement failed for hold %s", hold.id)


async def generate(state: AppState, principal: Principal, prepared: Prepared, hold: Hold) -> Generated:
    """Call the providers in order until one answers, then store, settle and build the client's JSON."""
    outcome = Outcome()
    try:

        async def call(candidate: Candidate) -> dict[str, Any]:
            body = orjson.dumps({**prepared.body, "model": candidate.upstream_id})
            payload, _ = await state.providers[candidate.provider].post_json("/images/generations", body)
            return payload

        try:
            candidate, payload = await routing.first_success(
                state.health, prepared.candidates, call, deadline=prepared.deadline
            )
        except GatewayError as error:
            outcome.status, outcome.error_code = "upstream_error", error.code
            raise
        outcome.candidate = candidate
        reported = payload.get("usage")
        if isinstance(reported, dict):
            outcome.input_tokens = _count(reported.get("input_tokens"))
            outcome.output_tokens = _count(reported.get("output_tokens"))
        try:
            data = await _images(state, principal, prepared, hold, payload, outcome)
        except UpstreamError as error:
            if outcome.status == "success":
                outcome.status, outcome.error_code = "upstream_error", error.code
            raise
        usage = _usage(prepared, outcome)
        charged = await _settle(state, principal, hold, usage)
    except asyncio.CancelledError:
        # The client went away: images already generated are billed, as chat bills delivered tokens.
        outcome.status, outcome.error_code = "client_disconnect", None
        await asyncio.shield(_settle_after_failure(state, principal, hold, prepared, outcome))
        raise
    except BaseException:
        if outcome.status == "success":
            outcome.status, outcome.error_code = "failed", "gateway_error"
        await asyncio.shield(_settle_after_failure(state, principal, hold, prepared, outcome))
        raise
    created = payload.get("created")
    response = {
        **payload,
        "created": created if isinstance(created, int) else int(time.time()),
        "data": data,
        "gateway_usage": {
            "provider": candidate.provider,
            "cost": float(charged),
            "images": outcome.images,
            "image_price": float(candidate.price.image),
            "request_price": float(candidate.price.request),
            "request_ms": usage.latency_ms,
            "estimated": False,
        },
    }
    return Generated(
        body=orjson.dumps(response),
        headers={"X-Gateway-Provider": candidate.provider, "X-Gateway-Cost": f"{charged:f}"},
    )


async def create(
    state: AppState, limited: Limited, raw: bytes, *, client_request_id: str | None
) -> Generated:
    """The whole pipeline for one request: validate, resolve, hold, call, store, settle.

    Images are not counted against token limits; the concurrency slot taken by the rate limiter
    is released here on every path, once the request is settled or refused.
    """
    principal = limited.principal
    assert principal.user_id is not None
    try:
        prepared = await prepare(state, raw, client_request_id=client_request_id)
        hold = await credits.place_hold(
            state.pool,
            user_id=principal.user_id,
            api_key_id=principal.key_id,
            amount=prepared.hold_amount,
            model=prepared.request.model,
            request_type="images",
            ttl_seconds=state.settings.upstream_total_timeout_seconds + HOLD_MARGIN_SECONDS,
        )
        return await generate(state, principal, prepared, hold)
    finally:
        await asyncio.shield(state.limiter.finish(limited.admission))


__all__ = ["Generated", "create"]
