"""Re-encrypt every stored API key under the newest ENCRYPTION_KEYS key.

`python -m scripts.rotate_encryption_keys`. Rotation: prepend a new Fernet key to ENCRYPTION_KEYS
and deploy, run this, then drop the old key.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg
from pydantic import ValidationError

from src import db_config
from src.config import Settings, get_settings
from src.security.security import InvalidToken, KeyCipher
from src.services import api_keys as keys_service


async def rotate(settings: Settings) -> int:
    database_url = await db_config.resolve_database_url(settings)
    target = db_config.connect_target(database_url)
    conn = await asyncpg.connect(target.dsn, statement_cache_size=target.statement_cache_size)
    try:
        await db_config.init_connection(conn)
        return await keys_service.reencrypt_all(conn, KeyCipher(settings.fernet_keys))
    finally:
        await conn.close()


def main() -> int:
    try:
        settings = get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            print(f"gatewayz: configuration error: {error['msg']}", file=sys.stderr)
        return 2
    try:
        count = asyncio.run(rotate(settings))
    except InvalidToken:
        # One transaction: a token no configured key opens leaves every row as it was.
        print(
            "gatewayz: a stored key does not decrypt with any ENCRYPTION_KEYS key; nothing was changed",
            file=sys.stderr,
        )
        return 1
    print(f"re-encrypted {count} key(s) under the newest ENCRYPTION_KEYS key")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
