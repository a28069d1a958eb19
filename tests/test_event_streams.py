"""Event streams over real HTTP (``dmft serve``), on the embedded store and on Redis.

A dashboard may subscribe before its sensor starts; an expired session's stream ends when it
expires; a hundred clients that come and go while a session streams leave the service working;
and on Redis, open streams and bursts of sessions share a bounded pool of connections instead
of exhausting it.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tools.stack import Server, run_service
from tools.traffic import MODALITIES, WatchData

from .redis_fixtures import RedisTarget, private_redis

WAIT_S = 20
CHUNK = 100  # 2 s of samples: one window, then one more per 50 samples
STORES = ["memory", "redis", "cluster"]


@dataclass
class ServerSentEvent:
    id: str | None
    type: str
    data: dict


KEEP_ALIVE = "keep-alive"


def read_stream(base: str, path: str, into: queue.Queue, headers: dict[str, str]) -> None:
    """Put every event of the stream, and ``KEEP_ALIVE`` for each keep-alive comment, on ``into``; None at its end."""
    try:
        with (
            httpx.Client(base_url=base, timeout=httpx.Timeout(5, read=120), trust_env=False) as client,
            client.stream("GET", path, headers=headers) as response,
        ):
            into.put(response.status_code)
            fields: dict[str, str] = {}
            for line in response.iter_lines():
                if line.startswith(":"):
                    into.put(KEEP_ALIVE)
                elif line == "":
                    if "event" in fields:
                        into.put(ServerSentEvent(fields.get("id"), fields["event"], json.loads(fields["data"])))
                    fields = {}
                else:
                    name, _, value = line.partition(": ")
                    fields[name] = value
    finally:
        into.put(None)


def follow(base: str, session_id: str, **headers: str) -> queue.Queue:
    """The session's stream, read in a thread; its first item is the answer's status."""
    events: queue.Queue = queue.Queue()
    path = f"/v1/sessions/{session_id}/events"
    threading.Thread(target=read_stream, args=(base, path, events, headers), daemon=True).start()
    return events


def next_event(events: queue.Queue, timeout: float = WAIT_S) -> ServerSentEvent | None:
    """The next prediction or end (None: the stream closed), skipping keep-alives and the transitions that the
    tracker confirms at windows of its own choosing."""
    while True:
        item = events.get(timeout=timeout)
        if item != KEEP_ALIVE and not (isinstance(item, ServerSentEvent) and item.type == "transition"):
            return item


def pieces(watch_data: WatchData, count: int, size: int = CHUNK) -> list[dict[str, list[list[float]]]]:
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[-1])
    return [{name: samples[name][i * size : (i + 1) * size].tolist() for name in MODALITIES} for i in range(count)]


def send(client: httpx.Client, session_id: str, seq: int, modalities: dict) -> dict:
    response = client.post(f"/v1/sessions/{session_id}/samples", json={"seq": seq, "modalities": modalities})
    assert response.status_code == 200, response.text
    return response.json()


@contextmanager
def serve(store: str, tmp_path: Path, request: pytest.FixtureRequest, **env: str) -> Iterator[Server]:
    """``dmft serve`` on the named store (Redis under a prefix of its own)."""
    settings = {f"DMFT_{name.upper()}": value for name, value in env.items()}
    if store == "memory":
        with run_service(tmp_path, env=settings) as server:
            yield server
    else:
        target: RedisTarget = request.getfixturevalue(f"module_{store}_target")
        with run_service(tmp_path, redis_url=target.url, redis_prefix=target.prefix, env=settings) as server:
            yield server


@pytest.fixture(scope="module", params=STORES)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One service per store for the module's tests, with a keep-alive every 0.3 s."""
    with serve(request.param, tmp_path_factory.mktemp(request.param), request, sse_keepalive_seconds="0.3") as running:
        yield running


def test_subscribe_before_the_session_starts(server: Server, watch_data: WatchData) -> None:
    with httpx.Client(base_url=server.base, timeout=30, trust_env=False) as client:
        events = follow(server.base, "early")
        assert events.get(timeout=WAIT_S) == 200
        assert [events.get(timeout=WAIT_S) for _ in range(2)] == [KEEP_ALIVE, KEEP_ALIVE]  # waiting, not closed
        answers = [send(client, "early", seq, chunk) for seq, chunk in enumerate(pieces(watch_data, 3))]
        windows = [p["window"] for answer in answers for p in answer["predictions"]]
        assert windows == [0, 1, 2, 3, 4]
        seen = [next_event(events) for _ in windows]
        assert [(e.type, e.data["window"]) for e in seen if e is not None] == [("prediction", w) for w in windows]
        assert client.delete("/v1/sessions/early").status_code == 204
        end = next_event(events)
        assert end is not None and (end.type, end.data["session_id"]) == ("end", "early")
        assert events.get(timeout=WAIT_S) is None


@pytest.mark.parametrize("store", ["memory", "redis"])  # a cluster's expiry is the single Redis's
def test_stream_of_an_expired_session_ends_when_it_expires(
    store: str, tmp_path: Path, request: pytest.FixtureRequest, watch_data: WatchData
) -> None:
    """The end comes with the expiry, not with the next keep-alive a minute later."""
    with (
        serve(store, tmp_path, request, sse_keepalive_seconds="60", session_ttl_seconds="2") as server,
        httpx.Client(base_url=server.base, timeout=30, trust_env=False) as client,
    ):
        events = follow(server.base, "short-lived")
        assert events.get(timeout=WAIT_S) == 200
        send(client, "short-lived", 0, pieces(watch_data, 1)[0])
        first = next_event(events)
        assert first is not None and first.type == "prediction"
        end = next_event(events, timeout=10)  # the session expires 2 s after its chunk
        assert isinstance(end, ServerSentEvent) and end.type == "end", end
        assert events.get(timeout=WAIT_S) is None


def test_resuming_the_stream_of_an_ended_session_ends_it(server: Server, watch_data: WatchData) -> None:
    """A client that saw events of a session that ended meanwhile learns so at once, rather than waiting for the
    id to start again."""
    with httpx.Client(base_url=server.base, timeout=30, trust_env=False) as client:
        send(client, "gone", 0, pieces(watch_data, 1)[0])
        events = follow(server.base, "gone", **{"Last-Event-ID": "0-0"})
        assert events.get(timeout=WAIT_S) == 200
        seen = next_event(events)
        assert seen is not None and seen.id is not None
        assert client.delete("/v1/sessions/gone").status_code == 204
        end = next_event(events)
        assert end is not None and end.type == "end"
        resumed = follow(server.base, "gone", **{"Last-Event-ID": seen.id})
        assert resumed.get(timeout=WAIT_S) == 200
        end = next_event(resumed)
        assert end is not None and end.type == "end"
        assert resumed.get(timeout=WAIT_S) is None


async def churn_while_streaming(base: str, rows: list[dict], *, clients: int, seconds: float) -> list[str]:
    """``clients`` readers of one session connect, listen 0.05-1.5 s and leave, again and again, while its chunks
    are posted; the problems seen."""
    problems: list[str] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10, trust_env=False) as client:

        async def churn(rng: random.Random) -> None:
            while not stop.is_set():
                try:
                    async with client.stream("GET", "/v1/sessions/churn/events") as response:
                        if response.status_code != 200:
                            problems.append(f"stream answered {response.status_code}")
                        async with asyncio.timeout(rng.uniform(0.05, 1.5)):
                            async for _ in response.aiter_lines():
                                pass
                except TimeoutError:
                    pass  # this client leaves
                except httpx.HTTPError as error:
                    problems.append(f"stream failed: {error!r}")

        readers = [asyncio.create_task(churn(random.Random(seed))) for seed in range(clients)]
        deadline = asyncio.get_running_loop().time() + seconds
        seq = 0
        while asyncio.get_running_loop().time() < deadline:
            body = {"seq": seq, "modalities": rows[seq % len(rows)]}
            try:
                response = await client.post("/v1/sessions/churn/samples", json=body)
            except httpx.TimeoutException:
                problems.append(f"chunk {seq} got no answer within 10 s")
                break
            if response.status_code != 200:
                problems.append(f"chunk {seq}: {response.status_code} {response.text[:200]}")
                break
            seq += 1
        stop.set()
        await asyncio.gather(*readers)
    return problems


@pytest.mark.parametrize("store", ["memory", "redis"])  # the cluster's subscriptions: test_cluster_failover.py
def test_event_stream_clients_coming_and_going_leave_the_service_working(
    store: str, tmp_path: Path, request: pytest.FixtureRequest, watch_data: WatchData
) -> None:
    with serve(store, tmp_path, request) as server:
        rows = pieces(watch_data, 8, size=50)
        problems = asyncio.run(churn_while_streaming(server.base, rows, clients=60, seconds=3))
        assert problems == []
        with httpx.Client(base_url=server.base, timeout=5, trust_env=False) as client:
            assert client.get("/v1/sessions/churn").status_code == 200
            assert client.get("/v1/overview").status_code == 200
            assert client.get("/readyz").status_code == 200
            assert client.get("/metrics").status_code == 200
        os.killpg(server.process.pid, signal.SIGTERM)
        # SIGTERM stops it: uvicorn shuts down, then ends by the signal it got.
        assert server.process.wait(timeout=15) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log.read_text()


def connected_clients(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("clients")["connected_clients"]) - 1  # this one
    finally:
        client.close()


async def open_streams(base: str, session_ids: list[str], ready: asyncio.Event) -> dict[str, list[int]]:
    """Follow each session (from its first event) until it ends; the windows of the predictions each stream saw."""
    seen: dict[str, list[int]] = {session_id: [] for session_id in session_ids}
    opened = 0
    limits = httpx.Limits(max_connections=len(session_ids) + 10)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(10, read=60)) as client:

        async def one(session_id: str) -> None:
            nonlocal opened
            headers = {"Last-Event-ID": "0-0"}
            async with client.stream("GET", f"/v1/sessions/{session_id}/events", headers=headers) as response:
                assert response.status_code == 200
                opened += 1
                if opened == len(session_ids):
                    ready.set()
                kind = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: ") and kind == "prediction":
                        seen[session_id].append(json.loads(line.removeprefix("data: "))["window"])
                    elif line.startswith("data: ") and kind == "end":
                        return

        await asyncio.gather(*(one(session_id) for session_id in session_ids))
    return seen


async def burst(base: str, session_ids: list[str], chunk: dict, seq: int) -> list[int]:
    """One chunk to every session at once; the statuses."""
    limits = httpx.Limits(max_connections=len(session_ids) + 10)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        body = {"seq": seq, "modalities": chunk}
        answers = await asyncio.gather(
            *(client.post(f"/v1/sessions/{session_id}/samples", json=body) for session_id in session_ids)
        )
    return [answer.status_code for answer in answers]


def test_redis_connections_stay_bounded_under_bursts_and_open_streams(tmp_path: Path, watch_data: WatchData) -> None:
    """200 sessions started at once, the overview of 150 of them, and 60 open streams, on a pool of 8 connections:
    requests wait for a connection instead of failing, and streams hold none."""
    first, second = pieces(watch_data, 2)
    session_ids = [f"burst-{i}" for i in range(200)]
    followed = session_ids[:60]
    with private_redis(tmp_path / "redis") as url:
        env = {"DMFT_REDIS_MAX_CONNECTIONS": "8"}
        with run_service(tmp_path, redis_url=url, redis_prefix="bounded", env=env) as server:
            assert asyncio.run(burst(server.base, session_ids, first, 0)) == [200] * len(session_ids)
            overview = httpx.get(f"{server.base}/v1/overview", params={"limit": 150}, timeout=30, trust_env=False)
            assert overview.status_code == 200, overview.text
            assert (overview.json()["active_sessions"], len(overview.json()["sessions"])) == (200, 150)

            async def stream_and_count() -> tuple[dict[str, list[int]], int]:
                ready = asyncio.Event()
                streams = asyncio.create_task(open_streams(server.base, followed, ready))
                await asyncio.wait_for(ready.wait(), WAIT_S)
                await asyncio.sleep(0.5)
                held = connected_clients(url)
                assert await burst(server.base, followed, second, 1) == [200] * len(followed)
                async with httpx.AsyncClient(base_url=server.base) as client:
                    for session_id in followed:
                        assert (await client.delete(f"/v1/sessions/{session_id}")).status_code == 204
                return await asyncio.wait_for(streams, WAIT_S), held

            seen, held = asyncio.run(stream_and_count())
    assert held <= 8 + 1, f"{held} connections to Redis with {len(followed)} streams open"
    assert seen == {session_id: [0, 1, 2] for session_id in followed}
