"""The services a fault run targets: ``dmft serve`` on the embedded store, and ``dmft serve --workers 2`` on a
``redis-server`` of the run's own, which a run may kill and start again (never the shared one).

That Redis writes every command to its append-only file before answering (``appendfsync always``),
as a production Redis that must not lose acknowledged writes does: killed with SIGKILL and
started again on the same files, it holds every session it had acknowledged.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.exceptions import RedisError

from tools.stack import Server, free_port, run_service

# Short enough for a run to see slow clients closed and event logs read to their end in seconds.
SERVICE_ENV = {
    "DMFT_HEADER_TIMEOUT_SECONDS": "3",
    "DMFT_BODY_TIMEOUT_SECONDS": "3",
    "DMFT_SSE_KEEPALIVE_SECONDS": "0.5",
}
POOL_SIZE = 8  # Redis connections per process: far fewer than the sessions of a burst
REDIS_START_TIMEOUT_S = 10.0


class RestartableRedis:
    """``redis-server`` on a free loopback port with its files in ``workdir``; ``kill`` and ``start`` it at will."""

    def __init__(self, workdir: Path) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise FileNotFoundError("redis-server is not installed")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._command = [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir),
                         "--save", "", "--appendonly", "yes", "--appendfsync", "always"]  # fmt: skip
        self._log = workdir / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=1.0)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}: {self._log.read_text()}")
                try:
                    client.ping()
                    return
                except (RedisError, OSError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last save; what it had acknowledged is in its append-only file."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass(frozen=True)
class RedisStack:
    server: Server
    redis: RestartableRedis


@contextmanager
def embedded_service(workdir: Path) -> Iterator[Server]:
    """``dmft serve``, one worker, sessions in its process."""
    with run_service(workdir, env=SERVICE_ENV) as server:
        yield server


@contextmanager
def redis_service(workdir: Path, *, workers: int = 2) -> Iterator[RedisStack]:
    """``dmft serve --workers N`` on a Redis of its own with a pool of ``POOL_SIZE`` connections per process."""
    store = RestartableRedis(workdir / "redis")
    store.start()
    try:
        env = {**SERVICE_ENV, "DMFT_REDIS_MAX_CONNECTIONS": str(POOL_SIZE)}
        with run_service(workdir, redis_url=store.url, redis_prefix="faults", workers=workers, env=env) as server:
            yield RedisStack(server, store)
    finally:
        store.stop()
