"""Streaming sessions through HTTP, on both session stores, plus Redis outages and the metrics.

A real held-out recording of the smartwatch dataset is streamed in uneven chunks; the
service must classify every 2 s window (hop 1 s) exactly once, in order, with the same
probabilities as the same window posted whole.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tools.stack import free_port
from tools.traffic import MODALITIES, WatchData

from .redis_fixtures import RedisTarget
from .service_fixtures import (
    HOP,
    WINDOW,
    assert_error,
    client_on_each_store,  # noqa: F401 - the 'client' fixture
    metric_value,
    parse_metrics,
)

pytestmark = pytest.mark.usefixtures("no_server_errors")

CHUNK_SIZES = (37, 113, 5, 250, 61)
PROBABILITY_TOLERANCE = 1e-5
SAMPLES_ROUTE = "/v1/sessions/{session_id}/samples"

Samples = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def recording(watch_data: WatchData) -> Samples:
    """The shortest held-out recording (about 1000 samples, 50 Hz), per modality."""
    return watch_data.recording_samples(watch_data.held_out_recordings()[0])


def new_session_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def expected_windows(length: int) -> int:
    return (length - WINDOW) // HOP + 1


def chunks(samples: Samples, sizes: tuple[int, ...] = CHUNK_SIZES) -> Iterator[dict[str, list[list[float]]]]:
    """Consecutive pieces of every modality, cycling through ``sizes``."""
    length = len(next(iter(samples.values())))
    start = 0
    for size in itertools.cycle(sizes):
        if start >= length:
            return
        yield {name: array[start : start + size].tolist() for name, array in samples.items()}
        start += size


def post(client: TestClient, session_id: str, seq: int, modalities: dict[str, Any], **extra: Any) -> Any:
    return client.post(f"/v1/sessions/{session_id}/samples", json={"seq": seq, "modalities": modalities, **extra})


def append(client: TestClient, session_id: str, seq: int, modalities: dict[str, Any], **extra: Any) -> dict[str, Any]:
    response = post(client, session_id, seq, modalities, **extra)
    assert response.status_code == 200, response.text
    return response.json()


def stream(client: TestClient, session_id: str, samples: Samples) -> list[dict[str, Any]]:
    """Every chunk of ``samples`` at seq 0, 1, 2, ...; returns the answers."""
    answers = []
    received = 0
    for seq, chunk in enumerate(chunks(samples)):
        answer = append(client, session_id, seq, chunk)
        received += len(next(iter(chunk.values())))
        assert answer["session_id"] == session_id
        assert (answer["seq"], answer["duplicate"]) == (seq, False)
        assert answer["received"] == dict.fromkeys(samples, received)
        assert all(0 <= answer["buffered"][name] < WINDOW + HOP for name in samples)
        answers.append(answer)
    return answers


# --- streaming -----------------------------------------------------------------------------


def test_stream_recording_classifies_every_window_once(
    client: TestClient, watch_data: WatchData, recording: Samples
) -> None:
    session_id = new_session_id()
    length = len(recording["accelerometer"])
    answers = stream(client, session_id, recording)
    predictions = [p for answer in answers for p in answer["predictions"]]
    n = expected_windows(length)
    assert [p["window"] for p in predictions] == list(range(n))
    for p in predictions:
        i = p["window"]
        assert p["start_sample"] == dict.fromkeys(MODALITIES, i * HOP)
        assert p["end_sample"] == dict.fromkeys(MODALITIES, i * HOP + WINDOW)
        assert p["start_seconds"] == pytest.approx(i * 1.0)
        assert p["end_seconds"] == pytest.approx(i * 1.0 + 2.0)
        assert p["model"] == "student"
        assert list(p["probabilities"]) == watch_data.class_names
        assert p["activity"] == max(p["probabilities"], key=p["probabilities"].__getitem__)
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    # Each window's answer is the answer to the same samples posted whole.
    windows = [
        {"modalities": {name: array[i * HOP : i * HOP + WINDOW].tolist() for name, array in recording.items()}}
        for i in range(n)
    ]
    response = client.post("/v1/predict/batch", json={"windows": windows})
    assert response.status_code == 200, response.text
    for streamed, whole in zip(predictions, response.json()["predictions"], strict=True):
        assert streamed["activity"] == whole["activity"]
        assert streamed["probabilities"] == pytest.approx(whole["probabilities"], abs=PROBABILITY_TOLERANCE)

    response = client.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    state = response.json()
    assert state["session_id"] == session_id
    assert state["model"] == "student"
    assert state["modalities"] == list(MODALITIES)
    assert state["seq"] == len(answers) - 1
    assert state["windows"] == n
    assert state["received"] == dict.fromkeys(MODALITIES, length)
    assert state["buffered"] == answers[-1]["buffered"]
    assert state["activity"] in watch_data.class_names
    assert 0 < state["confidence"] <= 1
    assert state["started_at"] <= state["updated_at"]
    recent = [p["window"] for p in state["recent"]]
    assert recent == list(range(n))[-50:]  # newest last, at most recent_predictions (50) of them
    assert state["since"] is not None


def test_stream_teacher_session_answers_with_teacher(client: TestClient, recording: Samples) -> None:
    session_id = new_session_id()
    first = {name: array[:120].tolist() for name, array in recording.items()}
    answer = append(client, session_id, 0, first, model="teacher")
    assert [p["window"] for p in answer["predictions"]] == [0]
    # The model is fixed by the first chunk; later chunks keep it.
    second = {name: array[120:200].tolist() for name, array in recording.items()}
    answer = append(client, session_id, 1, second)
    assert [(p["window"], p["model"]) for p in answer["predictions"]] == [(1, "teacher"), (2, "teacher")]
    assert client.get(f"/v1/sessions/{session_id}").json()["model"] == "teacher"


def test_stream_single_modality_session(client: TestClient, recording: Samples) -> None:
    session_id = new_session_id()
    answers = stream(client, session_id, {"gyroscope": recording["gyroscope"][:400]})
    predictions = [p for answer in answers for p in answer["predictions"]]
    assert [p["window"] for p in predictions] == list(range(expected_windows(400)))
    assert all(p["start_sample"] == {"gyroscope": p["window"] * HOP} for p in predictions)
    assert client.get(f"/v1/sessions/{session_id}").json()["modalities"] == ["gyroscope"]


def test_get_session_before_first_window_has_unknown_activity(client: TestClient, recording: Samples) -> None:
    session_id = new_session_id()
    append(client, session_id, 0, {name: array[:30].tolist() for name, array in recording.items()})
    state = client.get(f"/v1/sessions/{session_id}").json()
    assert (state["activity"], state["confidence"], state["since"]) == ("unknown", None, None)
    assert (state["windows"], state["recent"]) == (0, [])
    assert state["buffered"] == dict.fromkeys(MODALITIES, 30)


# --- seq -----------------------------------------------------------------------------------


def test_append_retried_chunk_is_duplicate(client: TestClient, recording: Samples) -> None:
    session_id = new_session_id()
    pieces = list(itertools.islice(chunks(recording), 4))
    answers = [append(client, session_id, seq, chunk) for seq, chunk in enumerate(pieces)]
    assert [p["window"] for p in answers[-1]["predictions"]] == [2, 3, 4, 5, 6]  # 155 -> 405 samples
    retry = append(client, session_id, 3, pieces[3])
    assert retry["duplicate"] is True
    assert retry["seq"] == 3
    assert retry["predictions"] == []
    assert retry["received"] == answers[-1]["received"]
    assert retry["buffered"] == answers[-1]["buffered"]
    state = client.get(f"/v1/sessions/{session_id}").json()
    assert state["seq"] == 3
    assert state["received"] == answers[-1]["received"]
    assert state["windows"] == 7
    assert [p["window"] for p in state["recent"]] == list(range(7))


@pytest.mark.parametrize(("seq", "kind"), [(1, "older"), (0, "first again"), (4, "gap"), (9, "far gap")])
def test_append_out_of_order_seq_is_409(client: TestClient, recording: Samples, seq: int, kind: str) -> None:
    session_id = new_session_id()
    for s in range(3):
        append(client, session_id, s, {name: array[s * 10 : s * 10 + 10].tolist() for name, array in recording.items()})
    response = post(client, session_id, seq, {name: array[30:40].tolist() for name, array in recording.items()})
    error = assert_error(response, 409, "seq_conflict", mentions=("expected 3", f"seq {seq}"))
    assert error["details"] == [{"expected_seq": 3}], kind
    assert client.get(f"/v1/sessions/{session_id}").json()["received"] == dict.fromkeys(MODALITIES, 30)


def test_append_first_chunk_with_nonzero_seq_is_409(client: TestClient, recording: Samples) -> None:
    session_id = new_session_id()
    response = post(client, session_id, 1, {"accelerometer": recording["accelerometer"][:10].tolist()})
    error = assert_error(response, 409, "seq_conflict", mentions=("expected 0",))
    assert error["details"] == [{"expected_seq": 0}]
    assert_error(client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")


# --- invalid chunks ------------------------------------------------------------------------


def test_append_modality_not_in_session_is_422(client: TestClient, recording: Samples) -> None:
    session_id = new_session_id()
    append(client, session_id, 0, {"accelerometer": recording["accelerometer"][:50].tolist()})
    response = post(client, session_id, 1, {"gyroscope": recording["gyroscope"][:50].tolist()})
    assert_error(response, 422, "invalid_input", mentions=("streams accelerometer", "gyroscope"))
    # Nothing was appended: seq 1 is still next.
    answer = append(client, session_id, 1, {"accelerometer": recording["accelerometer"][50:100].tolist()})
    assert answer["received"] == {"accelerometer": 100}
    assert [p["window"] for p in answer["predictions"]] == [0]


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"seq": 0, "modalities": {"magnetometer": [[0.0, 0.0, 0.0]]}}, ("unknown modality", "magnetometer")),
        ({"seq": 0, "modalities": {"accelerometer": [[0.0, 0.0]]}}, ("accelerometer", "row 0", "3 channels")),
        ({"seq": 0, "modalities": {"accelerometer": []}}, ("accelerometer", "no samples")),
        ({"seq": 0, "modalities": {}}, ("modalities", "at least 1")),
        ({"seq": -1, "modalities": {"accelerometer": [[0.0, 0.0, 0.0]]}}, ("seq", "greater than or equal to 0")),
        ({"modalities": {"accelerometer": [[0.0, 0.0, 0.0]]}}, ("seq", "required")),
        ({"seq": 0, "modalities": {"accelerometer": [[0.0, "1", 0.0]]}}, ("accelerometer[0][1]", "number")),
        ({"seq": 0, "modalities": {"accelerometer": [[0.0, 0.0, 0.0]]}, "model": "giant"}, ("model",)),
    ],
)
def test_append_malformed_chunk_is_422(client: TestClient, body: dict[str, Any], mentions: tuple[str, ...]) -> None:
    session_id = new_session_id()
    response = client.post(f"/v1/sessions/{session_id}/samples", json=body)
    assert_error(response, 422, "invalid_input", mentions=mentions)
    assert_error(client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")


# Outside float32: the network reads float32, so a finite JSON number can still overflow.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_append_sample_beyond_float32_range_is_422(client: TestClient, recording: Samples) -> None:
    session_id = new_session_id()
    rows = recording["accelerometer"][:100].tolist()
    rows[7][1] = 1e39
    response = post(client, session_id, 0, {"accelerometer": rows})
    assert_error(response, 422, "invalid_input", mentions=("accelerometer",))


def test_append_refused_first_chunk_creates_no_session(client: TestClient) -> None:
    session_id = new_session_id()
    too_much = [[0.0, 0.0, 0.0]] * (WINDOW + 120 * 50 + 1)  # one window plus max_buffer_seconds at 50 Hz, plus 1
    response = post(client, session_id, 0, {"accelerometer": too_much})
    assert_error(response, 422, "invalid_input", mentions=("accelerometer", "buffered"))
    assert_error(client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")


# --- lifecycle -----------------------------------------------------------------------------


def test_unknown_session_is_404(client: TestClient) -> None:
    assert_error(client.get("/v1/sessions/never-started"), 404, "session_not_found", mentions=("never-started",))
    assert_error(client.delete("/v1/sessions/never-started"), 404, "session_not_found", mentions=("never-started",))


def test_delete_session_ends_it(client: TestClient, recording: Samples) -> None:
    session_id = new_session_id()
    append(client, session_id, 0, {name: array[:150].tolist() for name, array in recording.items()})
    response = client.delete(f"/v1/sessions/{session_id}")
    assert response.status_code == 204
    assert response.content == b""
    assert_error(client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")
    assert_error(client.delete(f"/v1/sessions/{session_id}"), 404, "session_not_found")
    # The id may start again, from seq 0 and window 0.
    answer = append(client, session_id, 0, {name: array[:100].tolist() for name, array in recording.items()})
    assert [p["window"] for p in answer["predictions"]] == [0]


@pytest.mark.parametrize("session_id", ["has space", "x" * 200, "semi;colon", "brace{x}"])
def test_invalid_session_id_is_422(client: TestClient, session_id: str) -> None:
    body = {"seq": 0, "modalities": {"accelerometer": [[0.0, 0.0, 0.0]]}}
    assert_error(
        client.post(f"/v1/sessions/{session_id}/samples", json=body), 422, "invalid_input", mentions=("session_id",)
    )
    assert_error(client.get(f"/v1/sessions/{session_id}"), 422, "invalid_input", mentions=("session_id",))
    assert_error(client.delete(f"/v1/sessions/{session_id}"), 422, "invalid_input", mentions=("session_id",))


# --- overload ------------------------------------------------------------------------------


def test_append_overloaded_chunk_retried_on_another_replica_gets_its_predictions(
    recording: Samples, redis_target: RedisTarget
) -> None:
    session_id = new_session_id()
    chunk = {name: array[:150].tolist() for name, array in recording.items()}  # completes 2 windows at once
    with (
        TestClient(create_app(redis_target.settings(queue_size=1))) as saturated,
        TestClient(create_app(redis_target.settings())) as healthy,
    ):
        response = post(saturated, session_id, 0, chunk)
        assert_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"
        assert healthy.get(f"/v1/sessions/{session_id}").json()["windows"] == 0  # appended, nothing committed
        retry = append(healthy, session_id, 0, chunk)
        assert retry["duplicate"] is True
        assert [p["window"] for p in retry["predictions"]] == [0, 1]
        state = healthy.get(f"/v1/sessions/{session_id}").json()
        assert state["windows"] == 2
        assert [p["window"] for p in state["recent"]] == [0, 1]


# --- several API processes, one session ----------------------------------------------------


def test_two_apps_on_one_redis_session_classify_each_window_once(
    redis_target: RedisTarget, watch_data: WatchData
) -> None:
    recording = watch_data.recording_samples(watch_data.held_out_recordings()[1])
    length = len(recording["accelerometer"])
    session_id = new_session_id()
    with (
        TestClient(create_app(redis_target.settings())) as first,
        TestClient(create_app(redis_target.settings())) as second,
    ):
        clients = [first, second]
        windows: list[int] = []
        served = [0, 0]
        for seq, chunk in enumerate(chunks(recording)):
            answer = append(clients[seq % 2], session_id, seq, chunk)
            assert answer["seq"] == seq
            windows += [p["window"] for p in answer["predictions"]]
            served[seq % 2] += len(answer["predictions"])
        assert windows == list(range(expected_windows(length)))
        assert min(served) > 0, "both apps classified windows"
        states = [c.get(f"/v1/sessions/{session_id}").json() for c in clients]
        assert states[0] == states[1]
        assert states[0]["windows"] == expected_windows(length)
        assert [p["window"] for p in states[0]["recent"]] == windows[-50:]
        # A retry through the other app is still recognised as one.
        retry = append(clients[1 - seq % 2], session_id, seq, chunk)
        assert retry["duplicate"] is True and retry["predictions"] == []


# --- Redis outage --------------------------------------------------------------------------


def unreachable_redis_settings(port: int) -> Settings:
    return Settings(redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix="dmft-outage", compile_models=False)


def assert_store_unavailable(response: Any) -> None:
    assert_error(response, 503, "store_unavailable", mentions=("session store unreachable",))
    assert response.headers["retry-after"] == "1"


def test_redis_outage_answers_503_for_sessions_only(watch_data: WatchData) -> None:
    with TestClient(create_app(unreachable_redis_settings(free_port()))) as client:
        chunk = {"accelerometer": [[0.0, 0.0, 1.0]] * 10}
        assert_store_unavailable(post(client, "outage", 0, chunk))
        assert_store_unavailable(client.get("/v1/sessions/outage"))
        assert_store_unavailable(client.delete("/v1/sessions/outage"))
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "unavailable"
        assert ready.json()["checks"]["models"] == "ok"
        assert ready.json()["checks"]["store"].startswith("unreachable")
        assert client.get("/healthz").status_code == 200
        response = client.post("/v1/predict", json={"modalities": watch_data.window(int(watch_data.test[0]))})
        assert response.status_code == 200, response.text


@pytest.fixture
def redis_server_port() -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    """A free port for a throwaway redis-server the test starts itself; stopped afterwards."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed")
    servers: list[subprocess.Popen[bytes]] = []
    yield free_port(), servers
    for server in servers:
        server.terminate()
        try:
            server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()


def test_redis_outage_recovers_without_restart(
    redis_server_port: tuple[int, list[subprocess.Popen[bytes]]], recording: Samples
) -> None:
    port, servers = redis_server_port
    with TestClient(create_app(unreachable_redis_settings(port))) as client:
        first = {name: array[:120].tolist() for name, array in recording.items()}
        assert_store_unavailable(post(client, "recovery", 0, first))
        assert client.get("/readyz").status_code == 503

        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        servers.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert servers[0].poll() is None, f"redis-server exited: {servers[0].communicate()[0].decode()}"
            assert time.monotonic() < deadline, "the app did not reconnect to Redis within 10 s"
            time.sleep(0.1)
        assert client.get("/readyz").json() == {"status": "ok", "checks": {"models": "ok", "store": "ok"}}
        answer = append(client, "recovery", 0, first)
        assert [p["window"] for p in answer["predictions"]] == [0]
        second = {name: array[120:200].tolist() for name, array in recording.items()}
        answer = append(client, "recovery", 1, second)
        assert [p["window"] for p in answer["predictions"]] == [1, 2]
        assert client.get("/v1/sessions/recovery").json()["windows"] == 3


# --- metrics -------------------------------------------------------------------------------


def test_metrics_follow_session_traffic(client: TestClient, recording: Samples) -> None:
    session_id = f"metrics-{uuid.uuid4().hex}"
    route = {"route": SAMPLES_ROUTE}
    append(client, session_id, 0, {name: array[:120].tolist() for name, array in recording.items()})
    before = parse_metrics(client.get("/metrics").text)

    second = {name: array[120:350].tolist() for name, array in recording.items()}  # completes windows 1..5
    answer = append(client, session_id, 1, second)
    assert len(answer["predictions"]) == 5
    assert_error(post(client, session_id, 5, second), 409, "seq_conflict")
    response = client.post("/v1/predict", json={"modalities": {n: a[:100].tolist() for n, a in recording.items()}})
    assert response.status_code == 200
    text = client.get("/metrics").text
    after = parse_metrics(text)

    assert session_id not in text
    assert not any(session_id in value for sample in after for value in sample.labels.values())
    routes = {s.labels["route"] for s in after if s.name == "dmft_request_duration_seconds_count"}
    assert {SAMPLES_ROUTE, "/v1/sessions/{session_id}", "/v1/predict"} <= routes
    assert all(r.startswith("/") or r == "unmatched" for r in routes)

    def delta(name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert delta("dmft_request_duration_seconds_count", {**route, "method": "POST", "status": "200"}) == 1
    assert delta("dmft_request_duration_seconds_count", {**route, "method": "POST", "status": "409"}) == 1
    assert delta("dmft_request_duration_seconds_count", {"route": "/v1/predict", "status": "200"}) == 1
    assert delta("dmft_ingested_samples_total", {"modality": "accelerometer"}) == 230
    assert delta("dmft_ingested_samples_total", {"modality": "gyroscope"}) == 230
    assert delta("dmft_errors_total", {"reason": "seq_conflict"}) == 1
    assert delta("dmft_predictions_total", {"model": "student"}) == 5 + 1
    activities = {p["activity"] for p in answer["predictions"]}
    for activity in activities:
        assert delta("dmft_predictions_total", {"model": "student", "activity": activity}) >= 1
    assert delta("dmft_inference_duration_seconds_count", {"model": "student"}) >= 1
    assert delta("dmft_batch_size_sum", {"model": "student"}) == 5 + 1
    assert delta("dmft_queue_wait_seconds_count", {"model": "student"}) == 5 + 1
    assert metric_value(after, "dmft_active_sessions") >= 1


# --- clocks at the ends of the calendar ----------------------------------------------------------


@pytest.mark.parametrize(
    "timestamp", ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00", "1969-12-31T23:59:59Z", "2200-01-01T00:00:00Z"]
)
def test_timestamp_beyond_the_accepted_range_is_422_and_writes_nothing(
    client: TestClient, recording: Samples, timestamp: str
) -> None:
    session_id = new_session_id()
    chunk = {name: array[:WINDOW].tolist() for name, array in recording.items()}
    response = post(client, session_id, 0, chunk, timestamp=timestamp)
    assert_error(response, 422, "invalid_input", mentions=("timestamp", "1970-01-01", "2200-01-01"))
    assert_error(client.get(f"/v1/sessions/{session_id}"), 404, "session_not_found")
    answer = append(client, session_id, 0, chunk, timestamp="2199-12-31T23:59:50+01:00")
    assert [p["window"] for p in answer["predictions"]] == [0]


def test_overview_leaves_out_a_session_it_cannot_read_and_serves_the_others(
    client: TestClient, recording: Samples
) -> None:
    # A record dated beyond the calendar, as one written before such clocks were refused.
    service = client.app.state.sessions
    broken, healthy = new_session_id(), new_session_id()
    chunk = {name: array[:WINDOW].astype("<f4").tobytes() for name, array in recording.items()}
    layout = service.layout_for(list(recording))
    client.portal.call(
        lambda: service.store.append(
            broken, seq=0, model="student", layout=layout, chunk=chunk, now=time.time(), origin=1e12, ttl_seconds=60
        )
    )
    append(client, healthy, 0, {name: array[:WINDOW].tolist() for name, array in recording.items()})
    response = client.get("/v1/overview", params={"limit": 500})
    assert response.status_code == 200, response.text
    listed = {session["session_id"] for session in response.json()["sessions"]}
    assert healthy in listed and broken not in listed
