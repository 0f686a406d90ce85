"""The provider client: SSE parsing, upstream status mapping, and keys kept out of reprs and messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from pydantic import SecretStr

from src.services import providers
from src.services.providers import (
    ProviderAuthError,
    ProviderBadRequest,
    ProviderBadResponse,
    ProviderClient,
    ProviderProfile,
    ProviderRateLimited,
    ProviderServerError,
    ProviderTimeout,
    Timeouts,
    sse_events,
)
from tests.conftest import make_settings
from tests.fakes.upstream import FakeUpstream

UPSTREAM_SECRET = "sk-upstream-secret-0123456789abcdef"

# An SSE stream as providers send it: comments, keep-alives, CRLF, no space after "data:",
# a two-line data field, fields other than data, and multi-byte UTF-8.
STREAM = (
    b": OPENROUTER PROCESSING\n\n"
    b'data: {"text":"h\xc3\xa9llo \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x9a\x80"}\n\n'
    b":\n\n"
    b"\n\n\n"
    b'data:{"no":"space"}\r\n\r\n'
    b"data: line one\ndata: line two\n\n"
    b': keep-alive\nevent: message\nid: 7\nretry: 1000\ndata: {"x":1}\n\n'
    b"data: [DONE]\n\n"
)
EXPECTED = [
    '{"text":"héllo 日本 🚀"}'.encode(),
    b'{"no":"space"}',
    b"line one\nline two",
    b'{"x":1}',
    b"[DONE]",
]


class ByteChunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


async def parse(chunks: list[bytes]) -> list[bytes]:
    response = httpx.Response(200, stream=ByteChunks(chunks))
    return [event async for event in sse_events(response)]


class TestSseEvents:
    async def test_whole_stream(self) -> None:
        assert await parse([STREAM]) == EXPECTED

    async def test_one_byte_at_a_time(self) -> None:
        assert await parse([bytes([b]) for b in STREAM]) == EXPECTED

    async def test_every_split_point(self) -> None:
        # Includes cuts inside each multi-byte character, inside "data:", and between \r and \n.
        rocket = STREAM.index(b"\xf0\x9f\x9a\x80")
        cuts = range(1, len(STREAM))
        assert {rocket + 1, rocket + 2, STREAM.index(b"data:") + 2} <= set(cuts)
        for cut in cuts:
            assert await parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED, cut

    async def test_three_awkward_pieces(self) -> None:
        first = STREAM.index(b"\xe6\x97\xa5") + 1  # inside the first CJK character
        second = STREAM.index(b"data: line two") + 3  # inside the second "data:" of one event
        pieces = [STREAM[:first], STREAM[first:second], STREAM[second:]]
        assert await parse(pieces) == EXPECTED
        assert [orjson.loads(e) for e in (await parse(pieces))[:2]] == [
            {"text": "héllo 日本 🚀"},
            {"no": "space"},
        ]

    async def test_only_comments_and_keep_alives(self) -> None:
        assert await parse([b": ping\n\n", b"\n\n", b":\r\n\r\n"]) == []

    async def test_last_event_without_a_blank_line(self) -> None:
        assert await parse([b'data: {"a":1}\n\ndata: {"b":2}\n']) == [b'{"a":1}', b'{"b":2}']


def upstream_response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=orjson.dumps(body) if body is not None else b"", headers=headers)


class TestErrorForStatus:
    @pytest.mark.parametrize(
        ("status", "kind", "retryable"),
        [
            (400, ProviderBadRequest, False),
            (404, ProviderBadRequest, False),
            (401, ProviderAuthError, True),
            (403, ProviderAuthError, True),
            (408, ProviderTimeout, True),
            (429, ProviderRateLimited, True),
            (500, ProviderServerError, True),
            (503, ProviderServerError, True),
        ],
    )
    def test_status_maps_to_its_error(self, status: int, kind: type[Exception], retryable: bool) -> None:
        response = upstream_response(status)
        error = providers.error_for_status("fake", response, response.content)
        assert type(error) is kind
        assert error.retryable is retryable
        assert error.status_code == {400: 400, 404: 400, 408: 504, 429: 429}.get(status, 502)

    @pytest.mark.parametrize(
        ("header", "seconds"),
        [
            ("7", 7.0),
            ("1.5", 1.5),
            ("-3", 0.0),
            ("86400000", 3600.0),
            ("Wed, 21 Oct 2026 07:28:00 GMT", None),
        ],
    )
    def test_retry_after_is_read_and_capped(self, header: str, seconds: float | None) -> None:
        response = upstream_response(429, headers={"retry-after": header})
        assert providers.error_for_status("fake", response, b"").retry_after == seconds

    def test_upstream_400_message_is_kept_without_credentials(self) -> None:
        body = {
            "error": {
                "message": f"Unsupported value for 'seed' (key {UPSTREAM_SECRET}, Bearer abc.def.ghi)",
                "type": "invalid_request_error",
            }
        }
        response = upstream_response(400, body)
        error = providers.error_for_status("fake", response, response.content)
        assert "Unsupported value for 'seed'" in error.message
        assert UPSTREAM_SECRET not in error.message
        assert "abc.def.ghi" not in error.message

    def test_upstream_401_message_is_never_passed_on(self) -> None:
        body = {"error": {"message": "Incorrect API key provided: sk-proj-AAAA****ZZZZ"}}
        response = upstream_response(401, body)
        error = providers.error_for_status("fake", response, response.content)
        assert "sk-proj" not in error.message and "Incorrect API key" not in error.message


class TestProfiles:
    def test_upstream_key_is_not_in_the_profile_repr(self, tmp_path: Any) -> None:
        settings = make_settings(
            None,
            tmp_path,
            custom_provider_base_url="http://127.0.0.1:9/v1/",
            custom_provider_name="fake",
            custom_provider_api_key=SecretStr(UPSTREAM_SECRET),
        )
        profile = providers.build_profiles(settings)["fake"]
        assert profile.base_url == "http://127.0.0.1:9/v1"
        assert profile.request_headers()["authorization"] == f"Bearer {UPSTREAM_SECRET}"
        assert UPSTREAM_SECRET not in repr(profile)


@pytest.fixture
async def client(upstream: FakeUpstream) -> AsyncIterator[ProviderClient]:
    profile = ProviderProfile(
        name="fake", display_name="Fake", base_url=upstream.base_url, api_key=UPSTREAM_SECRET
    )
    async with aiohttp.ClientSession() as http:
        yield ProviderClient(profile, http, Timeouts(connect=1.0, first_byte=0.3, total=2.0))


BODY = orjson.dumps({"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
STREAM_BODY = orjson.dumps({**orjson.loads(BODY), "stream": True})


class TestProviderClient:
    async def test_sends_the_upstream_key(self, client: ProviderClient, upstream: FakeUpstream) -> None:
        upstream.api_key = UPSTREAM_SECRET
        payload, seconds = await client.post_json("/chat/completions", BODY)
        assert payload["choices"][0]["message"]["content"]
        assert seconds >= 0
        assert upstream.last_request.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"

    async def test_html_instead_of_a_stream_is_a_bad_response(
        self, client: ProviderClient, upstream: FakeUpstream
    ) -> None:
        upstream.set_fault(html=True)
        with pytest.raises(ProviderBadResponse):
            await client.open_stream("/chat/completions", STREAM_BODY)

    async def test_no_first_byte_in_time_is_a_timeout(
        self, client: ProviderClient, upstream: FakeUpstream
    ) -> None:
        upstream.set_fault(delay=2.0)
        with pytest.raises(ProviderTimeout):
            await client.open_stream("/chat/completions", STREAM_BODY)
        with pytest.raises(ProviderTimeout):
            await client.post_json("/chat/completions", BODY)

    async def test_stream_error_status_is_mapped_before_any_byte(
        self, client: ProviderClient, upstream: FakeUpstream
    ) -> None:
        upstream.set_fault(status=503, retry_after=4)
        with pytest.raises(ProviderServerError) as caught:
            await client.open_stream("/chat/completions", STREAM_BODY)
        assert caught.value.retry_after == 4.0
