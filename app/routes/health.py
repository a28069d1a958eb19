"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app import metrics
from app.deps import EngineDep, SessionsDep, StoreDep
from app.errors import current_request_id
from app.openapi import error_responses
from app.schemas import Health
from app.store import StoreUnavailable

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])
STORE_ANSWER_SECONDS = 2.0  # a store slower than this to answer a ping is not ready


@router.get("/healthz", responses=error_responses())
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Health}, **error_responses()})
async def readyz(engine: EngineDep, store: StoreDep) -> JSONResponse:
    """Models loaded in a running inference process, and the session store reachable."""
    checks = {"models": "ok" if engine.ready else "inference process not running"}
    try:
        async with asyncio.timeout(STORE_ANSWER_SECONDS):
            await store.ping()
        checks["store"] = "ok"
    except StoreUnavailable as error:
        # The reason names internal addresses: it goes to the log, under this answer's request id.
        log.warning("request %s: session store unreachable: %s", current_request_id(), error)
        checks["store"] = "unreachable"
    except TimeoutError:
        checks["store"] = f"no answer within {STORE_ANSWER_SECONDS:g} s"
    ready = all(value == "ok" for value in checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
async def scrape(sessions: SessionsDep) -> Response:
    await sessions.refresh_active_gauge()
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
