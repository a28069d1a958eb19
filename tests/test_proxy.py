"""The documented way to run behind a proxy that buffers requests: HAProxy with the shipped
``deploy/haproxy/haproxy.cfg`` in front of a real ``dmft serve``.

Requests and event streams pass through it; a client too slow to send its request is answered
408 by HAProxy, and the service never sees that request. The shipped 10 s for a request is
shortened here, so that the test need not wait for it. HAProxy missing (Debian's ``haproxy``)
skips these tests, except on CI (``CI=true``), where it is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tools.stack import Server, run_proxy, run_service
from tools.traffic import WatchData

from .install_fixtures import ROOT
from .service_fixtures import metric_value, parse_metrics

PROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
REQUEST_TIMEOUT_S = 2
ANSWER_WITHIN_S = 10.0


@dataclass(frozen=True)
class Stack:
    service: Server
    proxy: str  # base URL of HAProxy

    @property
    def proxy_address(self) -> tuple[str, int]:
        host, port = self.proxy.removeprefix("http://").split(":")
        return host, int(port)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("haproxy") is None:
        reason = "no haproxy on PATH: apt-get install haproxy"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("proxy")
    shortened = {"timeout http-request": f"timeout http-request {REQUEST_TIMEOUT_S}s"}
    with run_service(workdir / "service") as service:
        target = f"127.0.0.1:{service.port}"
        with run_proxy(workdir / "haproxy", target=target, config=PROXY_CONFIG, replace=shortened) as proxy:
            yield Stack(service, proxy)


def _service_metrics(stack: Stack) -> list:
    return parse_metrics(httpx.get(f"{stack.service.base}/metrics", trust_env=False).text)


def test_requests_and_event_streams_pass_the_proxy(stack: Stack, watch_data: WatchData) -> None:
    samples = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    chunks = [{name: rows[k * 100 : (k + 1) * 100].tolist() for name, rows in samples.items()} for k in range(2)]
    events: list[str] = []

    def follow() -> None:
        with (
            httpx.Client(base_url=stack.proxy, timeout=30, trust_env=False) as client,
            client.stream("GET", "/v1/sessions/behind-1/events") as stream,
        ):
            events.extend(line for line in stream.iter_lines() if line.startswith("event: "))

    with httpx.Client(base_url=stack.proxy, timeout=30, trust_env=False) as client:
        window = {"modalities": watch_data.window(int(watch_data.test[0]))}
        answer = client.post("/v1/predict", json=window)
        assert answer.status_code == 200 and answer.json()["activity"] in watch_data.class_names, answer.text
        assert client.post("/v1/sessions/behind-1/samples", json={"seq": 0, "modalities": chunks[0]}).status_code == 200
        follower = threading.Thread(target=follow)
        follower.start()
        time.sleep(1.0)  # connected through the proxy
        assert client.post("/v1/sessions/behind-1/samples", json={"seq": 1, "modalities": chunks[1]}).status_code == 200
        assert client.delete("/v1/sessions/behind-1").status_code == 204
        follower.join(timeout=30)
    assert not follower.is_alive(), "the event stream did not end with its session"
    assert events[0] == "event: prediction" and events[-1] == "event: end", events


def _answer(connection: socket.socket) -> tuple[bytes, float]:
    started = time.monotonic()
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"no answer within {ANSWER_WITHIN_S} s; received {received!r}")
    finally:
        connection.close()
    return received, time.monotonic() - started


@pytest.mark.parametrize(
    "start",
    [
        b"GET /healthz HTTP/1.1\r\nHost: dmft\r\nX-Slow: ",
        b"POST /v1/predict HTTP/1.1\r\nHost: dmft\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        b'{"modalities": {"accelerometer": [[0.1, ',
    ],
    ids=["headers", "body"],
)
def test_the_proxy_answers_a_slow_request_408_and_the_service_never_sees_it(stack: Stack, start: bytes) -> None:
    before = _service_metrics(stack)
    connection = socket.create_connection(stack.proxy_address, timeout=ANSWER_WITHIN_S)
    connection.sendall(start)
    answer, waited = _answer(connection)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert REQUEST_TIMEOUT_S * 0.9 <= waited < ANSWER_WITHIN_S
    after = _service_metrics(stack)
    for name, labels in (
        ("dmft_request_duration_seconds_count", {"route": "/v1/predict"}),
        ("dmft_errors_total", {"reason": "request_timeout"}),
    ):
        assert metric_value(after, name, labels) == metric_value(before, name, labels), name
