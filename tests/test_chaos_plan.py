"""The chaos suite's plans and report (devkit/chaos), without running servers.

The product-defaults scenario is issue 14's done-when: its plan, the events TikTok must
reject, the worker config and the section it writes to docs/reliability.md are checked here;
the run itself is `python devkit/chaos/run.py --defaults` (part of `make chaos`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devkit.chaos import run as chaos_run
from devkit.chaos.harness import (
    ChaosPlan,
    ChaosResult,
    ChaosRun,
    _invalid_for_tiktok,
)
from devkit.fake_tiktok.validate import CODE_PARAM_ERROR, validate
from devkit.sample_events import SampleEvents
from worker.delivery.codes import decide, event_index

EXE = Path(sys.executable).parent / "tiktok-worker"


def test_defaults_plan_is_the_done_when_scenario() -> None:
    plan = ChaosPlan.defaults()
    assert plan.product_defaults
    assert plan.workers == 3
    assert plan.rate * plan.duration_s == 60_000
    assert plan.duration_s == 120
    assert plan.kill_interval_s == (4.0, 4.0)
    assert plan.outages == ()
    assert plan.reject_share == 0.01
    assert plan.malformed_every == 0
    assert plan.background_fault_rate == 0.0
    # Bursts all through the window, every kind, at most 96 faulted requests in all (about
    # 9% of the requests these runs make; the run measures the share).
    assert {b.label for b in plan.bursts} >= {"http 500", "40100 throttled", "timeouts"}
    assert sum(f["count"] for b in plan.bursts for f in b.faults) == 96
    assert max(b.end_s for b in plan.bursts) <= plan.duration_s
    assert min(b.at_s for b in plan.bursts) < 10
    assert max(b.at_s for b in plan.bursts) > 100


def test_the_short_plan_stays_short_and_rejects_some_events() -> None:
    plan = ChaosPlan.short()
    assert plan.duration_s <= 60
    assert plan.drain_timeout_s <= 90
    assert not plan.product_defaults
    assert plan.reject_share > 0


def _map(event: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    config = tmp_path / "c.yaml"
    config.write_text(
        "destinations:\n  - {name: shop, pixel_code: COQDA8RC77U2TMR44LI0, access_token: t}\n"
    )
    out = subprocess.run(
        [str(EXE), "map", "--config", str(config)],
        input=json.dumps(event) + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    body: dict[str, Any] = json.loads(out.splitlines()[0])["body"]
    return body


@pytest.mark.parametrize("kind", ["track", "page"])
def test_an_invalid_event_is_rejected_by_tiktok_validation_naming_its_index(
    kind: str, tmp_path: Path
) -> None:
    events = SampleEvents(seed=3)
    good = [_map(events.track("Order Completed"), tmp_path) for _ in range(2)]
    source = events.track("Checkout Started") if kind == "track" else events.page()
    bad = _map(_invalid_for_tiktok(source, events), tmp_path)
    body = dict(good[0], data=[good[0]["data"][0], good[1]["data"][0], bad["data"][0]])
    raw = json.dumps(body).encode()

    decoded, rejection = validate(raw, now=body["data"][0]["event_time"])
    assert decoded is not None
    assert rejection is not None
    assert rejection.code == CODE_PARAM_ERROR
    assert event_index(rejection.message) == 2, rejection.message
    assert not decide(rejection.code, rejection.message).request_level
    # Without it, the same request is accepted.
    clean = json.dumps(dict(body, data=body["data"][:2])).encode()
    assert validate(clean, now=body["data"][0]["event_time"])[1] is None


class _Server:
    bootstrap = "127.0.0.1:1"
    url = "redis://127.0.0.1:2/0"


class _Fake:
    url = "http://127.0.0.1:3"


def test_the_defaults_run_configures_only_what_an_operator_must(tmp_path: Path) -> None:
    run = ChaosRun(ChaosPlan.defaults(), kafka=_Server(), redis=_Server(), workdir=tmp_path)
    config = run._config(_Fake())  # type: ignore[arg-type]
    assert set(config["kafka"]) == {
        "bootstrap_servers", "topics", "group_id", "dead_letter_topic", "retry_topic"
    }  # fmt: skip
    assert config["tiktok"] == {"base_url": _Fake.url}
    assert config["rate_limit"] == {"redis_url": _Server.url}
    assert set(config["destinations"][0]) == {"name", "pixel_code", "access_token"}
    path = tmp_path / "worker.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    check = subprocess.run(
        [str(EXE), "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr


def _result(plan: ChaosPlan) -> ChaosResult:
    result = ChaosResult(plan=plan, started_at="2026-12-01T18:00:00+00:00", drain_s=42.5)
    result.fake_requests = 200
    result.requests_by_code = {"0": 120, "40002": 50, "http_500": 30}
    result.fake_faults_applied = {"http_500": 18}
    result.events_per_accepted_request = [1000, 990, 10]
    result.rejected_produced = 500
    return result


def test_each_scenario_replaces_only_its_own_report_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chaos_run, "versions", lambda: "servers")
    report = tmp_path / "reliability.md"
    report.write_text("# Reliability\n\nProse stays.\n")

    chaos_run.write_report(_result(ChaosPlan.long()), "aaa", report)
    chaos_run.write_report(_result(ChaosPlan.defaults()), "bbb", report)
    text = report.read_text()
    assert text.startswith("# Reliability\n\nProse stays.\n")
    assert text.index(chaos_run.REPORT_MARKER) < text.index(chaos_run.DEFAULTS_MARKER)
    assert "| Commit | aaa |" in text
    assert "| Commit | bbb |" in text
    assert "| Requests to TikTok / faulted / answered 40002 | 200 / 9.0% / 25.0% |" in text
    assert "| Events per accepted request (median) | 990 |" in text
    assert "| **Drain time after the last fault** | **42.5 s** |" in text

    chaos_run.write_report(_result(ChaosPlan.long()), "ccc", report)
    text = report.read_text()
    assert "| Commit | aaa |" not in text
    assert "| Commit | ccc |" in text
    assert "| Commit | bbb |" in text
    assert text.count(chaos_run.REPORT_MARKER) == 1
    assert text.count(chaos_run.DEFAULTS_MARKER) == 1
    assert "Prose stays." in text
