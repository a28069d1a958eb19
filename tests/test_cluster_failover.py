"""A Redis Cluster resharding under a streaming session, and a cluster that goes down and comes back.

Resharding: the session's shard's slot moves to another master and back.

``dmft serve`` (two workers) streams a recording into a session of a three-master cluster of
the test's own, through the typed client, which retries 503 by ``seq``; a second client follows
the session's events, reconnecting with ``Last-Event-ID``. Meanwhile the session's slot is moved
key by key, as ``redis-cli --cluster reshard`` moves slots, to another master and then back.
Every answer must be 200 or 503, and every window predicted, recorded and streamed once, in order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from redis.crc import key_slot

from app.client import ActivityClient, PredictionEvent, RetryPolicy
from app.main import create_app
from app.settings import Settings
from app.store.shards import shard_of, shard_tags
from tools.redis_cluster import RedisClusterProcesses, free_node_ports, run_redis_cluster
from tools.stack import Server, run_service
from tools.traffic import MODALITIES, WatchData

from .service_fixtures import HOP, WINDOW, assert_error, metric_value, parse_metrics

SESSION = "resharded"
CHUNK = 25  # half a second of samples: many requests while the slot moves
PACE_S = 0.05
SHARDS = 16  # the service's default
RETRY = RetryPolicy(attempts=40, backoff=0.05, max_backoff=1.0)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    try:
        with run_redis_cluster(tmp_path / "cluster", free_node_ports(3)) as running:
            yield running
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture
def server(cluster: RedisClusterProcesses, tmp_path: Path) -> Iterator[Server]:
    with run_service(tmp_path, redis_url=cluster.url, redis_prefix="failover", workers=2) as running:
        yield running


def reshard_back_and_forth(cluster: RedisClusterProcesses, slot: int, started: threading.Event) -> list[int]:
    """Move ``slot`` to another master and back, slowly; the masters it was on, in turn."""
    home = cluster.owner(slot)
    away = next(port for port in cluster.ports if port != home)
    started.wait(30)
    cluster.move_slot(slot, away, batch=1, pause_s=0.3)
    moved_to = cluster.owner(slot)
    cluster.move_slot(slot, home, batch=1, pause_s=0.3)
    return [home, moved_to, cluster.owner(slot)]


def test_session_streams_through_a_resharding_without_losing_or_doubling_a_window(
    cluster: RedisClusterProcesses, server: Server, watch_data: WatchData
) -> None:
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[-1])
    length = min(len(samples["accelerometer"]), 1500)
    chunks = [{name: samples[name][i : i + CHUNK] for name in MODALITIES} for i in range(0, length, CHUNK)]
    windows = (length - WINDOW) // HOP + 1
    slot = key_slot(shard_tags(SHARDS)[shard_of(SESSION, SHARDS)].encode())

    statuses: list[int] = []
    hooks = {"response": [lambda response: statuses.append(response.status_code)]}
    started = threading.Event()
    placements: list[int] = []
    resharding = threading.Thread(
        target=lambda: placements.extend(reshard_back_and_forth(cluster, slot, started)), daemon=True
    )
    streamed: list[int] = []

    def follow() -> None:
        with ActivityClient(server.base, retry=RETRY) as follower:
            for event in follower.events(SESSION, last_event_id="0-0"):
                if isinstance(event.data, PredictionEvent):
                    streamed.append(event.data.window)
                if len(streamed) >= windows:
                    return

    following = threading.Thread(target=follow, daemon=True)
    following.start()
    resharding.start()
    answered: list[int] = []
    with ActivityClient(server.base, retry=RETRY, event_hooks=hooks) as client:
        stream = client.stream(SESSION)
        for index, chunk in enumerate(chunks):
            answer = stream.send(chunk)
            answered += [prediction.window for prediction in answer.predictions]
            if index == 3:
                started.set()
            if resharding.is_alive():
                time.sleep(PACE_S)  # spread the chunks over the whole resharding
        resharding.join(60)
        following.join(60)
        state = client.session(SESSION)
        recorded = [prediction.window for prediction in state.recent]

    assert not resharding.is_alive() and not following.is_alive()
    home, moved_to, back = placements
    assert moved_to != home and back == home  # the slot did move, and came back
    assert set(statuses) <= {200, 503}, statuses
    # A retried chunk whose windows were committed before its answer was lost answers without them: the
    # session's log has each window once, in order.
    assert answered == sorted(set(answered))
    assert streamed == list(range(windows))
    assert state.windows == windows
    assert recorded == list(range(windows))[-len(recorded) :]
    samples_after = parse_metrics(httpx.get(f"{server.base}/metrics", trust_env=False).text)
    for status in ("500", "502", "504"):
        assert metric_value(samples_after, "dmft_request_duration_seconds_count", {"status": status}) == 0
    print(f"answers during the resharding: {statuses.count(503)} x 503 of {len(statuses)}")


def test_a_cluster_down_answers_503_and_the_service_recovers_when_it_returns(
    cluster: RedisClusterProcesses, watch_data: WatchData
) -> None:
    """Every master stops, and starts again (its data lost: no persistence here): 503 meanwhile, then the service
    goes on without being restarted."""
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    chunk = {"seq": 0, "modalities": {name: samples[name][:WINDOW].tolist() for name in MODALITIES}}
    settings = Settings(redis_url=cluster.url, redis_prefix="restarted", compile_models=False)
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/sessions/before/samples", json=chunk).status_code == 200
        cluster.stop()
        for response in (
            client.post("/v1/sessions/during/samples", json=chunk),
            client.get("/v1/sessions/before"),
            client.get("/v1/overview"),
        ):
            assert_error(response, 503, "store_unavailable")
        assert client.get("/readyz").status_code == 503
        cluster.start()
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service did not find the cluster again within 30 s"
            time.sleep(0.2)
        answer = client.post("/v1/sessions/after/samples", json=chunk)
        assert answer.status_code == 200, answer.text
        assert [p["window"] for p in answer.json()["predictions"]] == [0]
        assert client.get("/v1/overview").json()["active_sessions"] == 1
