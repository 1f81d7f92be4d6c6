"""deploy/: plain manifests rendered from the chart — no drift, valid, and usable as documented."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.chart_support import (
    CRD_KINDS,
    ROOT,
    Obj,
    crd_schema_errors,
    crd_unknown_fields,
    helm_binary,
    kubernetes_schema_errors,
    parse_documents,
)

DEPLOY = ROOT / "deploy"
SCRIPT = ROOT / "scripts" / "render-manifests"
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--helm", helm_binary(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def committed(subdir: str) -> list[Obj]:
    objs: list[Obj] = []
    for path in sorted((DEPLOY / subdir).glob("*.yaml")):
        if path.name != "kustomization.yaml":
            objs += parse_documents(path.read_text())
    return objs


@pytest.mark.tools
def test_committed_manifests_match_the_chart() -> None:
    proc = run_script("--check")
    assert proc.returncode == 0, f"deploy/ drifted from the chart:\n{proc.stdout}{proc.stderr}"
    assert "up to date" in proc.stdout


@pytest.mark.tools
def test_the_check_detects_drift(tmp_path: Path) -> None:
    for subdir in ("manifests", "monitoring"):
        shutil.copytree(DEPLOY / subdir, tmp_path / subdir)
    assert run_script("--check", "--out", str(tmp_path)).returncode == 0
    deployment = tmp_path / "manifests" / "deployment.yaml"
    deployment.write_text(deployment.read_text().replace("replicas: 2", "replicas: 3"))
    (tmp_path / "monitoring" / "stale.yaml").write_text("kind: ConfigMap\n")
    proc = run_script("--check", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert "-  replicas: 3" in proc.stdout
    assert "+  replicas: 2" in proc.stdout
    assert "stale.yaml" in proc.stdout
    # Rendering again repairs both.
    assert run_script("--out", str(tmp_path)).returncode == 0
    assert run_script("--check", "--out", str(tmp_path)).returncode == 0
    assert not (tmp_path / "monitoring" / "stale.yaml").exists()


def test_layout_separates_operator_objects() -> None:
    assert {o["kind"] for o in committed("manifests")} == {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    assert {o["kind"] for o in committed("monitoring")} == {
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    }
    for subdir in ("manifests", "monitoring"):
        kustomization = yaml.safe_load((DEPLOY / subdir / "kustomization.yaml").read_text())
        files = {p.name for p in (DEPLOY / subdir).glob("*.yaml")} - {"kustomization.yaml"}
        assert set(kustomization["resources"]) == files


@pytest.mark.tools
@pytest.mark.parametrize("subdir", ["manifests", "monitoring"])
def test_manifests_validate_offline(subdir: str) -> None:
    objs = committed(subdir)
    assert all(o["metadata"]["namespace"] == "tiktok-conversions" for o in objs)
    core = [o for o in objs if o["kind"] not in CRD_KINDS]
    assert [e for o in core for e in kubernetes_schema_errors(o)] == []
    crds = [o for o in objs if o["kind"] in CRD_KINDS]
    assert crd_schema_errors(crds) == []
    assert [e for o in crds for e in crd_unknown_fields(o)] == []


def test_example_secret_provides_every_reference_of_the_config() -> None:
    (secret,) = parse_documents((DEPLOY / "secret.example.yaml").read_text())
    assert kubernetes_schema_errors(secret) == []
    (deployment,) = [o for o in committed("manifests") if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"][0] == {"secretRef": {"name": secret["metadata"]["name"]}}
    assert secret["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    (config_map,) = [o for o in committed("manifests") if o["kind"] == "ConfigMap"]
    referenced = set(ENV_REF.findall(config_map["data"]["config.yaml"]))
    assert referenced == set(secret["stringData"])
    assert not [o for o in committed("manifests") if o["kind"] == "Secret"]  # no tokens in Git
