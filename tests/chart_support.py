"""Render the Helm chart and validate what it renders, offline (used by test_helm/test_deploy).

- `helm_binary()`: the pinned Helm that scripts/provision-helm builds (and caches) on first use.
- `render(...)`: `helm template` of the chart, parsed into a list of Kubernetes objects.
- `kubernetes_schema_errors(obj)`: validation against the Kubernetes OpenAPI schemas shipped by
  the `kubernetes-validate` package, in strict mode (unknown fields are errors).
- `crd_schema_errors(objs)`: validation of ServiceMonitor/PrometheusRule/ScaledObject against
  their CRDs' OpenAPI schemas (kubernetes-models packages, run with node; see tests/crd_validate).

Nothing here reaches the network once scripts/provision-helm has run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests import tools

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "tiktok-conversions-worker"
ALL_ON_VALUES = CHART / "ci" / "all-on-values.yaml"
CRD_VALIDATE_SRC = ROOT / "tests" / "crd_validate"
# The manifests must be valid for the oldest Kubernetes the chart supports (kubeVersion >=1.25)
# and for the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
CRD_KINDS = frozenset({"ServiceMonitor", "PrometheusRule", "ScaledObject"})

Obj = dict[str, Any]


def cache_root() -> Path:
    return Path(os.environ.get("TIKTOK_WORKER_CACHE", Path.home() / ".cache" / "tiktok-worker"))


def helm_binary() -> str:
    """Path of the pinned Helm (built on first use by scripts/provision-helm; minutes, once)."""
    tools.require("helm")
    return _provisioned_helm()


@functools.cache
def _provisioned_helm() -> str:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "provision-helm")],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/provision-helm failed:\n{proc.stderr[-3000:]}")
    path = proc.stdout.strip().splitlines()[-1]
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"scripts/provision-helm printed {path!r}, not an executable")
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def template_args(
    *,
    values_files: Iterable[Path] = (),
    set_values: Mapping[str, str] | None = None,
    release: str = "tiktok",
    namespace: str = "streaming",
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for f in values_files:
        args += ["--values", str(f)]
    for key, value in (set_values or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def render_text(**kwargs: Any) -> str:
    return helm(*template_args(**kwargs)).stdout


def parse_documents(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(**kwargs: Any) -> list[Obj]:
    """`helm template` of the chart as a list of objects (kwargs as for `template_args`)."""
    return parse_documents(render_text(**kwargs))


def render_error(**kwargs: Any) -> str:
    """The error `helm template` reports for values it must refuse (fails if it renders)."""
    proc = helm(*template_args(**kwargs), check=False)
    assert proc.returncode != 0, "expected helm template to fail, but it rendered"
    return proc.stderr


def by_kind(objs: Sequence[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: Sequence[Obj], kind: str) -> Obj:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def kubernetes_schema_errors(obj: Obj) -> list[str]:
    """Errors of `obj` against the Kubernetes OpenAPI schema of its kind (strict: no unknown
    fields). A kind without a bundled schema is an error too, so nothing passes unchecked."""
    import kubernetes_validate  # type: ignore[import-untyped]

    name = f"{obj['kind']}/{obj['metadata']['name']}"
    errors: list[str] = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(f"{name} (Kubernetes {version}): {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    return errors


def _crd_validator_dir() -> Path:
    digest = hashlib.sha256(
        (CRD_VALIDATE_SRC / "package.json").read_bytes()
        + (CRD_VALIDATE_SRC / "package-lock.json").read_bytes()
    ).hexdigest()[:16]
    return cache_root() / f"crd-validate-{digest}"


def crd_schema_errors(objs: Sequence[Obj]) -> list[str]:
    """Errors of custom resources against their CRDs' OpenAPI schemas (types, enums, required)."""
    helm_binary()  # provisions the validator's node_modules as well
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(
            "node is required for the CRD schema validation (apt-get install nodejs)"
        )
    modules = _crd_validator_dir() / "node_modules"
    if not modules.is_dir():
        raise RuntimeError(f"{modules} missing: run scripts/provision-helm")
    proc = subprocess.run(
        [node, str(CRD_VALIDATE_SRC / "validate.mjs"), str(modules)],
        input=json.dumps(list(objs)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"validate.mjs failed:\n{proc.stderr}")
    results = json.loads(proc.stdout)
    assert len(results) == len(objs)
    return [
        f"{objs[r['index']]['kind']}/{objs[r['index']]['metadata']['name']}: {r['error']}"
        for r in results
        if not r["ok"]
    ]


# Fields of the custom resources the chart renders, per object path, from the CRDs' specs.
# The CRD schemas accept unknown fields (the API server prunes them silently), so a typo such
# as `minReplicas` in a ScaledObject would pass them; this table catches it.
_CRD_FIELDS: dict[tuple[str, str], frozenset[str]] = {
    ("ServiceMonitor", "spec"): frozenset(
        [
            "selector",
            "namespaceSelector",
            "endpoints",
            "jobLabel",
            "targetLabels",
            "podTargetLabels",
            "sampleLimit",
            "attachMetadata",
        ]
    ),
    ("ServiceMonitor", "endpoint"): frozenset(
        [
            "port",
            "targetPort",
            "path",
            "scheme",
            "interval",
            "scrapeTimeout",
            "honorLabels",
            "honorTimestamps",
            "relabelings",
            "metricRelabelings",
            "tlsConfig",
            "params",
            "bearerTokenSecret",
            "authorization",
            "basicAuth",
            "followRedirects",
            "enableHttp2",
        ]
    ),
    ("PrometheusRule", "spec"): frozenset({"groups"}),
    ("PrometheusRule", "group"): frozenset(
        [
            "name",
            "interval",
            "rules",
            "limit",
            "partial_response_strategy",
            "query_offset",
            "labels",
        ]
    ),
    ("PrometheusRule", "rule"): frozenset(
        ["alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"]
    ),
    ("ScaledObject", "spec"): frozenset(
        [
            "scaleTargetRef",
            "pollingInterval",
            "cooldownPeriod",
            "initialCooldownPeriod",
            "idleReplicaCount",
            "minReplicaCount",
            "maxReplicaCount",
            "advanced",
            "fallback",
            "triggers",
        ]
    ),
    ("ScaledObject", "trigger"): frozenset(
        ["type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"]
    ),
}


def crd_unknown_fields(obj: Obj) -> list[str]:
    """Fields of a rendered custom resource that its CRD does not define."""
    kind, spec = obj["kind"], obj.get("spec", {})
    # (where, which table, the mapping found there)
    items: list[tuple[str, str, Mapping[str, Any]]] = [("spec", "spec", spec)]
    if kind == "ServiceMonitor":
        items += [(f"spec.endpoints[{i}]", "endpoint", e) for i, e in enumerate(spec["endpoints"])]
    elif kind == "PrometheusRule":
        for i, group in enumerate(spec["groups"]):
            items.append((f"spec.groups[{i}]", "group", group))
            items += [
                (f"spec.groups[{i}].rules[{j}]", "rule", r) for j, r in enumerate(group["rules"])
            ]
    elif kind == "ScaledObject":
        items += [(f"spec.triggers[{i}]", "trigger", t) for i, t in enumerate(spec["triggers"])]
    return [
        f"{kind}: {where}.{key} is not a field of the CRD"
        for where, part, mapping in items
        for key in mapping
        if key not in _CRD_FIELDS[(kind, part)]
    ]
