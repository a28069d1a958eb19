"""Record a real run of the service and draw its dashboard: how ``docs/grafana-dashboard.png`` is made.

Starts ``dmft serve --workers 2`` on Redis and a Prometheus with the shipped configuration
scraping it (``tools.stack``), drives mixed traffic built from the held-out watch recordings
for a few minutes (``tools.traffic``), then draws the Grafana dashboard from that Prometheus
(``tools.render_dashboard``):

- sessions that stream recordings in real time, one second of samples per chunk, and
  start over with the next recording when theirs ends (one stale ``seq`` each: a 409);
- clients posting single windows to the student, the teacher and the cascade, batches,
  windows with one sensor missing, and now and then a malformed window (a 422);
- a burst of concurrent teacher requests in the middle, where batches grow and windows queue;
- a webhook receiver on loopback for the sessions' transitions, down during the burst: its
  deliveries fail, are retried with backoff and arrive late once it is back.

    OMP_NUM_THREADS=1 python -m tools.record_dashboard --seconds 180 --out docs/grafana-dashboard.png

Needs Redis (``--redis-url``; its keys under a fresh prefix are deleted afterwards), the
``prometheus`` binary, and the ``train`` extra (seglearn's recordings, matplotlib).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tools.render_dashboard import render
from tools.stack import redis_prefix, run_prometheus, run_service
from tools.traffic import Posters, Sessions, Traffic, WatchData, load_watch_data
from tools.webhook_receiver import Receiver, receiving

log = logging.getLogger("record_dashboard")

# Staggered, so that the active sessions rise and fall as recordings end and new ones begin.
SESSIONS = Sessions(dict.fromkeys((f"record-{number}" for number in range(6)), 0.0), stagger_s=4.0, stale_chunk=True)
CLIENTS = Posters(
    clients=2,
    models=("student", "student", "cascade", "cascade", "teacher"),
    batch_share=0.05,
    batch_size=16,
    malformed_share=0.03,
    missing_share=0.1,
)
BURST = Posters(clients=8, models=("teacher",), pause_s=0.0)  # back to back: batches form while a forward pass runs
# Retries at most 5 s apart, so that the receiver's return shows within the run.
WEBHOOK_BACKOFF = {"DMFT_WEBHOOK_INITIAL_BACKOFF_SECONDS": "0.5", "DMFT_WEBHOOK_MAX_BACKOFF_SECONDS": "5"}


def drive(base: str, watch: WatchData, seconds: float, receiver: Receiver) -> None:
    """Steady sessions and clients for ``seconds``, with the burst and the receiver's outage in the middle fifth."""
    with Traffic(base, watch, sessions=SESSIONS, posters=CLIENTS):
        time.sleep(seconds * 0.4)
        log.info("burst of %d concurrent teacher clients; webhook receiver down", BURST.clients)
        receiver.stop()
        with Traffic(base, watch, posters=BURST, seed=1):
            time.sleep(seconds * 0.2)
        receiver.start()
        time.sleep(seconds * 0.4)


def record(out: Path, *, seconds: float, redis_url: str, scrape_interval_s: int) -> None:
    watch = load_watch_data()
    with (
        tempfile.TemporaryDirectory(prefix="dmft-record-") as tmp,
        redis_prefix(redis_url, "dmft-record") as prefix,
        receiving() as receiver,
        # Two workers and traced models, as the image runs them.
        run_service(
            Path(tmp),
            redis_url=redis_url,
            redis_prefix=prefix,
            workers=2,
            compile_models=True,
            env={**receiver.settings_env(), **WEBHOOK_BACKOFF},
        ) as service,
        run_prometheus(
            Path(tmp) / "prometheus", target=f"127.0.0.1:{service.port}", scrape_interval=f"{scrape_interval_s}s"
        ) as prometheus,
    ):
        started = time.time()
        log.info("service %s, Prometheus %s: driving traffic for %.0f s", service.base, prometheus, seconds)
        drive(service.base, watch, seconds, receiver)
        time.sleep(2 * scrape_interval_s)  # the last requests reach Prometheus
        render(prometheus, out, start=started, end=time.time(), scrape_interval_s=scrape_interval_s)
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
