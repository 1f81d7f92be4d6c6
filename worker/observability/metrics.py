"""Every Prometheus metric the worker exposes, defined once.

Label values come only from bounded sets: configured destination names, configured TikTok
event names, topics and partitions of the subscription, and the fixed reason/outcome
vocabularies of `worker.core.vocabulary`. Never a user id, event id or message content.

Counters and histograms are exposed without their `_created` series (prometheus_client adds one
per child by default): they would double the series count and no dashboard or rule reads them.
Who updates what: the pipeline (consumed, mapped, skipped, delivered, in-flight), the sender
(requests, latency, batch size, retries, circuit state), the retry producer (parked), the
retry intake (parked events waiting), the dead-letter producer (dead letters, on broker
acknowledgement), the rate limiter (wait, fallback), the consumer thread (paused, assigned,
commits, last commit, rebalances) and `worker.kafka.lag` (consumer lag). prometheus_client's
`ProcessCollector` adds the standard `process_*` families (read from /proc at scrape time).
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

from worker import __version__
from worker.core.vocabulary import (
    CommitResult,
    DeadLetterReason,
    Outcome,
    ParkReason,
    RebalanceKind,
    SkipReason,
)

# Fixed label vocabularies (documented in the README's metrics table), from the enums.
SKIP_REASONS: Final = tuple(r.value for r in SkipReason)
DLQ_REASONS: Final = tuple(r.value for r in DeadLetterReason)
REQUEST_OUTCOMES: Final = tuple(o.value for o in Outcome)
COMMIT_RESULTS: Final = tuple(r.value for r in CommitResult)
REBALANCE_KINDS: Final = tuple(k.value for k in RebalanceKind)
PARK_REASONS: Final = tuple(r.value for r in ParkReason)

_LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 750, 1000)
_WAIT_BUCKETS_S: Final = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


class Metrics:
    """The metric catalogue, registered on one (injectable) registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide: module doc
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "tiktok_worker_"
        self.messages_consumed = Counter(
            p + "messages_consumed", "Kafka messages consumed.", ["topic"], registry=r
        )
        self.events_mapped = Counter(
            p + "events_mapped",
            "TikTok events produced by mapping, per destination and TikTok event name.",
            ["destination", "event"],
            registry=r,
        )
        self.events_skipped = Counter(
            p + "events_skipped",
            "Segment events that matched no destination or subscription.",
            ["reason"],
            registry=r,
        )
        self.events_delivered = Counter(
            p + "events_delivered",
            "TikTok events accepted by TikTok (code 0).",
            ["destination"],
            registry=r,
        )
        self.dead_letters = Counter(
            p + "dead_letters",
            "Records written to the dead-letter topic.",
            ["reason", "destination"],
            registry=r,
        )
        self.requests = Counter(
            p + "requests",
            "Events API requests by outcome.",
            ["destination", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "Events API request latency.",
            ["destination"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_events = Histogram(
            p + "batch_events",
            "Events per Events API request.",
            ["destination"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            p + "retries",
            "Batches scheduled for another attempt.",
            ["destination"],
            registry=r,
        )
        self.rate_limit_wait = Histogram(
            p + "rate_limit_wait_seconds",
            "Time a request waited for the shared rate limit.",
            buckets=_WAIT_BUCKETS_S,
            registry=r,
        )
        self.rate_limit_fallback = Gauge(
            p + "rate_limit_fallback",
            "1 while the rate limiter runs on its local fallback (Redis unreachable).",
            registry=r,
        )
        self.lane_inflight_events = Gauge(
            p + "lane_inflight_events",
            "Events queued or in requests, per destination lane.",
            ["destination"],
            registry=r,
        )
        self.circuit_state = Gauge(
            p + "destination_circuit_state",
            "Circuit of each destination: 0 closed, 1 half-open (one probe), 2 open (parking).",
            ["destination"],
            registry=r,
        )
        self.events_parked = Counter(
            p + "events_parked",
            "Events written to the retry topic (acknowledged by the broker), by reason.",
            ["destination", "reason"],
            registry=r,
        )
        self.parked_backlog = Gauge(
            p + "parked_backlog_messages",
            "Parked records in the retry topic the retry intake has not committed yet, per "
            "partition this worker holds (the retry group's lag).",
            ["topic", "partition"],
            registry=r,
        )
        self.parked_waiting = Gauge(
            p + "parked_waiting_events",
            "Parked events this worker has read from the retry topic and holds until due.",
            registry=r,
        )
        self.rate_limit_late_slots = Counter(
            p + "rate_limit_late_slots",
            "Requests released later than the headroom absorbs; each left one slot empty.",
            registry=r,
        )
        self.inflight_messages = Gauge(
            p + "inflight_messages",
            "Kafka messages consumed but not yet finished (delivered, skipped or dead-lettered).",
            registry=r,
        )
        self.paused_partitions = Gauge(
            p + "paused_partitions",
            "Assigned partitions currently paused by backpressure.",
            registry=r,
        )
        self.assigned_partitions = Gauge(
            p + "assigned_partitions", "Partitions assigned to this worker.", registry=r
        )
        self.consumer_lag = Gauge(
            p + "consumer_lag_messages",
            "Messages not yet committed by the group (high watermark - committed offset), per "
            "partition this worker holds.",
            ["topic", "partition"],
            registry=r,
        )
        self.last_commit_timestamp = Gauge(
            p + "last_commit_timestamp_seconds",
            "Unix time of the last successful offset commit.",
            registry=r,
        )
        self.commits = Counter(p + "commits", "Offset commits by result.", ["result"], registry=r)
        self.rebalances = Counter(
            p + "rebalances", "Partition assignment changes.", ["kind"], registry=r
        )
        self.build_info = Gauge(
            p + "build_info", "Build information; always 1.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        # The standard process_* families (CPU seconds, resident/virtual memory, open and max
        # fds, start time) on this registry, so /metrics carries them: memory against the
        # pod's limit is what an OOMKilled investigation starts from.
        ProcessCollector(registry=r)
        # Joins any per-destination series to its event source (web, crm, offline, app), so
        # dashboards split by source without a second label on every counter:
        # `... * on (destination) group_left (event_source) tiktok_worker_destination_info`.
        self.destination_info = Gauge(
            p + "destination_info",
            "One series per configured destination, labelled with its TikTok event source; "
            "always 1.",
            ["destination", "event_source"],
            registry=r,
        )

    def describe_destinations(self, sources: dict[str, str]) -> None:
        """Publish `destination_info` for the configured destinations (name -> source)."""
        for name, source in sources.items():
            self.destination_info.labels(destination=name, event_source=source).set(1)
