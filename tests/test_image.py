"""The image's own command, environment and health check, run without Docker.

The project is installed as the image's build stage installs it (``install_fixtures``: a wheel
of what it copies, into a fresh environment that has the run-time dependencies alone), and the
final stage's ``CMD`` runs with its ``ENV``, from its ``WORKDIR``, as its ``USER`` (dropping root
with ``setpriv`` where the tests run as root). Docker's isolation is stood in for where this
machine is shared: the container's ``/tmp``, home and virtual environment are folders of the
test's own, and its port and every-interface address are a free loopback port. ``HEALTHCHECK``'s
command must pass within the time Docker gives it (start period plus retries × interval), a
prediction must be served, and ``docker stop``'s SIGTERM must end it cleanly. The compose file's
environment for the API is run the same way, with the test Redis standing in for its ``redis``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from tools.stack import free_port, stop_group
from tools.traffic import WatchData

from .install_fixtures import IMAGE_PATH, ROOT, Dockerfile, Installed, as_user, readable_folder
from .redis_fixtures import RedisTarget

COMPOSE = ROOT / "docker-compose.yml"
STOP_GRACE_S = 10  # what `docker stop` waits after SIGTERM before it kills
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile.read()


def _seconds(duration: str) -> float:
    """A Docker duration such as ``15s``, ``1m30s`` or ``500ms``, in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


@dataclass
class Container:
    dockerfile: Dockerfile
    process: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    home: Path
    mounts: dict[str, Path]
    user: list[str]
    log: Path

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def path(self, inside: str) -> Path:
        """The folder that stands in for the container's path ``inside``."""
        return Path(_translate(inside, self.mounts))

    def health(self) -> int:
        """The exit status of the image's ``HEALTHCHECK`` command, run as Docker runs it."""
        options, command = self.dockerfile.healthcheck
        exposed = f":{self.dockerfile.exposed_port}/"
        command = [word.replace(exposed, f":{self.port}/") for word in command]
        timeout = _seconds(options["timeout"])
        try:
            return subprocess.run(
                [*self.user, *command], env=self.env, cwd=self.home, capture_output=True, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            return 1

    def wait_healthy(self) -> None:
        """Healthy within the start period and the retries Docker allows; else the test fails."""
        options, _ = self.dockerfile.healthcheck
        allowed = _seconds(options["start-period"]) + int(options["retries"]) * _seconds(options["interval"])
        deadline = time.monotonic() + allowed
        while self.health() != 0:
            assert self.process.poll() is None, f"the command exited with {self.process.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"not healthy within {allowed:.0f} s:\n{self.output()}"
            time.sleep(1.0)

    def stop(self) -> int:
        """What ``docker stop`` does: SIGTERM, and the exit status within its grace period."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_GRACE_S} s after SIGTERM, where Docker would kill it:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _translate(value: str, mounts: dict[str, Path]) -> str:
    """A container path, or a ``:``-separated list of them, as the folders that stand in for them here."""
    parts = []
    for part in value.split(":"):
        for inside, outside in mounts.items():
            if part == inside or part.startswith(inside + "/"):
                part = str(outside) + part[len(inside) :]
                break
        parts.append(part)
    return ":".join(parts)


def _venv_path(dockerfile: Dockerfile) -> str:
    """Where the final stage puts the environment that the build stage installed the project in."""
    for arguments in dockerfile.final.all("COPY"):
        words = shlex.split(arguments)
        if any(word.startswith("--from=") for word in words):
            return words[-1]
    raise AssertionError("the final stage copies no environment from the build stage")


def _command(dockerfile: Dockerfile, port: int, mounts: dict[str, Path]) -> list[str]:
    """``CMD``, listening on ``port`` of the loopback interface instead of the container's own network."""
    command = [_translate(word, mounts) for word in dockerfile.command]
    for option, value in (("--port", str(port)), ("--host", LOOPBACK)):
        if option in command:
            command[command.index(option) + 1] = value
    return command


@contextmanager
def container(dockerfile: Dockerfile, installed: Installed, environment: dict[str, str]) -> Iterator[Container]:
    """The image's command started as its container would start it, with ``environment`` added
    (what compose sets); stopped whatever happens."""
    root = readable_folder("dmft-container-")
    tmp, home = root / "tmp", root / "home"
    tmp.mkdir(mode=0o1777)
    tmp.chmod(0o1777)
    home.mkdir()
    user = as_user(dockerfile.user, installed)
    if user:
        os.chown(home, dockerfile.user, dockerfile.user)
    mounts = {_venv_path(dockerfile): installed.venv, "/tmp": tmp, dockerfile.workdir: home}
    env = {name: _translate(value, mounts) for name, value in dockerfile.env({"PATH": IMAGE_PATH}).items()}
    env.update({"HOME": str(home), **installed.env})
    env.update({name: _translate(value, mounts) for name, value in environment.items()})
    port = free_port()
    log = root / "container.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*user, *_command(dockerfile, port, mounts)],
            env=env,
            cwd=home,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Container(dockerfile, process, port, env, home, mounts, user, log)
    try:
        yield running
    finally:
        stop_group(process)
        shutil.rmtree(root, ignore_errors=True)


def _predict(running: Container, watch_data: WatchData) -> None:
    with httpx.Client(base_url=running.base, timeout=30, trust_env=False) as client:
        for model in ("student", "teacher"):
            index = int(watch_data.test[0])
            response = client.post("/v1/predict", json={"modalities": watch_data.window(index), "model": model})
            assert response.status_code == 200, response.text
            assert response.json()["activity"] in watch_data.class_names


def test_the_build_context_holds_what_the_build_copies(dockerfile: Dockerfile) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignored[0] == "*", "the context leaves everything out but what is let through"
    for source in dockerfile.copied():
        assert f"!{source}" in ignored or f"!{source}/" in ignored, f"{source} is left out of the build context"


def test_the_image_command_starts_healthy_unprivileged_from_a_fresh_install(
    dockerfile: Dockerfile, installed: Installed, watch_data: WatchData
) -> None:
    with container(dockerfile, installed, {}) as running:
        assert running.health() != 0, "the health check passes before the service is up"
        running.wait_healthy()
        _predict(running, watch_data)
        metrics_dir = running.path(dockerfile.env({})["PROMETHEUS_MULTIPROC_DIR"])
        assert metrics_dir.is_dir() and any(metrics_dir.glob("*.db"))
        if running.user:
            assert {path.stat().st_uid for path in metrics_dir.iterdir()} == {dockerfile.user}
        # `docker run` without a Redis: sessions stay in the process, so its one worker serves.
        assert "without REDIS_URL" in running.output()
        status = running.stop()
        output = running.output()
        assert status == 0, output
        assert running.health() != 0
        assert not metrics_dir.exists(), "the metrics directory outlives the service"
    assert "Traceback" not in output, output


def test_the_compose_environment_serves_sessions_from_redis_with_every_worker(
    dockerfile: Dockerfile, installed: Installed, watch_data: WatchData, redis_target: RedisTarget
) -> None:
    api = yaml.safe_load(COMPOSE.read_text())["services"]["api"]
    assert api["build"] == "." and "command" not in api, "compose runs the image's own command"
    environment = {name: str(value) for name, value in api["environment"].items()}
    assert environment["REDIS_URL"].startswith("redis://redis:")  # the compose service `redis`
    environment.update(REDIS_URL=redis_target.url, DMFT_REDIS_PREFIX=redis_target.prefix)
    with container(dockerfile, installed, environment) as running:
        running.wait_healthy()
        _predict(running, watch_data)
        samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
        chunk = {name: rows[:150].tolist() for name, rows in samples.items()}
        with httpx.Client(base_url=running.base, timeout=30, trust_env=False) as client:
            answer = client.post("/v1/sessions/compose-1/samples", json={"seq": 0, "modalities": chunk})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["predictions"]) == 2
            assert client.get("/readyz").json()["checks"]["store"] == "ok"
        with redis.Redis.from_url(redis_target.url) as store:
            assert any(b"compose-1" in key for key in store.scan_iter(match=f"{redis_target.prefix}:*"))
        status = running.stop()
        output = running.output()
    assert status == 0, output
    workers = output.count("Started server process")
    assert workers == int(dockerfile.command[dockerfile.command.index("--workers") + 1]), output
    assert output.count("serving with RedisStore") == workers, output
    assert "Traceback" not in output, output
