"""The built-in live page and the one endpoint it polls."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from app import metrics
from app.deps import SessionsDep
from app.openapi import error_responses
from app.schemas import LatencyHistogram, Overview

router = APIRouter(tags=["dashboard"])

PAGE = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"
OVERVIEW_ROUTE = "/v1/overview"
# The page's own polling and Prometheus's scrapes would swamp the request latency it shows.
UNSHOWN_ROUTES = {OVERVIEW_ROUTE, "/dashboard", "/metrics"}


def _histogram(counts: list[float]) -> LatencyHistogram:
    return LatencyHistogram(
        bounds=list(metrics.LATENCY_BUCKETS),
        counts=counts,
        quantiles_ms={
            f"p{round(q * 100)}": None if (value := metrics.quantile(q, counts)) is None else value * 1000
            for q in (0.5, 0.95, 0.99)
        },
    )


@router.get(OVERVIEW_ROUTE, responses=error_responses(422, 503))
async def overview(
    sessions: SessionsDep,
    limit: Annotated[int, Query(ge=1, le=500, description="Sessions to list.")] = 100,
    feed: Annotated[int, Query(ge=1, le=500, description="Recent predictions to list.")] = 50,
) -> Overview:
    """Live sessions, recent predictions and latency histograms, for the dashboard page."""
    count, summaries, items = await sessions.overview(limit, feed)
    requests = metrics.bucket_counts("dmft_request_duration_seconds", skip={"route": UNSHOWN_ROUTES})
    empty = [0.0] * (len(metrics.LATENCY_BUCKETS) + 1)
    return Overview(
        generated_at=datetime.now(UTC),
        active_sessions=count,
        sessions=summaries,
        recent_predictions=items,
        request_latency=_histogram(requests.get("", empty)),
        inference_latency={
            model: _histogram(counts)
            for model, counts in sorted(metrics.bucket_counts("dmft_inference_duration_seconds", "model").items())
        },
    )


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())
