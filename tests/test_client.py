"""The Python client against a real ``dmft serve`` over real HTTP, sync and async.

Faults come from a TCP proxy between the client and the server (``faulty_proxy``): an
answer lost after the server processed the request, a 503 from the gateway, a cut
event stream. The server itself is never replaced.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.client import (
    ActivityClient,
    AsyncActivityClient,
    PredictionEvent,
    RetryPolicy,
    ServiceError,
    ServiceUnreachable,
    SessionEnd,
    SessionEvent,
)
from app.schemas import Transition
from tools.stack import Server, free_port, run_service
from tools.traffic import MODALITIES, WatchData

from .faulty_proxy import FaultyProxy, faulty_proxy
from .redis_fixtures import RedisTarget
from .service_fixtures import HOP, WINDOW

CHUNK = 50  # samples per chunk: one second at 50 Hz
# Quick retries: the tests wait for the faults they inject, not for production backoff.
FAST_RETRY = RetryPolicy(attempts=4, backoff=0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One ``dmft serve`` with in-process sessions for the module; each test uses its own session ids."""
    with run_service(tmp_path_factory.mktemp("serve")) as running:
        yield running


@pytest.fixture
def proxy(server: Server) -> Iterator[FaultyProxy]:
    with faulty_proxy(server.port) as running:
        yield running


def _client(url: str, retry: RetryPolicy = FAST_RETRY) -> ActivityClient:
    return ActivityClient(url, retry=retry, trust_env=False)


def _async_client(url: str, retry: RetryPolicy = FAST_RETRY) -> AsyncActivityClient:
    return AsyncActivityClient(url, retry=retry, trust_env=False)


def _chunks(watch_data: WatchData, count: int | None = None) -> list[dict[str, np.ndarray]]:
    """One-second chunks of the shortest held-out recording."""
    recording = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    length = len(recording["accelerometer"])
    chunks = [{name: a[start : start + CHUNK] for name, a in recording.items()} for start in range(0, length, CHUNK)]
    return chunks[:count]


def test_binary_client_sends_msgpack_and_gets_the_answers_of_json(server: Server, watch_data: WatchData) -> None:
    window = {name: np.asarray(rows) for name, rows in watch_data.window(int(watch_data.test[0])).items()}
    sent: list[str] = []

    def record(request: httpx.Request) -> None:
        sent.append(request.headers["content-type"])

    hooks = {"request": [record]}
    with _client(server.base) as plain, ActivityClient(server.base, binary=True, event_hooks=hooks) as binary:
        expected = plain.predict(window)
        assert binary.predict(window).probabilities == pytest.approx(expected.probabilities, abs=1e-6)
        [batched] = binary.predict_batch([window])
        assert batched.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
        session_id = f"binary-{uuid.uuid4().hex[:8]}"
        answer = binary.stream(session_id).send({name: samples[:WINDOW] for name, samples in window.items()})
        assert [p.window for p in answer.predictions] == [0]
        with pytest.raises(ValueError, match="2-D"):
            binary.predict({"accelerometer": np.zeros(300)})
    assert sent == ["application/msgpack"] * 3


def test_predict_batch_and_models_parse_into_the_schemas(server: Server, watch_data: WatchData) -> None:
    windows = [watch_data.window(int(i)) for i in watch_data.test[:3]]
    with _client(server.base) as client:
        models = client.models()
        one = client.predict(windows[0], model="teacher")
        batch = client.predict_batch(windows, model="teacher")
    assert {info.name for info in models.models} == {"student", "teacher"}
    assert models.models[0].classes == watch_data.class_names
    assert one.model == "teacher" and one.activity in watch_data.class_names
    assert one.modalities_used == list(MODALITIES)
    assert len(batch) == 3 and batch[0].activity == one.activity
    assert batch[0].probabilities == pytest.approx(one.probabilities, abs=1e-5)


def test_stream_numbers_chunks_and_the_session_reads_back(server: Server, watch_data: WatchData) -> None:
    chunks = _chunks(watch_data)
    origin = datetime(2026, 3, 1, 7, 30, tzinfo=UTC)
    with _client(server.base) as client:
        stream = client.stream("client-stream", model="student")
        responses = [stream.send(chunk, timestamp=origin if k == 0 else None) for k, chunk in enumerate(chunks)]
        state = client.session("client-stream")
        history = client.history("client-stream")
        client.end_session("client-stream")
        with pytest.raises(ServiceError) as gone:
            client.session("client-stream")
    length = sum(len(chunk["accelerometer"]) for chunk in chunks)
    windows = [p.window for response in responses for p in response.predictions]
    assert [r.seq for r in responses] == list(range(len(chunks))) and stream.seq == len(chunks)
    assert windows == list(range((length - WINDOW) // HOP + 1))
    assert state.started_at == origin and state.received == dict.fromkeys(MODALITIES, length)
    assert responses[0].predictions == [] and responses[1].predictions[0].start_time == origin
    label = watch_data.recording_label(watch_data.held_out_recordings()[0])
    assert state.activity == label and history.segments[-1].activity == label
    assert (gone.value.status, gone.value.code) == (404, "session_not_found")


def test_errors_raise_the_service_error_shape_without_retrying(proxy: FaultyProxy, watch_data: WatchData) -> None:
    first, second = _chunks(watch_data, 2)
    with _client(proxy.url) as client:
        client.send_chunk("client-errors", 0, first)
        with pytest.raises(ServiceError) as conflict:
            client.send_chunk("client-errors", 5, second)
        with pytest.raises(ServiceError) as invalid:
            client.predict({"barometer": [[1.0]]})
    assert (conflict.value.status, conflict.value.code, conflict.value.expected_seq) == (409, "seq_conflict", 1)
    assert (invalid.value.status, invalid.value.code) == (422, "invalid_input")
    assert "barometer" in invalid.value.message
    assert proxy.connections == 1  # keep-alive throughout: nothing was retried


def _assert_resent_once(proxy: FaultyProxy, responses: list, received: dict[str, int], chunks: list) -> None:
    assert proxy.lost == 1
    assert [(r.seq, r.duplicate) for r in responses] == [(0, False), (1, True), (2, False)]
    assert received == dict.fromkeys(MODALITIES, sum(len(c["accelerometer"]) for c in chunks))


def _stream_losing_the_second_answer(proxy: FaultyProxy, session_id: str, chunks: list) -> None:
    """Three chunks through the blocking client; the proxy loses the answer to the second."""
    with _client(proxy.url) as client:
        stream = client.stream(session_id)
        responses = [stream.send(chunks[0])]
        proxy.lose_next_answer()
        responses += [stream.send(chunks[1]), stream.send(chunks[2])]
        received = client.session(session_id).received
    _assert_resent_once(proxy, responses, received, chunks)


def test_a_chunk_whose_answer_was_lost_is_resent_and_not_doubled(proxy: FaultyProxy, watch_data: WatchData) -> None:
    _stream_losing_the_second_answer(proxy, "client-lost-sync", _chunks(watch_data, 3))


def test_async_client_resends_a_lost_chunk_and_streams(proxy: FaultyProxy, watch_data: WatchData) -> None:
    chunks = _chunks(watch_data, 3)

    async def run() -> tuple[list, dict[str, int], str]:
        async with _async_client(proxy.url) as client:
            stream = client.stream("client-lost-async")
            responses = [await stream.send(chunks[0])]
            proxy.lose_next_answer()
            responses += [await stream.send(chunks[1]), await stream.send(chunks[2])]
            state = await client.session("client-lost-async")
            prediction = await client.predict(watch_data.window(int(watch_data.test[0])))
            return responses, state.received, prediction.activity

    responses, received, activity = asyncio.run(run())
    _assert_resent_once(proxy, responses, received, chunks)
    assert activity in watch_data.class_names


def test_lost_answer_on_redis_sessions_is_not_doubled(
    redis_target: RedisTarget, tmp_path: Path, watch_data: WatchData
) -> None:
    with (
        run_service(tmp_path, redis_url=redis_target.url, redis_prefix=redis_target.prefix) as server,
        faulty_proxy(server.port) as proxy,
    ):
        _stream_losing_the_second_answer(proxy, "client-lost-redis", _chunks(watch_data, 3))


def test_503_is_retried_after_its_retry_after(proxy: FaultyProxy, watch_data: WatchData) -> None:
    window = watch_data.window(int(watch_data.test[0]))
    overloaded = b'{"error": {"code": "overloaded", "message": "busy"}}'
    proxy.answer_next(503, {"retry-after": "1", "content-type": "application/json"}, overloaded)
    with _client(proxy.url) as client:
        started = time.monotonic()
        prediction = client.predict(window)
        waited = time.monotonic() - started
    assert prediction.activity in watch_data.class_names
    assert proxy.answered == 1 and waited >= 1.0


def test_503_after_the_last_attempt_raises_with_retry_after(proxy: FaultyProxy, watch_data: WatchData) -> None:
    overloaded = b'{"error": {"code": "overloaded", "message": "busy"}}'
    for _ in range(2):
        proxy.answer_next(503, {"retry-after": "0"}, overloaded)

    async def run() -> None:
        async with _async_client(proxy.url, RetryPolicy(attempts=2, backoff=0.01)) as client:
            await client.predict(watch_data.window(int(watch_data.test[0])))

    with pytest.raises(ServiceError) as error:
        asyncio.run(run())
    assert (error.value.status, error.value.code, error.value.retry_after) == (503, "overloaded", 0.0)
    assert proxy.answered == 2


def test_unreachable_service_raises_after_the_retries() -> None:
    with _client(f"http://127.0.0.1:{free_port()}", RetryPolicy(attempts=3, backoff=0.01)) as client:
        with pytest.raises(ServiceUnreachable, match="ConnectError"):
            client.models()


def _thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _window_count(chunks: list[dict[str, np.ndarray]]) -> int:
    return (sum(len(chunk["accelerometer"]) for chunk in chunks) - WINDOW) // HOP + 1


def test_events_resume_after_a_cut_connection_without_gaps_or_repeats(
    server: Server, proxy: FaultyProxy, watch_data: WatchData
) -> None:
    chunks = _chunks(watch_data)
    received: list[SessionEvent] = []

    def follow() -> None:
        with _client(proxy.url) as client:
            # "0-0": every retained event, so the test does not race the follower's first connect.
            for event in client.events("client-events", last_event_id="0-0"):
                received.append(event)

    with _client(server.base) as client:
        stream = client.stream("client-events")
        stream.send(chunks[0])  # the session exists before anyone follows it
        follower = _thread(follow)
        for k, chunk in enumerate(chunks[1:], start=1):
            stream.send(chunk)
            if k == len(chunks) // 2:
                _wait_for(lambda: len(received) >= 3)
                proxy.cut()
        _wait_for(lambda: sum(e.type == "prediction" for e in received) == _window_count(chunks))
        client.end_session("client-events")
        follower.join(timeout=30)
    assert not follower.is_alive()
    windows = [e.data.window for e in received if isinstance(e.data, PredictionEvent)]
    assert windows == list(range(_window_count(chunks)))
    transitions = [e.data for e in received if isinstance(e.data, Transition)]
    label = watch_data.recording_label(watch_data.held_out_recordings()[0])
    assert [(t.from_activity, t.to_activity) for t in transitions][:1] == [("unknown", label)]
    assert received[-1].type == "end" and isinstance(received[-1].data, SessionEnd)
    assert proxy.connections >= 2  # the cut stream was reopened
    # No event twice across the reconnection (the 'end' event repeats the last id: nothing follows it).
    assert len({e.id for e in received[:-1]}) == len(received) - 1


def test_async_events_resume_from_an_id_and_stop_at_the_end(server: Server, watch_data: WatchData) -> None:
    chunks = _chunks(watch_data, 6)
    session_id = "client-events-async"

    async def run() -> tuple[list[SessionEvent], SessionEvent]:
        async with _async_client(server.base) as client:
            stream = client.stream(session_id)
            events: list[SessionEvent] = []

            async def follow() -> None:
                async for event in client.events(session_id, last_event_id="0-0"):
                    events.append(event)

            follower = asyncio.create_task(follow())
            for chunk in chunks:
                await stream.send(chunk)
            while len(events) < 2:
                await asyncio.sleep(0.05)
            resumed = client.events(session_id, last_event_id=events[0].id)
            second = await anext(resumed)
            await resumed.aclose()
            await client.end_session(session_id)
            await asyncio.wait_for(follower, 30)
            return events, second

    events, second = asyncio.run(run())
    assert [e.data.window for e in events if isinstance(e.data, PredictionEvent)] == list(range(_window_count(chunks)))
    assert (second.id, second.data) == (events[1].id, events[1].data)
    assert events[-1].type == "end"
