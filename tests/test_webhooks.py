"""Webhook delivery with two dispatchers on one store, as two API processes share Redis.

The receiver is a real HTTP server on loopback that checks every signature; the
transitions are committed to the store as the session service commits them.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from app import metrics
from app.settings import Settings
from app.store import Event, Retention, SessionStore, StreamLayout
from app.store.memory import MemoryStore
from app.store.redis_store import RedisStore
from app.webhooks import WebhookDispatcher
from tools.webhook_receiver import SECRET, Receiver, receiving

from .redis_fixtures import RedisTarget

LAYOUT = StreamLayout(modalities=("a",), channels=(1,), window=(1,), hop=(1,), max_buffer=(1000,))
RETENTION = Retention(predictions=10, events=100, segments=10, outbox=1000)


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Callable[[], SessionStore]:
    if request.param == "memory":
        return MemoryStore
    target: RedisTarget = request.getfixturevalue("redis_target")
    return lambda: RedisStore(target.url, prefix=target.prefix)


def settings(receiver: Receiver, **overrides: float) -> Settings:
    webhooks = [{"url": receiver.url, "secret": SECRET}]
    return Settings(redis_url=None, webhooks=webhooks, **overrides)  # type: ignore[arg-type]


async def commit_transitions(store: SessionStore, session_id: str, count: int) -> None:
    """``count`` transitions of one session, one window each, committed in order."""
    samples = b"\0\0\0\0" * count
    result = await store.append(
        session_id,
        seq=0,
        model="student",
        layout=LAYOUT,
        chunk={"a": samples},
        now=time.time(),
        origin=0.0,
        ttl_seconds=60,
    )
    assert result.windows == count
    for window in range(count):
        data = json.dumps({"session_id": session_id, "window": window})
        committed = await store.commit(
            session_id,
            window,
            [{}],
            generation=result.generation,
            tracker={},
            events=[Event("transition", data)],
            segments=[],
            retention=RETENTION,
            ttl_seconds=60,
        )
        assert committed.recorded == [window]


def run_dispatchers(
    make_store: Callable[[], SessionStore], config: Settings, scenario: Callable[[SessionStore], Awaitable[None]]
) -> None:
    """Two dispatchers (two processes' worth) on one store, running while ``scenario`` does."""

    async def main() -> None:
        store = make_store()
        dispatchers = [WebhookDispatcher(store, config) for _ in range(2)]
        for dispatcher in dispatchers:
            await dispatcher.start()
        try:
            await scenario(store)
        finally:
            for dispatcher in dispatchers:
                await dispatcher.stop()
            await store.close()

    asyncio.run(main())


async def wait_until(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def delivered(outcome: str) -> float:
    return metrics.WEBHOOK_DELIVERIES.labels(outcome=outcome)._value.get()


def test_a_slow_receiver_gets_each_event_once_in_order(make_store: Callable[[], SessionStore]) -> None:
    """Ten deliveries take three times the lease: it is renewed per event, so nothing is sent twice."""
    with receiving(answer_after_s=0.3) as receiver:
        config = settings(receiver, webhook_lease_seconds=1.0, webhook_timeout_seconds=0.9)

        async def scenario(store: SessionStore) -> None:
            await commit_transitions(store, "slow", 10)
            await wait_until(lambda: len(receiver.received) >= 10)
            await asyncio.sleep(1.5)  # and nothing more arrives

        run_dispatchers(make_store, config, scenario)
    assert [event["window"] for event in receiver.received] == list(range(10))
    assert receiver.bad_signatures == 0


def test_an_event_failing_past_its_deadline_is_dropped_and_delivery_moves_on(
    make_store: Callable[[], SessionStore],
) -> None:
    """The give-up clock is the event's commit time, so a takeover between attempts does not reset it."""
    with receiving() as receiver:
        config = settings(
            receiver,
            webhook_lease_seconds=1.0,
            webhook_timeout_seconds=0.5,
            webhook_initial_backoff_seconds=0.2,
            webhook_max_backoff_seconds=0.4,
            webhook_give_up_seconds=2.0,
        )
        receiver.stop()  # down from the start
        dropped = delivered("dropped")

        async def scenario(store: SessionStore) -> None:
            await commit_transitions(store, "down", 2)
            await wait_until(lambda: delivered("dropped") >= dropped + 2, timeout_s=15)
            receiver.start()
            await commit_transitions(store, "back", 1)
            await wait_until(lambda: len(receiver.received) >= 1)

        run_dispatchers(make_store, config, scenario)
    assert [event["session_id"] for event in receiver.received] == ["back"]


def readme_verify() -> Callable[..., bool]:
    """The signature check the README gives receivers, run as written there."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [code] = [block for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "def verify(" in block]
    namespace: dict[str, object] = {}
    exec(code, namespace)  # the snippet exactly as the README gives it
    return namespace["verify"]  # type: ignore[return-value]


def test_the_readme_signature_check_accepts_real_deliveries_and_nothing_else() -> None:
    with receiving() as receiver:

        async def scenario(store: SessionStore) -> None:
            await commit_transitions(store, "signed", 1)
            await wait_until(lambda: len(receiver.requests) >= 1)

        run_dispatchers(MemoryStore, settings(receiver), scenario)
    verify = readme_verify()
    [(headers, body)] = receiver.requests
    assert verify(SECRET, headers, body)
    assert not verify("another-secret-0123", headers, body)
    assert not verify(SECRET, headers, body.replace(b"signed", b"forged"))
    stale = {**headers, "X-DMFT-Timestamp": str(int(headers["X-DMFT-Timestamp"]) - 3600)}
    assert not verify(SECRET, stale, body)
