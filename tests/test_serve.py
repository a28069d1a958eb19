"""``dmft serve`` as a process: its worker processes, their metrics and logs, and clients that are slow or many.

Each test starts the real command (``tools.stack.run_service``) and talks to it over real
sockets, since what is checked here happens in uvicorn's processes and connections, below the app.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tools.stack import Server, dmft_command, run_service
from tools.traffic import WatchData

from .redis_fixtures import RedisTarget
from .service_fixtures import metric_value, parse_metrics

CHUNK = 50  # samples per session chunk: one second
STOP_TIMEOUT_S = 20
SETTLE_S = 30  # how long the service may take to replace a worker and drain its queues


def _worker_pids(server: Server) -> set[int]:
    """The uvicorn worker processes of ``server``: its children started by multiprocessing's spawn."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    workers = set()
    for pid in map(int, children):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in command:
            workers.add(pid)
    return workers


def _stop(server: Server) -> str:
    """SIGTERM ``server``; its log, once it has shut down cleanly."""
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"dmft serve still running {STOP_TIMEOUT_S} s after SIGTERM")
    log = server.log.read_text()
    assert server.process.returncode == 0, log
    assert "Traceback" not in log, log
    return log


def test_several_workers_without_redis_serve_as_one_and_say_why(tmp_path: Path, watch_data: WatchData) -> None:
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    # A fresh connection per request, so that any second worker would take some of them.
    limits = httpx.Limits(max_keepalive_connections=0)
    with (
        run_service(tmp_path, workers=2) as server,
        httpx.Client(base_url=server.base, limits=limits, timeout=30, trust_env=False) as client,
    ):
        for seq in range(8):
            chunk = {name: rows[seq * CHUNK : (seq + 1) * CHUNK].tolist() for name, rows in samples.items()}
            response = client.post("/v1/sessions/one-home/samples", json={"seq": seq, "modalities": chunk})
            assert response.status_code == 200, response.text
        states = [client.get("/v1/sessions/one-home") for _ in range(8)]
        assert [state.status_code for state in states] == [200] * 8
        assert {state.json()["seq"] for state in states} == {7}
        log = _stop(server)
    assert log.count("Started server process") == 1, log
    assert "--workers 2 without REDIS_URL" in log and "serving with 1 worker" in log


def test_workers_log_their_start_and_a_killed_one_leaves_no_stale_gauge(
    tmp_path: Path, redis_target: RedisTarget, watch_data: WatchData
) -> None:
    metrics_dir = tmp_path / "not-yet" / "metrics"  # as in the image: named, but nothing made it
    windows = [watch_data.window(int(index)) for index in watch_data.test[:64]]
    flooding = threading.Event()
    flooding.set()

    def flood(base: str) -> None:
        with httpx.Client(base_url=base, timeout=60, trust_env=False) as client:
            while flooding.is_set():
                try:
                    client.post(
                        "/v1/predict/batch",
                        json={"windows": [{"modalities": window} for window in windows], "model": "teacher"},
                    )
                except httpx.TransportError:
                    pass  # the worker that held this connection was killed

    with run_service(
        tmp_path,
        redis_url=redis_target.url,
        redis_prefix=redis_target.prefix,
        workers=2,
        env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    ) as server:
        assert metrics_dir.is_dir()
        clients = [threading.Thread(target=flood, args=(server.base,)) for _ in range(6)]
        for thread in clients:
            thread.start()
        try:
            victim, last_depth = _kill_a_worker_with_work_queued(server, metrics_dir)
        finally:
            flooding.clear()
            for thread in clients:
                thread.join()
        assert last_depth > 0
        # The supervisor starts another worker; the dead one's queue is not anyone's any more.
        deadline = time.monotonic() + SETTLE_S
        while True:
            workers = _worker_pids(server)
            samples = parse_metrics(httpx.get(f"{server.base}/metrics", trust_env=False).text)
            depth = metric_value(samples, "dmft_queue_depth", {"model": "teacher"})
            if len(workers) == 2 and victim not in workers and depth == 0:
                break
            assert time.monotonic() < deadline, f"queue depth {depth} with workers {workers} (killed {victim})"
            time.sleep(0.5)
        log = _stop(server)
    assert not metrics_dir.exists(), "the metrics directory that the service made is left behind"
    assert metrics_dir.parent.is_dir()
    # Every worker, the replacements too, logs the service's own start-up lines.
    started = log.count("Application startup complete.")
    assert started >= 3, log
    assert log.count("app.services: serving with RedisStore") == started, log


def _kill_a_worker_with_work_queued(server: Server, metrics_dir: Path) -> tuple[int, float]:
    """SIGKILL a worker while its teacher queue holds windows; its pid and the depth its metrics file kept."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        for pid in _worker_pids(server):
            if _recorded_queue_depth(metrics_dir, pid) > 0:
                os.kill(pid, signal.SIGKILL)
                while pid in _worker_pids(server):
                    time.sleep(0.05)
                depth = _recorded_queue_depth(metrics_dir, pid)
                if depth > 0:  # else its queue ran dry in between: try again
                    return pid, depth
        time.sleep(0.02)
    raise AssertionError("no worker ever had teacher windows queued")


def _recorded_queue_depth(metrics_dir: Path, pid: int) -> float:
    """The teacher queue depth that worker ``pid`` last wrote (0 before it wrote any), read by
    prometheus_client's own collector."""
    source = metrics_dir / f"gauge_livemax_{pid}.db"
    alone = metrics_dir.parent / f"worker-{pid}"
    alone.mkdir(exist_ok=True)
    try:
        shutil.copy(source, alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        samples = [sample for family in registry.collect() for sample in family.samples]
    except FileNotFoundError:
        samples = []
    finally:
        shutil.rmtree(alone)
    return sum(s.value for s in samples if s.name == "dmft_queue_depth" and s.labels.get("model") == "teacher")


def test_workers_that_keep_dying_stop_the_service(tmp_path: Path, redis_target: RedisTarget) -> None:
    with run_service(tmp_path, redis_url=redis_target.url, redis_prefix=redis_target.prefix, workers=2) as server:
        killed: set[int] = set()
        deadline = time.monotonic() + 60
        while server.process.poll() is None:
            for pid in _worker_pids(server) - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            assert time.monotonic() < deadline, f"still running after {len(killed)} workers were killed"
            time.sleep(0.05)
        log = server.log.read_text()
    assert server.process.returncode == 1, log
    assert re.search(r"workers died \d+ times within 60 s; stopping", log), log


# ---------- slow and numerous clients ----------

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
MAX_CONNECTIONS = 8
# Well past each timeout on a busy machine, and far below "for good".
ANSWER_WITHIN_S = 8.0


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "DMFT_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT_S),
        "DMFT_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_S),
        "DMFT_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    with run_service(tmp_path_factory.mktemp("guarded"), env=env) as server:
        yield server


def _connect(server: Server) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_WITHIN_S)
    return connection


def _answer(connection: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open {ANSWER_WITHIN_S} s later; received {received!r}")
    finally:
        connection.close()
    return received, time.monotonic() - started


def _error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower(), head
    return status, json.loads(body)


def test_a_request_whose_headers_never_end_is_answered_408(guarded: Server) -> None:
    connection = _connect(guarded)
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: dmft\r\nX-Slow: ")
    answer, waited = _answer(connection)
    status, body = _error(answer)
    assert status == 408 and body["error"]["code"] == "request_timeout", body
    assert "headers" in body["error"]["message"]
    assert waited >= HEADER_TIMEOUT_S * 0.9


def test_a_connection_that_never_asks_is_closed(guarded: Server) -> None:
    answer, waited = _answer(_connect(guarded))
    assert answer == b"" and waited >= HEADER_TIMEOUT_S * 0.9


def test_a_body_that_never_ends_is_answered_408(guarded: Server) -> None:
    connection = _connect(guarded)
    connection.sendall(
        b"POST /v1/predict HTTP/1.1\r\nHost: dmft\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"modalities": {"accelerometer": [[0.1, '
    )
    answer, waited = _answer(connection)
    status, body = _error(answer)
    assert status == 408 and body["error"]["code"] == "request_timeout", body
    assert "body" in body["error"]["message"]
    assert waited >= BODY_TIMEOUT_S * 0.9


def test_a_slow_second_request_on_a_kept_alive_connection_is_answered_408(guarded: Server) -> None:
    connection = _connect(guarded)
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: dmft\r\n\r\n")
    first = b""
    while not first.endswith(b"}"):
        first += connection.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHo")
    status, body = _error(_answer(connection)[0])
    assert status == 408, body


def test_connections_beyond_the_limit_are_closed_at_once_and_the_service_recovers(guarded: Server) -> None:
    held = [_connect(guarded) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)  # accepted by the server, not only queued by the kernel
    try:
        answer, waited = _answer(_connect(guarded))
        assert answer == b"" and waited < HEADER_TIMEOUT_S / 2
    finally:
        for connection in held:
            connection.close()
    deadline = time.monotonic() + ANSWER_WITHIN_S
    while True:
        try:
            response = httpx.get(f"{guarded.base}/healthz", timeout=2, trust_env=False)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            break
        assert time.monotonic() < deadline, "the service did not take connections again"
        time.sleep(0.1)
    samples = parse_metrics(httpx.get(f"{guarded.base}/metrics", trust_env=False).text)
    assert metric_value(samples, "dmft_errors_total", {"reason": "connection_limit"}) >= 1


@pytest.mark.parametrize("command", ["serve", "replay", "mqtt-bridge"])
def test_every_option_of_the_service_commands_has_help_and_shows_its_default(command: str) -> None:
    shown = subprocess.run([*dmft_command(), command, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    options = re.split(r"\n(?=  -)", shown.stdout.split("options:\n", 1)[1])
    assert len(options) >= 5, shown.stdout
    for option in options:
        name, _, text = option.strip().partition("  ")
        described = " ".join(text.split())
        assert described, f"{command} {name}: no help"
        if name.startswith("-h"):
            continue
        # Each option says what it defaults to, in argparse's words or its own.
        assert "default:" in described or "required" in described or "else" in described, f"{command} {name}"
