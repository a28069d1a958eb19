"""Screenshot the live page of a real run: how ``docs/dashboard.png`` is made.

Starts ``dmft serve`` (``tools.stack``), streams held-out watch recordings into several
sessions as wrist gateways would (one second of samples a second, each session playing one
exercise after another, so activities differ and change) and posts single windows and
batches to every model (``tools.traffic``), opens ``/dashboard`` in headless Chromium at
1280×800 (``tools.cdp``) and takes the screenshot once the latency panel covers a full
minute of polls.

Each session's first chunk carries the last minute or so of its recording at once, dated
that far back (the chunk's ``timestamp``), so the page shows activities that have lasted a
while rather than a run that has just begun.

    OMP_NUM_THREADS=1 python -m tools.capture_dashboard --out docs/dashboard.png

Needs Chromium (``/usr/bin/chromium``, or ``CHROMIUM``) and the ``train`` extra (the
recordings). Sessions stay in the server's process unless ``--redis-url`` is given; then
they go to that Redis under a fresh key prefix, which is deleted afterwards.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

from tools.cdp import chromium
from tools.stack import redis_prefix, run_service
from tools.traffic import Posters, Sessions, Traffic, load_watch_data

log = logging.getLogger("capture_dashboard")

# Homes' wrist sensors, and how many seconds of each one's past its first chunk carries.
BACKFILL_S = {
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
CLIENTS = Posters(
    clients=1,
    models=("student", "student", "student", "cascade", "cascade", "teacher"),
    pause_s=0.06,
    batch_share=0.05,
    batch_size=8,
)
SETTLE_S = 20.0  # at most this long past the minute, waiting for a row whose activity just changed
MARGIN_S = 30.0  # playlists outlast the run by this much: no session ends before the screenshot


def capture(out: Path, *, seconds: float, redis_url: str | None) -> None:
    watch = load_watch_data()
    sessions = Sessions(BACKFILL_S, playlist_s=seconds + SETTLE_S + MARGIN_S)
    with (
        tempfile.TemporaryDirectory(prefix="dmft-capture-") as tmp,
        redis_prefix(redis_url, "dmft-capture") if redis_url else nullcontext() as prefix,
        run_service(Path(tmp), redis_url=redis_url, redis_prefix=prefix) as service,
        chromium(Path(tmp)) as page,
        Traffic(service.base, watch, sessions=sessions, posters=CLIENTS) as traffic,
    ):
        page.goto(f"{service.base}/dashboard")
        log.info("service %s: streaming %d sessions for %.0f s", service.base, len(BACKFILL_S), seconds)
        time.sleep(seconds)
        # A row lit up by a change of activity shows what the highlight looks like.
        deadline = time.monotonic() + SETTLE_S
        while not page.evaluate("!!document.querySelector('tr[data-changed]')") and time.monotonic() < deadline:
            time.sleep(0.2)
        traffic.check()
        page.evaluate("document.activeElement.blur()")
        page.screenshot(out)
        if page.errors:
            raise RuntimeError(f"the page failed: {page.errors}")
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
