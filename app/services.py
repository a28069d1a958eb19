"""The long-lived parts of the service, opened and closed together.

The HTTP app's lifespan and the MQTT bridge both run the same session logic; this is
the one place that builds it: the inference engine, the session store and the
session service over them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from app.engine import InferenceEngine
from app.sessions import SessionService
from app.settings import Settings
from app.store import SessionStore
from app.store.memory import MemoryStore
from app.store.redis_store import RedisStore
from app.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: InferenceEngine
    store: SessionStore
    sessions: SessionService


def build_store(settings: Settings) -> SessionStore:
    if settings.redis_url:
        return RedisStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            shards=settings.redis_shards,
            max_connections=settings.redis_max_connections,
            pool_timeout_seconds=settings.redis_pool_timeout_seconds,
        )
    return MemoryStore(max_sessions=settings.max_sessions)


@asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    """Load the models, connect the store and start webhook delivery; on exit, finish queued windows
    and stop."""
    engine = InferenceEngine(settings)
    await engine.start()
    store = build_store(settings)
    try:
        webhooks = WebhookDispatcher(store, settings)
        await webhooks.start()
        log.info("serving with %s session store, %d webhook target(s)", type(store).__name__, len(settings.webhooks))
        try:
            yield Services(settings, engine, store, SessionService(store, engine, settings))
        finally:
            await webhooks.stop()
    finally:
        await engine.stop()  # answers the windows in flight first
        await store.close()
