"""The live page ``/dashboard`` and the endpoint it polls, ``/v1/overview``.

The endpoint is checked through the API (in process, real held-out watch data). The page is
checked the way it is used: a real ``dmft serve`` with its sessions in the real Redis, the
page open in headless Chromium (driven over the DevTools protocol, ``tools/cdp.py``),
sessions streamed through the API while the page stays open, and what the page shows read
back from its DOM. Chromium missing skips those tests, except on CI (``CI=true``), where it
is a failure. Screenshots of each browser test are left in its ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import metrics
from app.main import create_app
from tools.cdp import Page
from tools.stack import Server, run_service
from tools.traffic import MODALITIES, WatchData

from .redis_fixtures import RedisTarget
from .service_fixtures import assert_error, memory_settings

pytestmark = pytest.mark.usefixtures("no_server_errors")

CHUNK = 150  # samples per chunk: 3 s at 50 Hz
HOMES = ("home-a", "home-b", "home-c")
PAGE_WAIT_S = 30.0
MANY = 100

Samples = dict[str, np.ndarray]


def distinct_recordings(watch: WatchData, count: int) -> list[int]:
    """Held-out recordings of ``count`` different exercises, shortest first."""
    chosen: dict[str, int] = {}
    for index in watch.held_out_recordings():
        chosen.setdefault(watch.recording_label(index), index)
    assert len(chosen) >= count
    return list(chosen.values())[:count]


def chunks(samples: Samples, size: int = CHUNK) -> list[dict[str, list[list[float]]]]:
    length = len(samples["accelerometer"])
    return [
        {name: rows[start : start + size].tolist() for name, rows in samples.items()}
        for start in range(0, length, size)
    ]


def send(client: TestClient | httpx.Client, session_id: str, seq: int, chunk: dict, **extra: Any) -> dict:
    response = client.post(f"/v1/sessions/{session_id}/samples", json={"seq": seq, "modalities": chunk, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def overview(client: TestClient | httpx.Client, **params: int) -> dict:
    response = client.get("/v1/overview", params=params)
    assert response.status_code == 200, response.text
    return response.json()


# ---------- /v1/overview through the API ----------


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(memory_settings())) as client:
        yield client


@pytest.fixture(scope="module")
def homes(client: TestClient, watch_data: WatchData) -> list[str]:
    """Three sessions, each streaming a different exercise; ``home-a`` got the last chunk, ``home-b`` the oldest."""
    pieces = {
        session_id: chunks(watch_data.recording_samples(index))
        for session_id, index in zip(HOMES, distinct_recordings(watch_data, len(HOMES)), strict=True)
    }
    for session_id, parts in pieces.items():
        for seq, part in enumerate(parts[:-1]):
            send(client, session_id, seq, part)
    for session_id in ("home-b", "home-c", "home-a"):
        send(client, session_id, len(pieces[session_id]) - 1, pieces[session_id][-1])
    return ["home-a", "home-c", "home-b"]


def test_overview_lists_sessions_newest_first_with_their_tracked_activity(client: TestClient, homes: list[str]) -> None:
    body = overview(client)
    assert body["active_sessions"] == len(homes)
    assert [summary["session_id"] for summary in body["sessions"]] == homes
    activities = set()
    for summary in body["sessions"]:
        state = client.get(f"/v1/sessions/{summary['session_id']}").json()
        assert summary["activity"] == state["activity"] != "unknown"
        assert summary["confidence"] == pytest.approx(state["confidence"])
        assert summary["since"] == state["since"]
        assert summary["updated_at"] == state["updated_at"]
        assert summary["windows"] == state["windows"] > 0
        assert summary["model"] == "student"
        assert summary["modalities"] == list(MODALITIES)
        assert summary["last_window"] == state["recent"][-1]
        lasted = datetime.fromisoformat(state["recent"][-1]["end_time"]) - datetime.fromisoformat(state["since"])
        assert summary["activity_seconds"] == pytest.approx(lasted.total_seconds())
        assert summary["activity_seconds"] > 0
        activities.add(summary["activity"])
    assert len(activities) == len(homes)  # three exercises, three activities


def test_overview_feed_is_newest_first_and_bounded(client: TestClient, homes: list[str]) -> None:
    everything = [
        (datetime.fromisoformat(prediction["recorded_at"]), prediction["window"], session_id)
        for session_id in homes
        for prediction in client.get(f"/v1/sessions/{session_id}").json()["recent"]
    ]
    newest = [(session_id, window) for _, window, session_id in sorted(everything, reverse=True)]

    feed = overview(client, feed=7)["recent_predictions"]
    assert [(item["session_id"], item["window"]) for item in feed] == newest[:7]
    assert feed[0]["session_id"] == homes[0]  # the session that got the last chunk
    times = [datetime.fromisoformat(item["recorded_at"]) for item in feed]
    assert times == sorted(times, reverse=True)
    assert len(overview(client)["recent_predictions"]) == min(50, len(everything))


def test_overview_orders_by_server_time_whatever_clock_a_session_keeps(
    client: TestClient, homes: list[str], watch_data: WatchData
) -> None:
    """A session replaying an old recording in its own clock still comes first when it is the newest."""
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    old_clock = {"timestamp": "2020-05-01T10:00:00+00:00"}
    answer = send(
        client, "replayed-2020", 0, {name: rows[:400].tolist() for name, rows in samples.items()}, **old_clock
    )
    body = overview(client)
    assert body["sessions"][0]["session_id"] == "replayed-2020"
    assert body["recent_predictions"][0]["session_id"] == "replayed-2020"
    assert body["recent_predictions"][0]["end_time"].startswith("2020-05-01")
    summary = body["sessions"][0]
    transition = answer["transitions"][0]
    last_end = datetime.fromisoformat(answer["predictions"][-1]["end_time"])
    assert summary["activity_seconds"] == pytest.approx(
        (last_end - datetime.fromisoformat(transition["time"])).total_seconds()
    )
    assert summary["activity_seconds"] < 60  # seconds of the replay, not the six years since its clock's date
    assert client.delete("/v1/sessions/replayed-2020").status_code == 204


def test_overview_limit_lists_the_most_recent_sessions(client: TestClient, homes: list[str]) -> None:
    body = overview(client, limit=2)
    assert body["active_sessions"] == len(homes)
    assert [summary["session_id"] for summary in body["sessions"]] == homes[:2]
    assert {item["session_id"] for item in body["recent_predictions"]} <= set(homes[:2])
    assert_error(client.get("/v1/overview", params={"limit": 0}), 422, "invalid_input")
    assert_error(client.get("/v1/overview", params={"feed": 501}), 422, "invalid_input")


def test_overview_latency_counts_predictions_but_not_its_own_polling(client: TestClient, watch_data: WatchData) -> None:
    before = overview(client)
    for _ in range(3):  # the page polls, and is reloaded: none of that is the service's latency
        overview(client)
        assert client.get("/dashboard").status_code == 200
    assert overview(client)["request_latency"]["counts"] == before["request_latency"]["counts"]

    windows = [watch_data.window(int(index)) for index in watch_data.test[:5]]
    for window, model in zip(windows, ("student", "student", "student", "teacher", "teacher"), strict=True):
        assert client.post("/v1/predict", json={"modalities": window, "model": model}).status_code == 200
    after = overview(client)

    requests = after["request_latency"]
    assert requests["bounds"] == list(metrics.LATENCY_BUCKETS)
    assert requests["counts"][-1] - before["request_latency"]["counts"][-1] == len(windows)
    for histogram in (requests, *after["inference_latency"].values()):
        counts = histogram["counts"]
        assert len(counts) == len(metrics.LATENCY_BUCKETS) + 1
        assert counts == sorted(counts)  # cumulative, +Inf last
        quantiles = histogram["quantiles_ms"]
        assert 0 < quantiles["p50"] <= quantiles["p95"] <= quantiles["p99"]
    for model, predictions in (("student", 3), ("teacher", 2)):
        grown = after["inference_latency"][model]["counts"][-1]
        if model in before["inference_latency"]:
            grown -= before["inference_latency"][model]["counts"][-1]
        assert 1 <= grown <= predictions  # one forward pass per request, fewer if some were batched


def test_dashboard_page_is_self_contained(client: TestClient) -> None:
    response = client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "v1/overview" in page
    # Nothing from another origin (a home's backend may have no internet), and no data parsed as HTML.
    for forbidden in ("http://", "https://", "src=", "href=", "@import", "url(", "innerHTML", "outerHTML",
                      "insertAdjacentHTML", "document.write"):  # fmt: skip
        assert forbidden not in page, forbidden


# ---------- the page in Chromium, against a real server ----------


@pytest.fixture
def server(redis_target: RedisTarget, tmp_path: Path) -> Iterator[Server]:
    with run_service(tmp_path, redis_url=redis_target.url, redis_prefix=redis_target.prefix) as running:
        yield running


def js(value: str) -> str:
    """A string literal for JavaScript."""
    return json.dumps(value)


def row(session_id: str) -> str:
    return f"document.querySelector('#session-rows tr[data-session-id={js(session_id)}]')"


def cell(session_id: str, field: str) -> str:
    """The text of one field of a session's row, or null while the row is absent."""
    return f"{row(session_id)}?.querySelector('[data-field={js(field)}]').textContent ?? null"


def open_dashboard(page: Page, server: Server) -> None:
    page.goto(f"{server.base}/dashboard")
    page.wait_for("document.getElementById('status').dataset.status === 'live'", timeout_s=PAGE_WAIT_S)
    page.evaluate("window.sameDocument = true")  # gone if the page reloads


def polls(page: Page) -> int:
    return int(page.evaluate("document.getElementById('dashboard').dataset.polls"))


def test_live_page_shows_a_streamed_session_without_reloading(
    page: Page, server: Server, watch_data: WatchData, tmp_path: Path
) -> None:
    session_id = "wrist-1"
    open_dashboard(page, server)
    assert page.evaluate("document.querySelectorAll('#session-rows tr').length") == 0

    samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    # Dated as if it had been recorded over the last minute or so: every window lies in the past.
    seconds = len(samples["accelerometer"]) / 50
    started = datetime.now(UTC) - timedelta(seconds=seconds + 5)
    with httpx.Client(base_url=server.base, timeout=30, trust_env=False) as client:
        for seq, part in enumerate(chunks(samples)):
            send(client, session_id, seq, part, **({"timestamp": started.isoformat()} if seq == 0 else {}))
        state = client.get(f"/v1/sessions/{session_id}").json()
    assert state["activity"] != "unknown"

    # The activity can be the last one while the page still shows an earlier poll: wait for the last window too.
    page.wait_for(f"{cell(session_id, 'windows')} === {js(str(state['windows']))}", timeout_s=PAGE_WAIT_S)
    assert page.evaluate(cell(session_id, "activity")) == state["activity"]
    assert page.evaluate("window.sameDocument === true")
    assert page.evaluate(f"{row(session_id)}.dataset.changed") == "true"  # new here: highlighted for a while
    assert page.evaluate(cell(session_id, "model")) == "student"
    assert page.evaluate(cell(session_id, "last-activity")) == state["recent"][-1]["activity"]
    assert page.evaluate(cell(session_id, "confidence")).endswith(f"{round(state['confidence'] * 100)} %")
    assert page.evaluate("document.getElementById('active-sessions').textContent") == "1"
    # "since" is a clock time and a duration that runs on between polls.
    assert re.fullmatch(r"\d{2}:\d{2}:\d{2}", page.evaluate(cell(session_id, "since-time")))
    duration = page.evaluate(cell(session_id, "since-duration"))
    assert re.fullmatch(r"\d+s|\d+m \d{2}s", duration)
    page.wait_for(f"{cell(session_id, 'since-duration')} !== {js(duration)}", timeout_s=5)

    # The feed: this session's predictions, newest first, up to the 50 the page asks for.
    expected = min(state["windows"], 50)
    feed = f"[...document.querySelectorAll('#feed-items li[data-session-id={js(session_id)}]')]"
    page.wait_for(f"{feed}.length === {expected}", timeout_s=PAGE_WAIT_S)
    windows = page.evaluate(f"{feed}.map((item) => Number(item.dataset.window))")
    assert windows == sorted(windows, reverse=True) and windows[0] == state["recent"][-1]["window"]
    newest = page.evaluate(f"{feed}[0].querySelector('[data-field=activity]').textContent")
    assert newest == state["recent"][-1]["activity"]

    # Latency over the polls' window, in milliseconds, once two polls have been seen.
    request = "document.querySelector('[data-latency=request]')"
    page.wait_for(f"/^last \\d+ s$/.test({request}.querySelector('[data-field=latency-mode]').textContent)")
    for quantile in ("p50", "p95", "p99"):
        text = page.evaluate(f"{request}.querySelector('[data-quantile={quantile}]').textContent")
        assert re.fullmatch(r"\d+(\.\d+)?", text), (quantile, text)
    student = "document.querySelector('#inference-rows tr[data-model=student]')"
    assert re.fullmatch(r"\d+(\.\d+)?", page.evaluate(f"{student}.querySelector('[data-quantile=p99]').textContent"))
    assert page.evaluate("document.getElementById('status').dataset.status") == "live"
    page.screenshot(tmp_path / "live-session.png")


def test_live_page_lists_a_hundred_sessions_and_filters_them(
    page: Page, server: Server, watch_data: WatchData, tmp_path: Path
) -> None:
    open_dashboard(page, server)
    recordings = [watch_data.recording_samples(index) for index in watch_data.held_out_recordings()]
    ids = [f"home-{number:03d}" for number in range(MANY)]
    with httpx.Client(base_url=server.base, timeout=30, trust_env=False) as client:
        for number, session_id in enumerate(ids):
            samples = recordings[number % len(recordings)]
            send(client, session_id, 0, {name: rows[:250].tolist() for name, rows in samples.items()})  # 4 windows
        listed = overview(client)["sessions"]
    assert [summary["session_id"] for summary in listed] == ids[::-1]

    rows = "[...document.querySelectorAll('#session-rows tr')]"
    page.wait_for(f"{rows}.length === {MANY}", timeout_s=PAGE_WAIT_S)
    # Sorted by last update, newest first, and every row filled in.
    assert page.evaluate(f"{rows}.map((row) => row.dataset.sessionId)") == ids[::-1]
    for summary in listed[:: MANY // 10]:
        assert page.evaluate(cell(summary["session_id"], "activity")) == summary["activity"]
    assert page.evaluate("document.getElementById('active-sessions').textContent") == str(MANY)

    # Polls update the rows in place: the same elements survive two more polls, and rendering stays quick.
    page.evaluate(f"{rows}.forEach((row) => {{ row.probe = true; }})")
    seen = polls(page)
    page.wait_for(f"Number(document.getElementById('dashboard').dataset.polls) >= {seen + 2}", timeout_s=PAGE_WAIT_S)
    assert page.evaluate(f"{rows}.filter((row) => row.probe).length") == MANY
    assert float(page.evaluate("document.getElementById('dashboard').dataset.renderMs")) < 250

    # A scrollable table whose header stays in view.
    scroll = "document.querySelector('.sessions .scroll')"
    assert page.evaluate(f"{scroll}.scrollHeight > {scroll}.clientHeight")
    page.evaluate(f"{scroll}.scrollTop = {scroll}.scrollHeight")
    header = "document.querySelector('#sessions-table th')"
    offset = page.evaluate(f"{header}.getBoundingClientRect().top - {scroll}.getBoundingClientRect().top")
    assert abs(offset) <= 1
    page.evaluate(f"{scroll}.scrollTop = 0")
    page.screenshot(tmp_path / "hundred-sessions.png")

    def narrow(text: str) -> list[str]:
        page.evaluate(
            f"(() => {{ const box = document.getElementById('filter'); box.value = {js(text)};"
            "box.dispatchEvent(new Event('input')); })()"
        )
        return page.evaluate(f"{rows}.filter((row) => !row.hidden).map((row) => row.dataset.sessionId)")

    assert narrow("home-04") == [f"home-{number:03d}" for number in range(49, 39, -1)]
    assert page.evaluate("document.getElementById('shown-count').textContent").startswith("10 shown")
    activity = listed[0]["activity"]
    matching = [
        summary["session_id"]
        for summary in listed
        if activity in (summary["activity"], (summary["last_window"] or {}).get("activity"))
    ]
    assert narrow(activity.upper()) == matching  # by activity, whatever the case
    page.screenshot(tmp_path / "filtered.png")
    assert len(narrow("")) == MANY


def test_live_page_reports_an_outage_and_recovers_without_reloading(
    redis_target: RedisTarget, page: Page, watch_data: WatchData, tmp_path: Path
) -> None:
    session_id = "wrist-2"
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[1])
    status = "document.getElementById('status')"
    with run_service(tmp_path, redis_url=redis_target.url, redis_prefix=redis_target.prefix) as first:
        open_dashboard(page, first)
        with httpx.Client(base_url=first.base, timeout=30, trust_env=False) as client:
            send(client, session_id, 0, {name: rows[:250].tolist() for name, rows in samples.items()})
        page.wait_for(f"{row(session_id)} !== null", timeout_s=PAGE_WAIT_S)
        os.killpg(first.process.pid, signal.SIGKILL)  # the service crashes, workers and all
        first.process.wait()
        page.wait_for(f"{status}.dataset.status === 'reconnecting'", timeout_s=PAGE_WAIT_S)
        text = page.evaluate(f"{status}.textContent")
        assert "service unreachable" in text and "last data" in text, text
        assert page.evaluate("document.getElementById('dashboard').classList.contains('stale')")
        page.screenshot(tmp_path / "reconnecting.png")

    # The service comes back on the same address, with the session in Redis: the page picks up again.
    with run_service(tmp_path, redis_url=redis_target.url, redis_prefix=redis_target.prefix, port=first.port):
        page.wait_for(f"{status}.dataset.status === 'live'", timeout_s=PAGE_WAIT_S)
        # While it is up: once stopped, the page would rightly turn stale again.
        assert page.evaluate("window.sameDocument === true")
        assert page.evaluate(f"{row(session_id)} !== null")
        assert not page.evaluate("document.getElementById('dashboard').classList.contains('stale')")
