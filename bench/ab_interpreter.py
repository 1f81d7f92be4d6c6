"""Two interpreter builds, A/B on the same code: decode-only and decode + map (issue 18).

Each run is a fresh process of one interpreter (a virtualenv's python with the lock installed
and this checkout on its path) that measures, like `make bench`'s mapping section, msgspec
decode alone and decode + map with one destination (`documented` presets) over the bench mix,
in events per CPU-second (median and best of the rounds). The two interpreters alternate, the
order swapped every pair, so background load hits both alike; the summary gives B / A per pair
and the median of the pairs.

    flock /tmp/heavy.lock .venv/bin/python bench/ab_interpreter.py \\
        --a /path/to/venv-a/bin/python --b /path/to/venv-b/bin/python [--pairs 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _child(events: int, rounds: int) -> int:
    from bench.bench_mapping import _CONFIG, _rate, make_events
    from bench.common import python_build
    from worker.config import parse_config
    from worker.mapping.mapper import Mapper
    from worker.mapping.segment import decode_event

    sample = make_events(events)
    mapper = Mapper(parse_config(_CONFIG.format(second="")), now=lambda: 1.7e9)
    result = {
        "python": sys.version.split()[0],
        "python_build": python_build(),
        "decode_only": _rate(decode_event, sample, rounds),
        "decode_map": _rate(mapper.map_message, sample, rounds),
    }
    print(json.dumps(result))
    return 0


def _run(python: str, events: int, rounds: int) -> dict[str, Any]:
    proc = subprocess.run(
        [python, str(Path(__file__)), "--child", "--events", str(events), "--rounds", str(rounds)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--a", help="python of the first virtualenv")
    parser.add_argument("--b", help="python of the second virtualenv")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.events, args.rounds)
    if not (args.a and args.b):
        parser.error("--a and --b are required")
    # B / A per pair, by the median round and by the best round (the least disturbed).
    ratios: dict[str, list[float]] = {}
    for pair in range(args.pairs):
        order = ("a", "b") if pair % 2 == 0 else ("b", "a")
        got = {side: _run(getattr(args, side), args.events, args.rounds) for side in order}
        for side in order:
            print(json.dumps({"pair": pair + 1, "side": side, **got[side]}), flush=True)
        for key in ("decode_only", "decode_map"):
            for stat in ("median", "max"):
                ratio = got["b"][key][stat] / got["a"][key][stat]
                ratios.setdefault(f"{key} {stat}", []).append(round(ratio, 3))
    summary = {
        "b_over_a_per_pair": ratios,
        "b_over_a_median_of_pairs": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
