"""Slow clients against ``dmft serve``: do they lock everyone else out, and for how long?

A real ``dmft serve`` (one worker, sessions in the process) runs with a small open-file limit
(``prlimit``, 256 by default, as a crowded container might have). Then ``--slow`` connections
arrive at once that never finish their headers, and stay open on the client's side, while
``--clients`` threads post the example window to ``/v1/predict`` on a fresh connection each,
for ``--seconds``. The same run is made twice in one process: with the limits ``dmft serve``
ships (header and body deadlines, a connection cap) and with them set out of reach (what
uvicorn alone does). It prints, per run and per phase (while the slow connections are fresh,
then after the header deadline has passed), the requests that succeeded and failed and their
latency, and how many slow connections the server had closed by the end::

    python bench/slow_clients.py --slow 500 --clients 4 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.stack import run_service  # noqa: E402

WINDOW = json.loads((ROOT / "examples" / "window.json").read_text())
SLOW_START = b"GET /healthz HTTP/1.1\r\nHost: dmft\r\nX-Slow: "
REQUEST_TIMEOUT_S = 5.0
OUT_OF_REACH = {
    "DMFT_HEADER_TIMEOUT_SECONDS": "1000000",
    "DMFT_BODY_TIMEOUT_SECONDS": "1000000",
    "DMFT_MAX_CONNECTIONS": "1000000",
}
SHIPPED_HEADER_TIMEOUT_S = 10.0


@dataclass
class Phase:
    ok: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def row(self) -> list[str]:
        p50, p99 = np.percentile(self.latencies_ms, [50, 99]) if self.latencies_ms else (float("nan"),) * 2
        return [str(self.ok), str(self.failed), f"{p50:.1f}", f"{p99:.1f}"]


def client(base: str, until: float, split_at: float, phases: tuple[Phase, Phase], lock: threading.Lock) -> None:
    while (now := time.monotonic()) < until:
        phase = phases[0] if now < split_at else phases[1]
        started = time.perf_counter()
        try:
            answer = httpx.post(f"{base}/v1/predict", json=WINDOW, timeout=REQUEST_TIMEOUT_S, trust_env=False)
            success = answer.status_code == 200
        except httpx.HTTPError:
            success = False
        with lock:
            if success:
                phase.ok += 1
                phase.latencies_ms.append(1000 * (time.perf_counter() - started))
            else:
                phase.failed += 1
        if not success:
            time.sleep(0.1)  # as a client backing off


def open_slow(port: int, count: int) -> list[socket.socket]:
    opened = []
    for _ in range(count):
        try:
            connection = socket.create_connection(("127.0.0.1", port), timeout=2)
            connection.sendall(SLOW_START)
            connection.setblocking(False)
            opened.append(connection)
        except OSError:
            pass  # the backlog is full: this one is turned away by the kernel
    return opened


def closed_by_server(connections: list[socket.socket]) -> int:
    closed = 0
    for connection in connections:
        try:
            data = connection.recv(65536)
            closed += data == b"" or data.startswith(b"HTTP/1.1 408")
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def run(label: str, env: dict[str, str], args: argparse.Namespace, workdir: Path) -> list[str]:
    wrapper = ["prlimit", f"--nofile={args.open_files}:{args.open_files}", "--"]
    with run_service(workdir / label.replace(" ", "-"), env=env, wrapper=wrapper) as server:
        slow = open_slow(server.port, args.slow)
        began = time.monotonic()
        phases = (Phase(), Phase())
        lock = threading.Lock()
        split_at = began + SHIPPED_HEADER_TIMEOUT_S + 2
        threads = [
            threading.Thread(target=client, args=(server.base, began + args.seconds, split_at, phases, lock))
            for _ in range(args.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        closed = closed_by_server(slow)
        for connection in slow:
            connection.close()
    return [label, str(len(slow)), *phases[0].row(), *phases[1].row(), str(closed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=500, help="connections that never finish their headers")
    parser.add_argument("--clients", type=int, default=4, help="threads posting windows meanwhile")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the clients post")
    parser.add_argument("--open-files", type=int, default=256, help="the server's open-file limit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slow-clients-") as folder:
        rows = [
            run("dmft serve's limits", {}, args, Path(folder)),
            run("limits out of reach", OUT_OF_REACH, args, Path(folder)),
        ]
    first = f"0-{SHIPPED_HEADER_TIMEOUT_S + 2:.0f} s"
    then = f"{SHIPPED_HEADER_TIMEOUT_S + 2:.0f}-{args.seconds:.0f} s"
    print(
        f"{args.slow} slow connections, {args.clients} clients posting windows for {args.seconds:.0f} s, "
        f"{args.open_files} open files for the server\n"
    )
    print(
        f"| run | slow connections opened | ok {first} | failed {first} | p50 ms | p99 ms "
        f"| ok {then} | failed {then} | p50 ms | p99 ms | slow ones closed by the server |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
