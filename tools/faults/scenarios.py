"""The fault and load runs. Each drives a running service over real sockets for a while and returns a ``RunReport``:
every request's outcome against the run's time bound, the memory of the service's processes, and, where
sessions were streamed, an audit of their windows. ``RunReport.problems`` says what the service did wrong.

- ``event_stream_churn``: readers of one session's events come and go while a writer streams it; health,
  overview and metrics are polled throughout (a store that froze would hang them).
- ``session_burst``: hundreds of sessions at once, far more than the Redis pool's connections, with the
  overview of 150 of them asked meanwhile.
- ``teacher_flood``: a thousand connections opened, then each posts a teacher window at the same moment.
- ``slow_clients``: connections that trickle their headers or body, while ordinary clients post windows.
- ``kill_process``: SIGKILL a worker, or an inference process, while sessions stream and windows are posted.
- ``redis_restart``: SIGKILL the Redis under streaming sessions and their event followers, start it again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tools.faults.probe import DROPPED, MIB, MemoryWatch, Tally, close_quietly, read_answer
from tools.faults.sessions import (
    Audit,
    SessionPlan,
    audit_sessions,
    follow_session,
    plan_sessions,
    stream_session,
    window_problems,
)
from tools.faults.stacks import RedisStack
from tools.stack import Server
from tools.traffic import WatchData

POLLED = ("/healthz", "/readyz", "/v1/overview", "/metrics")
POLL_INTERVAL_S = 0.25
SETTLE_TIMEOUT_S = 30.0
KEEPALIVE_EXPIRY_S = 2.0  # for the supervisor to replace a worker, or a follower to catch up


@dataclass
class RunReport:
    name: str
    seconds: float
    tally: Tally
    memory: MemoryWatch
    audit: Audit | None = None
    notes: dict[str, float | int | str] = field(default_factory=dict)

    def problems(self, *, max_growth_mib: float) -> list[str]:
        found = list(self.tally.problems)
        if self.memory.growth_bytes > max_growth_mib * MIB:
            found.append(f"memory rose {self.memory.growth_bytes / MIB:.0f} MiB (bound {max_growth_mib:g} MiB)")
        return found

    def summary(self) -> str:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(self.tally.statuses.items()))
        memory = self.memory
        line = (
            f"{self.name}: {self.seconds:.1f} s, {self.tally.requests} requests ({statuses}), slowest "
            f"{self.tally.slowest_s:.2f} s; RSS {memory.start_bytes / MIB:.0f} -> peak {memory.peak_bytes / MIB:.0f} "
            f"-> {memory.end_bytes / MIB:.0f} MiB"
        )
        if self.audit is not None:
            audit = self.audit
            line += (
                f"; {audit.sessions} sessions, {audit.expected_windows} windows expected, "
                f"{audit.lost} lost, {audit.doubled} doubled"
            )
        if self.notes:
            line += "; " + ", ".join(f"{key} {value}" for key, value in self.notes.items())
        return line


def _client(base: str, *, connections: int, bound_s: float) -> httpx.AsyncClient:
    """A client whose requests give up well after the run's bound, so that a late answer is seen as late.

    It lets idle connections go sooner than the service closes them (``DMFT_KEEPALIVE_TIMEOUT_SECONDS``, 5 s),
    as a client should: one sent on a connection that the server is closing at that moment gets no answer.
    """
    limits = httpx.Limits(
        max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=KEEPALIVE_EXPIRY_S
    )
    return httpx.AsyncClient(base_url=base, limits=limits, timeout=bound_s + 5, trust_env=False)


async def _poll_until(client: httpx.AsyncClient, tally: Tally, stop: asyncio.Event) -> None:
    """Ask health, readiness, the overview and the metrics in turn until ``stop``."""
    while not stop.is_set():
        for path in POLLED:
            began = time.monotonic()
            try:
                response = await client.get(path)
            except httpx.TransportError:
                tally.record(DROPPED, time.monotonic() - began, what=path)
                continue
            tally.record_answer(response, time.monotonic() - began, what=path)
        await asyncio.sleep(POLL_INTERVAL_S)


@dataclass
class Writers:
    """What a run's ``during`` part may wait for: the writers' end, and then each session's final window count."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    windows: dict[str, int] = field(default_factory=dict)


async def _stream_and_audit(
    server: Server,
    plans: list[SessionPlan],
    tally: Tally,
    *,
    seconds: float,
    pause_s: float,
    during: Callable[[httpx.AsyncClient, Writers], Awaitable[None]] | None = None,
    connections: int = 20,
) -> Audit:
    """Stream every plan, paced by ``pause_s``, stopping new chunks after ``seconds``, while ``during`` runs on the
    same client (with ``connections`` of its own); then audit the sessions as far as each was accepted."""
    writers = Writers()
    async with _client(server.base, connections=len(plans) + connections, bound_s=tally.bound_s) as client:
        alongside = asyncio.create_task(during(client, writers)) if during else None
        stop_at = time.monotonic() + seconds
        accepted = await asyncio.gather(
            *(
                stream_session(
                    client, plan, tally, stop_at=stop_at, give_up_at=stop_at + SETTLE_TIMEOUT_S, pause_s=pause_s
                )
                for plan in plans
            )
        )
        sent = [plan.truncated(count) for plan, count in zip(plans, accepted, strict=True)]
        writers.windows.update((plan.session_id, plan.windows) for plan in sent)
        writers.done.set()
        if alongside is not None:
            await alongside
        return await audit_sessions(client, sent, tally)


def event_stream_churn(
    server: Server, watch: WatchData, *, seconds: float, readers: int = 60, bound_s: float = 10.0
) -> RunReport:
    tally = Tally(bound_s)
    session_id = f"churn-{uuid.uuid4().hex[:8]}"
    plans = plan_sessions(watch, [session_id], chunks=int(seconds * 20) + 4)
    connects = Tally(bound_s)

    async def churn(client: httpx.AsyncClient, _: Writers) -> None:
        stop = asyncio.Event()

        async def reader(rng: random.Random) -> None:
            path = f"/v1/sessions/{session_id}/events"
            while not stop.is_set():
                began = time.monotonic()
                try:
                    async with client.stream("GET", path) as response:
                        connects.record(response.status_code, time.monotonic() - began, what="event stream")
                        async with asyncio.timeout(rng.uniform(0.05, 1.5)):
                            async for _ in response.aiter_lines():
                                pass
                except TimeoutError:
                    pass  # this reader leaves
                except httpx.TransportError:
                    connects.record(DROPPED, time.monotonic() - began, what="event stream")

        tasks = [asyncio.create_task(reader(random.Random(seed))) for seed in range(readers)]
        poller = asyncio.create_task(_poll_until(client, tally, stop))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks, poller)

    began = time.monotonic()
    with MemoryWatch(server.process.pid) as memory:
        audit = asyncio.run(
            _stream_and_audit(
                server, plans, tally, seconds=seconds, pause_s=0.02, during=churn, connections=readers + 8
            )
        )
    tally.merge(connects)
    report = RunReport("event-stream churn", time.monotonic() - began, tally, memory, audit)
    report.notes["stream connects"] = connects.requests
    return report


def session_burst(
    server: Server, watch: WatchData, *, sessions: int = 200, chunks: int = 4, bound_s: float = 30.0
) -> RunReport:
    """Every session sends its chunks back to back, all sessions at once. The store is healthy throughout, so a
    503 ``store_unavailable`` is a problem: requests wait for a pooled connection instead."""
    # A few connections of the burst are closed without an answer (ReadError on the client, under 1 in 250
    # requests, cause not yet found); the client resends by seq, and the audit still requires every window once.
    tally = Tally(bound_s, allowed=frozenset({"200", "503", DROPPED}), refused_codes=frozenset({"store_unavailable"}))
    run = uuid.uuid4().hex[:8]
    plans = plan_sessions(watch, [f"burst-{run}-{i}" for i in range(sessions)], chunks)

    async def overview(client: httpx.AsyncClient, _: Writers) -> None:
        await asyncio.sleep(0.2)  # while the sessions start
        for _ in range(3):
            began = time.monotonic()
            response = await client.get("/v1/overview", params={"limit": 150})
            elapsed = time.monotonic() - began
            tally.record_answer(response, elapsed, what="overview")

    began = time.monotonic()
    with MemoryWatch(server.process.pid) as memory:
        audit = asyncio.run(_stream_and_audit(server, plans, tally, seconds=bound_s, pause_s=0.0, during=overview))
    return RunReport("session burst", time.monotonic() - began, tally, memory, audit, {"sessions": sessions})


def _predict_request(server: Server, window: dict, model: str) -> bytes:
    body = json.dumps({"modalities": window, "model": model}).encode()
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def teacher_flood(server: Server, watch: WatchData, *, connections: int = 1000, bound_s: float = 60.0) -> RunReport:
    """Open ``connections`` connections, then post a held-out window to the teacher on each at the same moment.
    Each is answered (200, or 503 with ``Retry-After`` for what the queue cannot take in time); then the service
    answers a window at once again."""
    tally = Tally(bound_s, allowed=frozenset({"200", "503"}))
    windows = [watch.window(int(index)) for index in watch.test[:64]]
    requests = [_predict_request(server, windows[i % len(windows)], "teacher") for i in range(connections)]

    async def flood() -> None:
        opened = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", server.port) for _ in requests), return_exceptions=True
        )
        streams = [pair for pair in opened if not isinstance(pair, BaseException)]
        for failure in opened:
            if isinstance(failure, BaseException):
                tally.record(DROPPED, 0.0, what=f"connect: {failure!r}")

        async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
            began = time.monotonic()
            try:
                async with asyncio.timeout(bound_s + 5):
                    writer.write(request)
                    await writer.drain()
                    answer = await read_answer(reader)
                tally.record_answer(answer, time.monotonic() - began, what="teacher")
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
                tally.record(DROPPED, time.monotonic() - began, what=f"teacher: {error!r}")
            finally:
                await close_quietly(writer)

        await asyncio.gather(
            *(ask(reader, writer, request) for (reader, writer), request in zip(streams, requests, strict=False))
        )
        async with _client(server.base, connections=1, bound_s=bound_s) as client:
            began = time.monotonic()
            response = await client.post("/v1/predict", json={"modalities": windows[0]})
            elapsed = time.monotonic() - began
            tally.record_answer(response, elapsed, what="after")
            if response.status_code != 200:
                tally.problem(f"a window after the flood answered {response.status_code}")

    began = time.monotonic()
    with MemoryWatch(server.process.pid) as memory:
        asyncio.run(flood())
    return RunReport("teacher flood", time.monotonic() - began, tally, memory, notes={"connections": connections})


SLOW_HEAD = "POST /v1/predict HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\n"


def slow_clients(
    server: Server, watch: WatchData, *, slow: int = 300, seconds: float = 8.0, posters: int = 4, bound_s: float = 10.0
) -> RunReport:
    """``slow`` connections trickle a byte a second, half of them in their headers and half in a body they promised;
    meanwhile ``posters`` clients post windows back to back. Every window is answered within the bound, and the
    server answers each slow connection 408 and closes it (within its header or body deadline, plus the bound)."""
    tally = Tally(bound_s)
    closed = Tally(bound_s + 5, allowed=frozenset({"408"}))  # from the first byte; the deadlines are ~3 s
    window = watch.window(int(watch.test[0]))

    async def trickle(number: int) -> None:
        began = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        except OSError as error:
            closed.record(DROPPED, time.monotonic() - began, what=f"slow connect: {error!r}")
            return
        head = SLOW_HEAD + ("Content-Length: 1000\r\n\r\n" if number % 2 else "")
        try:
            writer.write(head.encode())
            answer = asyncio.create_task(read_answer(reader))
            while not answer.done() and time.monotonic() - began < seconds + bound_s:
                writer.write(b"x" if number % 2 else b"X")
                await asyncio.wait([answer], timeout=1.0)
            if answer.done():
                closed.record_answer(answer.result(), time.monotonic() - began, what="slow")
            else:
                answer.cancel()
                closed.record("open", time.monotonic() - began, what="slow connection never closed")
        except (OSError, asyncio.IncompleteReadError) as error:
            closed.record(DROPPED, time.monotonic() - began, what=f"slow: {error!r}")
        finally:
            await close_quietly(writer)

    async def post_windows(client: httpx.AsyncClient, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            await _post_window(client, window, tally)

    async def run() -> None:
        async with _client(server.base, connections=posters, bound_s=bound_s) as client:
            stop_at = time.monotonic() + seconds
            await asyncio.gather(
                *(trickle(number) for number in range(slow)), *(post_windows(client, stop_at) for _ in range(posters))
            )

    began = time.monotonic()
    with MemoryWatch(server.process.pid) as memory:
        asyncio.run(run())
    tally.merge(closed)
    notes = {"slow connections": slow, "closed with 408": closed.statuses["408"], "slowest close s": closed.slowest_s}
    return RunReport("slow clients", time.monotonic() - began, tally, memory, notes=notes)


def group_processes(group: int) -> dict[int, str]:
    """The command lines of process group ``group``'s live processes."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == group:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (ProcessLookupError, FileNotFoundError):
            continue
    return found


WORKER = "spawn_main"
INFERENCE_PROCESS = "app.inference.process"


def _processes_of(server: Server, kind: str) -> set[int]:
    return {pid for pid, command in group_processes(server.process.pid).items() if kind in command}


def _sockets(pid: int) -> int:
    try:
        return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).startswith("socket:"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def _busiest_worker(server: Server) -> int:
    """The worker holding the most sockets: the one that accepted the clients' connections (the kernel may hand
    every connection to one worker while the other idles)."""
    return max(_processes_of(server, WORKER), key=_sockets)


def _victim(server: Server, kind: str) -> int:
    """The process of ``kind`` to kill: the busiest worker, or its inference process."""
    worker = _busiest_worker(server)
    if kind == WORKER:
        return worker
    children = Path(f"/proc/{worker}/task/{worker}/children").read_text().split()
    return next(pid for pid in map(int, children) if pid in _processes_of(server, INFERENCE_PROCESS))


def kill_process(
    server: Server,
    watch: WatchData,
    *,
    kind: str,
    seconds: float,
    sessions: int = 12,
    posters: int = 4,
    bound_s: float = 30.0,
) -> RunReport:
    """SIGKILL one process of ``kind`` (``WORKER`` or ``INFERENCE_PROCESS``) a third of the way through ``seconds``
    of sessions streaming and windows posted; the service replaces it, and no session loses or doubles a window."""
    tally = Tally(bound_s, allowed=frozenset({"200", "503", DROPPED}))
    run = uuid.uuid4().hex[:8]
    plans = plan_sessions(watch, [f"kill-{run}-{i}" for i in range(sessions)], chunks=int(seconds * 10) + 4)
    window = watch.window(int(watch.test[1]))
    serving = (len(_processes_of(server, WORKER)), len(_processes_of(server, INFERENCE_PROCESS)))
    notes: dict[str, float | int | str] = {}

    async def kill_and_post(client: httpx.AsyncClient, _: Writers) -> None:
        stop_at = time.monotonic() + seconds
        killer = asyncio.create_task(_kill_later(seconds / 3))
        while time.monotonic() < stop_at:
            await asyncio.gather(*(_post_window(client, window, tally) for _ in range(posters)))
        await killer

    async def _kill_later(delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        victim = _victim(server, kind)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        while True:  # until as many workers and inference processes run as before, without the victim
            workers, inference = _processes_of(server, WORKER), _processes_of(server, INFERENCE_PROCESS)
            if victim not in workers | inference and (len(workers), len(inference)) == serving:
                notes["replaced in s"] = round(time.monotonic() - killed_at, 2)
                return
            if time.monotonic() - killed_at > SETTLE_TIMEOUT_S:
                tally.problem(f"no process replaced the killed {kind} within {SETTLE_TIMEOUT_S:g} s")
                return
            await asyncio.sleep(0.1)

    began = time.monotonic()
    with MemoryWatch(server.process.pid) as memory:
        audit = asyncio.run(
            _stream_and_audit(server, plans, tally, seconds=seconds, pause_s=0.05, during=kill_and_post)
        )
    name = "kill -9 worker" if kind == WORKER else "kill -9 inference process"
    return RunReport(name, time.monotonic() - began, tally, memory, audit, notes)


async def _post_window(client: httpx.AsyncClient, window: dict, tally: Tally) -> None:
    began = time.monotonic()
    try:
        response = await client.post("/v1/predict", json={"modalities": window})
    except httpx.TransportError:
        tally.record(DROPPED, time.monotonic() - began, what="window")
        return
    tally.record_answer(response, time.monotonic() - began, what="window")


def redis_restart(
    stack: RedisStack, watch: WatchData, *, seconds: float, sessions: int = 8, bound_s: float = 30.0
) -> RunReport:
    """SIGKILL the Redis a third of the way through ``seconds`` of streaming sessions, each followed by an event
    reader that resumes by ``Last-Event-ID``; start it again at two thirds. Requests during the outage are answered
    503 with ``Retry-After``; afterwards every session has each window once, and every follower saw each once."""
    server = stack.server
    tally = Tally(bound_s, allowed=frozenset({"200", "503", DROPPED}))
    run = uuid.uuid4().hex[:8]
    plans = plan_sessions(watch, [f"restart-{run}-{i}" for i in range(sessions)], chunks=int(seconds * 10) + 4)
    seen: dict[str, list[int]] = {plan.session_id: [] for plan in plans}
    notes: dict[str, float | int | str] = {}

    async def outage_and_followers(client: httpx.AsyncClient, writers: Writers) -> None:
        def caught_up(session_id: str) -> Callable[[], bool]:
            return lambda: writers.done.is_set() and len(set(seen[session_id])) >= writers.windows[session_id]

        followers = [
            asyncio.create_task(
                follow_session(client, plan.session_id, seen[plan.session_id], tally, done=caught_up(plan.session_id))
            )
            for plan in plans
        ]
        await asyncio.sleep(seconds / 3)
        stack.redis.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(seconds / 3)
        await asyncio.to_thread(stack.redis.start)
        notes["outage s"] = round(time.monotonic() - killed_at, 1)
        await writers.done.wait()
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                await asyncio.gather(*followers)
        except TimeoutError:
            tally.problem(f"followers had not caught up {SETTLE_TIMEOUT_S:g} s after the writers stopped")
        for session_id, windows in seen.items():
            for text in window_problems(f"{session_id} follower", windows, writers.windows[session_id]):
                tally.problem(text)

    began = time.monotonic()
    with MemoryWatch(server.process.pid) as memory:
        audit = asyncio.run(
            _stream_and_audit(
                server,
                plans,
                tally,
                seconds=seconds,
                pause_s=0.05,
                during=outage_and_followers,
                connections=sessions + 10,
            )
        )
    return RunReport("Redis killed and restarted", time.monotonic() - began, tally, memory, audit, notes)
