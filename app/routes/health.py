"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app import metrics
from app.deps import EngineDep, SessionsDep, StoreDep
from app.schemas import Health
from app.store import StoreUnavailable

router = APIRouter(tags=["health"])
STORE_ANSWER_SECONDS = 2.0  # a store slower than this to answer a ping is not ready


@router.get("/healthz")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Health}})
async def readyz(engine: EngineDep, store: StoreDep) -> JSONResponse:
    checks = {"models": "ok" if engine.bundles else "not loaded"}
    try:
        async with asyncio.timeout(STORE_ANSWER_SECONDS):
            await store.ping()
        checks["store"] = "ok"
    except StoreUnavailable as error:
        checks["store"] = f"unreachable: {error}"
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
