"""POST /v1/chat/completions: resolve, hold, call the provider (with failover), settle, respond.

The pipeline of DESIGN.md: the hold is taken before the upstream call and covers the worst case at
the dearest candidate; failover happens only before the first byte reaches the client; every
request is settled exactly once (success, upstream failure, client disconnect, cancelled stream,
shutdown), and the settlement, usage record and ledger row are one statement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar
from uuid import UUID

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError

from src.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamError,
)
from src.schemas.chat import DENIED_FIELDS, GATEWAY_FIELDS, ChatCompletionRequest
from src.security.deps import Limited, Principal
from src.services import credits, routing, tokens
from src.services import history as history_service
from src.services.catalog import Candidate
from src.services.credits import Cost, Hold, Usage
from src.services.providers import (
    ProviderClient,
    UpstreamStream,
    sse_events,
)
from src.services.rate_limit import Admission
from src.state import AppState

logger = logging.getLogger("gatewayz.chat")

RequestT = TypeVar("RequestT", bound=BaseModel)

DONE = b"[DONE]"
# A hold outlives its request's deadline by this much before the sweeper may release it.
HOLD_MARGIN_SECONDS = 120.0


@dataclass
class Prepared:
    """A validated request, its candidates and the upstream body template."""

    request: ChatCompletionRequest
    body: dict[str, Any]
    candidates: list[Candidate]
    prompt_tokens: int
    output_allowance: int
    hold_amount: Decimal
    stream: bool
    client_request_id: str | None
    media_parts: int = 0
    # The whole request's deadline (event-loop time), across every failover attempt.
    deadline: float = 0.0
    # The chat session whose history was injected, and the turns to save with the settlement.
    session: history_service.Pending | None = None


@dataclass
class Outcome:
    """What a finished (or failed) call produced, for settlement."""

    candidate: Candidate | None = None
    usage: dict[str, Any] | None = None
    generated: list[str] = field(default_factory=list)
    status: str = "success"
    error_code: str | None = None
    started: float = field(default_factory=time.perf_counter)
    # Tokens billed (input + output), for the token-limit correction once the request ends.
    tokens: int = 0
    # The first choice's text, kept only for a chat session's history.
    reply: list[str] = field(default_factory=list)


def parse_json_request(raw: bytes, model: type[RequestT]) -> tuple[dict[str, Any], RequestT]:
    """The client's JSON and its validated view as `model`; 400 with `param` for anything invalid.

    Fields that could redirect or re-authenticate the upstream call are refused by name.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_body")
    for name in body:
        if name in DENIED_FIELDS:
            raise InvalidRequest(
                f"'{name}' cannot be set on a gateway request.", param=name, code="field_not_allowed"
            )
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        raise InvalidRequest(
            f"Invalid value for '{param}': {error['msg']}." if param else str(error["msg"]),
            param=param,
            code="invalid_value",
        ) from exc
    return body, request


def parse_body(raw: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """A chat completion request: the client's JSON and its validated view."""
    return parse_json_request(raw, ChatCompletionRequest)


def output_allowance(state: AppState, request: ChatCompletionRequest, candidates: list[Candidate]) -> int:
    """max_completion_tokens or max_tokens, else the dearest candidate's output limit, else the default."""
    if request.output_limit is not None:
        return request.output_limit
    limits = [c.max_output_tokens for c in candidates if c.max_output_tokens]
    return max(limits) if limits else state.settings.default_max_output_tokens


async def prepare(
    state: AppState,
    raw: bytes,
    *,
    client_request_id: str | None,
    history: list[dict[str, Any]] | None = None,
    user_id: UUID | None = None,
    session_id: str | None = None,
) -> Prepared:
    body, request = parse_body(raw)
    candidates = await state.catalog.resolve(request.model, provider=request.pinned_provider)
    if request.pinned_provider is not None and request.allow_fallbacks:
        others = [
            c for c in await state.catalog.resolve(request.model) if c.provider != request.pinned_provider
        ]
        candidates = candidates + others
    allowance = output_allowance(state, request, candidates) * (request.n or 1)
    session = None
    wanted = _session_id(request.session_id, session_id)
    if wanted is not None and user_id is not None and history is None:
        # Before the hold: another user's (or an unknown) session is a 404 that costs nothing.
        session, stored = await history_service.load(
            state.pool, user_id=user_id, session_id=wanted, messages=body["messages"]
        )
        windows = [c.context_length for c in candidates if c.context_length]
        history = await history_service.fit(
            stored,
            body["messages"],
            tools=body.get("tools"),
            context_length=min(windows) if windows else None,
            output_allowance=allowance,
        )
    messages = (history or []) + body["messages"]
    estimate = tokens.estimate_prompt(messages, tools=body.get("tools"))
    hold_amount = credits.worst_case(
        candidates,
        prompt_tokens=estimate.text_tokens,
        media_parts=estimate.media_parts,
        media_allowance=state.settings.media_part_token_allowance,
        output_tokens=allowance,
    )
    upstream = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
    if isinstance(upstream.get("provider"), str):
        del upstream["provider"]
    if history:
        upstream["messages"] = messages
    stream = bool(request.stream)
    if stream:
        # Billing needs the provider's usage, whatever the client asked for.
        options = dict(upstream.get("stream_options") or {})
        options["include_usage"] = True
        upstream["stream_options"] = options
    return Prepared(
        request=request,
        body=upstream,
        candidates=candidates,
        prompt_tokens=estimate.text_tokens,
        output_allowance=allowance,
        hold_amount=hold_amount,
        stream=stream,
        client_request_id=client_request_id,
        media_parts=estimate.media_parts,
        deadline=asyncio.get_running_loop().time() + state.settings.upstream_total_timeout_seconds,
        session=session,
    )


def _session_id(in_body: str | None, in_query: str | None) -> str | None:
    if in_body is not None and in_query is not None and in_body != in_query:
        raise InvalidRequest(
            "The body and the query name different sessions.", param="session_id", code="invalid_value"
        )
    return in_body if in_body is not None else in_query


@dataclass(frozen=True)
class Estimate:
    prepared: Prepared
    likely_cost: Decimal


# A typical answer is far shorter than max_tokens; the likely cost assumes this many per choice.
LIKELY_OUTPUT_TOKENS = 256


async def estimate_cost(state: AppState, raw: bytes) -> Estimate:
    """The hold a request would take and its likely cost, without holding anything or calling a provider."""
    prepared = await prepare(state, raw, client_request_id=None)
    first = prepared.candidates[0]  # the cheapest, unless a provider is pinned: where it goes first
    n = prepared.request.n or 1
    likely = credits.cost_of(
        first.price,
        input_tokens=prepared.prompt_tokens
        + prepared.media_parts * state.settings.media_part_token_allowance,
        output_tokens=min(prepared.output_allowance // n, LIKELY_OUTPUT_TOKENS) * n,
    )
    return Estimate(prepared=prepared, likely_cost=likely.total)


def _client(state: AppState, candidate: Candidate) -> ProviderClient:
    return state.providers[candidate.provider]


def _upstream_body(prepared: Prepared, candidate: Candidate) -> bytes:
    return orjson.dumps({**prepared.body, "model": candidate.upstream_id})


def _sane_usage(usage: Any) -> tuple[int, int] | None:
    """Prompt and completion tokens from a provider's usage, when they are usable numbers."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, bool) or isinstance(completion, bool):
        return None
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        return None
    return prompt, completion


def usage_for(prepared: Prepared, outcome: Outcome) -> Usage:
    candidate = outcome.candidate
    latency_ms = int((time.perf_counter() - outcome.started) * 1000)
    if candidate is None:
        return Usage(
            provider=None,
            input_tokens=0,
            output_tokens=0,
            cost=credits.NO_COST,
            estimated=False,
            status=outcome.status,
            error_code=outcome.error_code,
            latency_ms=latency_ms,
            client_request_id=prepared.client_request_id,
        )
    reported = _sane_usage(outcome.usage)
    if reported is not None:
        input_tokens, output_tokens = reported
        estimated = False
        if output_tokens > prepared.output_allowance:
            # More output than max_tokens x n allows is not a number to bill: cap it, and say so.
            logger.error(
                "absurd usage from %s: %d output tokens for an allowance of %d",
                candidate.provider,
                output_tokens,
                prepared.output_allowance,
            )
            output_tokens = prepared.output_allowance
    else:
        # Billed, so counted with the real tokenizer (`settle_usage` has loaded it), not bounded.
        input_tokens = tokens.count_prompt(prepared.body["messages"], tools=prepared.body.get("tools"))
        output_tokens = tokens.count_text("".join(outcome.generated))
        estimated = True
    cost = credits.cost_of(candidate.price, input_tokens=input_tokens, output_tokens=output_tokens)
    if estimated and cost.total > prepared.hold_amount:
        # An estimate never bills more than the hold; only a provider's own report can.
        cost = credits.capped(cost, prepared.hold_amount)
    return Usage(
        provider=candidate.provider,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=cost,
        estimated=estimated,
        status=outcome.status,
        error_code=outcome.error_code,
        latency_ms=latency_ms,
        client_request_id=prepared.client_request_id,
    )


async def settle_usage(prepared: Prepared, outcome: Outcome) -> Usage:
    """`usage_for`, loading the tokenizer off the event loop first when tokens must be counted."""
    if outcome.candidate is not None and _sane_usage(outcome.usage) is None:
        await tokens.load()
    return usage_for(prepared, outcome)


def gateway_usage(candidate: Candidate, usage: Usage, charged: Decimal) -> dict[str, Any]:
    return {
        "provider": candidate.provider,
        "cost": float(charged),
        "input_cost": float(usage.cost.input_cost),
        "output_cost": float(usage.cost.output_cost),
        "request_ms": usage.latency_ms,
        "estimated": usage.estimated,
    }


async def _settle(
    state: AppState,
    principal: Principal,
    hold: Hold,
    usage: Usage,
    *,
    prepared: Prepared | None = None,
    reply: str | None = None,
) -> Decimal:
    turn = None
    if prepared is not None and prepared.session is not None and reply is not None:
        turn = history_service.exchange(prepared.session, usage, reply=reply, model=prepared.request.model)
    result = await credits.settle(state.pool, hold, usage, actor=principal.actor, history=turn)
    return result.charged if result is not None else Decimal(0)


@dataclass(frozen=True)
class Completion:
    body: bytes
    headers: dict[str, str]
    tokens: int


async def complete(state: AppState, principal: Principal, prepared: Prepared, hold: Hold) -> Completion:
    """A non-streaming call: failover across candidates, settle, and the client's JSON."""
    outcome = Outcome()
    try:

        async def call(candidate: Candidate) -> dict[str, Any]:
            payload, _ = await _client(state, candidate).post_json(
                "/chat/completions", _upstream_body(prepared, candidate)
            )
            return payload

        try:
            candidate, payload = await routing.first_success(
                state.health, prepared.candidates, call, deadline=prepared.deadline
            )
        except GatewayError as error:
            outcome.status, outcome.error_code = "upstream_error", error.code
            raise
        if not isinstance(payload.get("choices"), list) or "error" in payload:
            outcome.status, outcome.error_code = "upstream_error", "upstream_bad_response"
            if _sane_usage(payload.get("usage")) is not None:
                # The provider reports tokens it will bill us for: charge those. Without a
                # report nothing was delivered, so an estimate would bill for nothing.
                outcome.candidate, outcome.usage = candidate, payload.get("usage")
            raise UpstreamError(
                "The upstream provider returned an invalid response.", code="upstream_bad_response"
            )
        outcome.candidate, outcome.usage = candidate, payload.get("usage")
        if _sane_usage(outcome.usage) is None:
            outcome.generated = [_message_text(choice) for choice in payload["choices"]]
        usage = await settle_usage(prepared, outcome)
        charged = await _settle(
            state, principal, hold, usage, prepared=prepared, reply=_reply_text(payload["choices"])
        )
        reported = dict(payload.get("usage") or {}) if isinstance(payload.get("usage"), dict) else {}
        reported.update(
            prompt_tokens=usage.input_tokens,
            completion_tokens=usage.output_tokens,
            total_tokens=usage.input_tokens + usage.output_tokens,
            cost=float(charged),
        )
        payload["usage"] = reported
        payload["model"] = prepared.request.model
        payload["gateway_usage"] = gateway_usage(candidate, usage, charged)
        return Completion(
            body=orjson.dumps(payload),
            headers={"X-Gateway-Provider": candidate.provider, "X-Gateway-Cost": f"{charged:f}"},
            tokens=usage.input_tokens + usage.output_tokens,
        )
    except BaseException:
        if outcome.status == "success":
            outcome.status, outcome.error_code = "failed", outcome.error_code or "gateway_error"
        await asyncio.shield(_settle_after_failure(state, principal, hold, prepared, outcome))
        raise


async def _settle_after_failure(
    state: AppState, principal: Principal, hold: Hold, prepared: Prepared, outcome: Outcome
) -> None:
    try:
        usage = await settle_usage(prepared, outcome)
        outcome.tokens = usage.input_tokens + usage.output_tokens
        # A stream the client left part-way is a turn too: what it received is kept.
        partial = outcome.status == "client_disconnect" and bool(outcome.reply)
        await _settle(
            state,
            principal,
            hold,
            usage,
            prepared=prepared,
            reply="".join(outcome.reply) if partial else None,
        )
    except Exception:
        # The sweeper releases the hold after the maximum request time; nothing is lost.
        logger.exception("settlement failed for hold %s", hold.id)


def _reply_text(choices: list[Any]) -> str:
    """The first choice's message text, as a chat session keeps it."""
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def _message_text(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    message = choice.get("message") or {}
    parts = [message.get("content") or ""] if isinstance(message.get("content"), str) else []
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict):
            function = call.get("function") or {}
            parts.append(str(function.get("name", "")) + str(function.get("arguments", "")))
    return "".join(parts)


@dataclass
class OpenedStream:
    candidate: Candidate
    response: UpstreamStream


async def open_stream(state: AppState, prepared: Prepared, hold: Hold, principal: Principal) -> OpenedStream:
    """Open the upstream stream, failing over until one answers 200 (nothing has reached the client yet)."""
    outcome = Outcome()
    try:

        async def call(candidate: Candidate) -> UpstreamStream:
            return await _client(state, candidate).open_stream(
                "/chat/completions", _upstream_body(prepared, candidate)
            )

        try:
            candidate, response = await routing.first_success(
                state.health, prepared.candidates, call, deadline=prepared.deadline
            )
        except GatewayError as error:
            outcome.status, outcome.error_code = "upstream_error", error.code
            raise
        return OpenedStream(candidate=candidate, response=response)
    except BaseException:
        if outcome.status == "success":
            outcome.status, outcome.error_code = "failed", "gateway_error"
        await asyncio.shield(_settle_after_failure(state, principal, hold, prepared, outcome))
        raise


def _sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def _error_event(message: str, code: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "api_error", "param": None, "code": code}})
    return b"event: error\n" + _sse(body)


async def relay_stream(
    state: AppState,
    principal: Principal,
    prepared: Prepared,
    hold: Hold,
    opened: OpenedStream,
    admission: Admission,
) -> AsyncGenerator[bytes, None]:
    """Forward the upstream's chunks as they arrive, then a usage chunk with the cost, then [DONE].

    Settlement runs in a task of its own when the client goes away, so the cancellation that ends
    this generator cannot cancel the settlement too.
    """
    outcome = Outcome(candidate=opened.candidate)
    response = opened.response
    deadline = prepared.deadline
    last_chunk: dict[str, Any] = {}
    settled = False
    finished = False
    try:
        events = sse_events(response)
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    payload = await anext(events)
            except StopAsyncIteration:
                break
            if payload == DONE:
                finished = True
                break
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                outcome.status, outcome.error_code = "stream_error", "upstream_bad_response"
                break
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                outcome.status, outcome.error_code = "stream_error", "upstream_stream_error"
                break
            if chunk.get("usage"):
                outcome.usage = chunk["usage"]
            choices = chunk.get("choices")
            if not choices:
                # The provider's usage chunk: replaced by the gateway's own, with the cost.
                last_chunk = chunk
                continue
            last_chunk = chunk
            _collect_text(choices, outcome.generated)
            if prepared.session is not None:
                _collect_reply(choices, outcome.reply)
            yield _sse(payload)
        if not finished and outcome.status == "success":
            outcome.status, outcome.error_code = "stream_error", "upstream_stream_truncated"
        if outcome.status != "success":
            await _settle_stream(state, principal, hold, prepared, outcome)
            settled = True
            yield _error_event(
                "The upstream provider failed while streaming.", outcome.error_code or "stream_error"
            )
            return
        usage = await settle_usage(prepared, outcome)
        outcome.tokens = usage.input_tokens + usage.output_tokens
        charged = await _settle(
            state, principal, hold, usage, prepared=prepared, reply="".join(outcome.reply)
        )
        settled = True
        yield _sse(_usage_chunk(prepared, opened.candidate, last_chunk, usage, charged))
        yield _sse(DONE)
    except TimeoutError:
        outcome.status, outcome.error_code = "stream_error", "upstream_timeout"
        if not settled:
            await _settle_stream(state, principal, hold, prepared, outcome)
            settled = True
        yield _error_event("The upstream provider timed out while streaming.", "upstream_timeout")
    except aiohttp.ClientError:
        outcome.status, outcome.error_code = "stream_error", "upstream_stream_truncated"
        if not settled:
            await _settle_stream(state, principal, hold, prepared, outcome)
            settled = True
        yield _error_event("The upstream provider failed while streaming.", "upstream_stream_truncated")
    finally:
        if not settled:
            # The client went away (or the server is shutting down): bill what was generated.
            outcome.status, outcome.error_code = "client_disconnect", None
        state.spawn(_end_stream(state, principal, hold, prepared, outcome, admission, settle=not settled))
        state.spawn(response.aclose())


async def _end_stream(
    state: AppState,
    principal: Principal,
    hold: Hold,
    prepared: Prepared,
    outcome: Outcome,
    admission: Admission,
    *,
    settle: bool,
) -> None:
    """Outlives the request: settle a stream that ended without it, then free its slot."""
    if settle:
        await _settle_after_failure(state, principal, hold, prepared, outcome)
    await state.limiter.finish(admission, actual_tokens=outcome.tokens)


async def _settle_stream(
    state: AppState, principal: Principal, hold: Hold, prepared: Prepared, outcome: Outcome
) -> None:
    await asyncio.shield(_settle_after_failure(state, principal, hold, prepared, outcome))


def _collect_reply(choices: Any, into: list[str]) -> None:
    if not isinstance(choices, list):
        return
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                into.append(content)


def _collect_text(choices: Any, into: list[str]) -> None:
    if not isinstance(choices, list):
        return
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        content = delta.get("content")
        if isinstance(content, str):
            into.append(content)
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                into.append(str(function.get("name") or "") + str(function.get("arguments") or ""))


def _usage_chunk(
    prepared: Prepared, candidate: Candidate, last: dict[str, Any], usage: Usage, charged: Decimal
) -> bytes:
    return orjson.dumps(
        {
            "id": last.get("id", ""),
            "object": "chat.completion.chunk",
            "created": last.get("created", int(time.time())),
            "model": last.get("model", prepared.request.model),
            "choices": [],
            "usage": {
                "prompt_tokens": usage.input_tokens,
                "completion_tokens": usage.output_tokens,
                "total_tokens": usage.input_tokens + usage.output_tokens,
                "cost": float(charged),
            },
            "gateway_usage": gateway_usage(candidate, usage, charged),
        }
    )


@dataclass(frozen=True)
class StreamStart:
    provider: str
    chunks: AsyncIterator[bytes]
    # Called when the response ends; if the stream never started (the client left before the
    # first byte was sent), it settles the request and frees its slot, which the stream would do.
    abandon: Callable[[], None] = lambda: None


async def create(
    state: AppState,
    limited: Limited,
    raw: bytes,
    *,
    client_request_id: str | None,
    session_id: str | None = None,
    request_type: str = "chat",
) -> Completion | StreamStart:
    """The whole pipeline for one request: validate, resolve, tokens limit, hold, call, settle.

    The concurrency slot taken by the rate limiter is released here on every path: at once when
    the request fails before the upstream call, after settlement otherwise (for a stream, when
    the stream ends however it ends).
    """
    principal, admission = limited.principal, limited.admission
    limiter = state.limiter
    assert principal.user_id is not None
    try:
        prepared = await prepare(
            state, raw, client_request_id=client_request_id, user_id=principal.user_id, session_id=session_id
        )
        await limiter.reserve_tokens(admission, prepared.prompt_tokens + prepared.output_allowance)
        hold = await credits.place_hold(
            state.pool,
            user_id=principal.user_id,
            api_key_id=principal.key_id,
            amount=prepared.hold_amount,
            model=prepared.request.model,
            request_type=request_type,  # what the usage record says: "chat", "responses", ...
            ttl_seconds=state.settings.upstream_total_timeout_seconds + HOLD_MARGIN_SECONDS,
        )
        if not prepared.stream:
            completion = await complete(state, principal, prepared, hold)
            await limiter.finish(admission, actual_tokens=completion.tokens)
            return completion
        opened = await open_stream(state, prepared, hold, principal)
    except BaseException:
        # Refused or failed before anything was generated: the slot is free, no tokens were used.
        await asyncio.shield(limiter.finish(admission, actual_tokens=0))
        raise
    started: list[bool] = []

    async def chunks() -> AsyncIterator[bytes]:
        started.append(True)
        relay = relay_stream(state, principal, prepared, hold, opened, admission)
        try:
            async for chunk in relay:
                yield chunk
        finally:
            # Its cleanup only spawns tasks (no await), so it completes even while cancelled.
            await relay.aclose()

    def abandon() -> None:
        if not started:
            started.append(True)
            outcome = Outcome(candidate=opened.candidate, status="client_disconnect")
            state.spawn(_end_stream(state, principal, hold, prepared, outcome, admission, settle=True))
            state.spawn(opened.response.aclose())

    return StreamStart(provider=opened.candidate.provider, chunks=chunks(), abandon=abandon)


__all__ = ["Completion", "Cost", "StreamStart", "create"]
