"""The inference process: answers, a crash (503 at once, then restarted), the queue deadline, drain on
shutdown, and no process left behind, also after ``kill -9`` of the API process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.engine import InferenceEngine
from app.exceptions import InferenceUnavailable, QueueTimeout
from app.main import create_app
from tools.stack import run_service
from tools.traffic import WatchData

from .redis_fixtures import RedisTarget
from .service_fixtures import assert_error, memory_settings, metric_value, parse_metrics

RESTART_TIMEOUT_S = 60


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: only its parent has not read its status yet.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _inference_processes(pid: int) -> list[int]:
    """The inference processes among the descendants of ``pid``."""
    found = []
    for child in _children(pid):
        if b"app.inference.process" in Path(f"/proc/{child}/cmdline").read_bytes():
            found.append(child)
        else:
            found += _inference_processes(child)
    return found


def _arrays(window: dict[str, list[list[float]]]) -> dict[str, np.ndarray]:
    return {name: np.asarray(rows, dtype=np.float32) for name, rows in window.items()}


def test_crashed_inference_process_answers_503_at_once_and_is_restarted(watch_data: WatchData) -> None:
    body = {"modalities": watch_data.window(int(watch_data.test[0]))}
    with TestClient(create_app(memory_settings(retry_after_seconds=3))) as client:
        assert client.post("/v1/predict", json=body).status_code == 200
        engine: InferenceEngine = client.app.state.engine
        first = engine.supervisor.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert _wait_gone(first, 10)
        started = time.monotonic()
        refused = client.post("/v1/predict", json=body)
        assert time.monotonic() - started < 5, "a request must not wait for the restart"
        assert_error(refused, 503, "inference_unavailable", mentions=("restarting",))
        assert refused.headers["retry-after"] == "3"
        assert client.get("/readyz").status_code == 503
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while client.post("/v1/predict", json=body).status_code != 200:
            assert time.monotonic() < deadline, "the inference process was not restarted"
            time.sleep(0.2)
        assert engine.supervisor.pid not in (None, first)
        assert client.get("/readyz").status_code == 200
    assert _wait_gone(engine.supervisor.pid, 10), "the restarted process outlived the app"


def test_requests_in_flight_when_the_inference_process_dies_are_answered_503(watch_data: WatchData) -> None:
    window = _arrays(watch_data.window(int(watch_data.test[0])))

    async def scenario() -> list[Any]:
        engine = InferenceEngine(memory_settings(max_batch_size=8))
        await engine.start()
        try:
            # Enough teacher windows that the process is still at work when it is killed.
            pending = [asyncio.ensure_future(engine.predict_windows([window] * 64, "teacher")) for _ in range(8)]
            await asyncio.sleep(0.05)
            os.kill(engine.supervisor.pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
        finally:
            await engine.stop()

    outcomes = asyncio.run(scenario())
    assert any(isinstance(outcome, InferenceUnavailable) for outcome in outcomes), outcomes
    assert all(isinstance(outcome, list | InferenceUnavailable) for outcome in outcomes), outcomes


def test_stop_answers_the_windows_in_flight_then_ends_the_process(watch_data: WatchData) -> None:
    window = _arrays(watch_data.window(int(watch_data.test[0])))

    async def scenario() -> tuple[list[Any], int]:
        engine = InferenceEngine(memory_settings(max_batch_size=16))
        await engine.start()
        pending = [asyncio.ensure_future(engine.predict_windows([window] * 16, "teacher")) for _ in range(6)]
        await asyncio.sleep(0)  # all submitted
        await engine.stop()
        return [task.result() for task in pending], engine.supervisor.pid

    answers, pid = asyncio.run(scenario())
    assert all(len(answer) == 16 and answer[0].model == "teacher" for answer in answers)
    assert not _alive(pid)


def test_windows_queued_past_the_deadline_are_refused_and_not_computed(watch_data: WatchData) -> None:
    window = _arrays(watch_data.window(int(watch_data.test[0])))
    windows_per_request, requests = 64, 12

    async def scenario() -> tuple[list[Any], float, float]:
        engine = InferenceEngine(memory_settings(max_batch_size=64, queue_timeout_seconds=0.05, queue_size=4096))
        await engine.start()
        try:
            computed = _computed_windows()
            outcomes = await asyncio.gather(
                *(engine.predict_windows([window] * windows_per_request, "teacher") for _ in range(requests)),
                return_exceptions=True,
            )
            # The pass records arrive beside the answers: wait until they are all read.
            await asyncio.sleep(0.5)
            return outcomes, computed, _computed_windows()
        finally:
            await engine.stop()

    outcomes, before, after = asyncio.run(scenario())
    answered = [outcome for outcome in outcomes if isinstance(outcome, list)]
    expired = [outcome for outcome in outcomes if isinstance(outcome, QueueTimeout)]
    assert answered and expired, outcomes
    assert len(answered) + len(expired) == requests
    assert after - before == len(answered) * windows_per_request, "expired windows were computed"


def _computed_windows() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("dmft_batch_size_sum", {"model": "teacher"}) or 0.0


def test_queue_deadline_answers_503_with_retry_after(watch_data: WatchData) -> None:
    settings = memory_settings(queue_timeout_seconds=0.001, retry_after_seconds=2, max_batch_size=64)
    windows = [{"modalities": watch_data.window(int(i))} for i in watch_data.test[:64]]
    app = create_app(settings)

    async def burst() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                body = {"windows": windows, "model": "teacher"}
                return list(await asyncio.gather(*(client.post("/v1/predict/batch", json=body) for _ in range(6))))

    answers = asyncio.run(burst())
    refused = [answer for answer in answers if answer.status_code == 503]
    assert refused, [answer.status_code for answer in answers]
    for answer in refused:
        assert_error(answer, 503, "queue_timeout", mentions=("teacher", "0.001 s"))
        assert answer.headers["retry-after"] == "2"


def test_metrics_show_the_inference_process_passes(watch_data: WatchData) -> None:
    windows = [{"modalities": watch_data.window(int(i))} for i in watch_data.test[:20]]
    with TestClient(create_app(memory_settings())) as client:
        before = parse_metrics(client.get("/metrics").text)
        assert client.post("/v1/predict/batch", json={"windows": windows, "model": "teacher"}).status_code == 200
        after = parse_metrics(client.get("/metrics").text)
    labels = {"model": "teacher"}
    for name in ("dmft_batch_size_sum", "dmft_queue_wait_seconds_count"):
        assert metric_value(after, name, labels) - metric_value(before, name, labels) == len(windows), name
    passes = metric_value(after, "dmft_inference_duration_seconds_count", labels) - metric_value(
        before, "dmft_inference_duration_seconds_count", labels
    )
    assert passes == 1
    assert metric_value(after, "dmft_inference_duration_seconds_sum", labels) > metric_value(
        before, "dmft_inference_duration_seconds_sum", labels
    )


def test_bundles_that_cannot_be_loaded_stop_start_up_with_the_reason(tmp_path: Path) -> None:
    app = create_app(memory_settings(bundles=tmp_path))
    with pytest.raises(RuntimeError, match="could not be loaded.*is not a model bundle"), TestClient(app):
        pass


def test_killed_api_process_leaves_no_inference_process(tmp_path: Path) -> None:
    with run_service(tmp_path) as server:
        [inference] = _inference_processes(server.process.pid)
        api = int(Path(f"/proc/{inference}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
        assert httpx.get(server.base + "/readyz", trust_env=False).status_code == 200
        os.kill(api, signal.SIGKILL)
        assert _wait_gone(inference, 10), "the inference process outlived its API process"


def test_stopped_service_leaves_no_inference_process(tmp_path: Path, redis_target: RedisTarget) -> None:
    # Several workers share sessions only through Redis; without it the service runs one.
    with run_service(tmp_path, workers=2, redis_url=redis_target.url, redis_prefix=redis_target.prefix) as server:
        deadline = time.monotonic() + 60  # the service is ready once one worker is; the other may still load
        while len(inference := _inference_processes(server.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(inference) == 2, inference
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    for pid in inference:
        assert _wait_gone(pid, 10)
