"""Every PromQL expression the chart ships: the Grafana dashboard's and the alert rules'.

Used by tests/test_dashboard_rules.py (syntax, metric drift) and by the end-to-end test that
runs each expression against a real Prometheus scraping a real worker.

- `dashboard_expressions(variables)`: (panel title, expression) for every dashboard target,
  with Grafana's variables substituted (`$namespace`, `${datasource}`, `$__rate_interval`...).
- `rule_expressions(selector)`: (alert name, expression) for every rule in files/rules.yaml,
  optionally with the generic worker selector replaced, as the chart does per release.
- `all_expressions(variables, selector)`: both, expressions only.

Default substitutions suit a Prometheus that scrapes the worker directly, outside Kubernetes:
`namespace=""` matches series without a namespace label and `pod=~".*"` matches any (or none).
The rules expect the scrape job's name to contain "tiktok-conversions-worker".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
FILES: Final = ROOT / "helm" / "tiktok-conversions-worker" / "files"
DASHBOARD: Final = FILES / "dashboard.json"
RULES: Final = FILES / "rules.yaml"

# The selector files/rules.yaml uses for "this worker"; the chart replaces it per release.
GENERIC_SELECTOR: Final = 'job=~".*tiktok-conversions-worker.*"'

DEFAULT_VARIABLES: Final[Mapping[str, str]] = {
    "datasource": "prometheus",
    "namespace": "",
    "pod": ".*",
    "destination": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}

# Panels whose queries must return data once the worker has consumed, delivered and
# dead-lettered something (the end-to-end test's check that the dashboard shows real data).
DATA_PANELS: Final = (
    "Messages consumed / s",
    "Events mapped and delivered / s",
    "Dead letters / s by reason",
    "Requests / s by outcome",
    "Request latency",
    "Consumer lag per partition",
)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def load_rules() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return data


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace Grafana variables (`$name`, `${name}`, `[[name]]`) with values."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for Grafana variable {name!r} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", repl, expr)


def raw_dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) as written in dashboard.json."""
    return [
        (panel["title"], target["expr"])
        for panel in iter_panels(load_dashboard())
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def dashboard_expressions(variables: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    return [(title, substitute(expr, variables)) for title, expr in raw_dashboard_expressions()]


def rule_expressions(selector: str | None = None) -> list[tuple[str, str]]:
    """(alert or record name, expression); `selector` replaces the generic worker selector."""
    out = []
    for group in load_rules()["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"].strip()
            if selector is not None:
                expr = expr.replace(GENERIC_SELECTOR, selector)
            out.append((rule.get("alert") or rule["record"], expr))
    return out


def all_expressions(
    variables: Mapping[str, str] | None = None, selector: str | None = None
) -> list[str]:
    """Every expression of the dashboard (variables substituted) and of the alert rules."""
    return [e for _, e in dashboard_expressions(variables)] + [
        e for _, e in rule_expressions(selector)
    ]


_METRIC_RE: Final = re.compile(r"\b(tiktok_worker_[a-z0-9_]+|process_[a-z_]+|up)\b(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (the worker's and its `process_*`, plus `up`)."""
    return set(_METRIC_RE.findall(expr))
