"""Start the gateway: check settings, prepare the database once, then run uvicorn's workers."""

from __future__ import annotations

import asyncio
import sys

import uvicorn
from pydantic import ValidationError

from scripts.prestart import prepare
from src.config import get_settings


def main() -> int:
    try:
        settings = get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            print(f"gatewayz: configuration error: {error['msg']}", file=sys.stderr)
        return 2
    # The embedded database is started and migrated here, before the workers, so they share it.
    asyncio.run(prepare(settings))
    print(
        f"gatewayz: listening on http://{settings.host}:{settings.port}"
        f" with {settings.web_concurrency} worker(s)",
        file=sys.stderr,
    )
    uvicorn.run(
        "src.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.web_concurrency,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        access_log=False,  # the gateway writes its own, redacted access log
        proxy_headers=False,  # X-Forwarded-For is trusted only from TRUSTED_PROXIES, by the app
        server_header=False,
        log_config=None,  # logging is configured by the app, through the redacting formatter
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
