"""Shared fixtures: a real PostgreSQL per test, the app, an HTTP client, the fake upstream.

The database is `DATABASE_URL` when set (CI points it at the machine's server), else the
embedded PostgreSQL. Each test gets a fresh database cloned from a template migrated once per
session, so concurrency tests can run real transactions against it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi import FastAPI

if TYPE_CHECKING:
    from tests.fakes.live_server import LiveServer
    from tests.fakes.upstream import FakeUpstream

# Captured and removed before anything reads the environment, so every test builds its own settings.
TEST_DATABASE_URL = os.environ.pop("DATABASE_URL", None)
TEST_REDIS_URL = os.environ.pop("REDIS_URL", None)
IN_CI = os.environ.get("CI", "").lower() == "true"
for _name in list(os.environ):
    if _name.startswith(
        (
            "OPENROUTER_",
            "PORTKEY_",
            "FEATHERLESS_",
            "CHUTES_",
            "CUSTOM_PROVIDER_",
            "STRIPE_",
            "RESEND_",
            "PRIVY_",
            "SUPABASE_",
        )
    ) or _name in {
        "APP_ENV",
        "SECRET_KEY",
        "ENCRYPTION_KEYS",
        "ADMIN_API_KEY",
        "VERCEL",
        "RAILWAY_ENVIRONMENT",
        "METRICS_TOKEN",
    }:
        os.environ.pop(_name)
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="gatewayz-tests-"))
os.environ["GATEWAY_DATA_DIR"] = str(_SESSION_DIR / "default")

from src import db_config  # noqa: E402
from src.config import Settings  # noqa: E402
from src.main import create_app  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]
TEST_SECRET_KEY = "test-secret-key-" + "s" * 40
TEST_ADMIN_KEY = "gw_admin_test_" + "a" * 40
TEST_FERNET_KEY = Fernet.generate_key().decode()


def _admin_dsn() -> str:
    if TEST_DATABASE_URL:
        return TEST_DATABASE_URL
    data_dir = REPO_ROOT / ".gatewayz" / "test-postgres"
    return db_config.start_embedded_server(data_dir)


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    """A DSN on the test server with the right to create databases."""
    return _admin_dsn()


async def _drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template_database(pg_admin_dsn: str) -> AsyncIterator[str]:
    name = f"gwt_{RUN_ID}_template"
    dsn = await db_config.ensure_database(pg_admin_dsn, name)
    await db_config.migrate(dsn)
    yield name
    await _drop_database(pg_admin_dsn, name)


_counter = iter(range(1_000_000))


async def create_test_database(pg_admin_dsn: str, template: str) -> tuple[str, str]:
    name = f"gwt_{RUN_ID}_{next(_counter)}"
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()
    return name, db_config.with_database(pg_admin_dsn, name)


class _Dropper:
    """Drops finished tests' databases in the background, so no test waits for it."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.pending: set[asyncio.Task[None]] = set()

    def drop(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(_drop_database(self.admin_dsn, name))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def wait(self) -> None:
        await asyncio.gather(*self.pending, return_exceptions=True)


@pytest.fixture(scope="session")
async def _dropper(pg_admin_dsn: str) -> AsyncIterator[_Dropper]:
    dropper = _Dropper(pg_admin_dsn)
    yield dropper
    await dropper.wait()


@pytest.fixture
async def database_url(pg_admin_dsn: str, template_database: str, _dropper: _Dropper) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone."""
    name, dsn = await create_test_database(pg_admin_dsn, template_database)
    yield dsn
    await _assert_no_key_material_in_audit(dsn)
    _dropper.drop(name)


# Every API key the code generated during the session: none may appear in a log line, an audit
# row or an error body (checked after each test, and over the whole session's log at the end).
CREATED_KEYS: set[str] = set()


async def _assert_no_key_material_in_audit(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        audit = await conn.fetchval("SELECT coalesce(string_agg(a::text, ' '), '') FROM audit_logs a")
        stored = await conn.fetch("SELECT key_hash, key_encrypted FROM api_keys")
    finally:
        await conn.close()
    material = {key for key in CREATED_KEYS} | {row["key_hash"].hex() for row in stored}
    material |= {row["key_encrypted"] for row in stored}
    leaked = [item[:12] for item in material if item in audit]
    assert not leaked, f"key material in audit rows: {leaked}"


@pytest.fixture(scope="session", autouse=True)
def _no_key_in_any_log_line() -> Iterator[None]:
    """Run the session with every record at DEBUG written through the redacting formatter to a file,
    record every generated key, and prove at the end that no key reached the log."""
    from src.logging_config import JsonFormatter
    from src.security import security

    generate = security.generate_key

    def recording(environment: security.Environment = "live") -> str:
        key = generate(environment)
        CREATED_KEYS.add(key)
        return key

    security.generate_key = recording  # type: ignore[assignment]
    log_path = _SESSION_DIR / "session.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield
    logging.getLogger().removeHandler(handler)
    handler.close()
    security.generate_key = generate  # type: ignore[assignment]
    text = log_path.read_text()
    leaked = [key[:12] for key in CREATED_KEYS if key in text]
    assert not leaked, f"{len(leaked)} API keys appear in the session log: {leaked[:5]}"


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's database, for arranging and asserting."""
    conn = await asyncpg.connect(database_url)
    await db_config.init_connection(conn)
    yield conn
    await conn.close()


def make_settings(database_url: str | None, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "_env_file": None,
        "app_env": "development",
        "database_url": database_url,
        "gateway_data_dir": data_dir,
        "secret_key": TEST_SECRET_KEY,
        "encryption_keys": TEST_FERNET_KEY,
        "admin_api_key": TEST_ADMIN_KEY,
        "redis_url": None,
        "log_level": "DEBUG",
        "database_pool_min_size": 1,
        "database_pool_max_size": 20,
        # Far above what functional tests send, so a 402 test never turns into a 429; the limit
        # tests set their own.
        "default_rpm": 100_000,
        "default_rpd": 10_000_000,
        "default_tpm": 10**12,
        "default_tpd": 10**13,
        "default_concurrency": 10_000,
        "auth_failure_limit_per_minute": 100_000,
        "public_rpm_per_ip": 100_000,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module (or with indirect parametrisation) to change the app's settings."""
    return {}


@pytest.fixture
def settings(database_url: str, tmp_path: Path, settings_overrides: dict[str, Any]) -> Settings:
    return make_settings(database_url, tmp_path / "data", **settings_overrides)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running (pool, Redis, HTTP client)."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


async def _no_key_in_error_body(response: httpx.Response) -> None:
    if response.status_code >= 400:
        await response.aread()
        leaked = [key for key in CREATED_KEYS if key in response.text]
        assert not leaked, f"an error body contains an API key: {response.request.url}"


def asgi_client(application: FastAPI, **kwargs: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
    hooks = kwargs.pop("event_hooks", {})
    hooks.setdefault("response", []).append(_no_key_in_error_body)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", event_hooks=hooks, **kwargs)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as http:
        yield http


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    from tests.fakes.upstream import FakeUpstream

    with FakeUpstream() as server:
        yield server


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake OpenAI-compatible provider, with faults and records cleared for this test."""
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


@pytest.fixture
def redis_url() -> str:
    """The real Redis for tests whose subject is Redis; skipped only outside CI when unset."""
    if not TEST_REDIS_URL:
        if IN_CI:
            pytest.fail("REDIS_URL must be set in CI")
        pytest.skip("REDIS_URL is not set")
    return TEST_REDIS_URL


@pytest.fixture
def gateway_settings(settings: Settings, upstream_server: FakeUpstream) -> Settings:
    """Settings whose only provider is the fake upstream (as the custom provider named 'fake')."""
    return settings.model_copy(
        update={"custom_provider_base_url": upstream_server.base_url, "custom_provider_name": "fake"}
    )


@pytest.fixture
async def live_gateway(gateway_settings: Settings, upstream: FakeUpstream) -> AsyncIterator[LiveServer]:
    """The gateway on a real socket (uvicorn in its own thread), talking to the fake upstream."""
    from tests.fakes.live_server import LiveServer

    server = LiveServer(create_app(gateway_settings))
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
