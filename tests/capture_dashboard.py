"""Screenshot the live page of a real run: how ``docs/dashboard.png`` is made.

Starts ``dmft serve``, streams held-out watch recordings into several sessions as wrist
gateways would (one second of samples a second, each session playing one exercise after
another, so activities differ and change), posts single windows and batches to every
model, opens ``/dashboard`` in headless Chromium at 1280×800 and takes the screenshot once
the latency panel covers a full minute of polls.

Each session's first chunk carries the last minute or so of its recording at once, dated
that far back (the chunk's ``timestamp``), so the page shows activities that have lasted a
while rather than a run that has just begun.

    OMP_NUM_THREADS=1 python -m tests.capture_dashboard --out docs/dashboard.png

Needs Chromium (``/usr/bin/chromium``, or ``CHROMIUM``) and the ``train`` extra (the
recordings). Sessions stay in the server's process unless ``--redis-url`` is given; then
they go to that Redis under a fresh key prefix, which is deleted afterwards.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .browser import chromium
from .live_server import live_server
from .redis_fixtures import RedisTarget
from .service_fixtures import MODALITIES, WatchData, load_watch_data

log = logging.getLogger("capture_dashboard")

SAMPLE_RATE = 50  # Hz of the watch recordings: one second of samples per chunk
# Homes' wrist sensors, and how many seconds of each one's past its first chunk carries.
SESSIONS = {
    "kitchen-1": 70,
    "living-room": 35,
    "bedroom-2": 95,
    "physio-room-4": 20,
    "hallway": 55,
    "study-3": 40,
    "garden-1": 80,
    "bathroom-1": 25,
    "flat-7:left": 60,
    "flat-7:right": 45,
    "care-room-12": 110,
    "workshop": 30,
}
MODELS = ("student", "student", "student", "cascade", "cascade", "teacher")
PREDICT_PAUSE_S = 0.06
SETTLE_S = 20.0  # at most this long past the minute, waiting for a row whose activity just changed


def playlist(watch: WatchData, first_class: int, seconds: float, rng: random.Random) -> dict[str, np.ndarray]:
    """Held-out recordings one after another, the first of ``first_class``, ``seconds`` long at least."""
    recordings = watch.held_out_recordings()
    labels = {index: int(watch.raw["y"][index]) for index in recordings}
    chosen = [rng.choice([index for index in recordings if labels[index] == first_class])]
    while sum(len(watch.raw["X"][index]) for index in chosen) < seconds * SAMPLE_RATE:
        chosen.append(rng.choice([index for index in recordings if labels[index] != labels[chosen[-1]]]))
    parts = [watch.recording_samples(index) for index in chosen]
    return {name: np.concatenate([part[name] for part in parts]) for name in MODALITIES}


class Gateway:
    """Streams every session's playlist: the back-dated past at once, then one second a second."""

    def __init__(self, client: httpx.Client, streams: dict[str, dict[str, np.ndarray]]) -> None:
        self.client = client
        self.streams = streams
        self.position = dict.fromkeys(streams, 0)
        self.seq = dict.fromkeys(streams, 0)

    def send(self, session_id: str, samples: int, timestamp: datetime | None = None) -> None:
        start = self.position[session_id]
        chunk = {name: rows[start : start + samples].tolist() for name, rows in self.streams[session_id].items()}
        body: dict[str, Any] = {"seq": self.seq[session_id], "modalities": chunk}
        if timestamp is not None:
            body["timestamp"] = timestamp.isoformat()
        response = self.client.post(f"/v1/sessions/{session_id}/samples", json=body)
        response.raise_for_status()
        self.position[session_id] += samples
        self.seq[session_id] += 1

    def start(self, backfill: dict[str, float]) -> None:
        now = datetime.now(UTC)
        for session_id, seconds in backfill.items():
            self.send(session_id, int(seconds * SAMPLE_RATE), timestamp=now - timedelta(seconds=seconds))

    def run(self, stop: threading.Event) -> None:
        started = time.monotonic()
        tick = 0
        while not stop.wait(max(0.0, started + tick + 1 - time.monotonic())):
            tick += 1
            for session_id in self.streams:
                self.send(session_id, SAMPLE_RATE)


def post_windows(base: str, watch: WatchData, stop: threading.Event) -> None:
    """Single held-out windows to every model, now and then a batch, as other clients of the service would."""
    rng = random.Random(7)
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
        while not stop.wait(PREDICT_PAUSE_S):
            model = rng.choice(MODELS)
            if rng.random() < 0.05:
                windows = [{"modalities": watch.window(int(i))} for i in rng.sample(list(watch.test), 8)]
                client.post("/v1/predict/batch", json={"windows": windows, "model": model}).raise_for_status()
            else:
                window = watch.window(int(rng.choice(watch.test)))
                client.post("/v1/predict", json={"modalities": window, "model": model}).raise_for_status()


def capture(out: Path, *, seconds: float, redis_url: str | None) -> None:
    watch = load_watch_data()
    rng = random.Random(0)
    classes = rng.sample(range(len(watch.class_names)), len(watch.class_names))
    streams = {
        session_id: playlist(watch, classes[number % len(classes)], backfill + seconds + SETTLE_S + 30, rng)
        for number, (session_id, backfill) in enumerate(SESSIONS.items())
    }
    target = RedisTarget(url=redis_url, prefix=f"dmft-capture-{uuid.uuid4().hex}") if redis_url else None
    stop = threading.Event()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="dmft-capture-") as tmp,
            live_server(Path(tmp), redis=target) as server,
            httpx.Client(base_url=server.base, timeout=30, trust_env=False) as client,
            chromium(Path(tmp)) as page,
        ):
            gateway = Gateway(client, streams)
            gateway.start(SESSIONS)
            page.goto(f"{server.base}/dashboard")
            threads = [
                threading.Thread(target=gateway.run, args=(stop,), daemon=True),
                threading.Thread(target=post_windows, args=(server.base, watch, stop), daemon=True),
            ]
            for thread in threads:
                thread.start()
            log.info("service %s: streaming %d sessions for %.0f s", server.base, len(SESSIONS), seconds)
            time.sleep(seconds)
            # A row lit up by a change of activity shows what the highlight looks like.
            deadline = time.monotonic() + SETTLE_S
            while not page.evaluate("!!document.querySelector('tr[data-changed]')") and time.monotonic() < deadline:
                time.sleep(0.2)
            if not all(thread.is_alive() for thread in threads):
                raise RuntimeError("a traffic thread failed (its error is above): the run stalled")
            page.evaluate("document.activeElement.blur()")
            page.screenshot(out)
            if page.errors:
                raise RuntimeError(f"the page failed: {page.errors}")
            stop.set()
            for thread in threads:
                thread.join()
    finally:
        stop.set()
        if target is not None:
            target.cleanup()
    log.info("wrote %s", out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--seconds", type=float, default=65, help="traffic before the screenshot (over a minute)")
    parser.add_argument("--redis-url", help="keep the sessions in this Redis (default: in the server's process)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    capture(args.out, seconds=args.seconds, redis_url=args.redis_url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
