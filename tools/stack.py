"""The service, Prometheus and HAProxy as real processes on this machine, configured as ``docker-compose.yml``
runs them.

The tests that go over real HTTP, the monitoring tests and both README pictures start them
from here: ``dmft serve`` (with several workers ``/metrics`` goes through the multiprocess
collector, as in the image), the Prometheus binary with the shipped ``prometheus.yml``
and ``alerts.yml``, where only the compose DNS discovery is replaced by the one local address,
and HAProxy with the shipped ``haproxy.cfg``, where the compose service ``api`` is replaced so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tools.redis_cluster import sync_client

PROMETHEUS_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
STARTUP_TIMEOUT_S = 60.0
DELETE_BATCH = 500  # keys per DEL: SCAN hands them over in pages, and one huge DEL would block the server


def free_port() -> int:
    """A port that nothing listens on now (the OS's pick), for a server started next or a client to find closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dmft_command() -> list[str]:
    """The ``dmft`` console script of this interpreter's environment, else the module behind it."""
    script = Path(sys.executable).with_name("dmft")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "app.cli"]


@dataclass(frozen=True)
class Server:
    """A server process on loopback: where it answers, the process, and the file its output goes to."""

    base: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def _running(command: list[str], *, env: Mapping[str, str], port: int, log: Path, ready: str) -> Iterator[Server]:
    """Run ``command`` until the block ends, once its ``ready`` path answers 200; it is stopped whatever happens.

    It runs in a process group of its own, and the whole group is stopped: ``dmft serve --workers N``
    spawns worker processes that would outlive a parent killed alone.
    """
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, env=dict(env), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", port, process, log)
    url = server.base + ready
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {process.returncode}:\n{log.read_text(errors='replace')}")
            try:
                if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                logged = log.read_text(errors="replace")
                raise RuntimeError(f"no answer from {url} within {STARTUP_TIMEOUT_S:.0f} s:\n{logged}")
            time.sleep(0.2)
        yield server
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> None:
    """SIGTERM the process's group and give it ``grace_s`` to shut down cleanly, then SIGKILL what is left
    (workers outlive a parent that was killed)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def run_service(
    workdir: Path,
    *,
    redis_url: str | None = None,
    redis_prefix: str | None = None,
    workers: int = 1,
    compile_models: bool = False,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    dmft: Path | None = None,
    wrapper: Sequence[str] = (),
) -> Iterator[Server]:
    """``dmft serve`` on ``port`` (else a free one), ready (``/readyz``) when this yields; killed afterwards.

    ``dmft`` is the console script to run, by default this environment's; ``wrapper`` is a command
    that runs it (``prlimit --nofile=256:256 --``, say).

    Sessions go to the Redis at ``redis_url`` under ``redis_prefix``, else stay in the server's
    process whatever ``REDIS_URL`` this environment sets. Models are traced only with
    ``compile_models``: tests start in seconds without it, the pictures run the models as the
    image does. With several workers ``/metrics`` reads a fresh multiprocess directory under
    ``workdir``, unless ``env`` (added last, it wins) names one. The log is
    ``workdir/serve-<port>.log``, so that a server started again on the same port starts a fresh one.
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    environment = {
        **os.environ,
        "DMFT_COMPILE_MODELS": str(compile_models).lower(),
        "OMP_NUM_THREADS": "1",  # one thread per forward pass, as the service's default torch threads
        **(env or {}),
    }
    environment.pop("REDIS_URL", None)
    if redis_url is not None:
        environment["REDIS_URL"] = redis_url
    if redis_prefix is not None:
        environment["DMFT_REDIS_PREFIX"] = redis_prefix
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in environment:
        metrics_dir = workdir / f"metrics-{port}"
        metrics_dir.mkdir()  # never one that holds another run's counters
        environment["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    executable = [str(dmft)] if dmft else dmft_command()
    command = [*wrapper, *executable, "serve", "--port", str(port), "--workers", str(workers), "--no-access-log"]
    with _running(command, env=environment, port=port, log=workdir / f"serve-{port}.log", ready="/readyz") as server:
        yield server


def prometheus_config(target: str, *, scrape_interval: str) -> dict[str, Any]:
    """The shipped configuration, scraping ``target`` alone every ``scrape_interval``.

    Jobs that discover the compose replicas by DNS scrape ``target`` instead; everything
    else (rule files, job names, paths, evaluation) stays as shipped.
    """
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(
        scrape_interval=scrape_interval, scrape_timeout=scrape_interval, evaluation_interval=scrape_interval
    )
    for job in config["scrape_configs"]:
        if job.pop("dns_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": [target]}]
    return config


@contextmanager
def run_prometheus(workdir: Path, *, target: str, scrape_interval: str = "1s") -> Iterator[str]:
    """The ``prometheus`` binary on a free local port, scraping ``target``; yields its base URL once ``/-/ready``.

    The configuration is written next to a copy of the rule files it names, which
    Prometheus resolves relative to the configuration file.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = prometheus_config(target, scrape_interval=scrape_interval)
    for rule_file in config.get("rule_files", []):
        shutil.copy(PROMETHEUS_DIR / rule_file, workdir / rule_file)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    command = [
        "prometheus",
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with _running(command, env=os.environ, port=port, log=workdir / "prometheus.log", ready="/-/ready") as server:
        yield server.base


@contextmanager
def run_proxy(workdir: Path, *, target: str, config: Path, replace: Mapping[str, str] | None = None) -> Iterator[str]:
    """HAProxy with the shipped ``config`` on a free local port, in front of ``target`` (``host:port``)
    instead of the compose service ``api``; yields its base URL once ``/readyz`` answers through it.

    ``replace`` changes whole lines of the configuration (by their first words), as a test that
    cannot wait for the shipped timeouts needs.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = []
    for line in config.read_text().splitlines():
        words = line.split()
        if words[:1] == ["bind"]:
            line = f"    bind 127.0.0.1:{port}"
        elif words[:1] == ["server"]:
            line = line.replace(words[2], target)
        for start, replacement in (replace or {}).items():
            if line.strip().startswith(start):
                line = f"    {replacement}"
        lines.append(line)
    (workdir / "haproxy.cfg").write_text("\n".join(lines) + "\n")
    command = ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")]
    with _running(command, env=os.environ, port=port, log=workdir / "haproxy.log", ready="/readyz") as server:
        yield server.base


@contextmanager
def redis_prefix(url: str, name: str) -> Iterator[str]:
    """A fresh key prefix ``<name>-<hex>`` on the Redis (or cluster) at ``url``, one run's alone; its keys are
    deleted afterwards (a cluster's client deletes each key on its node)."""
    prefix = f"{name}-{uuid.uuid4().hex}"
    try:
        yield prefix
    finally:
        client = sync_client(url)
        try:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{prefix}:*", count=DELETE_BATCH):
                batch.append(key)
                if len(batch) >= DELETE_BATCH:
                    client.delete(*batch)
                    batch.clear()
            if batch:
                client.delete(*batch)
        finally:
            client.close()
