"""Every Prometheus metric of the service, declared once.

Label values are bounded: route templates (never a session id), model names,
activity classes, modality names and error codes. With ``PROMETHEUS_MULTIPROC_DIR``
set (several uvicorn workers) each process writes its samples there and ``/metrics``
aggregates them with the multiprocess collector.
"""

from __future__ import annotations

import math
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUEST_DURATION = Histogram(
    "dmft_request_duration_seconds",
    "HTTP request duration by route template, method and status.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "dmft_inference_duration_seconds",
    "Duration of one batched forward pass.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("dmft_batch_size", "Windows per forward pass.", ["model"], buckets=BATCH_BUCKETS)
QUEUE_WAIT = Histogram(
    "dmft_queue_wait_seconds",
    "Time a window waited in the inference queue before its forward pass started.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
PREDICTIONS = Counter(
    "dmft_predictions_total", "Windows classified, by answering model and activity.", ["model", "activity"]
)
ACTIVE_SESSIONS = Gauge(
    "dmft_active_sessions",
    "Streaming sessions not yet expired or ended.",
    # Every process reads the same shared count from the store: the latest reading is right.
    multiprocess_mode="mostrecent",
)
INGESTED_SAMPLES = Counter("dmft_ingested_samples_total", "Samples appended to session buffers.", ["modality"])
ERRORS = Counter("dmft_errors_total", "Error answers by reason.", ["reason"])
TRANSITIONS = Counter("dmft_transitions_total", "Session activity transitions, by activity entered.", ["activity"])
WEBHOOK_DELIVERIES = Counter(
    "dmft_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: delivered, failed (to be retried) or dropped (gave up).",
    ["outcome"],
)
# Every outcome is exported from the start, at 0, so that a failure ratio or alert has a series to read.
for _outcome in ("delivered", "failed", "dropped"):
    WEBHOOK_DELIVERIES.labels(outcome=_outcome)
WEBHOOK_LAG = Histogram(
    "dmft_webhook_delivery_lag_seconds",
    "Time from a transition's commit to its webhook's successful delivery.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0),
)
QUEUE_DEPTH = Gauge(
    "dmft_queue_depth",
    "Windows waiting in the model's inference queue; with several worker processes, the fullest one's.",
    ["model"],
    # Each process refuses windows once its own queue is full, so the fullest queue is the one that matters.
    multiprocess_mode="livemax",
)
QUEUE_CAPACITY = Gauge(
    "dmft_queue_capacity",
    "Windows one process's inference queue holds before new ones are refused (DMFT_QUEUE_SIZE).",
    ["model"],
    multiprocess_mode="livemax",
)


def _registry() -> CollectorRegistry:
    """This process's metrics, or every worker's when they share ``PROMETHEUS_MULTIPROC_DIR``."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics`` and its content type."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def bucket_counts(
    histogram: str, group_by: str | None = None, skip: dict[str, set[str]] | None = None
) -> dict[str, list[float]]:
    """Cumulative bucket counts of the latency ``histogram`` (bounds of ``LATENCY_BUCKETS``, then +Inf),
    summed per value of label ``group_by`` (all under '' without one), leaving out samples whose labels
    are in ``skip``."""
    bounds = [*map(float, LATENCY_BUCKETS), math.inf]
    totals: dict[str, list[float]] = {}
    for family in _registry().collect():
        if family.name != histogram:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            if any(sample.labels.get(label) in values for label, values in (skip or {}).items()):
                continue
            group = sample.labels[group_by] if group_by else ""
            counts = totals.setdefault(group, [0.0] * len(bounds))
            counts[bounds.index(float(sample.labels["le"]))] += sample.value
    return totals


def quantile(q: float, counts: list[float]) -> float | None:
    """``histogram_quantile`` over cumulative ``counts`` of ``LATENCY_BUCKETS``: seconds, or None if empty."""
    total = counts[-1]
    if total == 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(LATENCY_BUCKETS, counts, strict=False):
        if count >= rank:
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return LATENCY_BUCKETS[-1]  # in the +Inf bucket: its lower bound, as Prometheus answers
