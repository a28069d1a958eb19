"""The service and Prometheus as real processes on this machine, configured as ``docker-compose.yml`` runs them.

``deploy/record_dashboard.py`` starts both from here, and the monitoring tests start their
Prometheus from here: ``dmft serve`` with several workers (so ``/metrics`` goes through the
multiprocess collector, as in the image), and the Prometheus binary with the shipped
``prometheus.yml`` and ``alerts.yml``, where only the compose DNS discovery is replaced by
the one local address.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parent / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_ok(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; fail with the process's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from {url} within {timeout_s:.0f} s:\n{log.read_text()}")
        time.sleep(0.2)


@contextmanager
def _running(command: list[str], *, env: Mapping[str, str], log: Path, ready_url: str) -> Iterator[None]:
    """Run ``command`` until the block ends, once ``ready_url`` answers; it is killed whatever happens."""
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=dict(env), stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_until_ok(ready_url, process, log, STARTUP_TIMEOUT_S)
        yield
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _dmft() -> list[str]:
    script = Path(sys.executable).with_name("dmft")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "app.cli"]


@contextmanager
def run_service(workdir: Path, *, env: Mapping[str, str], workers: int = 2) -> Iterator[str]:
    """``dmft serve --workers N`` on a free port, with ``env`` (Redis, settings) added; yields its base URL."""
    port = free_port()
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # one thread per forward pass, as the service's default torch threads
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        **env,
    }
    command = [*_dmft(), "serve", "--port", str(port), "--workers", str(workers), "--no-access-log"]
    base = f"http://127.0.0.1:{port}"
    with _running(command, env=environment, log=workdir / "serve.log", ready_url=f"{base}/readyz"):
        yield base


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
    """The ``prometheus`` binary on a free local port, scraping ``target``; yields its base URL.

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
    base = f"http://127.0.0.1:{port}"
    with _running(command, env=os.environ, log=workdir / "prometheus.log", ready_url=f"{base}/-/ready"):
        yield base
