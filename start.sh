#!/usr/bin/env bash
# Installs what the gateway needs (first run only) and starts it on $PORT (default 8000).
# Without DATABASE_URL it runs on an embedded PostgreSQL kept in $GATEWAY_DATA_DIR (.gatewayz/).
# Settings come from the environment and .env (see .env.example).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/_env.sh
gatewayz_python runtime
exec "$PYTHON" -m scripts.serve
