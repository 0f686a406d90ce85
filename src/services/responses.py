"""POST /v1/responses, served by translating to a chat completion and back.

The request becomes a chat body that runs through the chat pipeline itself (`chat.create`), so
authentication, limits, the hold, failover and settlement are the ones chat has; only the usage
record's request_type says "responses". The chat answer is translated back into a Response object,
or, for a stream, the chat chunks into the Responses event stream:

    response.created, response.in_progress,
    per output item: response.output_item.added,
        message: response.content_part.added, response.output_text.delta..., response.output_text.done,
                 response.content_part.done
        function_call: response.function_call_arguments.delta..., response.function_call_arguments.done
    response.output_item.done,
    response.completed (or response.incomplete when max_output_tokens cut the answer)

An upstream failure after the stream started ends it with response.failed, never response.completed.

Request fields: `input`, `instructions`, `max_output_tokens`, `tools`, `tool_choice`, `text`
(format, verbosity) and `reasoning.effort` are translated; `temperature`, `top_p`, `user`,
`safety_identifier`, `prompt_cache_key`, `service_tier` and `parallel_tool_calls` (with tools) are
forwarded as they are; `metadata` is echoed and not forwarded; `store`, `include`, `truncation`,
`stream_options`, `max_tool_calls` and `top_logprobs` are accepted and not used. Fields the Responses
API does not define go on to the provider as chat fields do (the chat deny-list applies), except the
chat fields the translation owns (`messages`, `max_tokens`, ...), which answer 400 naming their
Responses counterpart. Stored state (`previous_response_id`, `conversation`, `prompt`, background
responses) answers 400: the gateway keeps no response objects.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from src.errors import InvalidRequest
from src.schemas.chat import DENIED_FIELDS
from src.schemas.responses import (
    CHAT_ONLY_FIELDS,
    STATEFUL_FIELDS,
    AssistantMessage,
    FunctionCall,
    FunctionCallOutput,
    InputFile,
    InputImage,
    InputText,
    OutputText,
    Refusal,
    ResponsesRequest,
    SystemMessage,
    UserMessage,
    error_param,
)
from src.security.deps import Limited
from src.services import chat as chat_service
from src.state import AppState

REQUEST_TYPE = "responses"
# Forwarded to the chat body untouched when the client set them.
FORWARDED = ("temperature", "top_p", "user", "safety_identifier", "prompt_cache_key", "service_tier")


@dataclass(frozen=True)
class Translated:
    """The chat body to run, and what the Response object echoes from the request."""

    chat_body: dict[str, Any]
    echo: dict[str, Any]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- request ---------------------------------------------------------------------------------------


def parse(raw: bytes) -> Translated:
    """The client's JSON as a chat body; 400 with an OpenAI-style `param` for anything invalid."""
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
        if name in STATEFUL_FIELDS and body[name] is not None:
            raise InvalidRequest(STATEFUL_FIELDS[name], param=name, code="unsupported_parameter")
        if name in CHAT_ONLY_FIELDS and body[name] is not None:
            instead = CHAT_ONLY_FIELDS[name]
            hint = f" use '{instead}' instead" if instead else " it has no Responses equivalent"
            raise InvalidRequest(
                f"'{name}' is a Chat Completions field:{hint}.", param=name, code="unsupported_parameter"
            )
    try:
        request = ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = error_param(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(
            f"Invalid value for '{param}': {message}." if param else message,
            param=param,
            code="invalid_value",
        ) from exc
    return Translated(chat_body=_chat_body(body, request), echo=_echo(body))


def _chat_body(body: dict[str, Any], request: ResponsesRequest) -> dict[str, Any]:
    known = set(ResponsesRequest.model_fields) | set(STATEFUL_FIELDS)
    chat: dict[str, Any] = {k: v for k, v in body.items() if k not in known}
    chat["model"] = request.model
    messages: list[dict[str, Any]] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        messages += _messages(request.input)
    chat["messages"] = messages
    if request.max_output_tokens is not None:
        chat["max_completion_tokens"] = request.max_output_tokens
    for name in FORWARDED:
        if body.get(name) is not None:
            chat[name] = body[name]
    if request.tools:
        chat["tools"] = [_chat_tool(tool) for tool in body["tools"]]
        if request.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = request.parallel_tool_calls
    if isinstance(body.get("tool_choice"), str):
        chat["tool_choice"] = body["tool_choice"]
    elif isinstance(body.get("tool_choice"), dict):
        chat["tool_choice"] = {"type": "function", "function": {"name": body["tool_choice"]["name"]}}
    text = body.get("text") or {}
    if isinstance(text.get("format"), dict):
        chat["response_format"] = _response_format(text["format"])
    if text.get("verbosity") is not None:
        chat["verbosity"] = text["verbosity"]
    if request.reasoning is not None and request.reasoning.effort is not None:
        chat["reasoning_effort"] = request.reasoning.effort
    if request.stream:
        chat["stream"] = True
    return chat


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {
        k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None
    }
    return {"type": "function", "function": function}


def _response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    spec = {k: fmt[k] for k in ("name", "schema", "description", "strict") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": spec}


def _messages(items: list[Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, FunctionCall):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            previous = messages[-1] if messages else None
            # Calls made in one turn (with or after the turn's text) are one assistant message.
            if previous is not None and previous["role"] == "assistant":
                previous.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutput):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _content(item.output)})
        elif isinstance(item, UserMessage | SystemMessage | AssistantMessage):
            messages.append({"role": item.role, "content": _content(item.content)})
    return messages


def _content(content: str | list[Any]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, InputText | OutputText):
            parts.append({"type": "text", "text": part.text})
        elif isinstance(part, Refusal):
            parts.append({"type": "refusal", "refusal": part.refusal})
        elif isinstance(part, InputImage):
            image: dict[str, Any] = {"url": part.image_url}
            if part.detail is not None:
                image["detail"] = part.detail
            parts.append({"type": "image_url", "image_url": image})
        elif isinstance(part, InputFile):
            file = {"file_data": part.file_data}
            if part.filename is not None:
                file["filename"] = part.filename
            parts.append({"type": "file", "file": file})
    return parts


def _echo(body: dict[str, Any]) -> dict[str, Any]:
    """The request's settings as the Response object repeats them."""
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "reasoning": body.get("reasoning"),
        "store": False,
        "temperature": body.get("temperature"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "user": body.get("user"),
        "safety_identifier": body.get("safety_identifier"),
    }


# -- response --------------------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(usage: Any) -> dict[str, Any] | None:
    """Chat usage (with the gateway's cost) in the Responses shape."""
    if not isinstance(usage, dict):
        return None
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = (
        _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
    )
    input_tokens, output_tokens = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
        "cost": usage.get("cost"),
    }


def _incomplete(finish_reason: Any) -> dict[str, str] | None:
    if finish_reason == "length":
        return {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return {"reason": "content_filter"}
    return None


def _response(
    echo: dict[str, Any],
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    incomplete_details: dict[str, str] | None = None,
    gateway_usage: Any = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": incomplete_details,
        "model": model,
        "output": output,
        "output_text": "".join(
            part["text"]
            for item in output
            if item["type"] == "message"
            for part in item["content"]
            if part["type"] == "output_text"
        ),
        "usage": usage,
        **echo,
    }
    if gateway_usage is not None:
        response["gateway_usage"] = gateway_usage
    return response


def _text_of(content: Any) -> str | None:
    if isinstance(content, str) or content is None:
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return None


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _function_call_item(call: Any) -> dict[str, Any] | None:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return None
    function = call["function"]
    return {
        "id": _new_id("fc"),
        "type": "function_call",
        "status": "completed",
        "call_id": call.get("id") if isinstance(call.get("id"), str) else _new_id("call"),
        "name": str(function.get("name") or ""),
        "arguments": str(function.get("arguments") or ""),
    }


def from_completion(echo: dict[str, Any], payload: dict[str, Any], *, model: str) -> dict[str, Any]:
    """A chat completion (already settled, with the gateway's usage) as a Response object."""
    choices = payload.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = _dict(choice.get("message"))
    incomplete = _incomplete(choice.get("finish_reason"))
    calls = [item for call in message.get("tool_calls") or () if (item := _function_call_item(call))]
    text, refusal = _text_of(message.get("content")), message.get("refusal")
    output: list[dict[str, Any]] = []
    if text or isinstance(refusal, str) or not calls:
        content = [_output_text(text or "")] if text or not isinstance(refusal, str) else []
        if isinstance(refusal, str):
            content.append({"type": "refusal", "refusal": refusal})
        output.append(
            {
                "id": _new_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "incomplete" if incomplete else "completed",
                "content": content,
            }
        )
    output += calls
    created = payload.get("created")
    return _response(
        echo,
        response_id=_new_id("resp"),
        created_at=created if isinstance(created, int) else int(time.time()),
        model=model,
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=_usage(payload.get("usage")),
        incomplete_details=incomplete,
        gateway_usage=payload.get("gateway_usage"),
    )


# -- stream ----------------------------------------------------------------------------------------


@dataclass
class _Stream:
    """The Responses event stream built from the chat chunks of one stream."""

    echo: dict[str, Any]
    model: str
    response_id: str = field(default_factory=lambda: _new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    sequence: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)
    message: dict[str, Any] | None = None  # the message item receiving text, while open
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)  # chat tool index -> open item
    finish_reason: Any = None
    usage: Any = None
    gateway_usage: Any = None

    def event(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        return _response(
            self.echo,
            response_id=self.response_id,
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=[dict(item) for item in self.output],
            **extra,
        )

    def start(self) -> list[bytes]:
        response = self.snapshot("in_progress")
        return [
            self.event("response.created", response=response),
            self.event("response.in_progress", response=response),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        if isinstance(chunk.get("usage"), dict) and "cost" in chunk["usage"]:
            self.usage, self.gateway_usage = chunk["usage"], chunk.get("gateway_usage")
        events: list[bytes] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if isinstance(content, str) and content:
                events += self._text(content)
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    events += self._call(call)
        return events

    def _open_message(self) -> list[bytes]:
        item: dict[str, Any] = {
            "id": _new_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        self.message, index = item, len(self.output)
        self.output.append(item)
        part = _output_text("")
        item["content"] = [part]
        return [
            self.event("response.output_item.added", output_index=index, item={**item, "content": []}),
            self.event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
        ]

    def _text(self, delta: str) -> list[bytes]:
        events = self._open_message() if self.message is None else []
        assert self.message is not None
        self.message["content"][0]["text"] += delta
        events.append(
            self.event(
                "response.output_text.delta",
                item_id=self.message["id"],
                output_index=self.output.index(self.message),
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return events

    def _close_message(self, status: str) -> list[bytes]:
        item, self.message = self.message, None
        if item is None:
            return []
        index, part = self.output.index(item), item["content"][0]
        item["status"] = status
        return [
            self.event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            ),
            self.event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def _call(self, call: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        index = call.get("index", 0)
        function = _dict(call.get("function"))
        item = self.calls.get(index)
        if item is None:
            # Items follow each other: the text before a tool call is finished when the call begins.
            events += self._close_message("completed")
            item = {
                "id": _new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": call.get("id") if isinstance(call.get("id"), str) else _new_id("call"),
                "name": str(function.get("name") or ""),
                "arguments": "",
            }
            self.calls[index] = item
            self.output.append(item)
            events.append(
                self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)
            )
        elif function.get("name") and not item["name"]:
            item["name"] = str(function["name"])
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item["arguments"] += arguments
            events.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.output.index(item),
                    delta=arguments,
                )
            )
        return events

    def finish(self) -> list[bytes]:
        incomplete = _incomplete(self.finish_reason)
        events: list[bytes] = []
        if not self.output:
            events += self._open_message()  # an empty answer is still one (empty) message
        events += self._close_message("incomplete" if incomplete else "completed")
        for item in self.calls.values():
            index = self.output.index(item)
            item["status"] = "completed"
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
            events.append(self.event("response.output_item.done", output_index=index, item=item))
        self.calls = {}
        status = "incomplete" if incomplete else "completed"
        response = self.snapshot(
            status,
            usage=_usage(self.usage),
            incomplete_details=incomplete,
            gateway_usage=self.gateway_usage,
        )
        events.append(self.event(f"response.{status}", response=response))
        return events

    def failed(self, error: Any) -> bytes:
        detail = error if isinstance(error, dict) else {}
        for item in self.output:
            if item["status"] == "in_progress":
                item["status"] = "incomplete"
        response = self.snapshot(
            "failed",
            error={
                "code": detail.get("code") or "upstream_error",
                "message": detail.get("message") or "The upstream provider failed while streaming.",
            },
        )
        return self.event("response.failed", response=response)


def _chat_frame(frame: bytes) -> tuple[str, Any]:
    """One SSE event of the chat relay: ("chunk", dict), ("done", None) or ("error", error dict)."""
    kind, data = "message", b""
    for line in frame.splitlines():
        if line.startswith(b"event:"):
            kind = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data += line[5:].strip()
    if data == chat_service.DONE:
        return "done", None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "error", None
    if kind == "error" or (isinstance(payload, dict) and "error" in payload):
        return "error", payload.get("error") if isinstance(payload, dict) else None
    return "chunk", payload if isinstance(payload, dict) else {}


async def _events(stream: _Stream, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Translate the chat relay's frames; closing this closes the relay, which settles the request."""
    try:
        # Started before anything is sent, so a client leaving at any point reaches the relay's own
        # clean-up (settlement and the rate limiter's slot) when this generator is closed.
        first = await anext(chunks, None)
        for event in stream.start():
            yield event
        frame = first
        while frame is not None:
            kind, payload = _chat_frame(frame)
            if kind == "done":
                for event in stream.finish():
                    yield event
                return
            if kind == "error":
                yield stream.failed(payload)
                return
            for event in stream.chunk(payload):
                yield event
            frame = await anext(chunks, None)
        yield stream.failed({"code": "upstream_stream_truncated"})
    finally:
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()


# -- pipeline --------------------------------------------------------------------------------------


async def create(
    state: AppState, limited: Limited, raw: bytes, *, client_request_id: str | None
) -> chat_service.Completion | chat_service.StreamStart:
    """Translate, run the chat pipeline (limits, hold, call, settle), translate the answer back."""
    try:
        translated = parse(raw)
    except BaseException:
        # Refused before the chat pipeline took the request: free its rate-limit slot here.
        await asyncio.shield(state.limiter.finish(limited.admission, actual_tokens=0))
        raise
    model = translated.chat_body["model"]
    result = await chat_service.create(
        state,
        limited,
        orjson.dumps(translated.chat_body),
        client_request_id=client_request_id,
        request_type=REQUEST_TYPE,
    )
    if isinstance(result, chat_service.StreamStart):
        stream = _Stream(echo=translated.echo, model=model)
        return chat_service.StreamStart(
            provider=result.provider, chunks=_events(stream, result.chunks), abandon=result.abandon
        )
    response = from_completion(translated.echo, orjson.loads(result.body), model=model)
    return chat_service.Completion(body=orjson.dumps(response), headers=result.headers, tokens=result.tokens)
