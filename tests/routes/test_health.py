"""Public service routes: root, liveness, readiness, ping and the OpenAPI page."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx

from src.main import create_app
from tests.conftest import asgi_client, make_settings
from tests.fakes.tcp_proxy import proxy_for_dsn


class TestRoot:
    async def test_root_names_the_service(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/")
        assert response.status_code == 200
        body = response.json()
        assert body["name"] == "Gatewayz Universal Inference API"
        assert body["version"] == "2.0.1"
        assert body["docs"] == "/docs"

    async def test_openapi_and_docs(self, client: httpx.AsyncClient) -> None:
        spec = (await client.get("/openapi.json")).json()
        assert spec["info"]["title"] == "Gatewayz Universal Inference API"
        assert spec["info"]["version"] == "2.0.1"
        docs = await client.get("/docs")
        assert docs.status_code == 200
        assert "swagger" in docs.text.lower()


class TestHealth:
    async def test_liveness(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    async def test_ready_when_database_answers(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health/ready")
        assert response.status_code == 200
        assert response.json()["checks"] == {"database": "ok", "redis": "disabled"}

    async def test_database_down_makes_ready_503_but_health_200(
        self, database_url: str, tmp_path: Path
    ) -> None:
        proxy, proxied_dsn = proxy_for_dsn(database_url)
        try:
            app = create_app(make_settings(proxied_dsn, tmp_path))
            async with app.router.lifespan_context(app), asgi_client(app) as client:
                assert (await client.get("/health/ready")).status_code == 200
                proxy.cut()
                response = await client.get("/health/ready")
                assert response.status_code == 503
                body = response.json()
                assert body["checks"]["database"] == "unavailable"
                assert body["error"]["code"] == "not_ready"
                assert set(body["error"]) == {"message", "type", "param", "code"}
                assert (await client.get("/health")).status_code == 200
                proxy.restore()
                for _ in range(20):
                    if (await client.get("/health/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("readiness did not recover after the database came back")
        finally:
            proxy.stop()


class TestPing:
    async def test_ping_counts(self, client: httpx.AsyncClient) -> None:
        first = (await client.get("/ping")).json()
        second = (await client.get("/ping")).json()
        assert first["message"] == "pong"
        assert (first["total_pings"], second["total_pings"]) == (1, 2)
        assert second["last_ping_at"] >= first["last_ping_at"]

    async def test_ping_is_atomic_under_50_concurrent_calls(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        responses = await asyncio.gather(*(client.get("/ping") for _ in range(50)))
        assert all(r.status_code == 200 for r in responses)
        counts = sorted(r.json()["total_pings"] for r in responses)
        assert counts == list(range(1, 51))
        assert await db.fetchval("SELECT total_pings FROM ping_stats") == 50
