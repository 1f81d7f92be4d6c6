"""The Grafana dashboard and the alert rules the chart ships, checked as code.

- promtool: the rules file is valid, its unit tests pass, and every dashboard expression parses.
- Drift: every metric and label the dashboard and the rules use exists in
  `worker.observability.metrics`,
  and every metric family of the worker is shown on the dashboard.
- Conventions: dashboard variables and selectors; each alert's severity, summary, description,
  runbook section, and a firing and a non-firing promtool case.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from tests import tools
from tests.dashboard_exprs import (
    DATA_PANELS,
    GENERIC_SELECTOR,
    RULES,
    all_expressions,
    dashboard_expressions,
    iter_panels,
    load_dashboard,
    load_rules,
    metric_names,
    raw_dashboard_expressions,
    rule_expressions,
    substitute,
)
from worker.observability.metrics import DLQ_REASONS, REQUEST_OUTCOMES, SKIP_REASONS, Metrics

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL_TEST = ROOT / "tests" / "promtool" / "rules_test.yaml"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
# Labels Prometheus attaches at scrape time (static config or ServiceMonitor).
TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
)
SEVERITIES = frozenset({"critical", "warning", "info"})


# --------------------------------------------------------------------------- helpers


def promtool() -> str:
    tools.require("promtool")
    path = shutil.which("promtool")
    assert path, "promtool not found: run scripts/provision (Debian package prometheus)"
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def metric_catalogue() -> dict[str, tuple[str, frozenset[str]]]:
    """Family name -> (type, label names) of every metric `Metrics` defines."""
    metrics = Metrics(CollectorRegistry())
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            # _labelnames/_name/_type are prometheus_client's own record of the definition.
            kind = value._type
            assert kind is not None, value._name
            out[value._name] = (kind, frozenset(value._labelnames))
    return out


def exposed_names() -> dict[str, tuple[str, frozenset[str]]]:
    """Sample names the worker exposes -> (family, label names usable with that name)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    out: dict[str, tuple[str, frozenset[str]]] = {}
    catalogue = dict(metric_catalogue())
    # The process_* families of prometheus_client's ProcessCollector, on the same registry.
    for collected in Metrics(CollectorRegistry()).registry.collect():
        if collected.name.startswith("process_"):
            catalogue[collected.name] = (collected.type, frozenset())
    for family, (kind, labels) in catalogue.items():
        for suffix in suffixes[kind]:
            extra = {"le"} if suffix == "_bucket" else set()
            out[family + suffix] = (family, labels | extra)
    return out


_SELECTOR_RE = re.compile(r"\b(tiktok_worker_[a-z0-9_]+|process_[a-z_]+|up)\s*\{([^}]*)\}")
_MATCHER_RE = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    for m in _SELECTOR_RE.finditer(expr):
        yield m.group(1), _MATCHER_RE.findall(m.group(2))


def every_expression() -> list[tuple[str, str]]:
    """(where, expression) for the dashboard (raw) and the rules."""
    return [(f"panel {t!r}", e) for t, e in raw_dashboard_expressions()] + [
        (f"alert {a}", e) for a, e in rule_expressions()
    ]


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def operations_sections() -> dict[str, str]:
    """Anchor -> body of each `###` section of docs/operations.md."""
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    parts = re.split(r"^### (.+)$", text, flags=re.MULTILINE)
    return {github_anchor(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}


def alerts() -> list[dict[str, Any]]:
    return [r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r]


# --------------------------------------------------------------------------- promtool


@pytest.mark.tools
def test_promtool_check_rules_accepts_the_rules_file() -> None:
    proc = run_promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout


@pytest.mark.tools
def test_promtool_unit_tests_pass() -> None:
    proc = run_promtool("test", "rules", str(PROMTOOL_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.tools
def test_promtool_unit_tests_detect_a_wrong_expectation(tmp_path: Path) -> None:
    # Guards the harness itself: a test file that expects the wrong thing must fail.
    tests = yaml.safe_load(PROMTOOL_TEST.read_text(encoding="utf-8"))
    tests["rule_files"] = [str(RULES)]
    case = next(c for t in tests["tests"] for c in t["alert_rule_test"] if c["exp_alerts"])
    case["exp_alerts"] = []
    broken = tmp_path / "broken_test.yaml"
    broken.write_text(yaml.safe_dump(tests), encoding="utf-8")
    proc = run_promtool("test", "rules", str(broken))
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_silent_promtool_case() -> None:
    tests = yaml.safe_load(PROMTOOL_TEST.read_text(encoding="utf-8"))
    firing: set[str] = set()
    silent: set[str] = set()
    for group in tests["tests"]:
        for case in group["alert_rule_test"]:
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), "alerts without a firing test"
    assert names - silent == set(), "alerts without a non-firing test"
    assert (firing | silent) - names == set(), "tests of alerts that do not exist"


@pytest.mark.tools
def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    # promtool has no "check expression"; recording rules give every expression to its parser.
    exprs = [e for _, e in dashboard_expressions()]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    proc = run_promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout


@pytest.mark.tools
def test_a_broken_expression_is_caught_by_the_parse_check(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    rule = {"record": "dashboard:broken", "expr": "sum by (topic (rate(x[1m]))"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [rule]}]}))
    assert run_promtool("check", "rules", str(path)).returncode != 0


# --------------------------------------------------------------------------- drift


def test_every_metric_used_exists_in_the_worker_catalogue() -> None:
    exposed = exposed_names()
    for where, expr in every_expression():
        names = metric_names(expr)
        assert names, f"{where} reads no metric: {expr}"
        unknown = names - exposed.keys() - {"up"}
        assert not unknown, f"{where} uses metrics the worker does not expose: {unknown}"


def test_every_label_used_exists_on_its_metric() -> None:
    exposed = exposed_names()
    for where, expr in every_expression():
        usable: set[str] = set(TARGET_LABELS)
        for name, matchers in selectors(expr):
            labels = TARGET_LABELS | (exposed[name][1] if name in exposed else frozenset())
            usable |= labels
            for label, _, _ in matchers:
                assert label in labels, f"{where}: {name} has no label {label!r}"
        for m in _GROUPING_RE.finditer(expr):
            for label in filter(None, (s.strip() for s in m.group(1).split(","))):
                assert label in usable, f"{where}: grouping by unknown label {label!r}"


def test_label_values_come_from_the_worker_vocabularies() -> None:
    vocab = {"reason": set(DLQ_REASONS) | set(SKIP_REASONS), "outcome": set(REQUEST_OUTCOMES)}
    checked = 0
    for where, expr in every_expression():
        for _, matchers in selectors(expr):
            for label, _, value in matchers:
                if label in vocab:
                    checked += 1
                    for alternative in value.split("|"):
                        assert alternative in vocab[label], f"{where}: {label}={alternative!r}"
    assert checked >= 3  # the outcome and reason matchers of the rules and panels


def test_the_dashboard_shows_every_worker_metric() -> None:
    used = {n for _, e in raw_dashboard_expressions() for n in metric_names(e)}
    exposed = exposed_names()
    shown = {exposed[n][0] for n in used if n in exposed}
    assert set(metric_catalogue()) - shown == set()


def test_drift_check_catches_an_unknown_metric() -> None:
    assert "tiktok_worker_no_such_metric" not in exposed_names()
    assert metric_names("rate(tiktok_worker_no_such_metric_total[5m]) / up") == {
        "tiktok_worker_no_such_metric_total",
        "up",
    }


# --------------------------------------------------------------------------- dashboard


def test_dashboard_identity_and_variables() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "tiktok-conversions-worker"
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= variables.keys()
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["pod"]["includeAll"] is True
    assert variables["pod"]["allValue"] == ".*"
    for name in ("namespace", "pod"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert "tiktok_worker_build_info" in variables[name]["definition"]
    # Issue 19: pick one or more destinations.
    dest = variables["destination"]
    assert dest["datasource"]["uid"] == "${datasource}"
    assert dest["definition"].endswith(", destination)")
    assert (dest["includeAll"], dest["allValue"], dest["multi"]) == (True, ".*", True)


def test_every_destination_metric_follows_the_destination_variable() -> None:
    exposed = exposed_names()
    checked = 0
    for title, expr in raw_dashboard_expressions():
        for name, matchers in selectors(expr):
            if name in exposed and "destination" in exposed[name][1]:
                checked += 1
                assert ("destination", "=~", "$destination") in matchers, (title, name)
    assert checked >= 10


def test_the_dashboard_shows_process_memory_cpu_and_fds() -> None:
    used = {n for _, e in raw_dashboard_expressions() for n in metric_names(e)}
    exposed = exposed_names()
    for name in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ):
        assert name in exposed, name
        assert name in used, name


def test_every_panel_queries_the_selected_datasource_namespace_and_pods() -> None:
    panels = [p for p in iter_panels(load_dashboard()) if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            for name, matchers in selectors(target["expr"]):
                got = {(label, op, value) for label, op, value in matchers}
                assert ("namespace", "=", "$namespace") in got, (panel["title"], name)
                assert ("pod", "=~", "$pod") in got, (panel["title"], name)


def test_rates_use_the_rate_interval() -> None:
    for title, expr in raw_dashboard_expressions():
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{title}: range [{window}]"


def test_panel_ids_are_unique_and_the_grid_does_not_overlap() -> None:
    panels = list(iter_panels(load_dashboard()))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_the_panels_the_issue_asks_for_exist() -> None:
    titles = {p["title"] for p in iter_panels(load_dashboard())}
    for title in (
        *DATA_PANELS,
        "Dead letters / s by destination",
        "Events per request",
        "Rate-limit wait",
        "Rate limiter on local fallback",
        "In-flight messages",
        "Paused and assigned partitions",
        "Time since last commit",
    ):
        assert title in titles


def test_substitution_replaces_every_variable() -> None:
    for expr in all_expressions():
        assert "$" not in expr.replace("$labels", "").replace("$value", ""), expr
    got = substitute('x{namespace="$namespace", pod=~"${pod}"}[$__rate_interval]', {"pod": "w-0"})
    assert got == 'x{namespace="", pod=~"w-0"}[1m]'
    with pytest.raises(KeyError):
        substitute("x[$unknown_variable]")


# --------------------------------------------------------------------------- alerts


def test_every_alert_follows_the_conventions() -> None:
    found = alerts()
    names = [a["alert"] for a in found]
    assert len(names) == len(set(names))
    for alert in found:
        name = alert["alert"]
        assert re.fullmatch(r"TiktokWorker[A-Z][A-Za-z]+", name), name
        assert alert["labels"]["severity"] in SEVERITIES, name
        assert "for" in alert, name
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= annotations.keys(), name
        assert "{{" not in annotations["summary"], f"{name}: summary must be static"
        if not alert["expr"].lstrip().startswith("absent("):  # absent() has no labels to name
            assert "{{ $labels." in annotations["description"], f"{name}: names no labels"
        assert annotations["runbook_url"] == f"docs/operations.md#{name.lower()}", name


def test_the_issue_alerts_exist() -> None:
    names = {a["alert"] for a in alerts()}
    assert {
        "TiktokWorkerDown",
        "TiktokWorkerNotCommitting",
        "TiktokWorkerConsumerLagGrowing",
        "TiktokWorkerDeadLetterRateHigh",
        "TiktokWorkerThrottled",
        "TiktokWorkerRequestErrorRateHigh",
        "TiktokWorkerRateLimiterFallback",
        "TiktokWorkerBackpressureStuck",
    } <= names


def test_every_rule_selector_is_the_generic_worker_selector() -> None:
    # The chart narrows GENERIC_SELECTOR to one release; a selector without it would match
    # every release's workers in the cluster.
    for name, expr in rule_expressions():
        found = list(selectors(expr))
        assert found, name
        for metric, matchers in found:
            assert ("job", "=~", ".*tiktok-conversions-worker.*") in matchers, (name, metric)
        assert expr.count(GENERIC_SELECTOR) == len(found), name


def test_every_alert_has_a_runbook_section() -> None:
    sections = operations_sections()
    for alert in alerts():
        anchor = alert["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in sections, f"docs/operations.md has no section for {alert['alert']}"
        body = sections[anchor]
        for part in ("Meaning", "Impact", "Diagnosis", "Action"):
            assert f"**{part}" in body, f"{alert['alert']}: runbook section lacks {part}"
