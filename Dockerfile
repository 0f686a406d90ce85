# syntax=docker/dockerfile:1
#
# Gatewayz: one image for every container platform (Docker, docker-compose, Railway).
#
#   docker build -t gatewayz .
#   docker run -p 8000:8000 -e APP_ENV=production -e DATABASE_URL=... -e SECRET_KEY=... \
#              -e ENCRYPTION_KEYS=... -e ADMIN_API_KEY=... gatewayz
#
# Without DATABASE_URL (and without APP_ENV=production) the container runs the embedded PostgreSQL
# in the /data volume: fine for a trial, not for production. See docs/deployment.md.

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000 \
    GATEWAYZ_SKIP_INSTALL=1 \
    GATEWAY_DATA_DIR=/data \
    XDG_RUNTIME_DIR=/tmp/gatewayz-runtime

# The embedded PostgreSQL refuses to run as root, and the gateway has no reason to: a fixed,
# unprivileged uid/gid that owns only the data volume and its runtime directory.
RUN groupadd --system --gid 10001 gatewayz \
    && useradd --system --uid 10001 --gid gatewayz --home-dir /home/gatewayz --create-home \
        --shell /usr/sbin/nologin gatewayz \
    && install -d -m 0700 -o gatewayz -g gatewayz /data /tmp/gatewayz-runtime

WORKDIR /app

# Dependencies first, so code changes do not invalidate this layer. Every runtime dependency ships
# as a wheel, so no compiler is needed.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# The code stays owned by root: the gateway user can read it, not change it.
COPY src/ ./src/
COPY api/ ./api/
COPY supabase/ ./supabase/
COPY scripts/ ./scripts/
COPY start.sh ./

USER gatewayz

VOLUME ["/data"]
EXPOSE 8000

# Liveness only (/health answers while the process serves). The start period covers the first
# start of the embedded database and the migrations. slim has no curl: python's urllib it is.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=4)"]

# start.sh applies the migrations and runs uvicorn on $PORT with $WEB_CONCURRENCY workers; on
# SIGTERM in-flight requests get SHUTDOWN_GRACE_SECONDS (30 by default), so give `docker stop` more
# than that (`docker stop -t 45`, or stop_grace_period in compose).
CMD ["bash", "start.sh"]
