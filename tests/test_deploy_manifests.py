"""The deployment artefacts agree with one another and with feedrunner itself.

deploy/k8s: every document is the kind it claims; the StatefulSet, headless Service, PodMonitor and
PodDisruptionBudget select the same pods; the probes, the Service and the PodMonitor use the port the
ConfigMap's feeds.yaml listens on; the pod gets every ${VAR} feeds.yaml needs, its shard index from its
ordinal and a shard count equal to replicas; and feeds.yaml, given exactly that environment, validates
for every ordinal (and is refused for an ordinal past the last). deploy/systemd: the unit runs
`feedrunner run`, reloads with SIGHUP, waits out the drain and does not retry an invalid feeds.yaml.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from feedrunner import spec as specmod
from feedrunner import units

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
SYSTEMD = REPO / "deploy" / "systemd"

API_VERSIONS = {
    "StatefulSet": "apps/v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "Secret": "v1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "PodDisruptionBudget": "policy/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"
SECRET_EXAMPLE = "secret.example.yaml"
# ${NAME} or ${NAME:-default}; $$ is a literal $ (the same grammar as feedrunner's interpolation).
VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


# ---------------------------------------------------------------------------------------------------
# Reading the artefacts


@functools.cache
def documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file name, document) for every YAML document under deploy/k8s."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                found.append((path.name, doc))
    return tuple(found)


def one(kind: str) -> dict[str, Any]:
    docs = [d for _, d in documents() if d.get("kind") == kind]
    assert len(docs) == 1, f"expected one {kind} under deploy/k8s, found {len(docs)}"
    return docs[0]


def statefulset() -> dict[str, Any]:
    return one("StatefulSet")


def container() -> dict[str, Any]:
    containers = statefulset()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the pod runs feedrunner alone"
    return containers[0]


def replicas() -> int:
    return statefulset()["spec"]["replicas"]


def feeds_yaml() -> str:
    return one("ConfigMap")["data"]["feeds.yaml"]


def secret_values() -> dict[str, str]:
    secret = one("Secret")
    return {**secret.get("stringData", {}), **secret.get("data", {})}


def required_variables(node: object) -> set[str]:
    """The ${VAR}s without a default in the values of a parsed document (comments do not count)."""
    if isinstance(node, dict):
        return set().union(*(required_variables(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(required_variables(v) for v in node)) if node else set()
    if isinstance(node, str):
        return {m.group(1) for m in VAR.finditer(node) if m.group(1) and not m.group(2)}
    return set()


def pod_env(ordinal: int) -> dict[str, str]:
    """The environment the StatefulSet gives the container of pod `ordinal`, as the kubelet builds it."""
    secret_name = one("Secret")["metadata"]["name"]
    env = {}
    for entry in container().get("env", []):
        name = entry["name"]
        if "value" in entry:
            env[name] = str(entry["value"])
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            assert path in (POD_INDEX, "status.podIP"), f"{name}: only the pod index and IP are fieldRefs here"
            env[name] = str(ordinal) if path == POD_INDEX else f"10.0.0.{ordinal + 10}"
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["name"] == secret_name, f"{name} comes from Secret {ref['name']}, not {secret_name}"
            assert ref["key"] in secret_values(), f"{name}: Secret {secret_name} has no key {ref['key']}"
            env[name] = secret_values()[ref["key"]]
        else:
            raise AssertionError(f"{name}: unexpected env source {source}")
    assert not container().get("envFrom"), "env is listed key by key, so the test can see every variable"
    return env


def check(tmp_path: Path, env: dict[str, str]) -> tuple[specmod.Spec | None, list[Any]]:
    path = tmp_path / "feeds.yaml"
    path.write_text(feeds_yaml(), encoding="utf-8")
    return specmod.check_file(path, env=env)


def spec_for(tmp_path: Path, ordinal: int) -> specmod.Spec:
    spec, problems = check(tmp_path, pod_env(ordinal))
    assert spec is not None, "\n".join(map(str, problems))
    return spec


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_named(name: str) -> dict[str, Any]:
    ports = [p for p in container()["ports"] if p.get("name") == name]
    assert len(ports) == 1, f"the container declares port {name!r} once"
    return ports[0]


def mounts() -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container()["volumeMounts"]}


def under(path: str, directory: str) -> bool:
    return PurePosixPath(directory) in (PurePosixPath(path), *PurePosixPath(path).parents)


# ---------------------------------------------------------------------------------------------------
# Kubernetes: shape and wiring


def test_every_document_is_a_known_kind_with_a_name():
    assert documents(), "no YAML documents under deploy/k8s"
    for file, doc in documents():
        kind = doc.get("kind")
        assert kind in API_VERSIONS, f"{file}: unexpected kind {kind!r}"
        assert doc.get("apiVersion") == API_VERSIONS[kind], f"{file}: {kind} is {API_VERSIONS[kind]}"
        if kind != "Kustomization":
            assert doc["metadata"]["name"], f"{file}: {kind} without a name"
    kinds = [d["kind"] for _, d in documents()]
    for kind in ("StatefulSet", "ConfigMap", "Service", "PodMonitor", "Secret", "Kustomization"):
        assert kind in kinds, f"deploy/k8s has no {kind}"


def test_kustomization_applies_every_manifest_but_the_secret_example():
    resources = one("Kustomization")["resources"]
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert SECRET_EXAMPLE not in resources, "the example Secret must never be applied with the rest"
    assert set(resources) == manifests - {SECRET_EXAMPLE}, "a manifest is missing from kustomization.yaml"
    secret_files = {f for f, d in documents() if d["kind"] == "Secret"}
    assert secret_files == {SECRET_EXAMPLE}, "a Secret lives only in the example file"
    assert secret_values(), "the example Secret names its keys"
    assert all(v == "CHANGE-ME" for v in secret_values().values()), "the example holds placeholders only"


def test_statefulset_service_podmonitor_and_pdb_select_the_same_pods():
    sts = statefulset()["spec"]
    labels = sts["template"]["metadata"]["labels"]
    selector = sts["selector"]["matchLabels"]
    assert selects(selector, labels), "the StatefulSet's selector must match its own pod template"
    service = one("Service")
    assert sts["serviceName"] == service["metadata"]["name"], "serviceName must be the headless Service"
    assert service["spec"].get("clusterIP") == "None", "a StatefulSet's governing Service is headless"
    assert selects(service["spec"]["selector"], labels)
    assert service["spec"]["selector"] == selector
    assert selects(one("PodMonitor")["spec"]["selector"]["matchLabels"], labels)
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)


def test_probes_service_and_podmonitor_use_the_port_feeds_yaml_listens_on(tmp_path: Path):
    spec = spec_for(tmp_path, 0)
    assert spec.server.enabled
    assert spec.server.host not in ("127.0.0.1", "localhost", "::1"), "probes and Prometheus come by pod IP"
    assert port_named("http")["containerPort"] == spec.server.port
    c = container()
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    (service_port,) = one("Service")["spec"]["ports"]
    assert service_port["name"] == "http"
    assert service_port["targetPort"] in ("http", spec.server.port)
    assert service_port["port"] == spec.server.port
    (endpoint,) = one("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")


def test_podmonitor_sends_the_token_the_server_checks(tmp_path: Path):
    # /metrics needs the bearer token: Prometheus must read the very Secret key the pod's token comes from.
    token_vars = required_variables(yaml.safe_load(feeds_yaml())["server"]["token"])
    assert len(token_vars) == 1, "server.token is one ${VAR} from the environment"
    (token_var,) = token_vars
    (entry,) = [e for e in container()["env"] if e["name"] == token_var]
    ref = entry["valueFrom"]["secretKeyRef"]
    (endpoint,) = one("PodMonitor")["spec"]["podMetricsEndpoints"]
    auth = endpoint["authorization"]
    assert auth["type"] == "Bearer"
    assert auth["credentials"] == {"name": ref["name"], "key": ref["key"]}
    assert spec_for(tmp_path, 0).server.token is not None


def test_the_shard_index_is_the_pod_ordinal_and_the_count_is_replicas():
    env = {e["name"]: e for e in container()["env"]}
    assert env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == POD_INDEX
    assert env["SHARD_COUNT"]["value"] == str(replicas()), "SHARD_COUNT must equal the StatefulSet's replicas"
    assert replicas() >= 1


def test_the_pod_is_killed_only_after_the_orderly_stop(tmp_path: Path):
    deadline = spec_for(tmp_path, 0).shutdown_deadline
    grace = statefulset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The runner exits at the deadline and ends whatever still runs 5s later; SIGKILL must come after.
    assert grace > deadline + 5


def test_the_container_provides_every_variable_feeds_yaml_needs():
    needed = required_variables(yaml.safe_load(feeds_yaml()))
    assert {"SHARD_INDEX", "SHARD_COUNT"} <= needed, "feeds.yaml takes its shard from the environment"
    missing = needed - set(pod_env(0))
    assert not missing, f"feeds.yaml needs {sorted(missing)}, which the StatefulSet does not set"


@pytest.mark.parametrize("ordinal", range(replicas()))
def test_feeds_yaml_validates_as_each_pod_would_run_it(tmp_path: Path, ordinal: int):
    spec = spec_for(tmp_path, ordinal)
    assert (spec.shard.index, spec.shard.count) == (ordinal, replicas())
    assert spec.state_url.reveal().startswith("postgresql"), "shards share one store: PostgreSQL"
    assert spec.sinks and all(s.delivery is not None for s in spec.sinks), "several hosts deliver onto a bus"
    assert spec.workers == 1, "one process per pod: the pod is the shard"


def test_an_ordinal_past_the_last_is_refused(tmp_path: Path):
    spec, problems = check(tmp_path, {**pod_env(0), "SHARD_INDEX": str(replicas())})
    assert spec is None
    assert any(p.path == "shard.index" for p in problems), problems


@pytest.mark.parametrize("variable", sorted(required_variables(yaml.safe_load(feeds_yaml()))))
def test_feeds_yaml_is_refused_without_each_variable(tmp_path: Path, variable: str):
    env = pod_env(0)
    del env[variable]
    spec, problems = check(tmp_path, env)
    assert spec is None
    assert any(variable in p.message for p in problems), problems


def test_the_container_runs_the_mounted_feeds_yaml():
    c = container()
    assert PurePosixPath(c["command"][0]).name == "feedrunner"
    assert c["args"][0] == "run"
    config = PurePosixPath(c["args"][1])
    mount = mounts()[str(config.parent)]
    (volume,) = [v for v in statefulset()["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert {"key": "feeds.yaml", "path": config.name} in volume["configMap"]["items"]
    # --watch reloads a changed ConfigMap, which reaches the pod only through a directory mount.
    assert "--watch" in c["args"]
    assert "subPath" not in mount


def test_the_pod_is_locked_down_and_writes_only_to_its_volumes(tmp_path: Path):
    pod = statefulset()["spec"]["template"]["spec"]
    c = container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 0) != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), f"resources.{kind}"
    writable = [path for path, m in mounts().items() if not m.get("readOnly")]
    assert any(under(c["workingDir"], w) for w in writable), "relative paths land on a writable volume"
    claims = {t["metadata"]["name"] for t in statefulset()["spec"].get("volumeClaimTemplates", [])}
    for sink in spec_for(tmp_path, 0).sinks:
        spool = sink.delivery.spool.path
        volumes = {mounts()[w]["name"] for w in writable if under(spool, w)}
        assert volumes, f"sink {sink.label}: spool {spool} is on the read-only root"
        assert volumes <= claims, f"sink {sink.label}: the spool must outlive the pod, on the shard's volume claim"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests():
    built = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert {d["kind"] for d in docs} == {d["kind"] for _, d in documents()} - {"Kustomization", "Secret"}
    namespace = one("Kustomization")["namespace"]
    assert all(d["metadata"]["namespace"] == namespace for d in docs)
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] != "feedrunner", "images: sets the image"


# ---------------------------------------------------------------------------------------------------
# systemd


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a systemd unit, each key with all its values in order (systemd allows repeats, and an
    empty assignment resets the list). Backslash-continued lines are joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} is outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def systemd_seconds(text: str) -> float:
    """A systemd time span: 35, 35s, 1min 30s, 500ms."""
    scale = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "ms": 0.001, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * scale[unit]
    return total


@functools.cache
def unit() -> dict[str, dict[str, list[str]]]:
    return unit_file(SYSTEMD / "feedrunner.service")


def service(key: str) -> list[str]:
    return unit()["Service"].get(key, [])


def env_example() -> dict[str, str]:
    lines = (SYSTEMD / "feedrunner.env.example").read_text(encoding="utf-8").splitlines()
    pairs = [line.partition("=") for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, _, v in pairs}


def test_the_unit_has_its_sections_and_runs_feedrunner():
    assert {"Unit", "Service", "Install"} <= set(unit())
    (exec_start,) = service("ExecStart")
    argv = shlex.split(exec_start)
    assert PurePosixPath(argv[0]).name == "feedrunner" and argv[0].startswith("/"), "systemd needs a full path"
    assert argv[1] == "run" and argv[2].endswith(".yaml")
    assert argv[argv.index("--workers") + 1] == "auto"
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_unit_reloads_with_sighup_after_validating():
    reloads = [shlex.split(r) for r in service("ExecReload")]
    assert reloads[-1] == ["/bin/kill", "-HUP", "$MAINPID"], "the runner reloads feeds.yaml on SIGHUP"
    (exec_start,) = service("ExecStart")
    config = shlex.split(exec_start)[2]
    for argv in reloads[:-1]:
        assert argv[1:] == ["validate", config], "only a check of the same file may come before the signal"


def test_the_unit_waits_out_the_drain_and_does_not_retry_an_invalid_file():
    default = specmod.schema()["properties"]["shutdown"]["properties"]["deadline"]["default"]
    (timeout,) = service("TimeoutStopSec")
    assert systemd_seconds(timeout) >= units.duration(default) + 10
    assert service("KillMode") == ["mixed"], "SIGTERM to the supervisor alone; it stops its workers"
    assert service("KillSignal") in ([], ["SIGTERM"])
    assert service("Restart") == ["on-failure"]
    prevented = " ".join(service("RestartPreventExitStatus")).split()
    assert "78" in prevented, "an invalid feeds.yaml (exit 78) cannot be fixed by restarting"
    assert "69" not in prevented, "an unavailable service (exit 69) is retried"


def test_the_unit_runs_unprivileged_with_its_state_directory():
    assert service("User") == ["feedrunner"] and service("Group") == ["feedrunner"]
    assert service("StateDirectory") == ["feedrunner"]
    assert service("WorkingDirectory") == ["/var/lib/feedrunner"]
    assert service("EnvironmentFile") == ["/etc/feedrunner/env"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes")):
        assert service(key) == [value], key
    assert int(service("LimitNOFILE")[0]) >= 65536


def test_the_env_example_sets_every_variable_of_the_kubernetes_feeds_yaml(tmp_path: Path):
    # A feeds.yaml like the ConfigMap's serves bare hosts too, each host's values from /etc/feedrunner/env.
    env = env_example()
    assert required_variables(yaml.safe_load(feeds_yaml())) <= set(env)
    spec, problems = check(tmp_path, env)
    assert spec is not None, "\n".join(map(str, problems))
    assert (spec.shard.index, spec.shard.count) == (int(env["SHARD_INDEX"]), int(env["SHARD_COUNT"]))
