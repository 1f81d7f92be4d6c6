"""The short chaos run (devkit/chaos/harness.py) as part of `make test`: about a minute of
kill -9s, a broker stop, a Redis stop and fake TikTok error bursts against three workers.

SPEC §4: nothing is lost and nothing good is dead-lettered, whatever fails; malformed input
is dead-lettered with its reason. `make chaos` runs the long version and records the figures
in docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devkit.chaos.harness import ChaosPlan, ChaosRun

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_short_chaos_run_loses_nothing(
    kafka_factory: Any, redis_factory: Any, tmp_path: Path
) -> None:
    # Private servers: the run stops and starts them, which the session ones must not see.
    kafka = kafka_factory()
    redis = redis_factory()
    plan = ChaosPlan.short()
    result = ChaosRun(plan, kafka=kafka, redis=redis, workdir=tmp_path / "chaos").run()
    # Shown with -s, and in the report when an assertion fails.
    summary = result.summary() + "\ntimeline:\n" + "\n".join(result.timeline)
    print(summary)

    # The faults really happened.
    assert result.faults["kill -9 worker"] >= 3, summary
    assert result.faults["broker stop"] == 1, summary
    assert result.faults["redis stop"] == 1, summary
    assert sum(result.fake_faults_applied.values()) >= 10, summary
    assert result.fallback_seen, summary  # SPEC §5: local limiter while Redis is away
    assert result.events_expected >= 1500, summary
    assert result.produce_failures == 0, summary

    # SPEC §4: zero loss, nothing good dead-lettered, bad input dead-lettered with its reason.
    assert result.lost == [], summary
    assert result.wrongly_dead_lettered == [], summary
    assert result.malformed_produced > 0, summary
    assert result.malformed_lost == 0, summary
    assert result.malformed_wrong_reason == 0, summary
    assert result.unexpected_accepted == 0, summary
    # Events TikTok's validation rejects (40002 naming their index): each dead-lettered as
    # permanent_api_error, never accepted; the rest of their batches is delivered (lost = 0).
    assert result.rejected_produced > 0, summary
    assert result.rejected_not_dead_lettered == [], summary
    assert result.rejected_wrong_reason == [], summary
    assert result.rejected_accepted == 0, summary
    assert result.drain_s is not None, summary

    # No worker died on its own: the only exits we did not cause are start-ups refused
    # while the broker was down (preflight, exit 1, one line).
    assert result.crashes == {}, summary
    # A clean stop at the end: exit 0 and every offset committed.
    assert result.final_exit_codes == [0] * plan.workers, summary
    assert result.offsets_committed_to_end, summary
