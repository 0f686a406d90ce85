"""Every error is OpenAI's shape, with the request id, and no 500 leaks its cause."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from starlette.types import Message

from src.config import Settings
from src.errors import Conflict
from src.main import create_app
from tests.conftest import asgi_client

SECRET_TEXT = "database password is hunter2 sk-abcdefghijklmnopqrstuvwx"


class Echo(BaseModel):
    model: str
    n: int = Field(1, ge=1, le=128)


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert response.headers["x-request-id"]
    return dict(body["error"])


@pytest.fixture
def settings_overrides() -> dict[str, object]:
    return {"max_body_bytes": 4096}


@pytest.fixture
async def error_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(settings)

    @app.post("/test/echo")
    async def echo(body: Echo) -> Echo:
        return body

    @app.get("/test/boom")
    async def boom() -> None:
        raise RuntimeError(SECRET_TEXT)

    @app.get("/test/conflict")
    async def conflict() -> None:
        raise Conflict("Already there.", param="name")

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        yield client


class TestErrorShapes:
    async def test_invalid_json(self, error_client: httpx.AsyncClient) -> None:
        response = await error_client.post(
            "/test/echo",
            content=b'{"model": "x",',
            headers={"content-type": "application/json"},
        )
        error = assert_openai_error(response, 400)
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "invalid_json"

    async def test_validation_error_names_the_field(self, error_client: httpx.AsyncClient) -> None:
        response = await error_client.post("/test/echo", json={"model": "x", "n": 0})
        error = assert_openai_error(response, 400)
        assert error["param"] == "n"
        missing = await error_client.post("/test/echo", json={"n": 1})
        assert assert_openai_error(missing, 400)["param"] == "model"

    async def test_domain_error(self, error_client: httpx.AsyncClient) -> None:
        error = assert_openai_error(await error_client.get("/test/conflict"), 409)
        assert (error["param"], error["code"]) == ("name", "conflict")

    async def test_unknown_route(self, error_client: httpx.AsyncClient) -> None:
        error = assert_openai_error(await error_client.get("/no/such/route"), 404)
        assert error["code"] == "not_found"

    async def test_wrong_method(self, error_client: httpx.AsyncClient) -> None:
        error = assert_openai_error(await error_client.delete("/test/echo"), 405)
        assert error["code"] == "method_not_allowed"

    async def test_declared_body_too_large(self, error_client: httpx.AsyncClient) -> None:
        response = await error_client.post(
            "/test/echo",
            content=b"x" * 5000,
            headers={"content-type": "application/json"},
        )
        assert assert_openai_error(response, 413)["code"] == "request_too_large"

    async def test_chunked_body_too_large_is_cut_while_reading(self, error_client: httpx.AsyncClient) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"model": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        response = await error_client.post(
            "/test/echo", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        assert assert_openai_error(response, 413)["code"] == "request_too_large"

    async def test_internal_error_leaks_nothing(
        self, error_client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
    ) -> None:
        response = await error_client.get("/test/boom", headers={"x-request-id": "req-boom-1"})
        error = assert_openai_error(response, 500)
        assert error["type"] == "server_error"
        assert "hunter2" not in response.text and "RuntimeError" not in response.text
        assert "Traceback" not in response.text
        assert "req-boom-1" in str(error["message"])
        assert response.headers["x-request-id"] == "req-boom-1"
        # The cause goes to the log, with the request id, and its secret-shaped part redacted.
        logged = capsys.readouterr().err
        assert "req-boom-1" in logged and "RuntimeError" in logged
        assert "sk-abcdefghijklmnopqrstuvwx" not in logged


class TestClientGone:
    async def test_a_client_gone_before_its_body_is_logged_499_not_an_error(
        self, settings: Settings, capsys: pytest.CaptureFixture[str]
    ) -> None:
        app: FastAPI = create_app(settings)
        reached: list[str] = []

        @app.post("/test/read")
        async def read(request: Request) -> dict[str, str]:
            await request.body()
            reached.append("after the body")
            return {}

        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/test/read",
            "raw_path": b"/test/read",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"10")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
        assert sent == [] and reached == []  # nobody to answer, nothing done past the body
        logged = capsys.readouterr().err
        assert '"status":499' in logged
        assert "unhandled error" not in logged and "Traceback" not in logged


class TestRequestId:
    async def test_sane_client_id_is_echoed(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health", headers={"X-Request-ID": "abc-123.DEF:9"})
        assert response.headers["x-request-id"] == "abc-123.DEF:9"

    @pytest.mark.parametrize("bad", ["has space", "x" * 200, "<script>", ""])
    async def test_insane_client_id_is_replaced(self, client: httpx.AsyncClient, bad: str) -> None:
        response = await client.get("/health", headers={"X-Request-ID": bad})
        generated = response.headers["x-request-id"]
        assert generated != bad and len(generated) == 32

    async def test_every_response_gets_one(self, client: httpx.AsyncClient) -> None:
        first = await client.get("/health")
        second = await client.get("/nope")
        assert first.headers["x-request-id"] != second.headers["x-request-id"]
        assert len(second.headers.get_list("x-request-id")) == 1
