"""Session ingest on one Redis against a three-master Redis Cluster on this machine (run from the repository root).

Two measurements, each alternating the two stores round after round, medians printed:

- the service: ``dmft serve`` (one worker) on each store, driven by ``wrk`` with one-second chunks
  (50 samples x 2 modalities, each completing a window that is classified) to 2,000 sessions
  from 32 connections, as ``bench/load.py`` drives its Redis ingest;
- the store alone: 32 asyncio writers in this process, each appending chunks to its own sessions
  and committing their windows (one prediction and its event each), so that Redis and the client
  library are all that is measured.

The single Redis and the cluster's masters are ``redis-server`` processes of the benchmark's own,
with the same settings (no persistence).

    python -m bench.store_ingest [--seconds 8] [--rounds 3] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from app.store import Event, Retention, StreamLayout
from app.store.redis_store import RedisStore
from tools.redis_cluster import free_node_ports, run_redis_cluster
from tools.stack import free_port, run_service

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load import median_of, wrk  # noqa: E402

LAYOUT = StreamLayout(
    modalities=("accelerometer", "gyroscope"), channels=(3, 3), window=(100, 100), hop=(50, 50), max_buffer=(6100, 6100)
)
RETENTION = Retention(predictions=50, events=1000, segments=1000, outbox=100_000)


@contextmanager
def single_redis(workdir: Path) -> Iterator[str]:
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(workdir)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait()


async def store_ingest(url: str, clients: int, seconds: float, run: str) -> float:
    """Chunks per second appended and committed by ``clients`` writers, each to its own sessions in turn."""
    store = RedisStore(url, prefix=f"bench-{run}")
    chunk = {
        name: np.random.default_rng(0).standard_normal((50, 3)).astype("<f4").tobytes() for name in LAYOUT.modalities
    }
    done = 0
    deadline = time.monotonic() + seconds

    async def writer(index: int) -> None:
        nonlocal done
        sessions = [f"{run}-{index}-{k}" for k in range(20)]
        seq = 0
        while time.monotonic() < deadline:
            for session_id in sessions:
                now = time.time()
                result = await store.append(
                    session_id, seq=seq, model="student", layout=LAYOUT, chunk=chunk, now=now, origin=now,
                    ttl_seconds=600,
                )  # fmt: skip
                if result.windows:
                    predictions = [
                        {"window": w} for w in range(result.first_window, result.first_window + result.windows)
                    ]
                    await store.commit(
                        session_id, result.first_window, predictions, generation=result.generation, tracker={},
                        events=[Event("prediction", json.dumps(p)) for p in predictions], segments=[],
                        retention=RETENTION, ttl_seconds=600,
                    )  # fmt: skip
                done += 1
            seq += 1

    try:
        await asyncio.gather(*(writer(index) for index in range(clients)))
    finally:
        await store.close()
    return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    workdir = Path(tempfile.mkdtemp(prefix="dmft-ingest-"))
    chunk = {name: np.round(rng.standard_normal((50, 3)), 5).tolist() for name in ("accelerometer", "gyroscope")}
    body = workdir / "chunk.json"
    body.write_text(json.dumps({"seq": 0, "modalities": chunk}).replace('"seq": 0', '"seq": SEQ'))

    with ExitStack() as stack:
        urls = {
            "single Redis": stack.enter_context(single_redis(workdir)),
            "3-master cluster": stack.enter_context(run_redis_cluster(workdir / "cluster", free_node_ports(3))).url,
        }
        servers = {
            name: stack.enter_context(
                run_service(workdir / name.replace(" ", "-"), redis_url=url, redis_prefix="ingest")
            )
            for name, url in urls.items()
        }
        for server in servers.values():  # warm-up: first requests pay one-time costs
            wrk(server.base, "wrk_sessions.lua", [str(body), "200", "warm"], 4, 2)

        service_runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        store_runs: dict[str, list[float]] = {name: [] for name in urls}
        for round_ in range(args.rounds):
            for name, server in servers.items():
                service_runs[name].append(
                    wrk(server.base, "wrk_sessions.lua", [str(body), "2000", f"r{round_}"], args.clients, args.seconds)
                )
            for name, url in urls.items():
                store_runs[name].append(asyncio.run(store_ingest(url, args.clients, args.seconds, f"s{round_}")))

    print(f"session ingest, {args.clients} clients, {args.seconds} s per measurement, median of {args.rounds} rounds")
    print("| store | service chunks/s | p50 ms | p99 ms | non-2xx | store alone chunks/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in urls:
        r = median_of(service_runs[name])
        print(
            f"| {name} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['failed']:.0f} | "
            f"{statistics.median(store_runs[name]):.0f} |"
        )
    single, cluster = (median_of(service_runs[name])["rps"] for name in urls)
    single_store, cluster_store = (statistics.median(store_runs[name]) for name in urls)
    print(f"cluster / single: service {cluster / single:.2f}, store alone {cluster_store / single_store:.2f}")


if __name__ == "__main__":
    main()
