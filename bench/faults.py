"""The fault and load suite of ``tests/test_faults.py``, for as long as asked (run from the repository root).

Two services run for the whole soak: ``dmft serve`` on the embedded store, and ``dmft serve --workers 2`` on a
``redis-server`` of the benchmark's own (append-only, ``appendfsync always``, a pool of 8 connections per
process). Rounds of every run follow each other until the time is up, each run ``--run-seconds`` long:
event-stream churn on both stores, a burst of 200 sessions, a teacher flood of ``--connections``
connections, 300 slow clients, kill -9 of an inference process and of a worker, and Redis killed and
restarted. Each run prints its figures; at the end, the totals per run, the memory of each service at
its start and end, and every problem found. Exits 1 if there was one.

    python bench/faults.py --minutes 10 [--run-seconds 20] [--connections 1200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, when run as a script

from tools.faults import scenarios  # noqa: E402
from tools.faults.probe import MIB, Tally, group_rss_bytes  # noqa: E402
from tools.faults.scenarios import RunReport  # noqa: E402
from tools.faults.stacks import embedded_service, redis_service  # noqa: E402
from tools.traffic import load_watch_data  # noqa: E402

MAX_GROWTH_MIB = 256  # per run, as in the tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to keep starting rounds (default 10)")
    parser.add_argument("--run-seconds", type=float, default=20.0, help="length of each timed run (default 20)")
    parser.add_argument("--connections", type=int, default=1200, help="connections of a teacher flood (default 1200)")
    args = parser.parse_args()
    watch = load_watch_data()
    seconds = args.run_seconds
    totals: dict[str, Tally] = defaultdict(lambda: Tally(0.0))
    durations: dict[str, float] = defaultdict(float)
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dmft-faults-") as workdir:
        with embedded_service(Path(workdir) / "embedded") as embedded, redis_service(Path(workdir) / "redis") as stack:
            services = {"embedded": embedded.process.pid, "redis": stack.server.process.pid}
            memory_at_start = {name: sum(group_rss_bytes(group).values()) for name, group in services.items()}
            runs: list[tuple[str, Callable[[], RunReport]]] = [
                ("churn, embedded", lambda: scenarios.event_stream_churn(embedded, watch, seconds=seconds)),
                ("churn, Redis", lambda: scenarios.event_stream_churn(stack.server, watch, seconds=seconds)),
                ("burst", lambda: scenarios.session_burst(stack.server, watch, sessions=200, chunks=4)),
                ("flood", lambda: scenarios.teacher_flood(embedded, watch, connections=args.connections)),
                ("slow clients", lambda: scenarios.slow_clients(embedded, watch, slow=300, seconds=seconds)),
                (
                    "kill inference",
                    lambda: scenarios.kill_process(
                        stack.server, watch, kind=scenarios.INFERENCE_PROCESS, seconds=seconds
                    ),
                ),  # fmt: skip
                (
                    "kill worker",
                    lambda: scenarios.kill_process(stack.server, watch, kind=scenarios.WORKER, seconds=seconds),
                ),  # fmt: skip
                ("Redis restart", lambda: scenarios.redis_restart(stack, watch, seconds=seconds)),
            ]
            end = time.monotonic() + args.minutes * 60
            rounds = 0
            while time.monotonic() < end:
                rounds += 1
                for name, run in runs:
                    report = run()
                    print(f"round {rounds}: {report.summary()}", flush=True)
                    totals[name].merge(report.tally)
                    durations[name] += report.seconds
                    problems += [f"round {rounds}, {name}: {text}" for text in report.problems(
                        max_growth_mib=MAX_GROWTH_MIB)]  # fmt: skip
            memory_at_end = {name: sum(group_rss_bytes(group).values()) for name, group in services.items()}
    print(f"\n{rounds} rounds in {sum(durations.values()) / 60:.1f} min")
    print("| run | seconds | requests | answers by status | slowest s |")
    print("|---|---:|---:|---|---:|")
    for name, tally in totals.items():
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(tally.statuses.items()))
        print(f"| {name} | {durations[name]:.0f} | {tally.requests} | {statuses} | {tally.slowest_s:.2f} |")
    for name in services:
        start, finish = memory_at_start[name] / MIB, memory_at_end[name] / MIB
        print(f"{name} service: {start:.0f} MiB at the start, {finish:.0f} MiB at the end")
    print(f"problems: {len(problems)}")
    for text in problems:
        print(f"  {text}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
