"""A real ``dmft serve`` in a subprocess, for the tests that go over real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from .redis_fixtures import RedisTarget
from .service_fixtures import free_port

STARTUP_TIMEOUT_S = 60


def dmft_command() -> list[str]:
    script = Path(sys.executable).with_name("dmft")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "app.cli"]


@dataclass
class LiveServer:
    base: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def live_server(
    tmp_path: Path,
    *,
    redis: RedisTarget | None = None,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> Iterator[LiveServer]:
    """``dmft serve`` on a free port (sessions in Redis under the target's prefix, else in process),
    ready when this yields; killed afterwards."""
    port = port or free_port()
    log = tmp_path / f"serve-{port}.log"
    environment = {**os.environ, "DMFT_COMPILE_MODELS": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("REDIS_URL", None)
    if redis is not None:
        environment |= {"REDIS_URL": redis.url, "DMFT_REDIS_PREFIX": redis.prefix}
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in environment:
        metrics_dir = tmp_path / f"metrics-{port}"
        metrics_dir.mkdir()
        environment["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    command = [*dmft_command(), "serve", "--port", str(port), "--workers", str(workers), "--no-access-log"]
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=environment, stdout=output, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", port, process, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, f"dmft serve exited with {process.returncode}:\n{server.output()}"
            try:
                if httpx.get(f"{server.base}/healthz", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no /healthz within {STARTUP_TIMEOUT_S} s:\n{server.output()}"
            time.sleep(0.25)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
