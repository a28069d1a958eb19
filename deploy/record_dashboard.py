"""Record a real run of the service and draw its dashboard: how ``docs/grafana-dashboard.png`` is made.

Starts ``dmft serve --workers 2`` on Redis and a Prometheus with the shipped configuration
scraping it, drives mixed traffic built from the held-out watch recordings for a few
minutes, then draws the Grafana dashboard from that Prometheus (``render_dashboard``):

- sessions that stream recordings in real time, one second of samples per chunk, and
  start over with the next recording when theirs ends (one stale ``seq`` each: a 409);
- clients posting single windows to the student, the teacher and the cascade, batches,
  windows with one sensor missing, and now and then a malformed window (a 422);
- a burst of concurrent teacher requests in the middle, where batches grow and windows queue.

    OMP_NUM_THREADS=1 python -m deploy.record_dashboard --seconds 180 --out docs/grafana-dashboard.png

Needs Redis (``--redis-url``; its keys under a fresh prefix are deleted afterwards), the
``prometheus`` binary, and the ``train`` extra (seglearn's recordings, matplotlib).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import redis

from deploy.render_dashboard import render
from deploy.stack import run_prometheus, run_service
from model.data import train_test_split
from model.watch import CHANNELS, build_watch_dataset, load_recordings

log = logging.getLogger("record_dashboard")

SAMPLE_RATE = 50  # Hz of the watch recordings
SESSIONS = 6
CLIENTS = 2
BURST_CLIENTS = 8
CLIENT_PAUSE_S = 0.05
MODELS = ("student", "student", "cascade", "cascade", "teacher")

Rows = list[list[float]]


@dataclass(frozen=True)
class Traffic:
    windows: list[dict[str, Rows]]  # held-out windows, as request rows
    recordings: list[dict[str, np.ndarray]]  # held-out recordings: modality -> (L, 3)


def held_out_traffic() -> Traffic:
    """Windows and whole recordings of the subjects that training never saw."""
    dataset, _ = build_watch_dataset()
    split = train_test_split(dataset)
    windows = [{name: dataset.arrays[name][i].tolist() for name in CHANNELS} for i in split.test]
    raw = load_recordings()
    recordings = [
        {name: np.asarray(series, dtype=np.float64)[:, columns] for name, columns in CHANNELS.items()}
        for series, subject in zip(raw["X"], raw["subject"], strict=True)
        if int(subject) in split.held_out_subjects
    ]
    return Traffic(windows, recordings)


def stream_sessions(base: str, traffic: Traffic, index: int, stop: threading.Event) -> None:
    """Stream recordings one after another into sessions, one second of samples a second."""
    rng = random.Random(index)
    stop.wait(index * 4.0)  # staggered, so the active sessions rise and fall
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
        for number in itertools.count():
            recording = rng.choice(traffic.recordings)
            session = f"record-{index}-{number}"
            length = len(recording["accelerometer"])
            for seq, start in enumerate(range(0, length, SAMPLE_RATE)):
                if stop.is_set():
                    return
                chunk = {name: rows[start : start + SAMPLE_RATE].tolist() for name, rows in recording.items()}
                client.post(f"/v1/sessions/{session}/samples", json={"seq": seq, "modalities": chunk})
                if seq == 5:  # a client replaying an old chunk out of order: answered 409
                    client.post(f"/v1/sessions/{session}/samples", json={"seq": 2, "modalities": chunk})
                stop.wait(1.0)
            client.delete(f"/v1/sessions/{session}")
            stop.wait(rng.uniform(2.0, 6.0))


def post_windows(base: str, traffic: Traffic, index: int, stop: threading.Event) -> None:
    """Single windows to every model, some batches, some with a sensor missing, a few malformed ones."""
    rng = random.Random(1000 + index)
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
        while not stop.is_set():
            model = rng.choice(MODELS)
            draw = rng.random()
            if draw < 0.05:
                client.post("/v1/predict/batch", json={"windows": _windows(traffic, rng, 16), "model": model})
            elif draw < 0.08:  # two channels where the accelerometer has three: a 422
                window = rng.choice(traffic.windows)
                client.post(
                    "/v1/predict", json={"modalities": {"accelerometer": [row[:2] for row in window["accelerometer"]]}}
                )
            else:
                window = rng.choice(traffic.windows)
                if draw > 0.9:  # a sensor dropped out
                    window = {"accelerometer": window["accelerometer"]}
                client.post("/v1/predict", json={"modalities": window, "model": model})
            stop.wait(CLIENT_PAUSE_S)


def burst(base: str, traffic: Traffic, index: int, stop: threading.Event) -> None:
    """Teacher requests back to back: batches form while a forward pass runs."""
    rng = random.Random(2000 + index)
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
        while not stop.is_set():
            client.post("/v1/predict", json={"modalities": rng.choice(traffic.windows), "model": "teacher"})


def _windows(traffic: Traffic, rng: random.Random, count: int) -> list[dict[str, dict[str, Rows]]]:
    return [{"modalities": window} for window in rng.sample(traffic.windows, count)]


Driver = Callable[[str, Traffic, int, threading.Event], None]


def _start(
    drivers: Sequence[tuple[Driver, int]], base: str, traffic: Traffic, stop: threading.Event
) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=driver, args=(base, traffic, index, stop), daemon=True)
        for driver, count in drivers
        for index in range(count)
    ]
    for thread in threads:
        thread.start()
    return threads


def drive(base: str, traffic: Traffic, seconds: float) -> None:
    """Steady sessions and clients for ``seconds``, with the burst in the middle fifth."""
    stop, burst_stop = threading.Event(), threading.Event()
    steady = _start([(stream_sessions, SESSIONS), (post_windows, CLIENTS)], base, traffic, stop)
    time.sleep(seconds * 0.4)
    log.info("burst of %d concurrent teacher clients", BURST_CLIENTS)
    bursting = _start([(burst, BURST_CLIENTS)], base, traffic, burst_stop)
    time.sleep(seconds * 0.2)
    burst_stop.set()
    for thread in bursting:
        thread.join()
    time.sleep(seconds * 0.4)
    stop.set()
    for thread in steady:
        thread.join()


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


def record(out: Path, *, seconds: float, redis_url: str, scrape_interval_s: int) -> None:
    traffic = held_out_traffic()
    prefix = f"dmft-record-{uuid.uuid4().hex}"
    with tempfile.TemporaryDirectory(prefix="dmft-record-") as tmp:
        workdir = Path(tmp)
        env = {"REDIS_URL": redis_url, "DMFT_REDIS_PREFIX": prefix}
        try:
            with run_service(workdir / "service", env=env) as base:
                target = base.removeprefix("http://")
                with run_prometheus(
                    workdir / "prometheus", target=target, scrape_interval=f"{scrape_interval_s}s"
                ) as prom:
                    started = time.time()
                    log.info("service %s, Prometheus %s: driving traffic for %.0f s", base, prom, seconds)
                    drive(base, traffic, seconds)
                    time.sleep(2 * scrape_interval_s)  # the last requests reach Prometheus
                    render(prom, out, start=started, end=time.time(), scrape_interval_s=scrape_interval_s)
        finally:
            delete_prefix(redis_url, prefix)
    log.info("wrote %s", out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180, help="how long to drive traffic")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--scrape-interval", type=int, default=5, help="seconds between Prometheus's scrapes")
    parser.add_argument("--out", type=Path, default=Path("docs/grafana-dashboard.png"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    record(args.out, seconds=args.seconds, redis_url=args.redis_url, scrape_interval_s=args.scrape_interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
