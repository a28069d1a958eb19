"""The application factory: ``create_app(settings)`` and the lifespan that owns the engine and store."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.errors import install_error_handlers
from app.middleware import BodyLimitMiddleware, RequestContextMiddleware, RequestMetricsMiddleware
from app.openapi import install_openapi
from app.routes import dashboard, health, models, predict, sessions
from app.routes.docs import install_docs
from app.services import open_services
from app.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_services(settings) as services:
            app.state.settings = settings
            app.state.engine = services.engine
            app.state.store = services.store
            app.state.sessions = services.sessions
            # What start-up loaded (torch's modules among it) lives as long as the process: keep it out of
            # the collector's full passes, which otherwise walk it all every few hundred requests.
            gc.freeze()
            yield

    app = FastAPI(
        title="DMFT activity service",
        version="0.1.0",
        description="Human activity recognition from multi-modal sensor windows (Distilled Mid-Fusion Transformer).",
        lifespan=lifespan,
        # FastAPI's pages would load their scripts from a CDN; these come from the service.
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Outside the body limit: it also times the limit's answers.
    app.add_middleware(RequestMetricsMiddleware)
    # Added last, so outermost: every answer, even one to an unexpected error, carries the request id.
    app.add_middleware(RequestContextMiddleware)
    for router in (predict.router, sessions.router, models.router, health.router, dashboard.router):
        app.include_router(router)
    install_openapi(app)
    return app
