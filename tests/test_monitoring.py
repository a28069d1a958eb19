"""The monitoring in ``deploy/``, checked with the real tools: promtool, a real Prometheus, a real service.

One module-wide stack serves the tests that need it: ``dmft serve --workers 2`` on the
test Redis, and the ``prometheus`` binary with the shipped ``prometheus.yml`` and
``alerts.yml`` scraping it every second (only the compose DNS discovery is replaced by
the server's address). Traffic is driven in two rounds with a scrape between them, so
that every rate has an increase to show.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client import REGISTRY

from app.engine import InferenceEngine
from tools import render_dashboard
from tools.stack import run_prometheus, run_service
from tools.traffic import WatchData
from tools.webhook_receiver import receiving

from .prometheus_fixtures import metric_names, promtool, require_prometheus
from .redis_fixtures import RedisTarget
from .service_fixtures import memory_settings, metric_value, parse_metrics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "dmft.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "dmft.yml"
API_JOB = "dmft-api"
SCRAPE_SERIES = {"up"}  # made by Prometheus for every target, not exported by the service
RATE_INTERVAL = "1m"  # for $__rate_interval: with a scrape every second, plenty of samples
WAIT_S = 30.0
PREDICT_MODELS = ("student", "teacher", "cascade")
PREDICTS_PER_ROUND = 12
CHUNK = 137  # samples per session chunk, so that windows complete in the middle of chunks
CHUNKS_PER_ROUND = 5
PREDICT_ROUTE = {"route": "/v1/predict"}


@dataclass(frozen=True)
class Stack:
    prometheus: str  # base URL
    target: str  # host:port that Prometheus scrapes
    exported: frozenset[str]  # every series name on the service's /metrics after the traffic


# --- talking to Prometheus ---------------------------------------------------------------------


def query(prometheus: str, expr: str) -> dict[str, Any]:
    """The whole answer of ``/api/v1/query`` (status, then data or error)."""
    return httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10, trust_env=False).json()


def values(prometheus: str, expr: str) -> list[float]:
    body = query(prometheus, expr)
    assert body["status"] == "success", body
    return [float(result["value"][1]) for result in body["data"]["result"]]


def wait_for(prometheus: str, expr: str, done: Callable[[list[float]], bool]) -> list[float]:
    """Poll ``expr`` until ``done(values)``; Prometheus scrapes and evaluates every second."""
    deadline = time.monotonic() + WAIT_S
    while True:
        found = values(prometheus, expr)
        if done(found):
            return found
        assert time.monotonic() < deadline, f"{expr} still gives {found} after {WAIT_S:.0f} s"
        time.sleep(0.5)


def wait_until_scraped(client: httpx.Client, prometheus: str) -> None:
    """Wait until Prometheus holds every /v1/predict request the service has counted so far."""
    served = metric_value(
        parse_metrics(client.get("/metrics").text), "dmft_request_duration_seconds_count", PREDICT_ROUTE
    )
    wait_for(prometheus, 'sum(dmft_request_duration_seconds_count{route="/v1/predict"})', lambda v: v == [served])


def dashboard_targets() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every query of the dashboard, as Prometheus receives it."""
    return [
        (panel.title, render_dashboard.promql(target.expr, interval=RATE_INTERVAL))
        for panel in render_dashboard.load_panels(DASHBOARD)
        for target in panel.targets
    ]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


# --- the stack ---------------------------------------------------------------------------------


def drive(client: httpx.Client, watch_data: WatchData, round_name: str) -> None:
    """One round of traffic that moves every metric the dashboard and the alerts read, each answer checked."""
    windows = [watch_data.window(int(i)) for i in watch_data.test[:PREDICTS_PER_ROUND]]
    for window, model in zip(windows, itertools.cycle(PREDICT_MODELS), strict=False):
        response = client.post("/v1/predict", json={"modalities": window, "model": model})
        assert response.status_code == 200, response.text
    batch = client.post("/v1/predict/batch", json={"windows": [{"modalities": w} for w in windows[:4]]})
    assert batch.status_code == 200, batch.text
    two_channels = {"accelerometer": [row[:2] for row in windows[0]["accelerometer"]]}
    assert client.post("/v1/predict", json={"modalities": two_channels}).status_code == 422
    recording = watch_data.recording_samples(watch_data.held_out_recordings()[0])
    for seq in range(CHUNKS_PER_ROUND):
        chunk = {name: rows[seq * CHUNK : (seq + 1) * CHUNK].tolist() for name, rows in recording.items()}
        response = client.post(f"/v1/sessions/monitoring-{round_name}/samples", json={"seq": seq, "modalities": chunk})
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def monitored(
    module_redis_target: RedisTarget, watch_data: WatchData, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The service and Prometheus scraping it, after two rounds of traffic that Prometheus has seen."""
    require_prometheus()
    workdir = tmp_path_factory.mktemp("monitoring")
    with (
        # A webhook receiver, so that the transitions of the session traffic are delivered and measured.
        receiving() as receiver,
        # Two workers, as the image runs them: /metrics then goes through the multiprocess collector.
        run_service(
            workdir,
            redis_url=module_redis_target.url,
            redis_prefix=module_redis_target.prefix,
            workers=2,
            env=receiver.settings_env(),
        ) as service,
        run_prometheus(workdir / "prometheus", target=f"127.0.0.1:{service.port}", scrape_interval="1s") as prometheus,
        httpx.Client(base_url=service.base, timeout=30, trust_env=False) as client,
    ):
        wait_for(prometheus, f'up{{job="{API_JOB}"}}', lambda v: v == [1.0])
        drive(client, watch_data, "a")
        wait_until_scraped(client, prometheus)
        drive(client, watch_data, "b")
        wait_until_scraped(client, prometheus)
        # Each round's session enters its exercise: both transitions reach the receiver.
        wait_for(prometheus, 'sum(dmft_webhook_deliveries_total{outcome="delivered"})', lambda v: v == [2.0])
        exported = frozenset(sample.name for sample in parse_metrics(client.get("/metrics").text))
        yield Stack(prometheus, f"127.0.0.1:{service.port}", exported)


# --- promtool ----------------------------------------------------------------------------------


def test_promtool_accepts_shipped_config_and_rules() -> None:
    config = promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout, config.stdout
    rules = promtool("check", "rules", PROMETHEUS_DIR / "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"{len(alert_rules())} rules found" in rules.stdout, rules.stdout


def test_every_alert_fires_in_promtool_unit_tests() -> None:
    result = promtool("test", "rules", PROMETHEUS_DIR / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    cases = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    tested = {test["alertname"] for case in cases for test in case["alert_rule_test"] if test["exp_alerts"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_alert_rules_carry_for_severity_and_annotations() -> None:
    for rule in alert_rules():
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# --- the live stack ----------------------------------------------------------------------------


def test_prometheus_scrapes_the_service_and_loads_the_alert_rules(monitored: Stack) -> None:
    body = query(monitored.prometheus, f'up{{job="{API_JOB}"}}')
    assert [(r["metric"]["instance"], r["value"][1]) for r in body["data"]["result"]] == [(monitored.target, "1")]
    expected = {rule["alert"] for rule in alert_rules()}

    def loaded() -> list[dict[str, Any]]:
        response = httpx.get(f"{monitored.prometheus}/api/v1/rules", timeout=10, trust_env=False).json()
        assert response["status"] == "success", response
        return [rule for group in response["data"]["groups"] for rule in group["rules"]]

    deadline = time.monotonic() + WAIT_S
    while any(rule["health"] == "unknown" for rule in loaded()):  # not evaluated yet
        assert time.monotonic() < deadline, loaded()
        time.sleep(0.5)
    rules = {rule["name"]: rule for rule in loaded()}
    assert set(rules) == expected
    assert all(rule["type"] == "alerting" and rule["health"] == "ok" for rule in rules.values()), rules
    # The one target answers, so neither of the alerts about a missing service may be active.
    assert rules["DMFTReplicaDown"]["state"] == "inactive"
    assert rules["DMFTServiceAbsent"]["state"] == "inactive"


@pytest.mark.parametrize("histogram", ["dmft_request_duration_seconds", "dmft_inference_duration_seconds"])
def test_p99_of_live_histograms_is_finite(monitored: Stack, histogram: str) -> None:
    expr = f"histogram_quantile(0.99, sum by (le) (rate({histogram}_bucket[1m])))"
    [p99] = values(monitored.prometheus, expr)
    assert math.isfinite(p99) and p99 > 0, p99


def test_dashboard_queries_read_exported_metrics_and_run(monitored: Stack) -> None:
    for title, expr in dashboard_targets():
        unknown = metric_names(expr) - monitored.exported
        assert not unknown, f"{title!r} reads {sorted(unknown)}, which the service does not export: {expr}"
        body = query(monitored.prometheus, expr)
        assert body["status"] == "success", (title, expr, body)
    # After traffic that touches every metric, no panel is empty.
    for panel in render_dashboard.load_panels(DASHBOARD):
        answers = [
            query(monitored.prometheus, render_dashboard.promql(t.expr, interval=RATE_INTERVAL)) for t in panel.targets
        ]
        assert panel.type == "row" or any(a["data"]["result"] for a in answers), f"{panel.title!r} shows no data"


def test_alert_expressions_read_exported_metrics_and_run(monitored: Stack) -> None:
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - monitored.exported - SCRAPE_SERIES
        assert not unknown, f"{rule['alert']} reads {sorted(unknown)}, which the service does not export"
        body = query(monitored.prometheus, rule["expr"])
        assert body["status"] == "success", (rule["alert"], body)


# --- the metric-name extractor that the checks above rely on -----------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (route) (rate(dmft_a_count{route!="/metrics", status=~"5.."}[5m]))', {"dmft_a_count"}),
        ("histogram_quantile(0.99, sum by (le, model) (rate(dmft_b_bucket[1m]))) > 0.5", {"dmft_b_bucket"}),
        ("sum(rate(a_total[5m])) by (job) / on (job) group_left (model) sum without (instance) (b)", {"a_total", "b"}),
        ('absent(up{job="dmft-api"})', {"up"}),
        ("a offset 5m + b @ 1609746000 and c unless d or e", {"a", "b", "c", "d", "e"}),
        ('label_replace(x, "dst", "$1", "src", "(.*)")', {"x"}),
        ('count_values("le", y) > bool 1e3', {"y"}),
        ("max_over_time(z[1h30m:1m]) * -Inf + NaN", {"z"}),
        ("SUM BY (le) (level:rate5m) / ignoring (le) group_right topk(3, sum(by_route))", {"level:rate5m", "by_route"}),
        (
            "dmft_queue_depth / dmft_queue_capacity > 0.8 or vector(0) == 0x1f",
            {"dmft_queue_depth", "dmft_queue_capacity"},
        ),
        ('{__name__="hidden"}', set()),
    ],
)
def test_metric_names_finds_selectors_only(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# --- the files docker compose mounts -----------------------------------------------------------


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of a compose service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, destination = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[destination] = ROOT / source
    return mounts


def _in_repository(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside the container comes from in this repository, through the bind mounts."""
    for destination, source in _mounts(service).items():
        if container_path == destination or container_path.startswith(destination.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(destination)
    raise AssertionError(f"{container_path} is not mounted from the repository: {service.get('volumes')}")


def test_compose_mounts_what_prometheus_and_grafana_are_configured_to_read() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    [config_flag] = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    assert _in_repository(prometheus, config_flag.split("=", 1)[1]) == PROMETHEUS_DIR / "prometheus.yml"
    # Prometheus finds the api replicas by the compose service name, on the port they serve.
    [job] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    [discovery] = job["dns_sd_configs"]
    assert discovery["names"] == ["api"] and "api" in services
    assert discovery["port"] == 8000 and any(str(port).endswith(":8000") for port in services["api"]["ports"])
    # Grafana reads its provisioning, and the provider's dashboards folder holds the dashboard.
    provisioning = _in_repository(grafana, "/etc/grafana/provisioning")
    assert provisioning / "datasources" / "prometheus.yml" == DATASOURCES
    assert provisioning / "dashboards" / "dmft.yml" == DASHBOARD_PROVIDERS
    [provider] = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert _in_repository(grafana, provider["options"]["path"]) / "dmft.json" == DASHBOARD
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _in_repository(grafana, home) == DASHBOARD
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"


def test_dashboard_panels_use_the_provisioned_datasource_and_fit_the_grid() -> None:
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    raw = json.loads(DASHBOARD.read_text())["panels"]
    assert len({panel["id"] for panel in raw}) == len(raw)
    for panel in raw:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"]), panel["title"]
            assert panel["targets"], panel["title"]
    occupied: dict[tuple[int, int], str] = {}
    for panel in render_dashboard.load_panels(DASHBOARD):
        assert 0 <= panel.x and panel.x + panel.w <= render_dashboard.GRID_COLUMNS, panel.title
        for cell in itertools.product(range(panel.x, panel.x + panel.w), range(panel.y, panel.y + panel.h)):
            assert cell not in occupied, f"{panel.title!r} overlaps {occupied[cell]!r}"
            occupied[cell] = panel.title


# --- the queue gauges behind the saturation alert ----------------------------------------------


def test_queue_gauges_count_windows_waiting_for_the_model(watch_data: WatchData) -> None:
    rows = watch_data.window(int(watch_data.test[0]))
    window = {name: np.asarray(samples, dtype=np.float32) for name, samples in rows.items()}

    def gauge(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"model": "student"})

    async def fill_and_drain() -> tuple[float | None, float | None]:
        engine = InferenceEngine(memory_settings(max_batch_size=4, queue_size=16))
        await engine.start()
        answers = asyncio.ensure_future(engine.predict_windows([window] * 10, "student"))
        await asyncio.sleep(0)  # sent to the inference process; its answers cannot have been read yet
        queued = gauge("dmft_queue_depth")
        await answers
        await engine.stop()
        return queued, gauge("dmft_queue_depth")

    queued, drained = asyncio.run(fill_and_drain())
    assert (queued, drained) == (10, 0)
    assert gauge("dmft_queue_capacity") == 16
