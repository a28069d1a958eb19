"""Activity tracking through HTTP on both stores: transitions without flapping, client time, history.

Three held-out recordings of different exercises are streamed back to back as one
session; the third has a few windows the model doubts, which must not flap.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tools.traffic import MODALITIES, WatchData

from .service_fixtures import (
    assert_error,
    client_on_each_store,  # noqa: F401 - the 'client' fixture
    memory_settings,
)

pytestmark = pytest.mark.usefixtures("no_server_errors")

SAMPLE_RATE = 50.0
CHUNK = 150  # 3 s
# Held-out recordings (seglearn indices): a steady one, another exercise, then one with a
# short stretch of doubtful windows in the middle.
RECORDINGS = (114, 74, 9)
ORIGIN = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
# A transition is dated to the first window of its confirming run: within a window of the true change.
TIME_TOLERANCE = timedelta(seconds=2)


@pytest.fixture(scope="module")
def exercises(watch_data: WatchData) -> tuple[dict[str, np.ndarray], list[str], list[datetime]]:
    """The recordings back to back, their labels, and where each begins in client time."""
    parts = [watch_data.recording_samples(index) for index in RECORDINGS]
    labels = [watch_data.recording_label(index) for index in RECORDINGS]
    assert len(set(labels)) == len(labels)
    starts, offset = [], 0
    for part in parts:
        starts.append(ORIGIN + timedelta(seconds=offset / SAMPLE_RATE))
        offset += len(part["accelerometer"])
    return {name: np.concatenate([part[name] for part in parts]) for name in MODALITIES}, labels, starts


def stream(client: TestClient, session_id: str, samples: dict[str, np.ndarray], **first: Any) -> list[dict]:
    answers = []
    length = len(samples["accelerometer"])
    for seq, start in enumerate(range(0, length, CHUNK)):
        body = {"seq": seq, "modalities": {n: a[start : start + CHUNK].tolist() for n, a in samples.items()}}
        response = client.post(f"/v1/sessions/{session_id}/samples", json={**body, **(first if seq == 0 else {})})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_transitions_follow_the_exercises_in_client_time(client: TestClient, exercises: Any) -> None:
    samples, labels, starts = exercises
    session_id = f"activity-{uuid.uuid4().hex[:8]}"
    answers = stream(client, session_id, samples, timestamp=ORIGIN.isoformat())
    transitions = [t for answer in answers for t in answer["transitions"]]
    # Entered once each, in order; the doubtful stretch of the last recording does not flap.
    assert [(t["from"], t["to"]) for t in transitions] == [
        ("unknown", labels[0]),
        (labels[0], labels[1]),
        (labels[1], labels[2]),
    ]
    for transition, start in zip(transitions, starts, strict=True):
        assert abs(parse_time(transition["time"]) - start) <= TIME_TOLERANCE, transition
        assert 0.6 <= transition["confidence"] <= 1
        assert (transition["session_id"], transition["model"]) == (session_id, "student")
    predictions = {p["window"]: p for answer in answers for p in answer["predictions"]}
    for transition in transitions:  # dated to the start of the first window of the new activity
        assert transition["time"] == predictions[transition["window"]]["start_time"]
        assert predictions[transition["window"]]["activity"] == transition["to"]
    # The doubtful windows are there: the model did change its mind, the tracker did not.
    assert any(p["activity"] not in labels for p in predictions.values())

    state = client.get(f"/v1/sessions/{session_id}").json()
    assert parse_time(state["started_at"]) == ORIGIN
    assert (state["activity"], state["since"]) == (labels[2], transitions[-1]["time"])
    assert state["confidence"] == pytest.approx(transitions[-1]["confidence"])


def test_history_has_one_segment_per_exercise(client: TestClient, exercises: Any) -> None:
    samples, labels, starts = exercises
    session_id = f"history-{uuid.uuid4().hex[:8]}"
    answers = stream(client, session_id, samples, timestamp=ORIGIN.isoformat())
    transitions = [t for answer in answers for t in answer["transitions"]]
    windows = sum(len(answer["predictions"]) for answer in answers)

    response = client.get(f"/v1/sessions/{session_id}/history")
    assert response.status_code == 200, response.text
    segments = response.json()["segments"]
    assert [(s["activity"], s["ongoing"]) for s in segments] == [
        (labels[0], False),
        (labels[1], False),
        (labels[2], True),
    ]
    assert [s["start"] for s in segments] == [t["time"] for t in transitions]
    assert [s["end"] for s in segments[:-1]] == [s["start"] for s in segments[1:]]
    last_window_end = max(p["end_time"] for answer in answers for p in answer["predictions"])
    assert segments[-1]["end"] == last_window_end
    assert sum(s["windows"] for s in segments) == windows
    assert all(0.6 < s["mean_confidence"] <= 1 for s in segments)

    def window(since: datetime | None = None, until: datetime | None = None) -> list[str]:
        params = {key: value.isoformat() for key, value in (("since", since), ("until", until)) if value}
        answer = client.get(f"/v1/sessions/{session_id}/history", params=params)
        assert answer.status_code == 200, answer.text
        return [s["activity"] for s in answer.json()["segments"]]

    middle = parse_time(segments[1]["start"]) + timedelta(seconds=1)
    assert window(since=middle, until=middle) == [labels[1]]
    assert window(until=starts[0] + timedelta(seconds=1)) == [labels[0]]
    assert window(since=parse_time(segments[1]["end"]) + timedelta(seconds=1)) == [labels[2]]
    assert window(since=starts[0] - timedelta(days=1), until=starts[0] - timedelta(hours=1)) == []


def test_without_timestamps_times_are_server_time(client: TestClient, exercises: Any) -> None:
    samples, labels, _ = exercises
    before = datetime.now(UTC)
    answers = stream(client, f"server-clock-{uuid.uuid4().hex[:8]}", {n: a[:600] for n, a in samples.items()})
    [transition] = [t for answer in answers for t in answer["transitions"]]
    assert transition["to"] == labels[0]
    assert before - timedelta(seconds=1) <= parse_time(transition["time"]) <= datetime.now(UTC)


def test_history_of_unknown_session_is_404(client: TestClient) -> None:
    response = client.get(f"/v1/sessions/never-{uuid.uuid4().hex[:8]}/history")
    assert_error(response, 404, "session_not_found")


MALFORMED_EVENT_IDS = [
    "yesterday",
    "12",
    "1-2-3",
    f"{2**64}-0",
    f"1-{2**64}",
    "\uff11-\uff11",  # digits, but not ASCII ones: Redis refuses them
    "\u0663-0",
    "\u00b2-0",  # a superscript two: a digit to str.isdigit, not to int
    "1" * 128 + "-0",
    "0" * 200 + "1-0",
    "-1-0",
    "+1-0",
]


@pytest.mark.parametrize("last_event_id", MALFORMED_EVENT_IDS)
@pytest.mark.parametrize("where", ["header", "query"])
def test_malformed_last_event_id_is_rejected(
    client: TestClient, exercises: Any, last_event_id: str, where: str
) -> None:
    samples, _, _ = exercises
    session_id = f"bad-id-{uuid.uuid4().hex[:8]}"
    stream(client, session_id, {n: a[:10] for n, a in samples.items()})
    if where == "header":
        # A header is bytes on the wire: what is not ASCII goes as UTF-8.
        response = client.get(f"/v1/sessions/{session_id}/events", headers={"Last-Event-ID": last_event_id.encode()})
    else:
        response = client.get(f"/v1/sessions/{session_id}/events", params={"last_event_id": last_event_id})
    error = assert_error(response, 422, "invalid_input", mentions=("event id",))
    assert len(error["message"]) < 200


def test_history_times_need_a_zone(client: TestClient, exercises: Any) -> None:
    samples, _, _ = exercises
    session_id = f"naive-{uuid.uuid4().hex[:8]}"
    stream(client, session_id, {n: a[:10] for n, a in samples.items()})
    for name in ("since", "until"):
        response = client.get(f"/v1/sessions/{session_id}/history", params={name: "2026-01-01T08:00:00"})
        assert_error(response, 422, "invalid_input")


def test_the_transition_delay_is_configurable(exercises: Any, watch_data: WatchData) -> None:
    """With the shortest delay (one window), the doubtful stretch of the last recording does flap."""
    samples, labels, _ = exercises
    with TestClient(create_app(memory_settings(transition_delay_seconds=2.0))) as client:
        answers = stream(client, "eager", samples)
    entered = [t["to"] for answer in answers for t in answer["transitions"]]
    assert len(entered) > len(labels)
    assert set(entered) <= set(watch_data.class_names)
    remaining = iter(entered)  # each exercise entered, in order, among the flaps
    assert all(label in remaining for label in labels)
