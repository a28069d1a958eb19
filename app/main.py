"""The application factory: ``create_app(settings)`` and the lifespan that owns the engine and store."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.engine import InferenceEngine
from app.errors import install_error_handlers
from app.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from app.routes import health, models, predict, sessions
from app.sessions import SessionService
from app.settings import Settings
from app.store import SessionStore
from app.store.memory import MemoryStore
from app.store.redis_store import RedisStore

log = logging.getLogger(__name__)


def build_store(settings: Settings) -> SessionStore:
    if settings.redis_url:
        return RedisStore(settings.redis_url, prefix=settings.redis_prefix)
    return MemoryStore()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = InferenceEngine.load(settings)
        store = build_store(settings)
        app.state.settings = settings
        app.state.engine = engine
        app.state.store = store
        app.state.sessions = SessionService(store, engine, settings)
        engine.start()
        log.info("serving with %s session store", type(store).__name__)
        try:
            yield
        finally:
            await engine.stop()  # finishes queued windows first
            await store.close()

    app = FastAPI(
        title="DMFT activity service",
        version="0.1.0",
        description="Human activity recognition from multi-modal sensor windows (Distilled Mid-Fusion Transformer).",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Added last, so outermost: it also times the answers of the body limit.
    app.add_middleware(RequestMetricsMiddleware)
    for router in (predict.router, sessions.router, models.router, health.router):
        app.include_router(router)
    return app
