"""Tests proving each knob of the fake upstream provider works over real HTTP."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakes.upstream import DEFAULT_CONTENT, TINY_PNG, FakeUpstream, Fault, Reply

MODEL = "openai/gpt-4o-mini"
MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},  # 9 characters
    {"role": "user", "content": [{"type": "text", "text": "What is the weather?"}]},  # 20
]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture
def up(server: FakeUpstream) -> Iterator[FakeUpstream]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def http(up: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=up.base_url, timeout=5) as client:
        yield client


@pytest.fixture
def sdk(up: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=up.base_url, api_key="x", max_retries=0, timeout=5) as client:
        yield client


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, **extra}


def sse_payloads(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


# -- lifecycle -----------------------------------------------------------


def test_start_stop_is_fast_and_restart_keeps_the_port() -> None:
    up = FakeUpstream()
    ports = set()
    for _ in range(3):
        began = time.perf_counter()
        up.start()
        ports.add(up.port)
        started = time.perf_counter()
        assert httpx.get(f"{up.base_url}/models").status_code == 200
        stopping = time.perf_counter()
        up.stop()
        assert started - began < 0.5
        assert time.perf_counter() - stopping < 0.5
    assert len(ports) == 1
    assert up.base_url == f"http://127.0.0.1:{up.port}/v1"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{up.base_url}/models")
    up.stop()  # idempotent


def test_stop_cuts_a_request_in_flight_quickly() -> None:
    with FakeUpstream() as up:
        up.set_fault(delay=30)
        errors: list[BaseException] = []

        def call() -> None:
            try:
                httpx.post(f"{up.base_url}/chat/completions", json=chat_body(), timeout=10)
            except httpx.HTTPError as exc:
                errors.append(exc)

        worker = threading.Thread(target=call)
        worker.start()
        assert up.wait_until(lambda: up.in_flight == 1)
        began = time.perf_counter()
        up.stop()
        assert time.perf_counter() - began < 0.5
        worker.join(2)
        assert len(errors) == 1 and isinstance(errors[0], httpx.RemoteProtocolError)
        assert up.disconnects == 0  # the server hung up, not the client


# -- models --------------------------------------------------------------


def test_models_list_has_openai_shape_and_extra_fields(
    up: FakeUpstream, http: httpx.Client, sdk: openai.OpenAI
) -> None:
    body = http.get("/models").json()
    assert body["object"] == "list"
    first = body["data"][0]
    assert {k: first[k] for k in ("id", "object", "owned_by")} == {
        "id": MODEL,
        "object": "model",
        "owned_by": "openai",
    }
    assert isinstance(first["created"], int)
    assert first["pricing"] == {"prompt": "0.000001", "completion": "0.000002", "image": "0", "request": "0"}
    assert first["context_length"] == 128000
    assert first["top_provider"] == {"max_completion_tokens": 16384}
    assert [m.id for m in sdk.models.list()] == [MODEL, "meta-llama/llama-3.1-8b-instruct"]

    up.models.append({"id": "acme/new-model", "context_length": 4096})
    added = http.get("/models/acme/new-model").json()
    assert added["id"] == "acme/new-model" and added["object"] == "model"
    assert "owned_by" in added and "created" in added
    missing = http.get("/models/acme/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


# -- chat completions ----------------------------------------------------


def test_non_stream_reply_with_usage(up: FakeUpstream, sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.content == DEFAULT_CONTENT
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == (9 + 20) // 4
    assert completion.usage.completion_tokens == len(DEFAULT_CONTENT.split())
    assert completion.usage.total_tokens == 7 + 5

    up.set_reply(content="ok", prompt_tokens=1000, completion_tokens=42, model="echo/other")
    completion = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.choices[0].message.content == "ok"
    assert completion.model == "echo/other"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (1000, 42)
    assert completion.usage.total_tokens == 1042


def test_non_stream_raw_shape(http: httpx.Client) -> None:
    response = http.post("/chat/completions", json=chat_body())
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["choices"][0]["logprobs"] is None
    assert body["choices"][0]["message"]["refusal"] is None
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_stream_without_usage(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == DEFAULT_CONTENT
    assert len(chunks) == 1 + len(DEFAULT_CONTENT.split()) + 1
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None and c.choices for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


def test_stream_with_include_usage_and_chunk_count(
    up: FakeUpstream, sdk: openai.OpenAI, http: httpx.Client
) -> None:
    up.reply.chunks = 10
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    content_chunks = [c for c in chunks[1:] if c.choices and c.choices[0].delta.content is not None]
    assert len(content_chunks) == 10
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == DEFAULT_CONTENT
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 10
    assert usage_chunk.usage.prompt_tokens == 7
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])

    raw = http.post("/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert raw.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(raw.text)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["choices"] == []


def test_slow_stream_uses_chunk_delay(up: FakeUpstream, sdk: openai.OpenAI) -> None:
    up.set_reply(chunks=4, chunk_delay=0.05)
    began = time.perf_counter()
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert len(chunks) == 6
    assert time.perf_counter() - began >= 5 * 0.05  # one delay before each frame after the first


def test_tool_call_non_stream(up: FakeUpstream, sdk: openai.OpenAI) -> None:
    up.reply.tool_call = True
    completion = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}

    plain = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)  # no tools: text
    assert plain.choices[0].message.content == DEFAULT_CONTENT


def test_tool_call_stream(up: FakeUpstream, sdk: openai.OpenAI) -> None:
    up.set_reply(tool_call=True, tool_name="lookup", tool_arguments='{"q": "fake upstream"}')
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    head = deltas[0].tool_calls
    assert deltas[0].role == "assistant"
    assert head is not None and head[0].index == 0 and head[0].id is not None
    assert head[0].function is not None and head[0].function.name == "lookup"
    fragments = [
        call.function.arguments
        for d in deltas[1:]
        for call in d.tool_calls or []
        if call.function is not None and call.function.arguments
    ]
    assert len(fragments) == 3
    assert json.loads("".join(fragments)) == {"q": "fake upstream"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- images --------------------------------------------------------------


def test_images_url(http: httpx.Client, sdk: openai.OpenAI) -> None:
    result = sdk.images.generate(prompt="a cat", model="openai/dall-e-3", n=3)
    assert isinstance(result.created, int)
    assert result.data is not None and len(result.data) == 3
    url = result.data[0].url
    assert url is not None and result.data[0].b64_json is None
    image = httpx.get(url)
    assert image.headers["content-type"] == "image/png" and image.content == TINY_PNG


def test_images_b64_json_is_a_png(sdk: openai.OpenAI) -> None:
    result = sdk.images.generate(prompt="a cat", response_format="b64_json")
    assert result.data is not None and len(result.data) == 1
    b64 = result.data[0].b64_json
    assert b64 is not None and result.data[0].url is None
    png = base64.b64decode(b64)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith(b"IEND\xae\x42\x60\x82")


# -- faults --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc_type"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_fault_status_with_openai_error_body(
    up: FakeUpstream,
    http: httpx.Client,
    sdk: openai.OpenAI,
    status: int,
    exc_type: type[openai.APIStatusError],
) -> None:
    up.set_fault(status=status, retry_after=7)
    response = http.post("/chat/completions", json=chat_body(stream=True))
    assert response.status_code == status
    assert response.headers["retry-after"] == "7"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    with pytest.raises(exc_type) as caught:
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert caught.value.status_code == status


def test_fault_status_without_retry_after_and_overrides(up: FakeUpstream, http: httpx.Client) -> None:
    up.set_fault(status=429, error_code="insufficient_quota", error_message="Out of credit.")
    response = http.post("/chat/completions", json=chat_body())
    assert response.status_code == 429
    assert "retry-after" not in response.headers
    assert response.json() == {
        "error": {
            "message": "Out of credit.",
            "type": "requests",
            "param": None,
            "code": "insufficient_quota",
        }
    }


def test_fault_delay_before_headers(up: FakeUpstream, http: httpx.Client) -> None:
    up.set_fault(delay=0.2)
    began = time.perf_counter()
    assert http.post("/chat/completions", json=chat_body()).status_code == 200
    assert time.perf_counter() - began >= 0.2
    with pytest.raises(httpx.ReadTimeout):
        http.post("/chat/completions", json=chat_body(), timeout=0.05)
    assert up.wait_until(lambda: up.disconnects == 1 and up.in_flight == 0)


def test_fault_stream_cut(up: FakeUpstream, sdk: openai.OpenAI, http: httpx.Client) -> None:
    up.set_fault(cut_after=3)
    received: list[str | None] = []
    with pytest.raises(openai.APIConnectionError) as caught:
        for chunk in sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "Hello ", "from "]
    # The SDK bundles its own httpx fork, so match the message, not the class.
    assert "incomplete chunked read" in str(caught.value.__cause__)

    data = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/chat/completions", json=chat_body(stream=True)) as response,
    ):
        for part in response.iter_bytes():
            data += part
    assert data.count(b"data: ") == 3 and b"[DONE]" not in data
    assert up.disconnects == 0


def test_fault_cut_non_stream(up: FakeUpstream, http: httpx.Client) -> None:
    up.set_fault(cut_after=0)
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/chat/completions", json=chat_body())


def test_fault_error_frame(up: FakeUpstream, sdk: openai.OpenAI, http: httpx.Client) -> None:
    up.set_fault(error_frame_after=2)
    received: list[str | None] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "Hello "]
    assert "mid-stream" in caught.value.message

    payloads = sse_payloads(http.post("/chat/completions", json=chat_body(stream=True)).text)
    assert len(payloads) == 3 and "[DONE]" not in payloads
    assert json.loads(payloads[-1])["error"]["type"] == "server_error"

    body = http.post("/chat/completions", json=chat_body()).json()
    assert "error" in body and "choices" not in body


def test_fault_malformed_json(up: FakeUpstream, http: httpx.Client) -> None:
    up.set_fault(malformed_json=True)
    response = http.post("/chat/completions", json=chat_body())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.text.startswith('{"id":')
    with pytest.raises(ValueError):
        response.json()

    payloads = sse_payloads(http.post("/chat/completions", json=chat_body(stream=True)).text)
    json.loads(payloads[0])
    with pytest.raises(ValueError):
        json.loads(payloads[1])
    assert payloads[-1] == "[DONE]"


def test_fault_html(up: FakeUpstream, http: httpx.Client, sdk: openai.OpenAI) -> None:
    up.set_fault(html=True)
    response = http.post("/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.text.startswith("<!DOCTYPE html>")
    # The SDK hands back the raw text when the body is not JSON.
    assert isinstance(sdk.chat.completions.create(model=MODEL, messages=MESSAGES), str)


def test_fault_no_choices(up: FakeUpstream, http: httpx.Client) -> None:
    up.set_fault(no_choices=True)
    body = http.post("/chat/completions", json=chat_body()).json()
    assert "choices" not in body and body["object"] == "chat.completion" and "usage" in body
    payloads = sse_payloads(http.post("/chat/completions", json=chat_body(stream=True)).text)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks and all("choices" not in c for c in chunks)


def test_fault_no_usage(up: FakeUpstream, http: httpx.Client, sdk: openai.OpenAI) -> None:
    up.set_fault(no_usage=True)
    body = http.post("/chat/completions", json=chat_body()).json()
    assert "usage" not in body and body["choices"][0]["message"]["content"] == DEFAULT_CONTENT
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None and c.choices for c in chunks)


def test_fault_fail_first_k_then_succeed(up: FakeUpstream, http: httpx.Client) -> None:
    up.set_fault(status=503, times=2)
    statuses = [http.post("/chat/completions", json=chat_body()).status_code for _ in range(4)]
    assert statuses == [503, 503, 200, 200]
    assert up.faults == []


def test_fault_per_model_and_scope(up: FakeUpstream, http: httpx.Client) -> None:
    up.set_fault(status=500, model="meta-llama/llama-3.1-8b-instruct")
    llama = chat_body(model="meta-llama/llama-3.1-8b-instruct")
    assert http.post("/chat/completions", json=llama).status_code == 500
    assert http.post("/chat/completions", json=chat_body()).status_code == 200
    # A model-specific fault wins over the global one.
    up.set_fault(status=429)
    assert http.post("/chat/completions", json=llama).status_code == 500
    assert http.post("/chat/completions", json=chat_body()).status_code == 429
    up.clear_fault("meta-llama/llama-3.1-8b-instruct")
    assert http.post("/chat/completions", json=llama).status_code == 429

    # Chat-only by default: models and images are untouched.
    assert http.get("/models").status_code == 200
    assert http.post("/images/generations", json={"prompt": "x"}).status_code == 200
    up.clear_faults()
    up.set_fault(status=502, endpoints="all")
    assert http.get("/models").status_code == 502
    assert http.post("/images/generations", json={"prompt": "x"}).status_code == 502
    up.set_fault(Fault(malformed_json=True, endpoints="all"))
    with pytest.raises(ValueError):
        http.get("/models").json()


def test_fault_validation() -> None:
    with pytest.raises(ValueError):
        Fault(status=500, html=True)
    with pytest.raises(ValueError):
        Fault(retry_after=3)
    with pytest.raises(ValueError):
        Fault(status=200)
    with pytest.raises(ValueError):
        Fault(times=0)


# -- recording, reset, counters ------------------------------------------


def test_requests_are_recorded_and_reset_clears(up: FakeUpstream, http: httpx.Client) -> None:
    up.set_fault(status=500, times=1)
    http.post(
        "/chat/completions",
        json=chat_body(user="u1"),
        headers={"Authorization": "Bearer sk-up", "X-Trace-Id": "t-1"},
    )
    http.get("/models?limit=5")
    first, second = up.requests
    assert (first.method, first.path) == ("POST", "/v1/chat/completions")
    assert first.headers["authorization"] == "Bearer sk-up"
    assert first.headers["x-trace-id"] == "t-1"
    assert all(name == name.lower() for name in first.headers)
    assert first.body == chat_body(user="u1")
    assert (second.method, second.path, second.query, second.body) == ("GET", "/v1/models", "limit=5", None)
    assert up.chat_requests == [first] and up.last_request == second

    up.set_fault(status=500)
    up.reply.content = "changed"
    up.models.clear()
    up.reset()
    assert up.requests == [] and up.faults == [] and up.disconnects == 0
    assert up.reply == Reply() and len(up.models) == 2
    assert http.post("/chat/completions", json=chat_body()).status_code == 200


def test_in_flight_and_disconnects(up: FakeUpstream, http: httpx.Client) -> None:
    up.set_reply(chunks=50, chunk_delay=0.02)
    with http.stream("POST", "/chat/completions", json=chat_body(stream=True)) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert up.in_flight == 1
    # Closing the response mid-stream drops the connection; the server notices.
    assert up.wait_until(lambda: up.disconnects == 1 and up.in_flight == 0)

    up.set_reply(chunks=2, chunk_delay=0)
    http.post("/chat/completions", json=chat_body(stream=True)).raise_for_status()
    # The handler finishes just after the client has read the last byte.
    assert up.wait_until(lambda: up.in_flight == 0)
    assert up.disconnects == 1  # a finished stream is not a disconnect


def test_api_key_required_when_configured() -> None:
    with FakeUpstream(api_key="sk-provider", reply=Reply(content="authorised")) as up:
        with (
            openai.OpenAI(base_url=up.base_url, api_key="wrong", max_retries=0) as client,
            pytest.raises(openai.AuthenticationError),
        ):
            client.models.list()
        with openai.OpenAI(base_url=up.base_url, api_key="sk-provider", max_retries=0) as client:
            completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert completion.choices[0].message.content == "authorised"
        assert up.requests[0].headers["authorization"] == "Bearer wrong"


def test_bad_requests_get_openai_errors(http: httpx.Client) -> None:
    response = http.post("/chat/completions", json={"model": MODEL})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert http.post("/nope", json={}).status_code == 404


async def test_serves_while_the_test_loop_is_busy(up: FakeUpstream) -> None:
    up.set_reply(chunks=3)
    async with httpx.AsyncClient(base_url=up.base_url) as client:
        response = await client.post("/chat/completions", json=chat_body())
    assert response.json()["usage"]["completion_tokens"] == 3
    # The server thread answers even while this loop is blocked.
    blocking = httpx.post(f"{up.base_url}/chat/completions", json=chat_body(), timeout=2)
    assert blocking.status_code == 200
    assert await up.wait_until_async(lambda: up.in_flight == 0)
