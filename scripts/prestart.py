"""Run once before the server's workers start: check settings, start the database, migrate."""

from __future__ import annotations

import asyncio
import sys

from pydantic import ValidationError

from src import db_config
from src.config import Settings, get_settings


async def prepare(settings: Settings) -> None:
    database_url = await db_config.resolve_database_url(settings)
    applied = await db_config.migrate(database_url)
    where = (
        "embedded PostgreSQL in " + str(db_config.embedded_server_dir(settings))
        if settings.uses_embedded_database
        else "DATABASE_URL"
    )
    print(
        f"gatewayz: database ready ({where}); {len(applied)} migration(s) applied",
        file=sys.stderr,
    )
    if settings.generates_secrets:
        print(
            f"gatewayz: development secrets are in {settings.gateway_data_dir / 'secrets.json'}"
            " (ADMIN_API_KEY is the operator's admin key)",
            file=sys.stderr,
        )


def main() -> int:
    try:
        settings = get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            print(f"gatewayz: configuration error: {error['msg']}", file=sys.stderr)
        return 2
    asyncio.run(prepare(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
