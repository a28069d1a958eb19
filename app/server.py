"""``dmft serve``: uvicorn, with what this service needs around it.

uvicorn runs the app; what it leaves to its caller is done here:

- Sessions live in the store: without Redis each worker process would hold sessions of its own,
  so without ``REDIS_URL`` one worker serves, and the log says why.
- Several workers share their metrics through ``PROMETHEUS_MULTIPROC_DIR``: the directory is made
  when missing (and removed on exit when the service made it), the files of a previous run are
  cleared, and a worker that died is marked dead, so that its last gauge readings leave ``/metrics``.
- Workers, even a lone one, run under a supervisor process that replaces one that died; workers
  that keep dying stop the service with a failure status, so that whatever supervises it
  (Docker's restart policy, systemd) sees the failure instead of an endless restart loop.
- Every worker logs the service's own lines (models loaded, store in use), as one process does.
- Slow and numerous clients are bounded by the HTTP protocol of ``app/http_protocol.py``.
"""

from __future__ import annotations

import copy
import logging
import os
import resource
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import LOGGING_CONFIG, STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from app.settings import Settings

log = logging.getLogger(__name__)

APP = "app.main:create_app"
# Named, not imported: only the worker processes load it (with the app's metrics).
HTTP_PROTOCOL = "app.http_protocol:GuardedHttpProtocol"
# A worker that dies this often within the window cannot run: stop rather than restart it forever.
MAX_WORKER_DEATHS = 5
WORKER_DEATH_WINDOW_S = 60.0
# The share of the process's open-file limit that client connections may take; the rest is for
# the store's connections, the model files, pipes and logs.
CONNECTION_SHARE_OF_FILES = 0.75
CRASH_LOOP = 1  # exit status when workers kept dying
# How long a worker may take to answer the supervisor's ping before it is taken for hung and
# replaced. uvicorn's 5 s is shorter than a worker's start takes on a busy machine (its answering
# thread starts only once the interpreter has started and unpickled it), which would kill workers
# that are merely starting, over and over.
WORKER_HEALTHCHECK_S = 30


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    access_log: bool = True


@dataclass(frozen=True)
class ConnectionLimits:
    """What ``GuardedHttpProtocol`` enforces on each worker's connections."""

    header_timeout: float
    body_timeout: float
    max_connections: int


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration, carrying the connection limits to every worker process."""

    def __init__(self, app: str, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits


def serve(options: ServeOptions, settings: Settings | None = None) -> int:
    """Run the service until it is stopped; the exit status (0, or why it could not keep running)."""
    settings = settings or Settings()
    workers = worker_count(options.workers, settings)
    limits = ConnectionLimits(
        header_timeout=settings.header_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_connections=connection_limit(settings.max_connections),
    )
    with shared_metrics_directory(workers) as metrics_dir:
        config = ServerConfig(
            APP,
            limits=limits,
            factory=True,
            host=options.host,
            port=options.port,
            workers=workers,
            http=HTTP_PROTOCOL,
            timeout_keep_alive=settings.keepalive_timeout_seconds,
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
            log_config=logging_config(options.log_level),
            log_level=options.log_level,
            access_log=options.access_log,
        )
        # Even one worker runs under the supervisor: it outlives the worker to clean up after it.
        supervisor = Supervisor(config, sockets=[config.bind_socket()], metrics_dir=metrics_dir)
        supervisor.run()
        return supervisor.exit_status()


def worker_count(requested: int, settings: Settings) -> int:
    """``requested``, or 1 where the workers could not share sessions."""
    if requested > 1 and not settings.redis_url:
        log.warning(
            "--workers %d without REDIS_URL: each worker process would keep sessions of its own, so a "
            "session's chunks would land in different ones; serving with 1 worker (set REDIS_URL or "
            "--redis-url to run several)",
            requested,
        )
        return 1
    return requested


def connection_limit(wanted: int) -> int:
    """``wanted`` connections per process, where the open-file limit leaves room for them.

    The soft limit is raised towards the hard one when it is too low; where even the hard one
    is, the connections get their share of it and the log says so.
    """
    needed = int(wanted / CONNECTION_SHARE_OF_FILES) + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    allowed = max(1, int(soft * CONNECTION_SHARE_OF_FILES))
    log.warning(
        "DMFT_MAX_CONNECTIONS %d does not fit the limit of %d open files; taking %d connections per worker",
        wanted,
        soft,
        allowed,
    )
    return allowed


@contextmanager
def shared_metrics_directory(workers: int) -> Iterator[Path | None]:
    """The directory in which the worker processes share their metric samples, empty for this run.

    One process keeps its metrics in memory unless ``PROMETHEUS_MULTIPROC_DIR`` asks for files.
    A directory that the service made (the one named but missing, or a temporary one) is
    removed when it stops; one that existed is left, without the stopped workers' live gauges.
    """
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not named and workers == 1:
        yield None
        return
    if named:
        directory = Path(named)
        made = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        # Files of a previous run would add stale samples to this one's.
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="dmft-metrics-"))
        made = True
        # The workers inherit the environment, and prometheus_client reads it when imported.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    try:
        yield directory
    finally:
        if made:
            shutil.rmtree(directory, ignore_errors=True)


class Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes (it replaces a worker that died), plus what a death
    means here: the dead worker's live gauges are marked dead, and workers that keep dying stop
    the service."""

    def __init__(self, config: uvicorn.Config, sockets: list[Any], *, metrics_dir: Path | None) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir
        self.deaths: deque[float] = deque()
        self.crash_loop = False

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._mark_dead(self._pids())  # every worker has been joined by now

    def keep_subprocess_alive(self) -> None:
        died = self._retiring(super().keep_subprocess_alive)
        now = time.monotonic()
        self.deaths.extend([now] * len(died))
        while self.deaths and self.deaths[0] < now - WORKER_DEATH_WINDOW_S:
            self.deaths.popleft()
        if len(self.deaths) >= MAX_WORKER_DEATHS and not self.should_exit.is_set():
            log.error(
                "workers died %d times within %.0f s; stopping instead of restarting them again",
                len(self.deaths),
                WORKER_DEATH_WINDOW_S,
            )
            self.crash_loop = True
            self.should_exit.set()

    def handle_signals(self) -> None:
        # SIGTTOU retires a worker, SIGHUP replaces every one.
        self._retiring(super().handle_signals)

    def exit_status(self) -> int:
        if self.crash_loop:
            return CRASH_LOOP
        if any(process.exitcode == STARTUP_FAILURE for process in self.processes):
            return STARTUP_FAILURE
        return 0

    def _pids(self) -> set[int]:
        return {process.pid for process in self.processes if process.pid is not None}

    def _retiring(self, step: Callable[[], None]) -> set[int]:
        """Run a step of uvicorn's that may replace workers; mark the replaced ones dead, and return them."""
        before = self._pids()
        step()
        gone = before - self._pids()
        self._mark_dead(gone)
        return gone

    def _mark_dead(self, pids: set[int]) -> None:
        if self.metrics_dir is None:
            return
        for pid in pids:
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))


def logging_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, and the service's own loggers beside it, in every worker process.

    uvicorn configures logging again in each worker it starts; without the root logger in this
    configuration, the service's lines (models loaded, store in use) would be lost in every
    worker but a lone one.
    """
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["service"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
    }
    config["handlers"]["service"] = {
        "class": "logging.StreamHandler",
        "formatter": "service",
        "stream": "ext://sys.stderr",
    }
    config["root"] = {"handlers": ["service"], "level": level.upper()}
    return config
