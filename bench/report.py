"""Ratios, target verdicts and the Markdown table of `make bench` (from results.json data)."""

from __future__ import annotations

from typing import Any

NA = "n/a"

TARGETS: dict[str, float] = {
    "decode_map_events_per_s": 50_000,
    "e2e_events_per_s": 40_000,
    "e2e_over_decode": 0.35,
    # Issue 18: ratios within one run.
    "e2e_over_raw": 0.5,
    "decode_map_over_decode": 0.35,
    "two_over_one_process": 1.8,
    "two_destinations_over_one": 0.7,
    "events_per_request": 500,
    "ratelimit_utilisation": 0.95,
    "peak_rss_mb": 200,
    "latency_p99_over_linger_ms": 100,
    "lanes_outage_over_healthy": 0.9,
    "lanes_throttled_events_per_request": 500,
    "parking_outage_over_healthy": 0.9,
}


def dig(data: Any, *keys: str) -> Any:
    """`data[k1][k2]...`, or None as soon as a level is missing."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Ratios of medians (see docs/benchmarks.md for what each means)."""
    raw = dig(results, "raw_consume", "events_per_s", "median")
    decode = dig(results, "decode_only", "median")
    decode_map = dig(results, "decode_map", "median")
    e2e = dig(results, "e2e_1_process", "events_per_s", "median")
    e2e_cpu = dig(results, "e2e_1_process", "events_per_worker_cpu_s", "median")
    base = dig(results, "baseline_one_request_per_event", "events_per_s", "median")
    out: dict[str, Any] = {
        "e2e_over_raw": _ratio(e2e, raw),
        "e2e_wall_over_decode": _ratio(e2e, decode),
        "e2e_per_cpu_over_decode": _ratio(e2e_cpu, decode),
        "e2e_per_cpu_over_decode_map": _ratio(e2e_cpu, decode_map),
        "two_over_one_process": _ratio(
            dig(results, "e2e_2_processes", "events_per_s", "median"), e2e
        ),
        "e2e_over_baseline": _ratio(e2e, base),
        "decode_map_over_decode": _ratio(decode_map, decode),
        "two_destinations_over_one": _ratio(
            dig(results, "e2e_1_process_2_destinations", "events_per_s", "median"), e2e
        ),
    }
    run_cores = dig(results, "e2e_1_process", "run_cores", "median")
    cores = dig(results, "machine", "cpu_count")
    if run_cores and cores:
        # If CPU were all that bounds it, N processes could go as far as the machine's cores
        # allow for the cores one process's run (worker + fake TikTok + broker) takes.
        out["two_over_one_process_cpu_ceiling"] = round(min(2.0, cores / run_cores), 2)
    mapped = dig(results, "topic", "mapped_per_message")
    per_request = dig(results, "e2e_1_process", "events_per_request", "median")
    if mapped and per_request:
        # At TikTok's ~1000 requests/s per app, one event per request caps TikTok events/s at
        # 1000, i.e. Segment events/s at 1000 / mapped; batching multiplies that by the batch.
        out["at_tiktok_cap_baseline_events_per_s"] = round(1000 / mapped)
        out["at_tiktok_cap_batched_events_per_s"] = round(1000 * per_request / mapped)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return NA
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{int(value):,}"


def _verdict(ok: bool | None) -> str:
    return NA if ok is None else ("meets" if ok else "**below**")


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def _at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


class _Table:
    def __init__(self) -> None:
        self.rows = [
            "| # | figure | min | median | max | unit | target | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]

    def add(
        self,
        name: str,
        figures: dict[str, Any] | None,
        unit: str,
        target: str = NA,
        ok: bool | None = None,
    ) -> None:
        f = figures or {}
        cells = " | ".join(_fmt(f.get(k)) for k in ("min", "median", "max"))
        self.rows.append(f"| {name} | {cells} | {unit} | {target} | {_verdict(ok)} |")


def _single(value: float | None) -> dict[str, Any]:
    return {"min": value, "median": value, "max": value}


def markdown(results: dict[str, Any]) -> str:
    """The results table (README quotes it) and the ratio table."""
    t = TARGETS
    d = results.get("derived") or derive(results)
    m = results["machine"]
    r = results
    table = _Table()
    table.add(
        "1 raw consume (confluent-kafka, no processing)",
        dig(r, "raw_consume", "events_per_s"),
        "events/s",
    )
    table.add("2 decode only (msgspec typed)", dig(r, "decode_only"), "events/CPU-s")
    table.add(
        "3 decode + map (1 destination)",
        dig(r, "decode_map"),
        "events/CPU-s",
        f">= {t['decode_map_events_per_s']:,.0f}",
        _at_least(dig(r, "decode_map", "median"), t["decode_map_events_per_s"]),
    )
    e2e = dig(r, "e2e_1_process", "events_per_s")
    table.add(
        "4 end to end, 1 worker process",
        e2e,
        "events/s",
        f">= {t['e2e_events_per_s']:,.0f}",
        _at_least(dig(e2e, "median"), t["e2e_events_per_s"]),
    )
    per_cpu = dig(r, "e2e_1_process", "events_per_worker_cpu_s")
    table.add(
        "4 same, per CPU-second of the worker",
        per_cpu,
        "events/CPU-s",
        f">= {t['e2e_events_per_s']:,.0f}",
        _at_least(dig(per_cpu, "median"), t["e2e_events_per_s"]),
    )
    table.add(
        "4 end to end, 2 worker processes", dig(r, "e2e_2_processes", "events_per_s"), "events/s"
    )
    table.add(
        "4 end to end, 1 worker process, 2 destinations (every event to both), Segment events",
        dig(r, "e2e_1_process_2_destinations", "events_per_s"),
        "events/s",
    )
    table.add(
        "4 end to end, 1 process, Redis rate limiter",
        dig(r, "e2e_1_process_redis_limiter", "events_per_s"),
        "events/s",
    )
    table.add(
        "5 baseline: one request per event",
        dig(r, "baseline_one_request_per_event", "events_per_s"),
        "events/s",
    )
    per_request = dig(r, "e2e_1_process", "events_per_request")
    table.add(
        "5 TikTok events per request under backlog",
        per_request,
        "events/request",
        f">= {t['events_per_request']:.0f}",
        _at_least(dig(per_request, "median"), t["events_per_request"]),
    )
    budget = dig(r, "ratelimit", "budget_qps")
    for n, rl in (dig(r, "ratelimit", "by_processes") or {}).items():
        frac = rl["fraction_of_budget"]
        table.add(
            f"6 rate limit, {n} process(es): achieved / budget",
            frac,
            "fraction",
            f">= {t['ratelimit_utilisation']}",
            _at_least(frac["min"], t["ratelimit_utilisation"]),
        )
        worst = rl["worst_window_release"]
        table.add(
            f"6 rate limit, {n} process(es): worst 1-s window, by release",
            worst,
            f"requests (budget {budget:g}/s)",
            f"<= {budget:g} (+1)",
            _at_most(worst["max"], budget + 1),
        )
        table.add(
            f"6 rate limit, {n} process(es): worst 1-s window, by arrival",
            rl["worst_window_arrival"],
            "requests",
        )
    arrival = r.get("arrival")
    if arrival:
        budget = arrival["budget_qps"]
        for run in arrival["runs"].values():
            what = f"{run['processes']} worker process(es), {run['busy_loops']} busy loops"
            if run.get("headroom") not in (None, "default"):
                what += f", headroom {run['headroom']:g}"
            restart = "redis_down_s" in run
            if restart:
                what += f", Redis down {run['redis_down_s']:g} s"
            bound = 1.1 * budget if restart else budget + 1
            table.add(
                f"6b {what}: worst 1-s window by arrival",
                _single(run["worst_window"]),
                f"requests (budget {budget:g}/s)",
                f"<= {bound:g}",
                _at_most(run["worst_window"], bound),
            )
            table.add(
                f"6b {what}: budget used by arrival",
                _single(run["budget_used"]),
                "fraction",
                f">= {t['ratelimit_utilisation']}",
                _at_least(run["budget_used"], t["ratelimit_utilisation"]),
            )
    mem = r.get("memory")
    if mem:
        done = "drained" if mem["drained"] else f"{mem['messages_done_estimate']:,} done"
        table.add(
            f"7 peak RSS, {mem['backlog_messages']:,}-message backlog, slow fake ({done})",
            _single(mem["peak_rss_mb"]),
            "MB",
            f"<= {t['peak_rss_mb']:.0f}",
            _at_most(mem["peak_rss_mb"], t["peak_rss_mb"]),
        )
    lat = r.get("latency")
    if lat:
        bound = lat["batch_linger_ms"] + t["latency_p99_over_linger_ms"]
        rate = f"{lat['rate_events_per_s']:,} events/s"
        table.add(f"8 latency p50, produce to acceptance, {rate}", lat["p50_ms"], "ms")
        table.add(
            f"8 latency p99, produce to acceptance, {rate}",
            lat["p99_ms"],
            "ms",
            f"<= {bound:.0f}",
            _at_most(dig(lat, "p99_ms", "median"), bound),
        )
    lanes = r.get("lanes")
    if lanes:
        table.add(
            "9 healthy destination's events/s, other destination healthy",
            lanes.get("b_events_per_s_healthy"),
            "events/s",
        )
        table.add(
            "9 same, other destination answering 503",
            lanes.get("b_events_per_s_outage"),
            "events/s",
        )
        ratio = lanes.get("outage_over_healthy")
        table.add(
            "9 ratio of the medians: during the outage / without",
            _single(ratio),
            "fraction",
            f">= {t['lanes_outage_over_healthy']}",
            _at_least(ratio, t["lanes_outage_over_healthy"]),
        )
        per_request = dig(lanes, "throttled", "events_per_request")
        table.add(
            "9 events per request, one lane at 2 requests/s with a backlog",
            per_request,
            "events/request",
            f">= {t['lanes_throttled_events_per_request']:.0f}",
            _at_least(dig(per_request, "median"), t["lanes_throttled_events_per_request"]),
        )
    parking = r.get("parking")
    if parking:
        steady = parking.get("steady") or {}
        if steady:
            ratio_value = steady.get("outage_over_healthy")
            single = {"min": ratio_value, "median": ratio_value, "max": ratio_value}
            table.add(
                "10 healthy destination's events/s during a 2-minute outage of another, "
                "steady stream, over the same without the outage",
                single if ratio_value is not None else None,
                "fraction",
                f">= {t['parking_outage_over_healthy']}",
                _at_least(ratio_value, t["parking_outage_over_healthy"]),
            )
            for label in ("healthy", "outage"):
                p99 = steady.get(label, {}).get("b_latency_p99_s")
                table.add(
                    f"10 same, healthy destination's produce→acceptance p99, other {label}",
                    {"min": p99, "median": p99, "max": p99} if p99 is not None else None,
                    "s",
                )
            lag = steady.get("outage", {}).get("source_lag_max")
            table.add(
                "10 same, source lag during the outage, maximum",
                {"min": lag, "median": lag, "max": lag} if lag is not None else None,
                "messages",
            )
        ratio = parking.get("outage_over_healthy")
        table.add(
            "10 healthy destination during another's outage, backlog above the in-flight bound",
            ratio,
            "fraction",
            f">= {t['parking_outage_over_healthy']}",
            _at_least(dig(ratio, "median"), t["parking_outage_over_healthy"]),
        )
        table.add(
            "10 end of the outage to an empty retry backlog",
            parking.get("recovery_to_empty_s"),
            "s",
        )
        for key, label in (
            ("source_lag_max", "10 source lag during the outage, maximum"),
            ("source_lag_when_b_done", "10 source lag when the healthy backlog was delivered"),
        ):
            values = [run["outage"].get(key) for run in parking.get("runs", [])]
            found = sorted(float(v) for v in values if v is not None)
            figures = (
                {"min": found[0], "median": found[len(found) // 2], "max": found[-1]}
                if found
                else None
            )
            table.add(label, figures, "messages")
    header = (
        f"Measured {r.get('finished_at')} ({r.get('mode')} run, {r.get('duration_s', 0):.0f} s) "
        f"on {m['cpu_count']} cores ({m['cpu_model']}); Python {m['python']}, "
        f"confluent-kafka {m['confluent_kafka']} / librdkafka {m['librdkafka']}, "
        f"Kafka {m['kafka']}, msgspec {m['msgspec']}, aiohttp {m['aiohttp']}. "
        f"Load average {m['load_average_at_start']} at start; other jobs used a median of "
        f"{_fmt(dig(r, 'e2e_1_process', 'others_cores', 'median'))} of the 2 cores during the "
        "1-process end-to-end runs."
    )
    # The image runs Debian's python3.11 (docs/benchmarks.md); say which build was measured.
    header += f" Interpreter build: {m.get('python_build', 'not recorded')}."
    ratios = [
        "| ratio of medians | value | target |",
        "|---|---|---|",
        "| (4) / (1): end to end over raw consume | "
        f"{_fmt(d.get('e2e_over_raw'))} | >= {t['e2e_over_raw']} |",
        "| (3) / (2): decode + map over decode only | "
        f"{_fmt(d.get('decode_map_over_decode'))} | >= {t['decode_map_over_decode']} |",
        "| (4) with 2 destinations / (4) with 1, Segment events/s | "
        f"{_fmt(d.get('two_destinations_over_one'))} | >= {t['two_destinations_over_one']} |",
        "| (4) per worker CPU-s / (2) decode per CPU-s | "
        f"{_fmt(d.get('e2e_per_cpu_over_decode'))} | >= {t['e2e_over_decode']} |",
        "| (4) wall clock / (2) decode per CPU-s | "
        f"{_fmt(d.get('e2e_wall_over_decode'))} | >= {t['e2e_over_decode']} |",
        "| (4) per worker CPU-s / (3) decode+map per CPU-s | "
        f"{_fmt(d.get('e2e_per_cpu_over_decode_map'))} | {NA} |",
        "| 2 processes / 1 process | "
        f"{_fmt(d.get('two_over_one_process'))} | >= {t['two_over_one_process']} |",
        "| 2 processes / 1 process, the most the machine's cores allow: cores / cores taken by "
        "the 1-process run (worker + fake TikTok + broker, median "
        f"{_fmt(dig(r, 'e2e_1_process', 'run_cores', 'median'))}) | "
        f"{_fmt(d.get('two_over_one_process_cpu_ceiling'))} | {NA} |",
        "| (4) / (5): batched over one request per event | "
        f"{_fmt(d.get('e2e_over_baseline'))} | {NA} |",
        "| ceiling set by TikTok's 1000 requests/s per app, Segment events/s: "
        "one request per event vs batched | "
        f"{_fmt(d.get('at_tiktok_cap_baseline_events_per_s'))} vs "
        f"{_fmt(d.get('at_tiktok_cap_batched_events_per_s'))} | {NA} |",
    ]
    return "\n".join([header, "", *table.rows, "", *ratios]) + "\n"
