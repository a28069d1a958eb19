"""Server-sent events and webhooks over real HTTP: ``dmft serve`` with two workers on the real Redis, and on the
real Redis Cluster.

The event stream is read by a real HTTP client, dropped mid-session and resumed with
``Last-Event-ID``. Webhooks go to a real HTTP server on loopback that checks every
signature, and that is taken down for a while and brought back.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tools.stack import Server, free_port, run_service
from tools.traffic import MODALITIES, WatchData
from tools.webhook_receiver import Receiver

from .redis_fixtures import RedisTarget
from .service_fixtures import metric_value, parse_metrics

CHUNK = 150
RECORDINGS = (114, 74, 9)  # three exercises, as in the activity tests: three transitions
WAIT_S = 30


@dataclass
class ServerSentEvent:
    id: str | None  # none on the end event
    type: str
    data: dict


def read_events(base: str, session_id: str, into: queue.Queue, *, last_event_id: str | None = None) -> None:
    """Put each event of the session's stream on ``into`` until the stream closes (None marks the end)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with (
        httpx.Client(base_url=base, timeout=httpx.Timeout(5, read=60), trust_env=False) as client,
        client.stream("GET", f"/v1/sessions/{session_id}/events", headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line == "":
                if "event" in fields:
                    into.put(ServerSentEvent(fields.get("id"), fields["event"], json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    into.put(None)


def follow(base: str, session_id: str, *, last_event_id: str | None = None) -> queue.Queue:
    events: queue.Queue = queue.Queue()
    threading.Thread(
        target=read_events, args=(base, session_id, events), kwargs={"last_event_id": last_event_id}, daemon=True
    ).start()
    return events


def take(events: queue.Queue, count: int) -> list[ServerSentEvent]:
    return [events.get(timeout=WAIT_S) for _ in range(count)]


@pytest.fixture
def exercises(watch_data: WatchData) -> dict[str, np.ndarray]:
    parts = [watch_data.recording_samples(index) for index in RECORDINGS]
    return {name: np.concatenate([part[name] for part in parts]) for name in MODALITIES}


def chunks(samples: dict[str, np.ndarray]) -> list[dict]:
    length = len(samples["accelerometer"])
    return [{n: a[start : start + CHUNK].tolist() for n, a in samples.items()} for start in range(0, length, CHUNK)]


def send(client: httpx.Client, session_id: str, seq: int, chunk: dict) -> dict:
    response = client.post(f"/v1/sessions/{session_id}/samples", json={"seq": seq, "modalities": chunk})
    assert response.status_code == 200, response.text
    return response.json()


REDIS_TARGETS = {"redis": "redis_target", "cluster": "cluster_target"}


@pytest.fixture(params=list(REDIS_TARGETS))
def any_redis(request: pytest.FixtureRequest) -> RedisTarget:
    """A prefix on the test Redis, then on the test Redis Cluster."""
    return request.getfixturevalue(REDIS_TARGETS[request.param])


@pytest.fixture
def server(any_redis: RedisTarget, tmp_path: Path) -> Iterator[Server]:
    with run_service(tmp_path, redis_url=any_redis.url, redis_prefix=any_redis.prefix, workers=2) as running:
        yield running


def test_event_stream_resumes_with_last_event_id(server: Server, exercises: dict[str, np.ndarray]) -> None:
    session_id = "sse-resume"
    pieces = chunks(exercises)
    half = len(pieces) // 2
    with httpx.Client(base_url=server.base, timeout=30, trust_env=False) as client:
        answers = [send(client, session_id, 0, pieces[0])]  # the stream needs a session
        # From the start of the log ("0-0"), so that no event is missed however late the stream connects.
        events = follow(server.base, session_id, last_event_id="0-0")
        answers += [send(client, session_id, seq, piece) for seq, piece in enumerate(pieces[1:half], start=1)]
        seen = take(events, sum(len(a["predictions"]) + len(a["transitions"]) for a in answers))
        # The client goes away; the session goes on.
        later = [send(client, session_id, seq, piece) for seq, piece in enumerate(pieces[half:], start=half)]
        resumed = follow(server.base, session_id, last_event_id=seen[-1].id)
        rest = take(resumed, sum(len(a["predictions"]) + len(a["transitions"]) for a in later))
        assert client.delete(f"/v1/sessions/{session_id}").status_code == 204
        end = resumed.get(timeout=WAIT_S)
        assert resumed.get(timeout=WAIT_S) is None  # the stream closed
        answers += later
        # A stream lasts as long as its client listens: it is no request latency.
        samples = parse_metrics(client.get("/metrics").text)
        events_route = {"route": "/v1/sessions/{session_id}/events"}
        assert metric_value(samples, "dmft_request_duration_seconds_count", events_route) == 0
        assert (
            metric_value(samples, "dmft_request_duration_seconds_count", {"route": "/v1/sessions/{session_id}/samples"})
            > 0
        )

    everything = seen + rest
    assert len({event.id for event in everything}) == len(everything)
    # Every window once, in order, and every transition the API answered, as it answered it.
    windows = [event.data["window"] for event in everything if event.type == "prediction"]
    assert windows == [p["window"] for answer in answers for p in answer["predictions"]] == list(range(len(windows)))
    transitions = [event.data for event in everything if event.type == "transition"]
    assert transitions == [t for answer in answers for t in answer["transitions"]]
    assert len(transitions) == len(RECORDINGS)
    assert all(event.data["session_id"] == session_id for event in everything)
    # Each transition comes right after the prediction of the window that confirmed it.
    for position, event in enumerate(everything):
        if event.type == "transition":
            assert everything[position - 1].type == "prediction"
    assert (end.type, end.data["session_id"]) == ("end", session_id)


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_webhooks_deliver_every_transition_once_in_order_across_an_outage(
    any_redis: RedisTarget, tmp_path: Path, exercises: dict[str, np.ndarray]
) -> None:
    receiver = Receiver(free_port())
    receiver.start()
    env = {
        **receiver.settings_env(),
        "DMFT_WEBHOOK_INITIAL_BACKOFF_SECONDS": "0.2",
        "DMFT_WEBHOOK_MAX_BACKOFF_SECONDS": "1",
    }
    try:
        with (
            run_service(tmp_path, redis_url=any_redis.url, redis_prefix=any_redis.prefix, workers=2, env=env) as server,
            httpx.Client(base_url=server.base, timeout=30, trust_env=False) as client,
        ):
            pieces = chunks(exercises)
            sent: dict[str, list[dict]] = {}

            def stream(session_id: str) -> None:
                answers = [send(client, session_id, seq, piece) for seq, piece in enumerate(pieces)]
                sent[session_id] = [t for answer in answers for t in answer["transitions"]]
                assert len(sent[session_id]) == 3

            def failures() -> float:
                samples = parse_metrics(client.get("/metrics").text)
                return metric_value(samples, "dmft_webhook_deliveries_total", {"outcome": "failed"})

            stream("home-a")
            wait_for(lambda: len(receiver.received) == 3, "the first session's transitions")
            receiver.stop()  # down while the second session is streamed
            stream("home-b")
            wait_for(lambda: failures() > 0, "a failed delivery to count")
            time.sleep(1.5)  # a few more retries against the closed port
            receiver.start()
            wait_for(lambda: len(receiver.received) >= 6, "the queued transitions after the outage")
            time.sleep(1.0)  # nothing more may come
            samples = parse_metrics(client.get("/metrics").text)
    finally:
        receiver.stop()

    assert receiver.bad_signatures == 0
    assert len(receiver.received) == 6
    assert len({event["event_id"] for event in receiver.received}) == 6  # each once
    for session_id, transitions in sent.items():
        delivered = [
            {key: value for key, value in event.items() if key != "event_id"}
            for event in receiver.received
            if event["session_id"] == session_id
        ]
        assert delivered == transitions  # all of them, in order, as the API answered them
    assert metric_value(samples, "dmft_webhook_deliveries_total", {"outcome": "delivered"}) == 6
    assert metric_value(samples, "dmft_webhook_deliveries_total", {"outcome": "dropped"}) == 0
