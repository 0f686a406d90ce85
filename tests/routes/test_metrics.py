"""/metrics: Prometheus text that the official parser reads, guarded like an admin route (or by
METRICS_TOKEN), whose counters move with the requests a test sends; and several worker processes
adding up in multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TEST_ADMIN_KEY
from tests.factories import create_user
from tests.fakes.upstream import FakeUpstream

METRICS_TOKEN = "metrics-token-for-tests-0123456789abcdef"
BODY = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}
Sample = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture
def settings_overrides(upstream: FakeUpstream) -> dict[str, Any]:
    return {
        "custom_provider_base_url": upstream.base_url,
        "custom_provider_name": "fake",
        "metrics_token": METRICS_TOKEN,
        "default_rpm": 4,
    }


def parse(text: str) -> dict[Sample, float]:
    values: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def scrape(client: httpx.AsyncClient) -> dict[Sample, float]:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def delta(after: dict[Sample, float], before: dict[Sample, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_counters_move_with_the_requests_sent(app: FastAPI, client: httpx.AsyncClient) -> None:
    user = await create_user(app, credits="10")
    before = await scrape(client)
    for _ in range(3):
        answer = await client.post("/v1/chat/completions", headers=user.headers, json=BODY)
        assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    after = await scrape(client)

    route = {"route": "/v1/chat/completions", "method": "POST"}
    assert delta(after, before, "gatewayz_http_requests_total", **route, status="200") == 3
    assert delta(after, before, "gatewayz_http_request_duration_seconds_count", route=route["route"]) == 3
    assert delta(after, before, "gatewayz_tokens_total", direction="input") == 3 * usage["prompt_tokens"]
    assert delta(after, before, "gatewayz_tokens_total", direction="output") == 3 * usage["completion_tokens"]
    assert delta(after, before, "gatewayz_credits_charged_total") == pytest.approx(3 * float(usage["cost"]))
    assert (
        delta(after, before, "gatewayz_upstream_duration_seconds_count", provider="fake", outcome="success")
        == 3
    )
    assert after[("gatewayz_open_holds", ())] == 0
    assert after[("gatewayz_provider_breaker_state", (("provider", "fake"),))] == 0
    assert ("gatewayz_notification_outbox_depth", ()) in after
    # Paths are counted by their route template, never by raw path.
    await client.get("/user/api-keys/123e4567-e89b-12d3-a456-426614174000", headers=user.headers)
    templated = await scrape(client)
    assert (
        delta(
            templated,
            after,
            "gatewayz_http_requests_total",
            route="/user/api-keys/{key_id}",
            method="GET",
            status="404",
        )
        == 1
    )


async def test_rate_limit_rejections_are_counted(app: FastAPI, client: httpx.AsyncClient) -> None:
    user = await create_user(app, credits="10")
    before = await scrape(client)
    statuses = [
        (await client.post("/v1/chat/completions", headers=user.headers, json=BODY)).status_code
        for _ in range(6)
    ]
    assert statuses.count(429) == 2
    after = await scrape(client)
    refused = sum(
        value - before.get(key, 0.0)
        for key, value in after.items()
        if key[0] == "gatewayz_rate_limit_rejections_total"
    )
    assert refused == 2
    assert (
        delta(
            after,
            before,
            "gatewayz_http_requests_total",
            route="/v1/chat/completions",
            method="POST",
            status="429",
        )
        == 2
    )


async def test_access_needs_the_token_or_an_admin(app: FastAPI, client: httpx.AsyncClient) -> None:
    user = await create_user(app)
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong-token"})).status_code == 401
    assert (await client.get("/metrics", headers=user.headers)).status_code == 403
    operator = await client.get("/metrics", headers={"Authorization": f"Bearer {TEST_ADMIN_KEY}"})
    assert operator.status_code == 200
    parse(operator.text)


WORKER = """
from src.services import metrics
metrics.HTTP_REQUESTS.labels("/v1/chat/completions", "POST", "200").inc({n})
metrics.TOKENS.labels("input").inc(10 * {n})
"""


def test_several_workers_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[2]
    for n in (2, 5):
        subprocess.run([sys.executable, "-c", WORKER.format(n=n)], env=env, cwd=root, check=True)
    rendered = subprocess.run(
        [sys.executable, "-c", "from src.services import metrics; print(metrics.render({}).decode())"],
        env=env,
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    values = parse(rendered)
    key = (
        "gatewayz_http_requests_total",
        (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200")),
    )
    assert values[key] == 7
    assert values[("gatewayz_tokens_total", (("direction", "input"),))] == 70
