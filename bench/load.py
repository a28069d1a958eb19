"""Load benchmark of the service against a bare FastAPI echo, every comparison measured alternately in one run.

Starts, as real processes: the bare echo (``bench/bare_app.py``: validates the same bodies with
pydantic, answers a constant), the service on Redis (one worker, dynamic batching), the service
with batching off (``DMFT_MAX_BATCH_SIZE=1``) and the service with ``--workers 2``. ``wrk`` (Debian
package ``wrk``) drives each in turn, round after round, so that a noisy machine slows all of them
alike; each ratio is taken within a round and the median over rounds is printed, beside the median
figures. The same process also times ``Bundle.predict`` (one thread, as the service runs it): the
student on one window, the teacher on batches of 32.

    python bench/load.py [--seconds 5] [--rounds 3] [--redis-url redis://127.0.0.1:6379/14]

Prints Markdown tables: every measurement, then each goal's ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import redis
import torch

from model import load_bundle

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE.parent / "model" / "weights"
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
MODALITIES = ("accelerometer", "gyroscope")
WINDOW, CHUNK = 100, 50  # samples per window (2 s at 50 Hz) and per session chunk (1 s)
SESSIONS = 500  # several chunks per session in one measurement


@dataclass(frozen=True)
class Run:
    rps: float
    p50: float  # ms
    p99: float  # ms
    failed: int  # non-2xx answers
    requests: int
    api_cpu_us: float = 0.0  # CPU time of the serving processes per request (all workers)
    inference_cpu_us: float = 0.0  # CPU time of their inference processes per request


def cpu_seconds(pid: int) -> float:
    """User and system time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    found = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return found + [grandchild for child in found for grandchild in descendants(child)]


def is_inference_process(pid: int) -> bool:
    return b"app.inference.process" in Path(f"/proc/{pid}/cmdline").read_bytes()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Target:
    url: str
    pid: int  # the server's process; its CPU time and its descendants' are read


def start(command: list[str], env: dict[str, str], port: int, ready: str, stack: ExitStack) -> Target:
    log = tempfile.TemporaryFile()
    stack.callback(log.close)
    process = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    stack.callback(stop, process)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{command} exited: {log.read().decode(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + ready, timeout=1):
                return Target(url, process.pid)
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{command} did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (uvicorn's workers and their inference processes), then wait."""
    try:
        os.killpg(process.pid, 15)
        process.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, 9)


def service(stack: ExitStack, workers: int = 1, **settings: str) -> Target:
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", str(workers)]
    command += ["--no-access-log", "--log-level", "warning"]
    return start(command, {"OMP_NUM_THREADS": "1", **settings}, port, "/readyz", stack)


def bare(stack: ExitStack) -> Target:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "bare_app:app", "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning"]
    return start(command, {}, port, "/docs", stack)


def wrk(target: Target, path: str, script: str, args: list[str], clients: int, seconds: float) -> Run:
    """``wrk`` against ``target``; with the CPU time of its processes per request."""
    processes = [target.pid, *descendants(target.pid)]
    before = [cpu_seconds(pid) for pid in processes]
    url = target.url + path
    threads = min(2, clients)
    command = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{seconds:g}s", "--latency", "-s", str(HERE / script)]
    output = subprocess.run([*command, url, "--", *args], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    percentiles = {
        int(p): float(v) * UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    }
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    total = int(re.search(r"(\d+) requests in", output).group(1))
    used = {pid: (cpu_seconds(pid) - start) * 1e6 / total for pid, start in zip(processes, before, strict=True)}
    inference = sum(cpu for pid, cpu in used.items() if is_inference_process(pid))
    serving = sum(used.values()) - inference
    return Run(rate, percentiles[50], percentiles[99], int(failed.group(1)) if failed else 0, total, serving, inference)


def windows_per_second(predict: Callable[[], object], batch: int, seconds: float) -> float:
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predict()
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def p50_ms(predict: Callable[[], object], calls: int) -> float:
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        predict()
        timings.append((time.perf_counter() - started) * 1e3)
    return statistics.median(timings)


def write_bodies(workdir: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    window = {name: rng.standard_normal((WINDOW, 3)).astype("<f4") for name in MODALITIES}
    rows = {name: np.round(array, 5).tolist() for name, array in window.items()}
    first = {name: np.round(rng.standard_normal((WINDOW, 3)), 5).tolist() for name in MODALITIES}
    chunk = {name: np.round(rng.standard_normal((CHUNK, 3)), 5).tolist() for name in MODALITIES}
    packed = {name: {"shape": list(array.shape), "data": array.tobytes()} for name, array in window.items()}
    bodies = {
        "student": json.dumps({"modalities": rows, "model": "student"}).encode(),
        "teacher": json.dumps({"modalities": rows, "model": "teacher"}).encode(),
        "student.msgpack": msgspec.msgpack.encode({"modalities": packed, "model": "student"}),
        # wrk_sessions.lua puts each request's seq where SEQ stands; every chunk completes one window.
        "first chunk": json.dumps({"seq": 0, "modalities": first}).replace('"seq": 0', '"seq": SEQ').encode(),
        "chunk": json.dumps({"seq": 0, "modalities": chunk}).replace('"seq": 0', '"seq": SEQ').encode(),
    }
    paths = {}
    for name, body in bodies.items():
        paths[name] = workdir / name
        paths[name].write_bytes(body)
    return paths


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32, 64])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="dmft-load-"))
    bodies = write_bodies(workdir)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    student = load_bundle(WEIGHTS / "student")
    teacher = load_bundle(WEIGHTS / "teacher")
    rng = np.random.default_rng(1)
    one = {name: rng.standard_normal((1, WINDOW, 3)).astype(np.float32) for name in MODALITIES}
    thirty_two = {name: rng.standard_normal((32, WINDOW, 3)).astype(np.float32) for name in MODALITIES}

    runs: dict[str, list[Run]] = {}
    reference: dict[str, list[float]] = {"student batch-1 p50 ms": [], "teacher batch-32 windows/s": []}

    def measure(name: str, target: Target, path: str, script: str, script_args: list[str], clients: int) -> None:
        runs.setdefault(name, []).append(wrk(target, path, script, script_args, clients, args.seconds))

    with ExitStack() as stack:
        echo = bare(stack)
        batching = service(stack, REDIS_URL=args.redis_url, DMFT_REDIS_PREFIX=prefix)
        single = service(stack, DMFT_MAX_BATCH_SIZE="1")
        two_workers = service(stack, workers=2)
        stack.callback(delete_keys, args.redis_url, prefix)
        post = "wrk_post.lua"
        for url in (echo, batching, single, two_workers):  # warm-up: first requests pay one-time costs
            for model in ("student", "teacher"):
                wrk(url, "/v1/predict", post, [str(bodies[model])], 4, 1)
        for _ in range(20):
            student.predict(one), teacher.predict(thirty_two)

        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for clients in args.clients:
                measure(f"echo {clients}", echo, "/v1/predict", post, [str(bodies["student"])], clients)
                for model in ("student", "teacher"):
                    body = [str(bodies[model])]
                    measure(f"{model} {clients}", batching, "/v1/predict", post, body, clients)
            for model in ("student", "teacher"):
                measure(f"{model} batch-1 64", single, "/v1/predict", post, [str(bodies[model])], 64)
            packed = [str(bodies["student.msgpack"]), "application/msgpack"]
            measure("student msgpack 32", batching, "/v1/predict", post, packed, 32)
            for clients in (32, 64):
                body = [str(bodies["student"])]
                measure(f"student 2 workers {clients}", two_workers, "/v1/predict", post, body, clients)
            chunk = [str(bodies["first chunk"]), str(bodies["chunk"]), str(SESSIONS)]
            measure("echo chunk 32", echo, "", "wrk_sessions.lua", [*chunk, f"e{round_}"], 32)
            measure("ingest 32", batching, "", "wrk_sessions.lua", [*chunk, f"r{round_}"], 32)
            reference["student batch-1 p50 ms"].append(p50_ms(lambda: student.predict(one), 500))
            reference["teacher batch-32 windows/s"].append(
                windows_per_second(lambda: teacher.predict(thirty_two), 32, args.seconds)
            )
    report(runs, reference, args)


def delete_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


def report(runs: dict[str, list[Run]], reference: dict[str, list[float]], args: argparse.Namespace) -> None:
    rounds = args.rounds

    def ratio(numerator: Callable[[int], float], denominator: Callable[[int], float]) -> float:
        return median([numerator(i) / denominator(i) for i in range(rounds)])

    def rps(name: str) -> Callable[[int], float]:
        return lambda i: runs[name][i].rps

    def p(name: str, q: str) -> Callable[[int], float]:
        return lambda i: getattr(runs[name][i], q)

    print(f"\n{args.seconds:g} s per measurement, medians of {rounds} alternating rounds\n")
    print("| measurement | req/s | p50 ms | p99 ms | non-2xx | serving CPU µs/req | inference CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, measured in runs.items():
        inference = median([r.inference_cpu_us for r in measured])
        print(
            f"| {name} | {median([r.rps for r in measured]):.0f} | {median([r.p50 for r in measured]):.2f} | "
            f"{median([r.p99 for r in measured]):.2f} | {sum(r.failed for r in measured)} | "
            f"{median([r.api_cpu_us for r in measured]):.0f} | {f'{inference:.0f}' if inference else ''} |"
        )
    for name, values in reference.items():
        print(f"| Bundle.predict: {name} | {median(values):.1f} | | | | | |")

    student_ms = reference["student batch-1 p50 ms"]
    teacher_wps = reference["teacher batch-32 windows/s"]
    goals = [
        ("student req/s vs echo, 32 clients", ratio(rps("student 32"), rps("echo 32")), ">= 0.8", True),
        ("student p99 vs echo p99, 32 clients", ratio(p("student 32", "p99"), p("echo 32", "p99")), "<= 2", False),
        (
            "teacher windows/s at 64 clients vs Bundle.predict batches of 32",
            ratio(rps("teacher 64"), lambda i: teacher_wps[i]),
            ">= 0.8",
            True,
        ),
        (
            "student batching vs batch size 1, 64 clients",
            ratio(rps("student 64"), rps("student batch-1 64")),
            ">= 2",
            True,
        ),
        (
            "teacher batching vs batch size 1, 64 clients",
            ratio(rps("teacher 64"), rps("teacher batch-1 64")),
            ">= 3",
            True,
        ),
        (
            "session ingest on Redis req/s vs echo, 32 clients",
            ratio(rps("ingest 32"), rps("echo chunk 32")),
            ">= 0.5",
            True,
        ),
        ("session ingest p99 vs echo p99", ratio(p("ingest 32", "p99"), p("echo chunk 32", "p99")), "<= 3", False),
        (
            "MessagePack vs JSON req/s, student, 32 clients",
            ratio(rps("student msgpack 32"), rps("student 32")),
            "report",
            None,
        ),
        (
            "one client: student p50 / (echo p50 + 1.5 x student batch-1)",
            ratio(p("student 1", "p50"), lambda i: runs["echo 1"][i].p50 + 1.5 * student_ms[i]),
            "<= 1",
            False,
        ),
        (
            "--workers 2 vs 1, student, 32 clients",
            ratio(rps("student 2 workers 32"), rps("student 32")),
            "report",
            None,
        ),
        (
            "--workers 2 vs 1, student, 64 clients",
            ratio(rps("student 2 workers 64"), rps("student 64")),
            "report",
            None,
        ),
    ]
    print("\n| goal | ratio | target | met |")
    print("|---|---:|---|---|")
    for name, value, target, higher in goals:
        bound = float(target.split()[1]) if higher is not None else None
        met = "" if bound is None else ("yes" if (value >= bound if higher else value <= bound) else "no")
        print(f"| {name} | {value:.2f} | {target} | {met} |")


if __name__ == "__main__":
    main()
