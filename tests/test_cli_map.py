"""`tiktok-worker map` and `tiktok-worker check-config`, run as the installed command."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "tiktok-worker"
TOKEN = "tok-SECRET-0123456789"
CONFIG = """
kafka:
  client: {sasl.password: kafka-SECRET}
tiktok: {max_event_age_s: null}  # the events below have fixed (old) timestamps
rate_limit: {redis_url: "redis://:redis-SECRET@localhost:6379/0"}
destinations:
  - name: web-shop
    pixel_code: COQDA8RC77U2TMR44LI0
    access_token: ${TT_TOKEN}
    test_event_code: TEST04030
  - name: second
    pixel_code: BU35TSQHT2A1QT375OMG
    access_token: other-SECRET
    presets: none
    subscriptions:
      - name: Everything tracked
        trigger: 'type = "track"'
        event: CustomEvent
"""


def run_cli(
    *args: str, stdin: str = "", env_token: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if env_token:
        env["TT_TOKEN"] = TOKEN
    return subprocess.run(
        [str(EXE), *args], input=stdin, capture_output=True, text=True, env=env, timeout=60
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


def test_map_skips_events_older_than_max_event_age(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("tiktok: {max_event_age_s: null}", "tiktok: {}"))
    now = time.time()
    events = [
        {"type": "page", "messageId": "old", "timestamp": _iso(now - 172800 - 60)},
        {"type": "page", "messageId": "new", "timestamp": _iso(now - 172800 + 600)},
    ]
    stdin = "\n".join(json.dumps(e) for e in events) + "\n"
    result = run_cli("map", "--config", str(config), stdin=stdin)
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert out[0] == {"index": 0, "skipped": "too_old"}
    assert len(out) == 2
    assert out[1]["index"] == 1
    assert out[1]["destination"] == "web-shop"
    assert "body" in out[1]


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat().replace("+00:00", "Z")


def test_map_prints_one_line_per_result(config_file: Path, tmp_path: Path) -> None:
    events = [
        {
            "type": "page",
            "messageId": "p1",
            "timestamp": "2024-01-08T13:52:50.212Z",
            "properties": {"email": "Jane@Example.com"},
        },
        {"type": "identify", "userId": "u"},
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "o1",
            "timestamp": "2024-01-08T13:52:50Z",
            "properties": {"value": "$100"},
        },
    ]
    lines = [json.dumps(e) for e in events] + [
        "",
        "this is not json",
        json.dumps([events[0], {"type": "x"}]),
    ]
    input_file = tmp_path / "events.jsonl"
    input_file.write_text("\n".join(lines) + "\n")
    result = run_cli("map", "--config", str(config_file), "--input", str(input_file))
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert out[0]["index"] == 0
    assert (out[0]["destination"], out[0]["subscription"]) == ("web-shop", "View Content")
    body = out[0]["body"]
    assert body["event_source_id"] == "COQDA8RC77U2TMR44LI0"
    assert body["test_event_code"] == "TEST04030"
    (data,) = body["data"]
    assert data["event"] == "ViewContent"
    assert data["event_id"] == "p1"
    assert data["event_time"] == 1704721970
    assert data["user"]["email"] == [hashlib.sha256(b"jane@example.com").hexdigest()]
    assert out[1] == {"index": 1, "skipped": "no_match"}
    # Order Completed with an unusable value: invalid for both destinations (both map
    # `value` with the default paths), one line each; stdout keeps the spec's exact shape and
    # the reasons go to stderr, without the offending value.
    assert out[2:4] == [{"index": 2, "invalid": "invalid_event"}] * 2
    errors = result.stderr.splitlines()
    # stderr names the file's own line (1-based, the blank line counted), stdout's index
    # counts non-blank lines from 0 (the spec's shape).
    assert errors[0].startswith("tiktok-worker map: line 3 destination web-shop: invalid_event: ")
    assert errors[1].startswith(
        "tiktok-worker map: line 3 destination second: invalid_event: "
        "value ($.properties.value | $.properties.revenue)"
    )
    assert "$100" not in result.stdout + result.stderr
    assert out[4] == {"index": 3, "invalid": "decode_error"}
    assert errors[2].startswith("tiktok-worker map: line 5: decode_error: not valid JSON")
    assert [o["index"] for o in out[5:]] == [4, 4]
    assert out[5]["subscription"] == "View Content"
    assert out[6] == {"index": 4, "invalid": "invalid_event"}
    assert errors[3].startswith("tiktok-worker map: line 6 event 1: invalid_event: ")
    assert len(errors) == 4
    assert len(out) == 7
    assert "Jane@Example.com" not in result.stdout


def test_map_reads_stdin_and_bodies_are_single_event_requests(config_file: Path) -> None:
    event = json.dumps(
        {
            "type": "track",
            "event": "Checkout Started",
            "messageId": "c1",
            "properties": {"products": [{"product_id": "a"}, {"product_id": "b"}]},
        }
    )
    result = run_cli("map", "--config", str(config_file), stdin=event + "\n")
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["destination"], o["subscription"]) for o in out] == [
        ("web-shop", "Initiate Checkout"),
        ("second", "Everything tracked"),
    ]
    for o in out:
        assert len(o["body"]["data"]) == 1
    assert out[0]["body"]["data"][0]["properties"]["contents"] == [
        {"content_id": "a"},
        {"content_id": "b"},
    ]
    assert "test_event_code" not in out[1]["body"]


def test_map_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("destinations:\n  - name: a\n    access_token: t\n")
    result = run_cli("map", "--config", str(path), stdin="{}\n")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tiktok-worker: configuration error: destinations[0].pixel_code: required"
    )
    assert "Traceback" not in result.stderr


def test_map_with_a_missing_input_exits_1(config_file: Path, tmp_path: Path) -> None:
    result = run_cli("map", "--config", str(config_file), "--input", str(tmp_path / "none.jsonl"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr


def test_check_config_prints_masked_config(config_file: Path) -> None:
    result = run_cli("check-config", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# configuration OK: 2 destination(s): web-shop, second")
    assert "SECRET" not in result.stdout
    assert "SECRET" not in result.stderr
    assert "access_token: '***'" in result.stdout
    assert "pixel_code: COQDA8RC77U2TMR44LI0" in result.stdout
    assert "partner_name: Segment" in result.stdout


def test_check_config_unset_variable_exits_2_naming_it(config_file: Path) -> None:
    result = run_cli("check-config", "--config", str(config_file), env_token=False)
    assert result.returncode == 2
    assert "destinations[0].access_token: environment variable TT_TOKEN is not set" in result.stderr
    assert result.stdout == ""


def test_check_config_bad_trigger_exits_2_with_position(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "destinations:\n  - name: a\n    pixel_code: P\n    access_token: T\n"
        "    when: 'type = \"page\" and'\n"
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().endswith("at position 18")
    assert "destinations[0].when:" in result.stderr


FOUR_SOURCES = """
tiktok: {max_event_age_s: null}  # the event below has a fixed (old) timestamp
destinations:
  - {name: web-shop, pixel_code: PIXELWEB01, access_token: t, presets: all}
  - name: leads
    event_source: crm
    pixel_code: CRMSET01
    access_token: t
    subscriptions: [{name: Qualified, trigger: 'event = "Order Completed"', event: QualifiedLead}]
  - {name: stores, event_source: offline, event_set_id: EVSET01, access_token: t,
     test_event_code: TEST00001}
  - {name: mobile, event_source: app, tiktok_app_id: "7000000001", access_token: t}
"""


def test_map_shows_each_sources_body_as_sent(tmp_path: Path) -> None:
    path = tmp_path / "sources.yaml"
    path.write_text(FOUR_SOURCES)
    event = {
        "type": "track",
        "event": "Order Completed",
        "messageId": "m1",
        "timestamp": "2024-01-08T13:52:50.212Z",
        "userId": "u1",
        "context": {"app": {"namespace": "com.example"}, "device": {"type": "android"}},
        "properties": {
            "lead_id": "L1",
            "currency": "USD",
            "value": 3,
            "products": [{"product_id": "p1", "price": 3}],
        },
    }
    result = run_cli("map", "--config", str(path), stdin=json.dumps(event) + "\n")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    heads = {
        line["destination"]: (
            line["body"]["event_source"],
            line["body"]["event_source_id"],
            line["body"]["data"][0]["event"],
        )
        for line in lines
    }
    assert heads == {
        "web-shop": ("web", "PIXELWEB01", "CompletePayment"),
        "leads": ("crm", "CRMSET01", "QualifiedLead"),
        "stores": ("offline", "EVSET01", "CompletePayment"),
        "mobile": ("app", "7000000001", "Purchase"),
    }
    by_name = {line["destination"]: line["body"] for line in lines}
    # Each source's own shape: offline's test code inside the event, app's app object,
    # CRM's lead, and the offline user keys in Segment's order.
    assert "test_event_code" not in by_name["stores"]
    assert by_name["stores"]["data"][0]["test_event_code"] == "TEST00001"
    offline_user = by_name["stores"]["data"][0]["user"]
    assert list(offline_user) == ["external_id", "phone", "email", "lead_id"]
    assert by_name["mobile"]["data"][0]["app"] == {"app_id": "com.example"}
    assert by_name["leads"]["data"][0]["lead"] == {"lead_id": "L1"}


def test_check_config_rejects_an_app_event_outside_tiktoks_list(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "destinations:\n"
        "  - {name: mobile, event_source: app, tiktok_app_id: '1', access_token: t,\n"
        "     subscriptions: [{name: x, trigger: 'type = \"track\"', event: CompletePayment}]}\n"
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(
        "tiktok-worker: configuration error: destinations[0].subscriptions[0].event: "
        "'CompletePayment' is not a TikTok app event"
    )
    assert "Traceback" not in result.stderr
