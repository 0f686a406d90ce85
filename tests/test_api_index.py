"""Vercel's entry point imports and serves."""

from __future__ import annotations

import httpx


async def test_api_index_serves_health() -> None:
    from api.index import app

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://vercel") as client:
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"]
