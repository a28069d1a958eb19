"""The session-store contract, checked on both stores: in this process (MemoryStore) and in Redis.

Every test runs a scenario coroutine with ``asyncio.run`` against a fresh store made
inside that loop (the Redis client binds to the loop that uses it). Streams here are
tiny: windows of 4 samples every 2, and ramps whose values name their sample index, so
a span's bytes show exactly which samples the store handed back.

``append`` hands back every complete window not committed yet; ``commit`` records their
predictions once (a compare-and-set on the next uncommitted window) and lets the store
drop the samples no window still needs. The streaming tests commit after every append,
as the service does. Commits also carry the tracker state, events, segments and
transitions, whose logs (events, history, outbox) are checked here too.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
import pytest
from redis.crc import key_slot

from app.store import (
    AppendResult,
    BufferOverflow,
    CommitResult,
    Event,
    EventBatch,
    EventPosition,
    ModalityMismatch,
    Retention,
    SeqConflict,
    SessionLimitReached,
    SessionStore,
    StreamLayout,
    parse_event_id,
)
from app.store.memory import MemoryStore
from app.store.redis_store import RedisStore
from app.store.shards import shard_of, shard_tags

from .redis_fixtures import RedisTarget

T = TypeVar("T")
StoreFactory = Callable[[], SessionStore]
Scenario = Callable[[SessionStore], Awaitable[T]]

TTL = 60
KEEP = 50
MODEL = "student"
# One modality per channel count, all cut the same way: windows of 4 samples every 2.
LAYOUT = StreamLayout(
    modalities=("a", "b", "c"), channels=(1, 2, 3), window=(4, 4, 4), hop=(2, 2, 2), max_buffer=(64, 64, 64)
)
# Two rates: "slow" has half the samples of "fast" in every window and hop.
TWO_RATES = StreamLayout(modalities=("fast", "slow"), channels=(3, 1), window=(4, 2), hop=(2, 1), max_buffer=(64, 32))
# One modality, a small buffer: for chunks refused by overflow.
SMALL = StreamLayout(modalities=("a",), channels=(1,), window=(4,), hop=(2,), max_buffer=(10,))


REDIS_TARGETS = {"redis": "redis_target", "cluster": "cluster_target"}  # the prefix fixture of each kind of Redis
SHARDS = 16


@pytest.fixture(params=["memory", *REDIS_TARGETS])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """Makes a fresh store of the parametrised kind (call it inside the event loop that uses it)."""
    if request.param == "memory":
        return MemoryStore
    return redis_store(request.getfixturevalue(REDIS_TARGETS[request.param]))


@pytest.fixture(params=list(REDIS_TARGETS))
def any_redis(request: pytest.FixtureRequest) -> RedisTarget:
    """A prefix on the test Redis, then on the test Redis Cluster."""
    return request.getfixturevalue(REDIS_TARGETS[request.param])


def redis_store(target: RedisTarget) -> StoreFactory:
    return lambda: RedisStore(target.url, prefix=target.prefix, shards=SHARDS)


def run(make_store: StoreFactory, scenario: Scenario[T]) -> T:
    """Run ``scenario(store)`` in a new event loop, closing the store afterwards."""

    async def main() -> T:
        store = make_store()
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())


def ramp(layout: StreamLayout, index: int, start: int, count: int) -> np.ndarray:
    """Samples ``start .. start+count-1`` of modality ``index``: channel c of sample k is ``1000*index + 10*k + c``."""
    k = np.arange(start, start + count, dtype=np.float32)[:, None]
    c = np.arange(layout.channels[index], dtype=np.float32)[None, :]
    return (1000 * index + 10 * k + c).astype("<f4")


def samples(layout: StreamLayout, counts: dict[str, int], sent: dict[str, int]) -> dict[str, bytes]:
    """The next ``counts`` samples of each named modality as float32 bytes, after ``sent`` already sent."""
    return {
        name: ramp(layout, layout.modalities.index(name), sent[name], count).tobytes() for name, count in counts.items()
    }


async def append(
    store: SessionStore,
    seq: int,
    chunk: dict[str, bytes],
    *,
    session_id: str = "s1",
    layout: StreamLayout = LAYOUT,
    ttl_seconds: int = TTL,
) -> AppendResult:
    now = time.time()
    return await store.append(
        session_id, seq=seq, model=MODEL, layout=layout, chunk=chunk, now=now, origin=now, ttl_seconds=ttl_seconds
    )


def prediction(window: int, tag: str = "") -> dict:
    """A dummy prediction naming its window (and, optionally, who made it)."""
    return {"window": window, "activity": f"a{window}{tag}"}


async def commit(
    store: SessionStore,
    first: int,
    count: int,
    *,
    session_id: str = "s1",
    keep: int = KEEP,
    ttl_seconds: int = TTL,
    tag: str = "",
    events: list[Event] | None = None,
    segments: list[dict] | None = None,
    retention: Retention | None = None,
) -> CommitResult:
    """Commit dummy predictions for windows ``first .. first+count-1``, with a tracker state naming them."""
    predictions = [prediction(w, tag) for w in range(first, first + count)]
    return await store.commit(
        session_id,
        first,
        predictions,
        generation=await generation_of(store, session_id),
        tracker=tracker(first + count, tag),
        events=events or [],
        segments=segments or [],
        retention=retention or Retention(predictions=keep, events=100, segments=100, outbox=100),
        ttl_seconds=ttl_seconds,
    )


async def generation_of(store: SessionStore, session_id: str) -> str:
    """The session's generation as ``append`` hands it out (any string for a session that doesn't exist)."""
    snapshot = await store.get(session_id)
    return snapshot.generation if snapshot else "no session"


def tracker(next_window: int, tag: str = "") -> dict:
    """A dummy tracker state: the store keeps it whole and hands it back."""
    return {"through": next_window, "by": tag}


async def commit_pending(
    store: SessionStore, result: AppendResult, *, session_id: str = "s1", ttl_seconds: int = TTL
) -> CommitResult:
    """Commit dummy predictions for the windows ``result`` left pending."""
    return await commit(store, result.first_window, result.windows, session_id=session_id, ttl_seconds=ttl_seconds)


def windows_for(length: int, window: int, hop: int) -> int:
    return (length - window) // hop + 1 if length >= window else 0


def one_sample_each(layout: StreamLayout = LAYOUT, count: int = 1, start: int = 0) -> dict[str, bytes]:
    return samples(layout, dict.fromkeys(layout.modalities, count), dict.fromkeys(layout.modalities, start))


def check_pending_spans(layout: StreamLayout, first: int, count: int, spans: dict[str, bytes] | None) -> None:
    """``spans`` hold exactly the samples of windows ``first .. first+count-1``, window by window."""
    if not count:
        assert not spans
        return
    assert spans is not None
    assert set(spans) == set(layout.modalities)
    for i, name in enumerate(layout.modalities):
        span = np.frombuffer(spans[name], dtype="<f4").reshape(-1, layout.channels[i])
        start = first * layout.hop[i]
        stop = (first + count - 1) * layout.hop[i] + layout.window[i]
        np.testing.assert_array_equal(span, ramp(layout, i, start, stop - start))
        for k in range(count):  # and each window within the span is the window the index names
            offset = k * layout.hop[i]
            window = span[offset : offset + layout.window[i]]
            np.testing.assert_array_equal(window, ramp(layout, i, (first + k) * layout.hop[i], layout.window[i]))


# --- seq -------------------------------------------------------------------------------------


def test_append_seq_zero_creates_session(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        assert await store.get("s1") is None
        result = await append(store, 0, one_sample_each(count=3))
        assert not result.duplicate
        assert result.seq == 0
        assert result.model == MODEL
        assert result.layout == LAYOUT
        assert result.received == dict.fromkeys(LAYOUT.modalities, 3)
        assert result.buffered == dict.fromkeys(LAYOUT.modalities, 3)
        assert (result.first_window, result.windows) == (0, 0)
        assert not result.spans
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert snapshot.seq == 0
        assert snapshot.model == MODEL
        assert snapshot.layout == LAYOUT
        assert snapshot.windows == 0
        assert snapshot.received == dict.fromkeys(LAYOUT.modalities, 3)
        assert snapshot.buffered == dict.fromkeys(LAYOUT.modalities, 3)
        assert snapshot.predictions == []
        assert snapshot.started == pytest.approx(result.started)

    run(make_store, scenario)


@pytest.mark.parametrize("seq", [1, 5])
def test_append_nonzero_first_seq_conflicts_with_zero(make_store: StoreFactory, seq: int) -> None:
    async def scenario(store: SessionStore) -> None:
        with pytest.raises(SeqConflict) as raised:
            await append(store, seq, one_sample_each())
        assert raised.value.expected == 0
        assert await store.get("s1") is None

    run(make_store, scenario)


def test_append_repeated_last_seq_is_duplicate_and_appends_nothing(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        await append(store, 0, one_sample_each(count=3))
        first = await append(store, 1, one_sample_each(count=3, start=3))
        assert (first.first_window, first.windows) == (0, 2)  # 6 samples: windows at 0 and 2
        committed = await commit_pending(store, first)
        assert committed.recorded == [0, 1]
        again = await append(store, 1, one_sample_each(count=3, start=3))
        assert again.duplicate
        assert again.seq == 1
        assert (again.first_window, again.windows) == (2, 0)  # both windows are committed
        assert not again.spans
        assert again.received == first.received == dict.fromkeys(LAYOUT.modalities, 6)
        assert again.buffered == committed.buffered == dict.fromkeys(LAYOUT.modalities, 2)
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.seq, snapshot.windows, snapshot.received) == (1, 2, first.received)
        # The stream goes on from where it was: the duplicate added nothing.
        after = await append(store, 2, one_sample_each(count=2, start=6))
        assert (after.first_window, after.windows) == (2, 1)
        check_pending_spans(LAYOUT, after.first_window, after.windows, after.spans)

    run(make_store, scenario)


@pytest.mark.parametrize(("seq", "kind"), [(5, "gap"), (4, "gap of one"), (1, "older"), (0, "first")])
def test_append_out_of_order_seq_conflicts_with_next(make_store: StoreFactory, seq: int, kind: str) -> None:
    async def scenario(store: SessionStore) -> None:
        for s in range(3):
            await append(store, s, one_sample_each(start=s))
        with pytest.raises(SeqConflict) as raised:
            await append(store, seq, one_sample_each(start=3))
        assert raised.value.expected == 3, kind
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert snapshot.seq == 2
        assert snapshot.received == dict.fromkeys(LAYOUT.modalities, 3)

    run(make_store, scenario)


# --- pending windows -------------------------------------------------------------------------


def test_append_returns_uncommitted_windows_again(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        first = await append(store, 0, one_sample_each(count=6))
        assert (first.duplicate, first.first_window, first.windows) == (False, 0, 2)
        check_pending_spans(LAYOUT, 0, 2, first.spans)
        # Not committed (say, classifying failed): the client's retry gets the same windows.
        retry = await append(store, 0, one_sample_each(count=6))
        assert retry.duplicate
        assert (retry.first_window, retry.windows, retry.spans) == (first.first_window, first.windows, first.spans)
        assert retry.received == retry.buffered == dict.fromkeys(LAYOUT.modalities, 6)
        # The next chunk: still from window 0, now with the windows it completes as well.
        more = await append(store, 1, one_sample_each(count=3, start=6))
        assert not more.duplicate
        assert (more.first_window, more.windows) == (0, 3)
        check_pending_spans(LAYOUT, 0, 3, more.spans)
        assert more.buffered == dict.fromkeys(LAYOUT.modalities, 9)  # nothing dropped before a commit
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.windows, snapshot.predictions) == (0, [])
        committed = await commit_pending(store, more)
        assert committed.recorded == [0, 1, 2]
        assert committed.buffered == dict.fromkeys(LAYOUT.modalities, 3)  # from window 3's start, sample 6
        done = await append(store, 1, one_sample_each(count=3, start=6))
        assert done.duplicate
        assert (done.first_window, done.windows) == (3, 0)
        assert not done.spans

    run(make_store, scenario)


def stream(
    store: SessionStore, layout: StreamLayout, plan: list[dict[str, int]]
) -> Awaitable[tuple[list[int], list[dict[str, int]], dict[str, int]]]:
    """Append ``plan`` (samples per modality per chunk), committing the pending windows after each append.

    Checks every pending span against the ramps; returns the committed window indices in
    commit order, the samples buffered after each commit and the totals sent.
    """

    async def go() -> tuple[list[int], list[dict[str, int]], dict[str, int]]:
        sent = dict.fromkeys(layout.modalities, 0)
        offset = dict.fromkeys(layout.modalities, 0)  # samples dropped so far, per modality
        committed: list[int] = []
        buffered_after: list[dict[str, int]] = []
        for seq, counts in enumerate(plan):
            chunk = samples(layout, {name: n for name, n in counts.items() if n}, sent)
            result = await append(store, seq, chunk, layout=layout)
            for name, n in counts.items():
                sent[name] += n
            assert not result.duplicate
            assert result.received == sent
            assert result.buffered == {name: sent[name] - offset[name] for name in sent}
            ready = min(
                windows_for(sent[name], layout.window[i], layout.hop[i]) for i, name in enumerate(layout.modalities)
            )
            assert result.first_window == len(committed), "pending windows start at the first uncommitted one"
            assert result.windows == ready - len(committed), f"chunk {seq} completes {ready - len(committed)} windows"
            check_pending_spans(layout, result.first_window, result.windows, result.spans)
            if not result.windows:
                continue
            done = await commit_pending(store, result)
            expected = list(range(result.first_window, result.first_window + result.windows))
            assert done.recorded == expected
            committed += done.recorded
            # Only samples from the next window's start on are kept.
            offset = {name: min(ready * layout.hop[i], sent[name]) for i, name in enumerate(layout.modalities)}
            assert done.buffered == {name: sent[name] - offset[name] for name in sent}
            buffered_after.append(done.buffered)
        return committed, buffered_after, sent

    return go()


@pytest.mark.parametrize("length", [3, 4, 5, 6, 21, 40])
def test_each_window_committed_once_with_its_samples(make_store: StoreFactory, length: int) -> None:
    sizes = itertools.cycle([1, 3, 7, 2, 5, 11])
    plan, sent = [], 0
    while sent < length:
        n = min(next(sizes), length - sent)
        plan.append(dict.fromkeys(LAYOUT.modalities, n))
        sent += n

    async def scenario(store: SessionStore) -> None:
        committed, buffered, totals = await stream(store, LAYOUT, plan)
        assert totals == dict.fromkeys(LAYOUT.modalities, length)
        total = (length - 4) // 2 + 1 if length >= 4 else 0
        assert committed == list(range(total))  # each window exactly once, in order
        # After a commit, less than one window's samples are left.
        assert all(n < 4 for counts in buffered for n in counts.values())
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert snapshot.windows == total
        assert snapshot.predictions == [prediction(w) for w in range(total)]

    run(make_store, scenario)


def test_each_window_committed_once_when_modalities_arrive_unevenly(make_store: StoreFactory) -> None:
    # Each modality has its own chunk sizes (sometimes none at all); windows wait for the slowest.
    fast = itertools.cycle([5, 0, 3, 9, 1, 4])
    slow = itertools.cycle([0, 4, 1, 2, 6, 0, 3])
    plan, sent = [], {"fast": 0, "slow": 0}
    for _ in range(30):
        counts = {"fast": min(next(fast), 60 - sent["fast"]), "slow": min(next(slow), 30 - sent["slow"])}
        plan.append(counts)
        sent = {name: sent[name] + counts[name] for name in sent}
    plan.append({"fast": 60 - sent["fast"], "slow": 30 - sent["slow"]})

    async def scenario(store: SessionStore) -> None:
        committed, buffered, totals = await stream(store, TWO_RATES, plan)
        assert totals == {"fast": 60, "slow": 30}
        total = windows_for(60, 4, 2)
        assert total == windows_for(30, 2, 1) == 29
        assert committed == list(range(total))
        assert buffered[-1] == {"fast": 2, "slow": 1}  # all that the next window would reuse

    run(make_store, scenario)


def test_commit_keeps_buffers_trimmed_over_long_stream(make_store: StoreFactory) -> None:
    sizes = itertools.cycle([3, 1, 5, 2])
    plan = [dict.fromkeys(LAYOUT.modalities, next(sizes)) for _ in range(80)]  # 220 samples, far past max_buffer

    async def scenario(store: SessionStore) -> None:
        committed, buffered, totals = await stream(store, LAYOUT, plan)
        assert totals == dict.fromkeys(LAYOUT.modalities, 220)
        assert committed == list(range(windows_for(220, 4, 2)))
        assert max(n for counts in buffered for n in counts.values()) < 4
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert all(n < 4 for n in snapshot.buffered.values())
        assert snapshot.received == totals
        assert snapshot.windows == len(committed)
        assert len(snapshot.predictions) == KEEP
        assert snapshot.predictions[-1] == prediction(len(committed) - 1)

    run(make_store, scenario)


# --- commit ----------------------------------------------------------------------------------


def test_commit_records_each_window_only_once(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        pending = await append(store, 0, one_sample_each(count=6))
        assert (pending.first_window, pending.windows, pending.tracker) == (0, 2, None)
        first = await commit(store, 0, 2, tag="-A")
        assert (first.recorded, first.stale) == ([0, 1], False)
        assert first.buffered == dict.fromkeys(LAYOUT.modalities, 2)
        # Another process classified the same windows: its commit is stale, writes nothing and
        # learns where the session is.
        second = await commit(store, 0, 2, tag="-B")
        assert (second.recorded, second.stale, second.next_window, second.tracker) == ([], True, 2, tracker(2, "-A"))
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.windows, snapshot.tracker) == (2, tracker(2, "-A"))
        assert snapshot.predictions == [prediction(0, "-A"), prediction(1, "-A")]
        # A stale pending list overlapping new windows is redone from the session's next window.
        more = await append(store, 1, one_sample_each(count=4, start=6))
        assert (more.first_window, more.windows, more.tracker) == (2, 2, tracker(2, "-A"))
        assert (await commit(store, 0, 4, tag="-B")).stale
        redone = await commit(store, 2, 2, tag="-B")
        assert redone.recorded == [2, 3]
        assert redone.buffered == dict.fromkeys(LAYOUT.modalities, 2)
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.windows, snapshot.tracker) == (4, tracker(4, "-B"))
        assert snapshot.predictions == [prediction(w, "-A") for w in (0, 1)] + [prediction(w, "-B") for w in (2, 3)]

    run(make_store, scenario)


def test_commit_ahead_of_the_next_window_is_stale(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        pending = await append(store, 0, one_sample_each(count=10))
        assert (pending.first_window, pending.windows) == (0, 4)
        later = await commit(store, 2, 2)
        assert (later.recorded, later.stale, later.next_window, later.tracker) == ([], True, 0, None)
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.windows, snapshot.predictions, snapshot.buffered) == (
            0,
            [],
            dict.fromkeys(LAYOUT.modalities, 10),
        )
        retry = await append(store, 0, one_sample_each(count=10))
        assert retry.duplicate
        assert (retry.first_window, retry.windows) == (0, 4)
        check_pending_spans(LAYOUT, 0, 4, retry.spans)

    run(make_store, scenario)


def test_commit_of_incomplete_windows_is_refused(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        await append(store, 0, one_sample_each(count=6))  # two complete windows
        with pytest.raises(Exception, match="complete windows"):
            await commit(store, 0, 3)
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.windows, snapshot.predictions) == (0, [])

    run(make_store, scenario)


def test_commit_keeps_newest_predictions_in_window_order(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        pending = await append(store, 0, one_sample_each(count=20))
        assert (pending.first_window, pending.windows) == (0, 9)
        await commit(store, 0, 4, keep=4)
        await commit(store, 4, 2, keep=4)
        await commit(store, 6, 1, keep=4)
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert snapshot.predictions == [prediction(w) for w in (3, 4, 5, 6)]
        assert snapshot.windows == 7
        await commit(store, 7, 1, keep=2)
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert snapshot.predictions == [prediction(6), prediction(7)]
        assert snapshot.windows == 8

    run(make_store, scenario)


def test_commit_after_the_session_started_again_records_nothing(make_store: StoreFactory) -> None:
    """Windows handed out by a session that ended are never recorded in a new one under the same id."""

    async def scenario(store: SessionStore) -> None:
        old = await append(store, 0, one_sample_each(count=6))
        assert await store.delete("s1")
        new = await append(store, 0, one_sample_each(count=10))
        assert new.generation != old.generation
        late = await store.commit(
            "s1",
            old.first_window,
            [prediction(0, "-old"), prediction(1, "-old")],
            generation=old.generation,
            tracker=tracker(2, "-old"),
            events=events_of("p0", "t0"),
            segments=[{"segment": "old"}],
            retention=Retention(predictions=KEEP, events=10, segments=10, outbox=10),
            ttl_seconds=TTL,
        )
        assert (late.recorded, late.stale) == ([], False)
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.windows, snapshot.predictions, snapshot.tracker) == (0, [], None)
        assert (await read(store, "0-0", generation=new.generation)).events == []
        assert await store.history("s1") == []
        assert (await commit_pending(store, new)).recorded == [0, 1, 2, 3]

    run(make_store, scenario)


@pytest.mark.parametrize("how", ["never started", "deleted"])
def test_commit_for_missing_session_records_nothing(make_store: StoreFactory, how: str) -> None:
    async def scenario(store: SessionStore) -> None:
        if how == "deleted":
            pending = await append(store, 0, one_sample_each(count=6))
            assert pending.windows == 2
            assert await store.delete("s1") is True
        result = await commit(store, 0, 2)
        assert (result.recorded, result.buffered) == ([], {})
        assert await store.get("s1") is None
        assert await store.active_sessions(now=time.time(), ttl_seconds=TTL) == 0

    run(make_store, scenario)


# --- refused chunks --------------------------------------------------------------------------


def test_append_unknown_modality_raises_mismatch_and_appends_nothing(make_store: StoreFactory) -> None:
    layout = StreamLayout(modalities=("a", "b"), channels=(1, 2), window=(4, 4), hop=(2, 2), max_buffer=(64, 64))

    async def scenario(store: SessionStore) -> None:
        await append(store, 0, samples(layout, {"a": 3, "b": 3}, {"a": 0, "b": 0}), layout=layout)
        chunk = {**samples(layout, {"a": 3}, {"a": 3}), "c": np.zeros((3, 3), "<f4").tobytes()}
        with pytest.raises(ModalityMismatch) as raised:
            await append(store, 1, chunk, layout=LAYOUT)
        assert raised.value.session_modalities == ["a", "b"]
        assert raised.value.model == MODEL
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert snapshot.seq == 0
        assert snapshot.received == {"a": 3, "b": 3}
        # The rejected seq is still the next one.
        result = await append(store, 1, samples(layout, {"a": 1, "b": 1}, {"a": 3, "b": 3}), layout=layout)
        assert result.received == {"a": 4, "b": 4}
        assert (result.first_window, result.windows) == (0, 1)
        check_pending_spans(layout, 0, 1, result.spans)

    run(make_store, scenario)


def test_append_past_max_buffer_raises_overflow_and_appends_nothing(make_store: StoreFactory) -> None:
    layout = StreamLayout(modalities=("a", "b"), channels=(1, 2), window=(4, 4), hop=(2, 2), max_buffer=(10, 10))

    async def scenario(store: SessionStore) -> None:
        await append(store, 0, samples(layout, {"a": 2, "b": 2}, {"a": 0, "b": 0}), layout=layout)
        # "a" runs ahead alone: no window completes, so its buffer grows up to max_buffer.
        await append(store, 1, samples(layout, {"a": 8}, {"a": 2}), layout=layout)
        with pytest.raises(BufferOverflow) as raised:
            await append(store, 2, samples(layout, {"a": 1, "b": 1}, {"a": 10, "b": 2}), layout=layout)
        assert raised.value.modality == "a"
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert snapshot.seq == 1
        assert snapshot.received == {"a": 10, "b": 2}  # not even "b" was appended
        assert snapshot.buffered == {"a": 10, "b": 2}
        # Catching up with "b" alone is accepted and completes windows; committing them trims "a".
        result = await append(store, 2, samples(layout, {"b": 8}, {"b": 2}), layout=layout)
        assert (result.first_window, result.windows) == (0, 4)
        assert result.buffered == {"a": 10, "b": 10}
        check_pending_spans(layout, 0, 4, result.spans)
        committed = await commit_pending(store, result)
        assert committed.recorded == [0, 1, 2, 3]
        assert committed.buffered == {"a": 2, "b": 2}
        # Room again: "a" may run ahead by another max_buffer.
        ahead = await append(store, 3, samples(layout, {"a": 8}, {"a": 10}), layout=layout)
        assert ahead.buffered == {"a": 10, "b": 2}

    run(make_store, scenario)


REFUSED_FIRST_CHUNKS = {
    "seq conflict": (1, samples(SMALL, {"a": 4}, {"a": 0}), SeqConflict),
    "overflow": (0, samples(SMALL, {"a": 11}, {"a": 0}), BufferOverflow),
    "modality mismatch": (
        0,
        {**samples(SMALL, {"a": 4}, {"a": 0}), "z": np.zeros(4, "<f4").tobytes()},
        ModalityMismatch,
    ),
}


@pytest.mark.parametrize("kind", list(REFUSED_FIRST_CHUNKS))
def test_refused_first_chunk_creates_no_session(make_store: StoreFactory, kind: str) -> None:
    seq, chunk, error = REFUSED_FIRST_CHUNKS[kind]

    async def scenario(store: SessionStore) -> None:
        with pytest.raises(error):
            await append(store, seq, chunk, layout=SMALL)
        assert await store.get("s1") is None
        # Nothing was started: a valid seq 0 starts the session afresh.
        result = await append(store, 0, samples(SMALL, {"a": 5}, {"a": 0}), layout=SMALL)
        assert not result.duplicate
        assert (result.seq, result.received, result.first_window, result.windows) == (0, {"a": 5}, 0, 1)

    run(make_store, scenario)


@pytest.mark.parametrize("kind", list(REFUSED_FIRST_CHUNKS))
def test_redis_refused_first_chunk_writes_no_key_and_counts_no_session(any_redis: RedisTarget, kind: str) -> None:
    seq, chunk, error = REFUSED_FIRST_CHUNKS[kind]

    async def scenario(store: SessionStore) -> int:
        with pytest.raises(error):
            await append(store, seq, chunk, layout=SMALL)
        return await store.active_sessions(now=time.time(), ttl_seconds=TTL)

    active = run(redis_store(any_redis), scenario)
    assert (any_redis.keys(), active) == ([], 0)


# --- lifecycle -------------------------------------------------------------------------------


def test_get_unknown_session_returns_none(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        assert await store.get("never-started") is None

    run(make_store, scenario)


def test_delete_session_then_gone(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        pending = await append(store, 0, one_sample_each(count=6))
        assert (await commit_pending(store, pending)).recorded == [0, 1]
        assert await store.delete("s1") is True
        assert await store.get("s1") is None
        assert await store.delete("s1") is False
        # The id may start a new session afterwards, from seq 0, with no windows committed.
        result = await append(store, 0, one_sample_each(count=4))
        assert result.received == dict.fromkeys(LAYOUT.modalities, 4)
        assert (result.first_window, result.windows) == (0, 1)
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.windows, snapshot.predictions) == (0, [])

    run(make_store, scenario)


def test_active_sessions_counts_live_sessions(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        assert await store.active_sessions(now=time.time(), ttl_seconds=TTL) == 0
        for session_id in ("s1", "s2", "s3"):
            await append(store, 0, one_sample_each(), session_id=session_id)
        assert await store.active_sessions(now=time.time(), ttl_seconds=TTL) == 3
        await append(store, 1, one_sample_each(start=1), session_id="s1")  # still one session
        assert await store.delete("s2")
        assert await store.active_sessions(now=time.time(), ttl_seconds=TTL) == 2

    run(make_store, scenario)


def test_recent_sessions_lists_live_sessions_newest_first(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        for session_id in ("s1", "s2", "s3"):
            await append(store, 0, one_sample_each(), session_id=session_id)
            await asyncio.sleep(0.01)
        await append(store, 1, one_sample_each(start=1), session_id="s1")
        assert await store.recent_sessions(now=time.time(), ttl_seconds=TTL, limit=10) == ["s1", "s3", "s2"]
        assert await store.recent_sessions(now=time.time(), ttl_seconds=TTL, limit=2) == ["s1", "s3"]
        assert await store.delete("s3")
        assert await store.recent_sessions(now=time.time(), ttl_seconds=TTL, limit=10) == ["s1", "s2"]

    run(make_store, scenario)


def test_session_expires_after_ttl(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        pending = await append(store, 0, one_sample_each(count=6), ttl_seconds=1)
        assert (await commit_pending(store, pending, ttl_seconds=1)).recorded == [0, 1]
        await append(store, 0, one_sample_each(), session_id="s2", ttl_seconds=1)
        assert await store.get("s1") is not None
        assert await store.active_sessions(now=time.time(), ttl_seconds=1) == 2
        await asyncio.sleep(1.5)
        assert await store.get("s1") is None
        assert await store.get("s2") is None
        assert await store.active_sessions(now=time.time(), ttl_seconds=1) == 0
        # A commit for the expired session records nothing and brings nothing back.
        late = await commit(store, 2, 1, ttl_seconds=1)
        assert (late.recorded, late.buffered) == ([], {})
        assert await store.get("s1") is None
        # An expired id starts afresh: only seq 0 is accepted.
        with pytest.raises(SeqConflict) as raised:
            await append(store, 1, one_sample_each(start=6), ttl_seconds=1)
        assert raised.value.expected == 0

    run(make_store, scenario)


# --- the embedded store's own limits ------------------------------------------------------------


def test_embedded_store_refuses_new_sessions_beyond_its_limit() -> None:
    async def scenario(store: SessionStore) -> None:
        for session_id in ("s1", "s2"):
            await append(store, 0, one_sample_each(), session_id=session_id)
        with pytest.raises(SessionLimitReached):
            await append(store, 0, one_sample_each(), session_id="s3")
        assert await store.get("s3") is None
        await append(store, 1, one_sample_each(start=1), session_id="s1")  # the sessions it holds go on
        assert await store.delete("s2")
        await append(store, 0, one_sample_each(), session_id="s3")  # room again

    run(lambda: MemoryStore(max_sessions=2), scenario)


def test_embedded_store_counts_no_expired_session_against_its_limit() -> None:
    async def scenario(store: SessionStore) -> None:
        await append(store, 0, one_sample_each(), session_id="short", ttl_seconds=1)
        with pytest.raises(SessionLimitReached):
            await append(store, 0, one_sample_each(), session_id="s2")
        await asyncio.sleep(1.2)
        await append(store, 0, one_sample_each(), session_id="s2")

    run(lambda: MemoryStore(max_sessions=1), scenario)


def test_embedded_store_frees_expired_sessions_without_being_asked() -> None:
    """Expired sessions are purged on a timer, not only when something reads them."""

    async def scenario(store: SessionStore) -> int:
        big = StreamLayout(modalities=("a",), channels=(64,), window=(4,), hop=(2,), max_buffer=(4096,))
        chunk = {"a": np.zeros((3000, 64), dtype="<f4").tobytes()}  # 768 kB, all buffered
        tracemalloc.start()
        try:
            for index in range(20):
                await append(store, 0, chunk, session_id=f"s{index}", layout=big, ttl_seconds=1)
            held = tracemalloc.get_traced_memory()[0]
            await asyncio.sleep(2.5)  # nothing touches the store meanwhile
            return held - tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()

    freed = run(MemoryStore, scenario)
    assert freed > 20 * 768_000 * 0.9


def test_embedded_readers_wake_for_their_own_session_and_read_only_what_is_new(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 readers of one session with 1,000 events kept cost nothing while another session commits, and a reader
    of the newest events reads those, not the whole log (ids compared: counted through ``parse_event_id``)."""
    parsed = 0

    def counting(text: str) -> tuple[int, int]:
        nonlocal parsed
        parsed += 1
        return parse_event_id(text)

    monkeypatch.setattr("app.store.memory.parse_event_id", counting)

    async def scenario(store: SessionStore) -> tuple[int, int]:
        nonlocal parsed
        followed = await append(store, 0, one_sample_each(count=8), session_id="followed")
        retention = Retention(predictions=KEEP, events=1000, segments=10, outbox=10)
        committed = await commit(
            store, 0, 1, session_id="followed", events=events_of(*["p0"] * 1000), retention=retention
        )
        last = committed.event_ids[-1]
        readers = [
            asyncio.create_task(
                read(store, last, generation=followed.generation, wait_seconds=30, session_id="followed")
            )
            for _ in range(200)
        ]
        other = await append(store, 0, one_sample_each(count=50), session_id="other")
        await asyncio.sleep(0.1)
        parsed = 0
        for window in range(other.windows):
            await commit(store, window, 1, session_id="other", events=events_of(f"p{window}"))
            await asyncio.sleep(0)  # let any reader that was woken run
        while_others_commit = parsed
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        parsed = 0
        await commit(store, 1, 1, session_id="followed", events=events_of("p1"), retention=retention)
        assert len((await read(store, last, generation=followed.generation, session_id="followed")).events) == 1
        return while_others_commit, parsed

    while_others_commit, reading_the_newest = run(MemoryStore, scenario)
    assert while_others_commit == 0
    assert reading_the_newest <= 2


# --- Redis keys ------------------------------------------------------------------------------


def test_redis_session_keys_share_their_shard_tag_and_expire(any_redis: RedisTarget) -> None:
    """A session's keys, its shard's index and outbox carry the shard's hash tag: one cluster slot, so that every
    script touches keys of one slot."""
    sessions = ("alpha", "beta.2:x")

    async def scenario(store: SessionStore) -> None:
        await store.open_outbox()
        for session_id in sessions:
            await append(store, 0, one_sample_each(count=5), session_id=session_id)
            pending = await append(store, 1, one_sample_each(count=1, start=5), session_id=session_id)
            assert (await commit_pending(store, pending, session_id=session_id)).recorded == [0, 1]

    run(redis_store(any_redis), scenario)
    tags = shard_tags(SHARDS)
    keys = set(any_redis.keys())
    expected: set[str] = {f"{any_redis.prefix}:{{{tag}}}:outbox" for tag in tags}
    with any_redis.client() as client:
        for session_id in sessions:
            tag = tags[shard_of(session_id, SHARDS)]
            base = f"{any_redis.prefix}:{{{tag}}}:session:{session_id}"
            session_keys = {f"{base}:{name}" for name in ("meta", "buf", "pred")}
            expected |= session_keys | {f"{any_redis.prefix}:{{{tag}}}:sessions"}
            for key in session_keys:
                ttl = client.pttl(key)
                assert 0 < ttl <= TTL * 1000, f"{key} has TTL {ttl} ms"
            assert client.zscore(f"{any_redis.prefix}:{{{tag}}}:sessions", session_id) is not None
    assert keys == expected
    for key in keys:  # each key in the slot its tag names, and the shards spread evenly over the slots
        tag = key.split("{", 1)[1].split("}", 1)[0]
        assert key_slot(key.encode()) == key_slot(tag.encode()) == tags.index(tag) * 16384 // SHARDS


def test_redis_commit_equal_predictions_of_different_windows(any_redis: RedisTarget) -> None:
    async def scenario(store: SessionStore) -> None:
        pending = await append(store, 0, one_sample_each(count=8))
        assert (pending.first_window, pending.windows) == (0, 3)
        same = {"activity": "rest"}
        committed = await store.commit(
            "s1",
            0,
            [same, same, same],
            generation=pending.generation,
            tracker={},
            events=[],
            segments=[],
            retention=Retention(predictions=KEEP, events=10, segments=10, outbox=10),
            ttl_seconds=TTL,
        )
        assert committed.recorded == [0, 1, 2]
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.windows, snapshot.predictions) == (3, [same, same, same])

    run(redis_store(any_redis), scenario)


def test_redis_commit_for_missing_session_writes_no_key(any_redis: RedisTarget) -> None:
    async def scenario(store: SessionStore) -> None:
        pending = await append(store, 0, one_sample_each(count=6))
        assert await store.delete("s1") is True
        assert (await commit_pending(store, pending)).recorded == []
        assert (await commit(store, 0, 1, session_id="never-started")).recorded == []

    run(redis_store(any_redis), scenario)
    assert any_redis.keys() == []


# --- time origin, events, history, outbox and delivery -----------------------------------------


def test_new_session_takes_the_given_time_origin(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        chunk = one_sample_each(count=2)
        first = await store.append(
            "s1", seq=0, model=MODEL, layout=LAYOUT, chunk=chunk, now=5e9, origin=1e9, ttl_seconds=TTL
        )
        assert first.started == 1e9
        later = await store.append(
            "s1",
            seq=1,
            model=MODEL,
            layout=LAYOUT,
            chunk=one_sample_each(start=2),
            now=5e9 + 1,
            origin=2e9,
            ttl_seconds=TTL,
        )
        assert later.started == 1e9  # fixed by the first chunk
        snapshot = await store.get("s1")
        assert snapshot is not None
        assert (snapshot.started, snapshot.updated) == (1e9, 5e9 + 1)

    run(make_store, scenario)


def events_of(*names: str) -> list[Event]:
    """Dummy events: 'p3' is a prediction, 't3' a transition, both naming their window."""
    return [Event("transition" if name[0] == "t" else "prediction", f'{{"name": "{name}"}}') for name in names]


async def read(
    store: SessionStore, after: str, *, generation: str | None, wait_seconds: float = 0.01, session_id: str = "s1"
) -> EventBatch:
    return await store.read_events(session_id, after, generation=generation, wait_seconds=wait_seconds)


def test_events_are_logged_in_order_with_increasing_ids(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        assert await store.event_position("s1") == EventPosition(None, "0-0")
        started = await append(store, 0, one_sample_each(count=8))
        assert await store.event_position("s1") == EventPosition(started.generation, "0-0")
        first = await commit(store, 0, 2, events=events_of("p0", "p1", "t1"))
        second = await commit(store, 2, 1, events=events_of("p2"))
        ids = first.event_ids + second.event_ids
        assert len(ids) == 4
        assert [parse_event_id(i) for i in ids] == sorted({parse_event_id(i) for i in ids})
        assert await store.event_position("s1") == EventPosition(started.generation, ids[-1])
        batch = await read(store, "0-0", generation=started.generation)
        assert batch.generation == started.generation
        assert [(e.id, e.type, e.data) for e in batch.events] == [
            (i, e.type, e.data) for i, e in zip(ids, events_of("p0", "p1", "t1", "p2"), strict=True)
        ]
        after = await read(store, ids[1], generation=started.generation)
        assert [e.id for e in after.events] == ids[2:]
        # A stale commit logs nothing.
        assert (await commit(store, 0, 1, events=events_of("p0"))).stale
        assert (await read(store, ids[-1], generation=started.generation)).events == []

    run(make_store, scenario)


def test_read_events_waits_for_the_next_commit_and_sees_the_end(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        started = await append(store, 0, one_sample_each(count=8))
        start = (await store.event_position("s1")).last_id
        idle = await read(store, start, generation=started.generation, wait_seconds=0.05)
        assert (idle.events, idle.generation) == ([], started.generation)
        waiting = asyncio.create_task(read(store, start, generation=started.generation, wait_seconds=5))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        began = time.monotonic()
        committed = await commit(store, 0, 1, events=events_of("p0"))
        woken = await waiting
        assert time.monotonic() - began < 2
        assert [e.id for e in woken.events] == committed.event_ids
        # Ending the session wakes a waiting reader at once.
        waiting = asyncio.create_task(
            read(store, committed.event_ids[-1], generation=started.generation, wait_seconds=5)
        )
        await asyncio.sleep(0.1)
        began = time.monotonic()
        assert await store.delete("s1")
        gone = await waiting
        assert time.monotonic() - began < 2
        assert (gone.events, gone.generation) == ([], None)

    run(make_store, scenario)


def test_read_events_waits_for_the_session_to_start(make_store: StoreFactory) -> None:
    """A reader may come before the session: it is woken when the session starts, and reads its events."""

    async def scenario(store: SessionStore) -> None:
        assert (await read(store, "0-0", generation=None, wait_seconds=0.05)) == EventBatch([], None)
        waiting = asyncio.create_task(read(store, "0-0", generation=None, wait_seconds=5))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        began = time.monotonic()
        started = await append(store, 0, one_sample_each(count=8))
        woken = await waiting
        assert time.monotonic() - began < 2
        assert (woken.events, woken.generation) == ([], started.generation)
        committed = await commit(store, 0, 2, events=events_of("p0", "p1"))
        batch = await read(store, "0-0", generation=started.generation)
        assert [e.id for e in batch.events] == committed.event_ids

    run(make_store, scenario)


def test_read_events_of_a_session_started_again_is_news(make_store: StoreFactory) -> None:
    """A reader of one generation never gets the events of the session that took its id after it."""

    async def scenario(store: SessionStore) -> None:
        old = await append(store, 0, one_sample_each(count=8))
        assert await store.delete("s1")
        new = await append(store, 0, one_sample_each(count=8))
        await commit(store, 0, 1, events=events_of("p0"))
        batch = await read(store, "0-0", generation=old.generation, wait_seconds=5)
        assert batch.generation == new.generation != old.generation

    run(make_store, scenario)


def test_read_events_sees_the_session_expire_when_it_is_due(make_store: StoreFactory) -> None:
    """Nothing announces an expiry, yet a waiting reader learns of it then, not when its wait ends."""

    async def scenario(store: SessionStore) -> None:
        started = await append(store, 0, one_sample_each(count=8), ttl_seconds=1)
        began = time.monotonic()
        gone = await read(store, "0-0", generation=started.generation, wait_seconds=10)
        assert (gone.events, gone.generation) == ([], None)
        assert time.monotonic() - began < 3

    run(make_store, scenario)


@pytest.mark.parametrize(
    "after",
    ["\uff11-\uff11", "\u0661-0", "1" * 21 + "-0", "0" * 130 + "-0", f"{2**64}-0", "1-2-3", "12", " 1-0", "1-0\n", ""],
)
def test_read_events_refuses_what_is_not_an_event_id(make_store: StoreFactory, after: str) -> None:
    """Ids are checked as Redis checks stream ids, on both stores: ASCII digits, each part below 2**64."""

    async def scenario(store: SessionStore) -> None:
        started = await append(store, 0, one_sample_each(count=8))
        with pytest.raises(ValueError, match="not an event id"):
            await read(store, after, generation=started.generation)
        # The store still answers.
        assert (await read(store, "0-0", generation=started.generation)).generation == started.generation

    run(make_store, scenario)


def test_read_events_after_the_last_possible_id_is_empty(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        started = await append(store, 0, one_sample_each(count=8))
        await commit(store, 0, 1, events=events_of("p0"))
        last = f"{2**64 - 1}-{2**64 - 1}"
        assert (await read(store, last, generation=started.generation)) == EventBatch([], started.generation)

    run(make_store, scenario)


def test_readers_cancelled_twice_leave_the_store_working(make_store: StoreFactory) -> None:
    """A client that goes away cancels its reader, and the server may cancel it again while it unwinds: nothing
    may be left holding the store (the embedded store once froze for good that way)."""

    async def scenario(store: SessionStore) -> None:
        started = await append(store, 0, one_sample_each(count=8))
        # The first reader leaves while its wait is still being set up (on Redis: subscribing), and a second
        # one comes: it must get the next commit's events.
        first = asyncio.create_task(read(store, "0-0", generation=started.generation, wait_seconds=5))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        second = asyncio.create_task(read(store, "0-0", generation=started.generation, wait_seconds=5))
        await asyncio.sleep(0.1)
        committed = await commit(store, 0, 1, events=events_of("p0"))
        assert [event.id for event in (await second).events] == committed.event_ids
        for _ in range(5):
            readers = [
                asyncio.create_task(read(store, "0-0", generation=started.generation, wait_seconds=5))
                for _ in range(20)
            ]
            await asyncio.sleep(0.02)
            for reader in readers:
                reader.cancel()
            await asyncio.sleep(0)
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        async with asyncio.timeout(5):
            assert (await store.get("s1")) is not None
            assert (await commit(store, 1, 1, events=events_of("p1"))).recorded == [1]
            assert await store.delete("s1")

    run(make_store, scenario)


def test_event_log_and_history_keep_the_newest(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        await append(store, 0, one_sample_each(count=20))
        retention = Retention(predictions=KEEP, events=3, segments=2, outbox=100)
        for window in range(5):
            await commit(
                store,
                window,
                1,
                events=events_of(f"p{window}"),
                segments=[{"segment": window}],
                retention=retention,
            )
        batch = await read(store, "0-0", generation=await generation_of(store, "s1"))
        assert [e.data for e in batch.events] == [e.data for e in events_of("p2", "p3", "p4")]
        assert await store.history("s1") == [{"segment": 3}, {"segment": 4}]
        assert await store.history("never-started") == []

    run(make_store, scenario)


def test_transitions_of_every_session_reach_the_outbox_each_session_in_commit_order(make_store: StoreFactory) -> None:
    """Sessions 's1' and 's2' are in two shards of a Redis store: its outbox has parts, read as one."""

    async def scenario(store: SessionStore) -> None:
        for session_id in ("s1", "s2"):
            await append(store, 0, one_sample_each(count=8), session_id=session_id)
        # Until webhook delivery opens the outbox, nothing is queued.
        early = await commit(store, 0, 1, session_id="s2", events=events_of("t0"))
        assert early.event_ids
        assert await store.read_outbox("0-0", limit=10, wait_seconds=0.01) == []
        await store.open_outbox()
        a = await commit(store, 0, 2, session_id="s1", events=events_of("p0", "t0", "p1"))
        b = await commit(store, 1, 1, session_id="s2", events=events_of("t1"))
        c = await commit(store, 2, 1, session_id="s1", events=events_of("t2"))
        entries = await store.read_outbox("0-0", limit=10, wait_seconds=0.01)
        queued = {
            ("s1", a.event_ids[1], events_of("t0")[0].data),
            ("s2", b.event_ids[0], events_of("t1")[0].data),
            ("s1", c.event_ids[0], events_of("t2")[0].data),
        }
        assert {(e.session_id, e.event_id, e.data) for e in entries} == queued
        assert [e.event_id for e in entries if e.session_id == "s1"] == [a.event_ids[1], c.event_ids[0]]
        # Reading on from an entry's position gives the entries after it, once each.
        first = await store.read_outbox(entries[0].position, limit=1, wait_seconds=0.01)
        assert [e.event_id for e in first] == [entries[1].event_id]
        assert await store.read_outbox(entries[-1].position, limit=10, wait_seconds=0.01) == []
        # Opening it again (another process starting) keeps what it holds.
        await store.open_outbox()
        assert await store.read_outbox("0-0", limit=10, wait_seconds=0.01) == entries
        # The outbox outlives the session: a transition is delivered even after the session ends.
        assert await store.delete("s1")
        assert await store.read_outbox("0-0", limit=10, wait_seconds=0.01) == entries
        # And it keeps the newest ``retention.outbox``: in a sharded store, each part keeps its share of them
        # (one, here) as it queues more.
        small = Retention(predictions=KEEP, events=100, segments=100, outbox=2)
        d = await commit(store, 2, 1, session_id="s2", events=events_of("t2"), retention=small)
        # Event ids are per session: two sessions may log an event in the same millisecond.
        kept = [(e.session_id, e.event_id) for e in await store.read_outbox("0-0", limit=10, wait_seconds=0.01)]
        assert kept[-1] == ("s2", d.event_ids[0])
        assert ("s2", b.event_ids[0]) not in kept

    run(make_store, scenario)


def test_delivery_lease_and_cursor(make_store: StoreFactory) -> None:
    async def scenario(store: SessionStore) -> None:
        await store.open_outbox()
        for session_id in ("s1", "s2"):
            await append(store, 0, one_sample_each(count=8), session_id=session_id)
        await commit(store, 0, 1, session_id="s1", events=events_of("t0"))
        [old] = await store.read_outbox("0-0", limit=10, wait_seconds=0.01)

        async def hold(target: str, owner: str) -> str | None:
            return await store.hold_delivery(target, owner, lease_seconds=0.5, start_after=old.id)

        # A target without a cursor starts where it is told: not with a backlog queued for others.
        start = await hold("hook", "owner-a")
        assert start is not None
        assert await store.read_outbox(start, limit=10, wait_seconds=0.01) == []
        assert await hold("hook", "owner-b") is None
        await commit(store, 0, 1, session_id="s2", events=events_of("t0"))
        [new] = await store.read_outbox(start, limit=10, wait_seconds=0.01)
        assert new.session_id == "s2"
        assert await store.advance_delivery("hook", "owner-a", new.position)
        assert not await store.advance_delivery("hook", "owner-b", start)
        assert await hold("hook", "owner-a") == new.position  # renewed, from its cursor
        assert await hold("other", "owner-b") == start  # per target
        await asyncio.sleep(0.7)
        # The lease lapsed: another owner takes over from the cursor, and the old one may not move it.
        assert await hold("hook", "owner-b") == new.position
        assert not await store.advance_delivery("hook", "owner-a", start)
        assert await store.read_outbox(new.position, limit=10, wait_seconds=0.01) == []

    run(make_store, scenario)
