"""End to end: ``dmft serve`` with two uvicorn workers on the test Redis, over real HTTP.

The two worker processes share sessions through Redis and metrics through
``PROMETHEUS_MULTIPROC_DIR``; ``/metrics`` answered by either worker counts both.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tools.stack import run_service
from tools.traffic import WatchData

from .redis_fixtures import RedisTarget
from .service_fixtures import HOP, WINDOW, metric_value, parse_metrics

SHUTDOWN_TIMEOUT_S = 20
PREDICT_REQUESTS = 20
CHUNK = 137  # samples per session chunk


@dataclass
class Server:
    base: str
    process: subprocess.Popen[bytes]
    log: Path
    metrics_dir: Path


@pytest.fixture
def server(redis_target: RedisTarget, tmp_path: Path) -> Iterator[Server]:
    """A running ``dmft serve --workers 2`` on the test Redis (its keys are deleted afterwards)."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with run_service(
        tmp_path,
        redis_url=redis_target.url,
        redis_prefix=redis_target.prefix,
        workers=2,
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    ) as running:
        yield Server(running.base, running.process, running.log, metrics_dir)


def test_serve_two_workers_share_sessions_and_metrics(server: Server, watch_data: WatchData) -> None:
    base, process, log = server.base, server.process, server.log
    # No proxy from the environment; a fresh connection per request, so that both workers may accept some.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base, timeout=30, limits=limits, trust_env=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        windows = [watch_data.window(int(i)) for i in watch_data.test[:: len(watch_data.test) // PREDICT_REQUESTS]]
        windows = windows[:PREDICT_REQUESTS]

        def predict(window: dict[str, list[list[float]]]) -> httpx.Response:
            return client.post("/v1/predict", json={"modalities": window})

        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(pool.map(predict, windows))
        assert [r.status_code for r in responses] == [200] * PREDICT_REQUESTS
        assert all(r.json()["activity"] in watch_data.class_names for r in responses)

        recording = watch_data.recording_samples(watch_data.held_out_recordings()[0])
        length = len(recording["accelerometer"])
        session_id = f"e2e-{os.getpid()}"
        seen: list[int] = []
        chunks = 0
        for seq, start in enumerate(range(0, length, CHUNK)):
            body = {"seq": seq, "modalities": {n: a[start : start + CHUNK].tolist() for n, a in recording.items()}}
            response = client.post(f"/v1/sessions/{session_id}/samples", json=body)
            assert response.status_code == 200, response.text
            seen += [p["window"] for p in response.json()["predictions"]]
            chunks += 1
        expected = (length - WINDOW) // HOP + 1
        assert seen == list(range(expected))
        state = client.get(f"/v1/sessions/{session_id}").json()
        assert (state["seq"], state["windows"]) == (chunks - 1, expected)

        samples = parse_metrics(client.get("/metrics").text)
    predict_route = {"route": "/v1/predict", "method": "POST"}
    samples_route = {"route": "/v1/sessions/{session_id}/samples", "method": "POST"}
    assert metric_value(samples, "dmft_request_duration_seconds_count", predict_route) == PREDICT_REQUESTS
    assert metric_value(samples, "dmft_request_duration_seconds_count", samples_route) == chunks
    assert metric_value(samples, "dmft_predictions_total") == PREDICT_REQUESTS + expected
    assert metric_value(samples, "dmft_ingested_samples_total", {"modality": "gyroscope"}) == length
    # Both workers started and write their samples to the shared directory.
    files = sorted(path.name for path in server.metrics_dir.glob("*.db"))
    assert len({name.removesuffix(".db").rsplit("_", 1)[1] for name in files}) == 2, files

    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"dmft serve still running {SHUTDOWN_TIMEOUT_S} s after SIGTERM")
    assert process.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()
