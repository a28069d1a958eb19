"""Load benchmark of the service against a bare FastAPI endpoint, measured alternately in one run.

Starts, as real uvicorn processes with one worker each: the bare endpoint (parses the same
window body with pydantic, returns a constant), the service with dynamic batching, and the
service with batching off (``DMFT_MAX_BATCH_SIZE=1``). ``wrk`` (Debian package ``wrk``)
drives each in turn, round after round, so a noisy machine slows all of them alike.
Prints throughput and p50/p99 as ratios to the bare endpoint, batching on vs off, and
session ingest through Redis.

    python bench/load.py [--seconds 8] [--rounds 3] [--clients 1 32 64] [--redis-url redis://127.0.0.1:6379/14]
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
from contextlib import ExitStack
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str], port: int, stack: ExitStack) -> str:
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stack.callback(process.wait, 20)
    stack.callback(process.terminate)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited: {process.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/docs", timeout=1):
                return url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{command} did not start")


def service(port: int, stack: ExitStack, **settings: str) -> str:
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    return start(command, settings, port, stack)


def wrk(url: str, script: str, args: list[str], clients: int, seconds: int) -> dict[str, float]:
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", str(HERE / script), url, "--", *args]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    percentiles = {
        int(p): float(v) * UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    }
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    total = int(re.search(r"(\d+) requests in", output).group(1))
    return {
        "rps": rate,
        "p50": percentiles[50],
        "p99": percentiles[99],
        "failed": int(failed.group(1)) if failed else 0,
        "requests": total,
    }


def window_body(model: str, rng: np.random.Generator) -> str:
    window = {name: np.round(rng.standard_normal((100, 3)), 5).tolist() for name in ("accelerometer", "gyroscope")}
    return json.dumps({"modalities": window, "model": model})


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32, 64])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")

    rng = np.random.default_rng(0)
    workdir = Path(tempfile.mkdtemp(prefix="dmft-load-"))
    bodies = {model: workdir / f"{model}.json" for model in ("student", "teacher")}
    for model, path in bodies.items():
        path.write_text(window_body(model, rng))
    chunk = {name: np.round(rng.standard_normal((50, 3)), 5).tolist() for name in ("accelerometer", "gyroscope")}
    (workdir / "chunk.json").write_text(json.dumps({"seq": 0, "modalities": chunk}).replace('"seq": 0', '"seq": SEQ'))

    with ExitStack() as stack:
        bare_port, on_port, off_port, redis_port = (free_port() for _ in range(4))
        bare = start(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(HERE),
                "bare_app:app",
                "--port",
                str(bare_port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            {},
            bare_port,
            stack,
        )
        batching = service(on_port, stack)
        single = service(off_port, stack, DMFT_MAX_BATCH_SIZE="1")
        ingest = service(redis_port, stack, REDIS_URL=args.redis_url, DMFT_REDIS_PREFIX=f"bench-{uuid.uuid4().hex[:8]}")
        targets = {
            "bare": (bare, bodies["student"]),
            "student": (batching, bodies["student"]),
            "teacher": (batching, bodies["teacher"]),
        }
        for url, body in targets.values():  # warm-up: first requests pay one-time costs
            wrk(url + "/v1/predict", "wrk_post.lua", [str(body)], 4, 2)

        print(f"/v1/predict, {args.seconds:g} s per measurement, median of {args.rounds} alternating rounds")
        print("| clients | endpoint | req/s | p50 ms | p99 ms | req/s vs bare | p99 vs bare | non-2xx |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for clients in args.clients:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, (url, body) in targets.items():
                    runs[name].append(wrk(url + "/v1/predict", "wrk_post.lua", [str(body)], clients, args.seconds))
            bare_result = median_of(runs["bare"])
            for name in targets:
                r = median_of(runs[name])
                print(
                    f"| {clients} | {name} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                    f"{r['rps'] / bare_result['rps']:.2f} | {r['p99'] / bare_result['p99']:.2f} | {r['failed']:.0f} |"
                )

        print("\ndynamic batching on vs off (max batch 1), 64 clients")
        print("| model | batching req/s | batch-1 req/s | ratio | batching p99 ms | batch-1 p99 ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for model in ("student", "teacher"):
            on, off = [], []
            for _ in range(args.rounds):
                on.append(wrk(batching + "/v1/predict", "wrk_post.lua", [str(bodies[model])], 64, args.seconds))
                off.append(wrk(single + "/v1/predict", "wrk_post.lua", [str(bodies[model])], 64, args.seconds))
            a, b = median_of(on), median_of(off)
            print(
                f"| {model} | {a['rps']:.0f} | {b['rps']:.0f} | {a['rps'] / b['rps']:.2f} | {a['p99']:.1f} | "
                f"{b['p99']:.1f} |"
            )

        print("\nsession ingest through Redis: 1 s chunks (50 samples x 2 modalities) to 2000 sessions, 32 clients")
        runs_ingest = [
            wrk(ingest, "wrk_sessions.lua", [str(workdir / "chunk.json"), "2000", f"r{round_}"], 32, args.seconds)
            for round_ in range(args.rounds)
        ]
        r = median_of(runs_ingest)
        print(
            f"chunks/s {r['rps']:.0f}  samples/s {r['rps'] * 100:.0f}  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
            f"non-2xx {r['failed']:.0f} of {r['requests']:.0f}"
        )


if __name__ == "__main__":
    main()
