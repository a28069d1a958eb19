"""The Kubernetes deployment in ``deploy/kubernetes/``: rendered by kustomize, valid against the
Kubernetes schema, and consistent with the service it runs.

Each kustomization is rendered with ``kubectl kustomize`` (the kustomize built into kubectl), every
built-in resource is validated strictly (unknown fields are errors) with ``kubernetes-validate``
against the oldest and the newest Kubernetes release we support, and the Prometheus Operator's
ServiceMonitor, a custom resource without a built-in schema, against the part of its CRD schema the
deployment uses. The rest checks what a schema cannot: that probes name routes the app serves,
selectors select the pods, every configured variable is a setting the service reads, and the pod
runs as the image's non-root user with a writable directory where the service writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from starlette.routing import Match

from app import metrics
from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = ["base", "queue-autoscaling"]
# The oldest release the manifests claim (README) and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.27.0", kubernetes_validate.utils.latest_version()]
DOCKERFILE = ROOT / "Dockerfile"

# The fields of the ServiceMonitor CRD (monitoring.coreos.com/v1) the deployment uses; anything else
# is refused, so a misspelt field fails here instead of being dropped by the API server.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


def render(kustomization: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        reason = "kubectl not found: apt-get install kubernetes-client (it renders the kustomizations)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / kustomization)], capture_output=True, text=True, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    return [document for document in yaml.safe_load_all(rendered.stdout) if document]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def resources(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [resource] = [r for r in resources if r["kind"] == kind]
    return resource


def api_container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_resource_validates_against_the_kubernetes_schema(resources: list[dict[str, Any]], version: str) -> None:
    for resource in resources:
        if resource["kind"] == "ServiceMonitor":
            jsonschema.validate(resource, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(resource, version, strict=True)


def test_everything_lands_in_one_namespace(resources: list[dict[str, Any]]) -> None:
    namespace = one(resources, "Namespace")["metadata"]["name"]
    namespaced = [r for r in resources if r["kind"] != "Namespace"]
    assert namespaced and all(r["metadata"].get("namespace") == namespace for r in namespaced)


def test_service_pdb_monitor_and_autoscaler_point_at_the_api_pods(resources: list[dict[str, Any]]) -> None:
    deployment = one(resources, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(resources, "Service")
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)

    container_ports = {port["name"]: port["containerPort"] for port in api_container(resources)["ports"]}
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in container_ports

    monitor = one(resources, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= {service_port["name"]}

    target = one(resources, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # The autoscaler owns the replica count: an applied one would reset it on every rollout.
    assert "replicas" not in deployment["spec"]


def served(path: str) -> bool:
    """Whether some route of the app answers GET ``path``."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": ""}
    return any(route.matches(scope)[0] is Match.FULL for route in create_app(Settings(redis_url=None)).routes)


def test_probes_and_scrapes_ask_for_routes_the_service_serves(resources: list[dict[str, Any]]) -> None:
    container = api_container(resources)
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(served(probe["path"]) for probe in probes.values())
    assert probes["readinessProbe"]["path"] == "/readyz"  # the one that checks the store
    assert probes["livenessProbe"]["path"] == "/healthz"  # never restarts a pod for a Redis outage
    names = {port["name"] for port in container["ports"]}
    assert {probe["port"] for probe in probes.values()} <= names
    monitor = one(resources, "ServiceMonitor")
    assert all(served(endpoint["path"]) for endpoint in monitor["spec"]["endpoints"])


def test_the_command_serves_on_the_container_port(resources: list[dict[str, Any]]) -> None:
    container = api_container(resources)
    command = container["command"]
    assert command[:2] == ["dmft", "serve"]
    port = int(command[command.index("--port") + 1])
    assert port in {p["containerPort"] for p in container["ports"]}
    assert command[command.index("--host") + 1] == "0.0.0.0"


def setting_variables() -> set[str]:
    """Every environment variable the service's settings read."""
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names |= set(alias.choices) if alias is not None else {f"DMFT_{name.upper()}"}
    return names


def test_every_configured_variable_is_a_setting_the_service_reads(resources: list[dict[str, Any]]) -> None:
    configured = set(one(resources, "ConfigMap")["data"]) | set(one(resources, "Secret")["stringData"])
    configured |= {variable["name"] for variable in api_container(resources).get("env", [])}
    unknown = configured - setting_variables() - {"PROMETHEUS_MULTIPROC_DIR"}
    assert not unknown, f"variables no setting reads: {sorted(unknown)}"
    # Each one parses: a malformed value would stop every replica at start-up.
    values = {**one(resources, "ConfigMap")["data"], **one(resources, "Secret")["stringData"]}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        Settings()


def dockerfile_user() -> str:
    [user] = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")]
    return user


def test_pods_run_unprivileged_with_only_tmp_writable(resources: list[dict[str, Any]]) -> None:
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user()
    container = api_container(resources)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    empty_dirs = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
    metrics_dir = Path({v["name"]: v["value"] for v in container["env"]}["PROMETHEUS_MULTIPROC_DIR"])
    assert any(metrics_dir.is_relative_to(path) and name in empty_dirs for path, name in mounts.items())


def test_termination_grace_covers_the_pre_stop_pause(resources: list[dict[str, Any]]) -> None:
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    command = api_container(resources)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(command[1]) + 20  # the pause, then the drain


def adapter_rules() -> Iterator[dict[str, Any]]:
    values = yaml.safe_load((KUBERNETES / "queue-autoscaling" / "prometheus-adapter-values.yaml").read_text())
    yield from values["rules"]["custom"]


def test_queue_autoscaling_reads_a_metric_the_service_exports() -> None:
    hpa = one(render("queue-autoscaling"), "HorizontalPodAutoscaler")
    pod_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert pod_metrics and pod_metrics <= served
    exported = {family.name for family in metrics.QUEUE_DEPTH.collect()}
    for rule in adapter_rules():
        assert rule["seriesQuery"].split("{")[0] in exported
