"""The application factory, its lifespan and the module-level `app` that servers import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from src.config import VERSION, Settings, get_settings
from src.errors import REQUEST_ID_HEADER, install_error_handlers
from src.logging_config import configure_logging
from src.middleware import RequestContextMiddleware
from src.routes import (
    activity,
    admin,
    admin_billing,
    admin_ops,
    admin_pricing,
    api_keys,
    auth,
    catalog,
    chat,
    coupons,
    health,
    history,
    images,
    limits,
    metrics,
    notifications,
    payments,
    plans,
    referrals,
    responses,
    subscriptions,
    trials,
    users,
)
from src.schemas import openapi
from src.state import AppState, close_state, ensure_state

logger = logging.getLogger("gatewayz")

TITLE = "Gatewayz Universal Inference API"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, AppState]]:
    state = await ensure_state(app)
    logger.info(
        "gatewayz %s started (database: %s)",
        VERSION,
        "embedded" if state.settings.uses_embedded_database else "external",
    )
    try:
        yield {"gateway": state}
    finally:
        app.state.gateway = None
        await close_state(state)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(
        level=settings.log_level,
        secrets=settings.secret_values(),
        json_output=settings.log_json,
    )
    app = FastAPI(
        title=TITLE,
        version=VERSION,
        description="One OpenAI-compatible API and one key for hundreds of models, with prepaid credits.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.gateway = None
    app.state.open_lock = asyncio.Lock()
    install_error_handlers(app)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origin_list,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=[
            REQUEST_ID_HEADER,
            "X-Gateway-Provider",
            "X-Gateway-Cost",
            "Retry-After",
        ],
    )
    # Added last, so it is the outermost: every response, errors included, carries the request id.
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    app.include_router(health.router)
    app.include_router(auth.router)
    app.include_router(users.router)
    app.include_router(api_keys.router)
    app.include_router(admin.router)
    app.include_router(chat.router)
    app.include_router(history.router)
    app.include_router(activity.router)
    app.include_router(responses.router)
    app.include_router(images.router)
    app.include_router(catalog.router)
    app.include_router(admin_pricing.router)
    app.include_router(limits.router)
    app.include_router(plans.router)
    app.include_router(trials.router)
    app.include_router(payments.router)
    app.include_router(subscriptions.router)
    app.include_router(coupons.router)
    app.include_router(referrals.router)
    app.include_router(admin_billing.router)
    app.include_router(metrics.router)
    app.include_router(admin_ops.router)
    app.include_router(notifications.router)
    openapi.install(app)
    return app


app = create_app()
