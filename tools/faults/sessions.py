"""Sessions streamed as a careful client streams them, and an audit of what the service kept of them.

A writer sends its session's chunks in order and resends a chunk, by the same ``seq``, until it is
accepted: after a dropped connection, and after a 503 once its ``Retry-After`` (at most a second)
has passed. Such a client must end up with every window of its samples classified once: the audit
reads the session's state and its whole event log (from ``0-0``) and names every window that is
missing or was recorded twice. A follower reads a session's events as ``EventSource`` would,
reconnecting with ``Last-Event-ID`` whenever its stream breaks, and keeps every prediction's window.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import numpy as np

from tools.faults.probe import DROPPED, Tally
from tools.traffic import MODALITIES, WatchData, playlist

CHUNK_SAMPLES = 50  # one second at 50 Hz: a window per chunk once the first two seconds are in
WINDOW_SAMPLES, HOP_SAMPLES = 100, 50  # of the shipped bundles at the default hop
MAX_RETRY_WAIT_S = 1.0  # a Retry-After longer than this is not waited for in full
DROPPED_RETRY_S = 0.1
JSON_HEADERS = {"content-type": "application/json"}


def expected_windows(samples: int) -> int:
    return (samples - WINDOW_SAMPLES) // HOP_SAMPLES + 1 if samples >= WINDOW_SAMPLES else 0


@dataclass(frozen=True)
class SessionPlan:
    """A session's chunks as JSON bodies (``seq`` i at index i), cut from held-out recordings."""

    session_id: str
    bodies: list[bytes]
    samples: int  # per modality, over all chunks

    @property
    def windows(self) -> int:
        return expected_windows(self.samples)

    def truncated(self, chunks: int) -> SessionPlan:
        """The plan as far as its first ``chunks`` chunks."""
        return SessionPlan(self.session_id, self.bodies[:chunks], chunks * CHUNK_SAMPLES)


def plan_sessions(watch: WatchData, session_ids: list[str], chunks: int, *, seed: int = 0) -> list[SessionPlan]:
    """``chunks`` one-second chunks for each session, each a stretch of held-out exercises of its own."""
    rng = random.Random(seed)
    classes = len(watch.class_names)
    plans = []
    for number, session_id in enumerate(session_ids):
        samples = playlist(watch, rng, first_class=number % classes, seconds=chunks + 1)
        bodies = [
            json.dumps({"seq": seq, "modalities": _rows(samples, seq * CHUNK_SAMPLES, CHUNK_SAMPLES)}).encode()
            for seq in range(chunks)
        ]
        plans.append(SessionPlan(session_id, bodies, chunks * CHUNK_SAMPLES))
    return plans


def _rows(samples: dict[str, np.ndarray], start: int, count: int) -> dict[str, list[list[float]]]:
    return {name: samples[name][start : start + count].tolist() for name in MODALITIES}


async def stream_session(
    client: httpx.AsyncClient,
    plan: SessionPlan,
    tally: Tally,
    *,
    stop_at: float,
    give_up_at: float,
    pause_s: float = 0.0,
) -> int:
    """Send the plan's chunks in order, each until it is accepted, ``pause_s`` apart; no new chunk after
    ``stop_at``, and no more tries after ``give_up_at``. How many chunks were accepted."""
    path = f"/v1/sessions/{plan.session_id}/samples"
    for seq, body in enumerate(plan.bodies):
        if time.monotonic() > stop_at:
            return seq
        while True:
            if time.monotonic() > give_up_at:
                tally.problem(f"{plan.session_id}: chunk {seq} not accepted before the run's end")
                return seq
            began = time.monotonic()
            what = f"{plan.session_id} chunk {seq}"
            try:
                response = await client.post(path, content=body, headers=JSON_HEADERS)
            except httpx.TransportError as error:
                tally.record(DROPPED, time.monotonic() - began, what=f"{what}: {error!r}")
                await asyncio.sleep(DROPPED_RETRY_S)
                continue
            tally.record_answer(response, time.monotonic() - began, what=what)
            if response.status_code == 200:
                break
            if response.status_code != 503:
                return seq  # the tally has the problem; this client cannot go on
            await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), MAX_RETRY_WAIT_S))
        if pause_s:
            await asyncio.sleep(pause_s)
    return len(plan.bodies)


@dataclass(frozen=True)
class ServerSentEvent:
    id: str | None
    type: str
    data: dict


async def server_sent(response: httpx.Response) -> AsyncIterator[ServerSentEvent | None]:
    """The events of a stream, and None for each keep-alive comment."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield None
        elif line == "":
            if "event" in fields:
                yield ServerSentEvent(fields.get("id"), fields["event"], json.loads(fields["data"]))
            fields = {}
        else:
            name, _, value = line.partition(": ")
            fields[name] = value


async def logged_windows(client: httpx.AsyncClient, session_id: str) -> list[int]:
    """The windows of every prediction in the session's event log, in log order, read from its start
    until the stream falls idle (its first keep-alive)."""
    windows = []
    path = f"/v1/sessions/{session_id}/events"
    async with client.stream("GET", path, headers={"Last-Event-ID": "0-0"}) as response:
        response.raise_for_status()
        async for event in server_sent(response):
            if event is None:
                break
            if event.type == "prediction":
                windows.append(event.data["window"])
            elif event.type == "end":
                break
    return windows


def window_problems(name: str, windows: list[int], expected: int) -> list[str]:
    """What is wrong with ``windows`` against ``range(expected)``, each once: missing and doubled windows."""
    counts = Counter(windows)
    missing = [window for window in range(expected) if counts[window] == 0]
    doubled = sorted(window for window, count in counts.items() if count > 1)
    extra = sorted(window for window in counts if not 0 <= window < expected)
    problems = []
    for label, found in (("missing", missing), ("doubled", doubled), ("unexpected", extra)):
        if found:
            problems.append(f"{name}: {len(found)} windows {label} ({found[:10]})")
    return problems


@dataclass
class Audit:
    sessions: int = 0
    expected_windows: int = 0
    logged_windows: int = 0
    lost: int = 0
    doubled: int = 0


async def audit_sessions(client: httpx.AsyncClient, plans: list[SessionPlan], tally: Tally) -> Audit:
    """Check every session's window count and event log against its plan; problems go to the tally."""
    audit = Audit()
    logs = await asyncio.gather(*(_audit_one(client, plan, tally) for plan in plans))
    for plan, windows in zip(plans, logs, strict=True):
        counts = Counter(windows)
        audit.sessions += 1
        audit.expected_windows += plan.windows
        audit.logged_windows += len(windows)
        audit.lost += sum(1 for window in range(plan.windows) if counts[window] == 0)
        audit.doubled += sum(count - 1 for count in counts.values())
        for text in window_problems(f"{plan.session_id} event log", windows, plan.windows):
            tally.problem(text)
    return audit


async def _audit_one(client: httpx.AsyncClient, plan: SessionPlan, tally: Tally) -> list[int]:
    """The windows of the session's event log, after checking its state's window count."""
    state = await client.get(f"/v1/sessions/{plan.session_id}")
    if state.status_code != 200:
        tally.problem(f"{plan.session_id}: state answered {state.status_code} {state.text[:200]}")
        return []
    if state.json()["windows"] != plan.windows:
        tally.problem(f"{plan.session_id}: {state.json()['windows']} windows classified of {plan.windows}")
    return await logged_windows(client, plan.session_id)


async def follow_session(
    client: httpx.AsyncClient, session_id: str, seen: list[int], tally: Tally, *, done: Callable[[], bool]
) -> None:
    """Follow the session's events from its start, resuming after the last id seen whenever the stream breaks,
    until ``done()``; each prediction's window goes to ``seen``."""
    last_id = "0-0"
    path = f"/v1/sessions/{session_id}/events"
    while not done():
        began = time.monotonic()
        try:
            async with client.stream("GET", path, headers={"Last-Event-ID": last_id}) as response:
                if response.status_code != 200:
                    await response.aread()
                    tally.record_answer(response, time.monotonic() - began, what=f"{session_id} events")
                    await asyncio.sleep(MAX_RETRY_WAIT_S)
                    continue
                async for event in server_sent(response):
                    if event is None:
                        if done():
                            return
                        continue
                    last_id = event.id or last_id
                    if event.type == "prediction":
                        seen.append(event.data["window"])
                    elif event.type == "end":
                        tally.problem(f"{session_id}: its event stream ended while the session went on")
                        return
        except httpx.TransportError:
            await asyncio.sleep(DROPPED_RETRY_S)
