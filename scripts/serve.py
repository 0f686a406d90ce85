"""Start the gateway: check settings, prepare the database once, then run uvicorn's workers."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

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
    if settings.web_concurrency > 1:
        _share_metrics(settings.gateway_data_dir / "metrics")
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


def _share_metrics(default: Path) -> None:
    """Several workers write their metrics into one folder, so any worker's /metrics sums them all."""
    folder = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or default)
    # Values of an earlier run would be added to this one's: start from an empty folder.
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


if __name__ == "__main__":
    raise SystemExit(main())
