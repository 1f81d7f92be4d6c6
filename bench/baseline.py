"""The Segment-style baseline: one request per event, no batching, the same fake server.

It is the worker itself with `tiktok.max_batch_events: 1` (everything else as in the batched
runs: 64 concurrent requests, the same mapping, rate limit 100000/s local), so the only
difference measured is batching. Segment's cloud destination also sends one request per event
(docs/segment-tiktok-destination.md), and at TikTok's limit of about 1000 requests/s per app
it can never exceed about 1000 TikTok events/s per app, whatever its own speed.
"""

from __future__ import annotations

from typing import Any

from bench.common import BenchEnv
from bench.e2e import WorkerSpec, run_e2e

BASELINE_SPEC = WorkerSpec(tiktok={"max_batch_events": 1})


def run_baseline(
    env: BenchEnv, *, topic: str, messages: int, expected_events: int, name: str
) -> dict[str, Any]:
    return run_e2e(
        env,
        topic=topic,
        messages=messages,
        expected_events=expected_events,
        spec=BASELINE_SPEC,
        name=name,
    )
