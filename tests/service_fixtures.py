"""Shared pieces of the HTTP service tests: the real watch data, the error shape, metrics, no 500s.

The watch dataset (``tools.traffic.load_watch_data``) is built once per test session and
split by held-out subjects exactly as training splits it, so the windows posted here were
never trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import metrics
from app.errors import MAX_DETAILS
from app.main import create_app
from app.settings import Settings
from tools.traffic import WatchData, load_watch_data

from .redis_fixtures import RedisTarget

WINDOW = 100  # samples per window of the shipped bundles (2 s at 50 Hz)
HOP = 50  # samples between session windows (the default hop of 1 s at 50 Hz)
ERROR_KEYS = {"code", "message", "details", "request_id"}


@pytest.fixture(scope="session")
def watch_data() -> WatchData:
    return load_watch_data()


def memory_settings(**overrides: Any) -> Settings:
    """An app with sessions in its own process and untraced models, whatever ``REDIS_URL`` the environment sets."""
    return Settings(**{"redis_url": None, "compile_models": False, **overrides})


@pytest.fixture(scope="module", params=["memory", "redis", "cluster"], name="client")
def client_on_each_store(request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """``client``: the app once per session store, for a module; Redis and the Redis Cluster under a prefix of the
    module's own."""
    if request.param == "memory":
        settings = memory_settings()
    else:
        target: RedisTarget = request.getfixturevalue(f"module_{request.param}_target")
        settings = target.settings()
    with TestClient(create_app(settings)) as client:
        yield client


def assert_error(
    response: Any, status: int, code: str | None = None, *, mentions: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The answer is ``status`` in the service's one error shape; its message names every ``mentions``.

    The shape: ``code``, ``message``, ``details`` (always a list of objects, a few at most) and the
    ``request_id`` that the answer's ``X-Request-ID`` header carries too.
    """
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    assert isinstance(error["details"], list) and all(isinstance(d, dict) for d in error["details"]), error
    assert len(error["details"]) <= MAX_DETAILS, error
    assert error["request_id"] == response.headers["x-request-id"], (error, response.headers)
    for word in mentions:
        assert word.lower() in error["message"].lower(), f"{word!r} not named in {error['message']!r}"
    return error


def assert_no_server_error(response: Any) -> None:
    """Anything but a 5xx other than the documented 503 (overload, store outage)."""
    assert response.status_code < 500 or response.status_code == 503, f"{response.status_code}: {response.text}"


def server_errors() -> float:
    """Requests this process has answered with a 5xx other than 503, by the request metric."""
    total = 0.0
    for family in metrics.REQUEST_DURATION.collect():
        for sample in family.samples:
            status = sample.labels.get("status", "")
            if sample.name.endswith("_count") and status.startswith("5") and status != "503":
                total += sample.value
    return total


@pytest.fixture
def no_server_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test during which the app answered any 500 (tests expected to fail for a bug are exempt)."""
    before = server_errors()
    yield
    if request.node.get_closest_marker("xfail") is None:
        assert server_errors() == before, "the service answered 500 during this test"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    return [
        Sample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def metric_value(samples: list[Sample], name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = dict(labels or {})
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(key) == value for key, value in wanted.items())
    )
