"""The deployment files: Kubernetes manifests valid against Kubernetes' own schemas, and consistent.

``deploy/kubernetes`` is plain YAML with a kustomization that only sets the namespace and the
image, and makes the Grafana dashboard a ConfigMap; ``render`` does exactly that (and the test
fails if the kustomization asks for more), so what is validated is what ``kubectl apply -k``
would send. The compose file is validated by ``docker-compose config`` in the container tier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.servers import Server

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUSTOMIZATION = DEPLOY / "kubernetes" / "kustomization.yaml"
UNDERSTOOD = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images"}
CLUSTER_WIDE = {"Namespace"}


def render() -> list[dict[str, Any]]:
    """What ``kustomize build deploy/kubernetes`` gives for the features the kustomization uses."""
    spec = yaml.safe_load(KUSTOMIZATION.read_text())
    assert set(spec) <= UNDERSTOOD, f"render() does not know {set(spec) - UNDERSTOOD}"
    folder = KUSTOMIZATION.parent
    resources = [yaml.safe_load((folder / name).read_text()) for name in spec["resources"]]
    for generator in spec.get("configMapGenerator", []):
        options = generator.get("options", {})
        assert options.get("disableNameSuffixHash"), "render() does not add name hashes"
        data = {Path(name).name: (folder / name).read_text() for name in generator["files"]}
        metadata = {"name": generator["name"], "labels": options.get("labels", {})}
        resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    tags = {image["name"]: image["newTag"] for image in spec.get("images", [])}
    for resource in resources:
        if resource["kind"] not in CLUSTER_WIDE:
            resource["metadata"]["namespace"] = spec["namespace"]
        for container in _pod(resource).get("containers", []):
            if container["image"] in tags:
                container["image"] += ":" + tags[container["image"]]
    return resources


def _pod(resource: dict[str, Any]) -> dict[str, Any]:
    return resource.get("spec", {}).get("template", {}).get("spec", {})  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return {resource["kind"]: resource for resource in render()}


def test_every_manifest_is_valid_for_kubernetes(manifests: dict[str, dict[str, Any]]) -> None:
    version = kubernetes_validate.latest_version()
    for resource in manifests.values():
        if resource["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the Prometheus Operator's own kind: checked below
        kubernetes_validate.validate(resource, version, strict=True)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor",
            "ConfigMap", "Secret"} <= manifests.keys()  # fmt: skip


def test_the_pieces_fit_together(manifests: dict[str, dict[str, Any]]) -> None:
    deployment, service = manifests["Deployment"], manifests["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"],
        manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    monitor = manifests["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in monitor["endpoints"]} <= ports
    assert manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    secret = manifests["Secret"]["metadata"]["name"]
    [container] = _pod(deployment)["containers"]
    assert {"secretRef": {"name": secret}} in container["envFrom"]


def test_probes_and_grace_match_the_gateway(manifests: dict[str, dict[str, Any]]) -> None:
    pod = _pod(manifests["Deployment"])
    [container] = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    env = {item["name"]: item["value"] for item in container["env"]}
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > float(env["INFERENCE_SHUTDOWN_GRACE"]) + pause
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (Dockerfile)


def test_the_autoscaler_and_dashboard_use_metrics_the_gateway_serves(
    manifests: dict[str, dict[str, Any]], gateway: Server
) -> None:
    exposed = httpx.get(gateway.url + "/metrics").text
    for metric in manifests["HorizontalPodAutoscaler"]["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert f"\n{metric['pods']['metric']['name']} " in exposed
    dashboard = manifests["ConfigMap"]["data"]["grafana-dashboard.json"]
    assert '"uid": "inference-core"' in dashboard


def test_compose_wires_the_gateway_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["gateway"]["environment"]["INFERENCE_BASE_URL"].startswith("http://simulator:")
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["gateway:8080"]
    for volume in services["grafana"]["volumes"] + services["prometheus"]["volumes"]:
        assert (DEPLOY / "compose" / volume.split(":")[0]).exists(), volume
