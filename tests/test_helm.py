"""The Helm chart: lint, render, validate offline, and assert what a platform team relies on.

Renders the chart with the pinned Helm (scripts/provision-helm) for three value sets — the
defaults, ci/all-on-values.yaml (every option on, KEDA) and ci/hpa-values.yaml — and checks:
Kubernetes OpenAPI validity (kubernetes-validate, strict), CRD validity (CRD OpenAPI schemas via
tests/crd_validate), security context, probes, resources, secret handling, replica bounds,
monitoring resources, and that the rendered config passes `tiktok-worker check-config`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart_support import (
    ALL_ON_VALUES,
    CHART,
    CRD_KINDS,
    ROOT,
    Obj,
    by_kind,
    crd_schema_errors,
    crd_unknown_fields,
    helm,
    kubernetes_schema_errors,
    one,
    render,
    render_error,
)
from tests.dashboard_exprs import GENERIC_SELECTOR
from worker import __version__

HPA_VALUES = CHART / "ci" / "hpa-values.yaml"
VALUE_SETS = {
    "default": (),
    "all-on": (ALL_ON_VALUES,),
    "hpa": (HPA_VALUES,),
}
CORE_KINDS = {
    "Deployment",
    "ConfigMap",
    "Secret",
    "Service",
    "ServiceAccount",
    "PodDisruptionBudget",
}
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: render(values_files=files) for name, files in VALUE_SETS.items()}


def deployment(objs: list[Obj]) -> Obj:
    return one(objs, "Deployment")


def container(objs: list[Obj]) -> Obj:
    containers = deployment(objs)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Obj = containers[0]
    return result


def worker_config(objs: list[Obj]) -> dict[str, Any]:
    cm = next(o for o in by_kind(objs, "ConfigMap") if "config.yaml" in o["data"])
    result: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return result


def values_of(*files: Path) -> dict[str, Any]:
    merged: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        _deep_merge(merged, yaml.safe_load(f.read_text()))
    return merged


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


# --------------------------------------------------------------------------- lint and render


@pytest.mark.tools
@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(name: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    for f in VALUE_SETS[name]:
        args += ["--values", str(f)]
    proc = helm(*args)
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.tools
def test_renders_the_expected_objects(rendered: dict[str, list[Obj]]) -> None:
    assert {o["kind"] for o in rendered["default"]} == CORE_KINDS
    assert {o["kind"] for o in rendered["all-on"]} == CORE_KINDS | {
        "ServiceMonitor",
        "PrometheusRule",
        "ScaledObject",
        "NetworkPolicy",
    }
    assert len(by_kind(rendered["all-on"], "ConfigMap")) == 2  # config + dashboard
    assert "HorizontalPodAutoscaler" in {o["kind"] for o in rendered["hpa"]}


@pytest.mark.tools
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[Obj]], name: str
) -> None:
    objs = rendered[name]
    core = [o for o in objs if o["kind"] not in CRD_KINDS]
    errors = [e for o in core for e in kubernetes_schema_errors(o)]
    assert errors == []
    crds = [o for o in objs if o["kind"] in CRD_KINDS]
    assert crd_schema_errors(crds) == []
    assert [e for o in crds for e in crd_unknown_fields(o)] == []


@pytest.mark.tools
def test_schema_validation_rejects_broken_objects(rendered: dict[str, list[Obj]]) -> None:
    # Guards the validators: each must fail on a defect a typo could introduce.
    deploy = json.loads(json.dumps(deployment(rendered["default"])))
    deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    assert kubernetes_schema_errors(deploy) != []
    deploy = json.loads(json.dumps(deployment(rendered["default"])))
    deploy["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    assert kubernetes_schema_errors(deploy) != []  # strict: unknown field

    scaled = json.loads(json.dumps(one(rendered["all-on"], "ScaledObject")))
    scaled["spec"]["maxReplicaCount"] = "12"
    monitor = json.loads(json.dumps(one(rendered["all-on"], "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["interval"] = 30
    assert len(crd_schema_errors([scaled, monitor])) == 2
    scaled["spec"]["maxReplicas"] = 12
    assert crd_unknown_fields(scaled) == [
        "ScaledObject: spec.maxReplicas is not a field of the CRD"
    ]


@pytest.mark.parametrize(
    ("set_values", "message"),
    [
        ({"keda.enabled": "true"}, "topicPartitions is required"),
        ({"autoscaling.enabled": "true"}, "topicPartitions is required"),
        (
            {"keda.enabled": "true", "topicPartitions": "2", "keda.maxReplicas": "3"},
            "the replica upper bound (3) exceeds topicPartitions (2)",
        ),
        (
            {"autoscaling.enabled": "true", "topicPartitions": "4", "autoscaling.maxReplicas": "6"},
            "the replica upper bound (6) exceeds topicPartitions (4)",
        ),
        ({"replicaCount": "5", "topicPartitions": "4"}, "exceeds topicPartitions (4)"),
        (
            {"keda.enabled": "true", "autoscaling.enabled": "true", "topicPartitions": "6"},
            "mutually exclusive",
        ),
        ({"terminationGracePeriodSeconds": "35"}, "must exceed config.kafka.drain_timeout_s + 10"),
        ({"config.destinations[0].access_token": "literal-token"}, "access_token"),
        ({"config.kafka.typo": "1"}, "additional properties 'typo' not allowed"),
        ({"keda.minReplicas": "0"}, "minReplicas"),
    ],
)
@pytest.mark.tools
def test_refuses_unsafe_values(set_values: dict[str, str], message: str) -> None:
    assert message in render_error(set_values=set_values)


@pytest.mark.tools
def test_replica_bounds_that_fit_the_partitions_render() -> None:
    objs = render(set_values={"keda.enabled": "true", "topicPartitions": "3"})
    assert one(objs, "ScaledObject")["spec"]["maxReplicaCount"] == 3
    assert "replicas" not in deployment(objs)["spec"]  # KEDA owns the replica count


# --------------------------------------------------------------------------- the pod


@pytest.mark.tools
@pytest.mark.parametrize("name", VALUE_SETS)
def test_security_context(rendered: dict[str, list[Obj]], name: str) -> None:
    pod = deployment(rendered[name])["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container(rendered[name])["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsUser"] != 0


@pytest.mark.tools
def test_writable_tmp_on_a_read_only_root(rendered: dict[str, list[Obj]]) -> None:
    pod = deployment(rendered["default"])["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in container(rendered["default"])["volumeMounts"]}
    assert mounts["/etc/tiktok-worker"]["readOnly"] is True
    tmp_volume = next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"]["name"])
    assert "emptyDir" in tmp_volume


@pytest.mark.tools
@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_and_ports(rendered: dict[str, list[Obj]], name: str) -> None:
    c = container(rendered[name])
    port = worker_config(rendered[name])["http"]["port"]
    assert port == 9464
    assert c["ports"] == [{"name": "http-metrics", "containerPort": port, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert c["args"] == ["run", "--config", "/etc/tiktok-worker/config.yaml"]


@pytest.mark.tools
@pytest.mark.parametrize("name", VALUE_SETS)
def test_resources(rendered: dict[str, list[Obj]], name: str) -> None:
    resources = container(rendered[name])["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]


@pytest.mark.tools
@pytest.mark.parametrize("name", VALUE_SETS)
def test_termination_grace_exceeds_the_drain(rendered: dict[str, list[Obj]], name: str) -> None:
    grace = deployment(rendered[name])["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = worker_config(rendered[name])["kafka"]["drain_timeout_s"]
    # The worker drains for drain_timeout_s, then allows itself a 10 s shutdown margin.
    assert grace > drain + 10


@pytest.mark.tools
def test_config_changes_roll_the_pods() -> None:
    def checksums(**set_values: str) -> dict[str, str]:
        objs = render(set_values=set_values)
        annotations: dict[str, str] = deployment(objs)["spec"]["template"]["metadata"][
            "annotations"
        ]
        return annotations

    base = checksums()
    assert base == checksums()  # deterministic
    changed = checksums(**{"config.logging.level": "debug"})
    assert changed["checksum/config"] != base["checksum/config"]
    assert changed["checksum/secret"] == base["checksum/secret"]
    rotated = checksums(**{"secret.env.TIKTOK_ACCESS_TOKEN": "rotated"})
    assert rotated["checksum/secret"] != base["checksum/secret"]


# --------------------------------------------------------------------------- secrets


@pytest.mark.tools
def test_no_token_in_any_configmap(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["all-on"]
    secret = one(objs, "Secret")
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert values["TIKTOK_ACCESS_TOKEN"] == "ci-placeholder-token-web"
    for obj in objs:
        if obj["kind"] == "Secret":
            continue
        text = json.dumps(obj)
        for key, value in values.items():
            assert value not in text, f"{key}'s value leaks into {obj['kind']}"
    for dest in worker_config(objs)["destinations"]:
        assert ENV_REF.fullmatch(dest["access_token"]), dest["name"]


@pytest.mark.tools
def test_every_config_reference_is_provided_by_the_secret(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["all-on"]
    text = yaml.safe_dump(worker_config(objs))
    referenced = set(ENV_REF.findall(text))
    assert {"TIKTOK_ACCESS_TOKEN", "KAFKA_SASL_PASSWORD", "REDIS_PASSWORD"} <= referenced
    assert referenced <= one(objs, "Secret")["data"].keys()
    env_from = container(objs)["envFrom"]
    assert {"secretRef": {"name": one(objs, "Secret")["metadata"]["name"]}} in env_from


@pytest.mark.tools
def test_existing_secret_is_referenced_not_created() -> None:
    objs = render(set_values={"secret.existingSecret": "tiktok-tokens"})
    assert by_kind(objs, "Secret") == []
    assert container(objs)["envFrom"][0] == {"secretRef": {"name": "tiktok-tokens"}}
    assert "checksum/secret" not in deployment(objs)["spec"]["template"]["metadata"]["annotations"]


# --------------------------------------------------------------------------- the worker config


@pytest.mark.tools
@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_config_is_accepted_by_check_config(
    rendered: dict[str, list[Obj]], name: str, tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    config = worker_config(rendered[name])
    if "ssl.ca.location" in config["kafka"]["client"]:
        # The pod mounts the CA there; librdkafka reads the file when the config is checked
        # (as at start-up), so point it at a CA bundle this machine has.
        import certifi

        config["kafka"]["client"]["ssl.ca.location"] = certifi.where()
    security = config["kafka"].get("security") or {}
    if any(key in security for key in ("ca_file", "cert_file", "key_file")):
        # The pod mounts kafkaTls there; check-config loads the files as a client would, so
        # point them at a test PKI made here (test_kafka_tls_and_sasl_come_from_existing_secrets
        # checks the paths the chart renders).
        from devkit.infra.certs import make_test_pki

        tls = make_test_pki(tmp_path / "pki")
        made = {"ca_file": tls.ca_cert, "cert_file": tls.client_cert, "key_file": tls.client_key}
        for key in security.keys() & made.keys():
            security[key] = str(made[key])
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIKTOK_", "KAFKA_", "REDIS_"))}
    secret_values = {
        ref: f"placeholder-{ref.lower()}-0123456789"
        for ref in ENV_REF.findall(yaml.safe_dump(config))
    }
    env.update(secret_values)
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout
    token = secret_values["TIKTOK_ACCESS_TOKEN"]
    assert token not in proc.stdout  # masked


@pytest.mark.tools
def test_check_config_rejects_a_config_the_chart_must_not_render(tmp_path: Path) -> None:
    # Guards the previous test: check-config does fail, naming the key, on a bad config.
    config = worker_config(render())
    config["kafka"]["max_inflight_messages"] = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "TIKTOK_ACCESS_TOKEN": "x" * 20, "TIKTOK_PIXEL_CODE": "PIXEL"}
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "kafka.max_inflight_messages" in proc.stderr


@pytest.mark.tools
def test_expected_replicas_follows_the_replica_upper_bound(
    rendered: dict[str, list[Obj]],
) -> None:
    assert worker_config(rendered["default"])["rate_limit"]["expected_replicas"] == 1
    assert worker_config(rendered["all-on"])["rate_limit"]["expected_replicas"] == 12
    hpa_max = values_of(HPA_VALUES)["autoscaling"]["maxReplicas"]
    assert worker_config(rendered["hpa"])["rate_limit"]["expected_replicas"] == hpa_max
    explicit = render(set_values={"config.rate_limit.expected_replicas": "7"})
    assert worker_config(explicit)["rate_limit"]["expected_replicas"] == 7


def test_chart_app_version_is_the_worker_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__


# --------------------------------------------------------------------------- wiring


@pytest.mark.tools
def test_service_pdb_and_monitor_select_the_pods(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["all-on"]
    pod_labels = deployment(objs)["spec"]["template"]["metadata"]["labels"]
    service = one(objs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http-metrics"
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    monitor = one(objs, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    policy = one(objs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 443, 9092, 6379} <= egress_ports


@pytest.mark.tools
def test_keda_scales_on_the_consumer_group_lag(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["all-on"]
    values = values_of(ALL_ON_VALUES)
    scaled = one(objs, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment(objs)["metadata"]["name"]
    assert scaled["maxReplicaCount"] <= values["topicPartitions"]
    topics = [t["metadata"]["topic"] for t in scaled["triggers"]]
    assert topics == values["config"]["kafka"]["topics"]
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == values["config"]["kafka"]["group_id"]
        assert trigger["metadata"]["allowIdleConsumers"] == "false"
        assert trigger["authenticationRef"] == {"name": "kafka-sasl"}
    assert "replicas" not in deployment(objs)["spec"]


@pytest.mark.tools
@pytest.mark.parametrize("start_from", [None, "earliest", "latest"])
def test_keda_offset_reset_policy_is_the_workers_start_from(start_from: str | None) -> None:
    # Issue 19: KEDA must count the lag of a partition without committed offsets the way the
    # worker will consume it; one setting (config.kafka.start_from, default earliest) decides.
    set_values = {"keda.enabled": "true", "topicPartitions": "3"}
    if start_from is not None:
        set_values["config.kafka.start_from"] = start_from
    objs = render(set_values=set_values)
    (trigger,) = one(objs, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["offsetResetPolicy"] == (start_from or "earliest")
    assert worker_config(objs)["kafka"]["start_from"] == (start_from or "earliest")


@pytest.mark.tools
def test_keda_has_no_offset_reset_value_of_its_own() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert "offsetResetPolicy" not in values["keda"]
    assert "offsetResetPolicy" in render_error(set_values={"keda.offsetResetPolicy": "latest"})


@pytest.mark.tools
def test_prometheus_rule_is_the_rules_file_scoped_to_the_release(
    rendered: dict[str, list[Obj]], tmp_path: Path
) -> None:
    objs = rendered["all-on"]
    rule = one(objs, "PrometheusRule")
    groups = rule["spec"]["groups"]
    source = yaml.safe_load((CHART / "files" / "rules.yaml").read_text())["groups"]
    assert [g["name"] for g in groups] == [g["name"] for g in source] + ["tiktok-worker-team"]
    name = deployment(objs)["metadata"]["name"]
    selector = f'job="{name}",namespace="streaming"'
    for got, want in zip(groups[0]["rules"], source[0]["rules"], strict=True):
        assert got["expr"] == want["expr"].replace(GENERIC_SELECTOR, selector)
        assert got["annotations"]["description"] == want["annotations"]["description"]
        anchor = want["annotations"]["runbook_url"].split("#")[1]
        assert got["annotations"]["runbook_url"] == (
            "https://git.example.com/data/tiktok-conversions-worker/-/blob/main/docs/"
            f"operations.md#{anchor}"
        )
    assert GENERIC_SELECTOR not in json.dumps(rule)
    path = tmp_path / "rendered_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    proc = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.tools
def test_dashboard_configmap_carries_the_dashboard(rendered: dict[str, list[Obj]]) -> None:
    cm = next(
        o
        for o in by_kind(rendered["all-on"], "ConfigMap")
        if o["metadata"]["name"].endswith("-dashboard")
    )
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Streaming"}
    (payload,) = cm["data"].values()
    assert json.loads(payload) == json.loads((CHART / "files" / "dashboard.json").read_text())


# --------------------------------------------------------------------------- documentation


def _leaf_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves of a values tree (lists and empty maps are leaves)."""
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in _leaf_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def _documented_keys() -> list[str]:
    """Dotted paths of the keys of values.yaml that carry a helm-docs `# --` comment."""
    stack: list[tuple[int, str]] = []
    documented: list[str] = []
    pending = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = True
            continue
        if stripped.startswith("#"):
            continue  # a continuation line of the comment
        m = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not m:
            pending = False
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        if pending:
            documented.append(".".join(key for _, key in stack))
        pending = False
    return documented


def test_every_value_is_documented_in_values_and_readme() -> None:
    documented = _documented_keys()
    assert len(documented) > 50
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    undocumented = [
        leaf
        for leaf in _leaf_paths(values)
        if not any(leaf == d or leaf.startswith(d + ".") for d in documented)
    ]
    assert undocumented == [], "values without a `# --` comment"
    readme = (CHART / "README.md").read_text()
    assert [d for d in documented if f"`{d}`" not in readme] == [], "values missing in README"


def test_schema_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def known(path: str) -> bool:
        node = schema
        for part in path.split("."):
            props = node.get("properties", {})
            if part not in props:
                # An open object (probe, resources, ...) accepts any key below it.
                return (
                    node.get("type") == "object" and node.get("additionalProperties") is not False
                )
            node = props[part]
        return True

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert [p for p in _leaf_paths(values) if not known(p)] == []
    assert not known("image.repositry")  # the schema does catch typos


def _render_notes(tmp_path: Path, **set_values: str) -> str:
    """NOTES.txt as `helm install` would print it (helm template skips NOTES, so a copy of the
    chart carries it as a ConfigMap)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    indented = "".join(f"    {line}\n" for line in notes.splitlines())
    (chart / "templates" / "notes-preview.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n" + indented
    )
    args = ["template", "tw", str(chart), "-n", "streaming", "--show-only"]
    args.append("templates/notes-preview.yaml")
    for key, value in set_values.items():
        args += ["--set", f"{key}={value}"]
    text: str = yaml.safe_load(helm(*args).stdout)["data"]["notes"]
    return text


@pytest.mark.tools
def test_notes_guide_the_operator(tmp_path: Path) -> None:
    notes = _render_notes(tmp_path)
    assert "WARNING: secret.env is empty" in notes
    assert "deploy/tw-tiktok-conversions-worker" in notes
    assert '"segment-events.tiktok-dlq"' in notes
    notes = _render_notes(tmp_path / "existing", **{"secret.existingSecret": "tokens"})
    assert "WARNING" not in notes
    assert 'the existing Secret "tokens"' in notes


@pytest.mark.tools
def test_static_membership_uses_the_pod_name_as_group_instance_id() -> None:
    objs = render(set_values={"staticMembership": "true"})
    env = {e["name"]: e for e in container(objs).get("env", [])}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    client = worker_config(objs)["kafka"]["client"]
    assert client["group.instance.id"] == "${POD_NAME}"


@pytest.mark.tools
def test_no_static_membership_by_default() -> None:
    objs = render()
    assert "POD_NAME" not in {e["name"] for e in container(objs).get("env", [])}
    assert "group.instance.id" not in worker_config(objs)["kafka"]["client"]


# --------------------------------------------------------------------------- Kafka security


@pytest.mark.tools
def test_kafka_tls_and_sasl_come_from_existing_secrets() -> None:
    objs = render(
        set_values={
            "kafkaTls.existingSecret": "kafka-tls",
            "kafkaTls.certKey": "tls.crt",
            "kafkaTls.keyKey": "tls.key",
            "kafkaSasl.existingSecret": "kafka-sasl",
            "kafkaSasl.usernameKey": "username",
            "config.kafka.security.mechanism": "scram-sha-512",
        }
    )
    security = worker_config(objs)["kafka"]["security"]
    assert security == {
        "mechanism": "scram-sha-512",
        "username": "${KAFKA_SASL_USERNAME}",
        "password": "${KAFKA_SASL_PASSWORD}",
        "ca_file": "/etc/tiktok-worker/kafka-tls/ca.crt",
        "cert_file": "/etc/tiktok-worker/kafka-tls/tls.crt",
        "key_file": "/etc/tiktok-worker/kafka-tls/tls.key",
    }
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(objs)["env"]}
    assert env == {
        "KAFKA_SASL_PASSWORD": {"name": "kafka-sasl", "key": "password"},
        "KAFKA_SASL_USERNAME": {"name": "kafka-sasl", "key": "username"},
    }
    (mount,) = [m for m in container(objs)["volumeMounts"] if m["name"] == "kafka-tls"]
    assert mount == {
        "name": "kafka-tls",
        "mountPath": "/etc/tiktok-worker/kafka-tls",
        "readOnly": True,
    }
    volumes = deployment(objs)["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == "kafka-tls"]
    assert volume["secret"]["secretName"] == "kafka-tls"
    assert volume["secret"]["defaultMode"] == 0o440
    assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt", "tls.crt", "tls.key"]
    for obj in objs:
        assert kubernetes_schema_errors(obj) == [], obj["kind"]


@pytest.mark.tools
def test_values_set_in_kafka_security_win_over_the_secret_defaults() -> None:
    objs = render(
        set_values={
            "kafkaTls.existingSecret": "kafka-tls",
            "config.kafka.security.mechanism": "client-cert-auth",
            "config.kafka.security.ca_file": "/etc/ssl/certs/ca-certificates.crt",
            "config.kafka.security.cert_file": "/etc/tiktok-worker/kafka-tls/client.pem",
            "config.kafka.security.key_file": "/etc/tiktok-worker/kafka-tls/client.key",
        }
    )
    security = worker_config(objs)["kafka"]["security"]
    assert security["ca_file"] == "/etc/ssl/certs/ca-certificates.crt"
    assert "password" not in security
    assert "env" not in container(objs)  # no SASL Secret, no extraEnv


@pytest.mark.tools
@pytest.mark.parametrize(
    ("set_values", "message"),
    [
        ({"config.kafka.security.password": "hunter2"}, "does not match pattern"),
        (
            {"kafkaTls.existingSecret": "t", "kafkaTls.certKey": "tls.crt"},
            "kafkaTls.certKey and kafkaTls.keyKey go together",
        ),
        ({"config.kafka.security.mechanism": "gssapi"}, "mechanism"),
    ],
)
def test_refuses_unsafe_kafka_security(set_values: dict[str, str], message: str) -> None:
    assert message in render_error(set_values=set_values)
