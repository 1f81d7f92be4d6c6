"""`make demo`: the whole product on this machine in about a minute.

Starts Apache Kafka, Redis and the fake TikTok server on loopback, creates the topics, produces
a few thousand realistic Segment events (with some malformed messages and a few events TikTok
rejects), runs the worker until everything is committed, prints what happened, and stops it all.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import (
    FakeTikTokProcess,
    WorkerProcess,
    committed_offsets,
    headers_of,
    metric_value,
    produce,
    read_topic,
    wait_until,
    worker_config,
    write_config,
)
from tests.infra.kafka import KafkaServer
from tests.infra.redis_server import RedisServer
from worker.sample_events import MALFORMED_VALUES, SampleEvents, encode

EVENTS = 5000
PARTITIONS = 3


def say(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tiktok-demo-"))
    say(f"== tiktok-conversions-worker demo (logs under {work})")
    kafka = KafkaServer(workdir=work / "kafka")
    redis = RedisServer(workdir=work / "redis")
    fake = FakeTikTokProcess(work)
    worker: WorkerProcess | None = None
    try:
        t0 = time.monotonic()
        kafka.start()
        redis.start()
        fake.start()
        say(
            f"1. started Kafka {kafka.bootstrap}, Redis {redis.url}, fake TikTok {fake.url} "
            f"in {time.monotonic() - t0:.1f}s"
        )
        topic, dlq = "segment-events", "segment-events.tiktok-dlq"
        kafka.create_topic(topic, partitions=PARTITIONS)
        kafka.create_topic(dlq, partitions=1)

        gen = SampleEvents(seed=2026, prefix="demo")
        events = list(gen.stream(EVENTS))
        values = [encode(e) for e in events]
        values += list(MALFORMED_VALUES)
        # Two events TikTok will refuse (the fake answers 40002 for them).
        rejected = [e["messageId"] for e in events if e["type"] == "page"][:2]
        fake.fault(kind="reject_event_ids", event_ids=rejected)
        produce(kafka.bootstrap, topic, values, key_every=101)
        kinds = Counter(e["type"] if e["type"] != "track" else e["event"] for e in events)
        say(
            f"2. produced {len(values)} messages to {topic}: "
            + ", ".join(f"{n} {k}" for k, n in kinds.most_common())
            + f", {len(MALFORMED_VALUES)} malformed"
        )

        config = worker_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            dlq_topic=dlq,
            base_url=fake.url,
            group_id="tiktok-demo",
            redis_url=redis.url,
            tiktok={"batch_linger_ms": 200},
        )
        worker = WorkerProcess(write_config(work / "worker.yaml", config)).start()
        worker.wait_ready()
        started = time.monotonic()
        ends = {p: 0 for p in range(PARTITIONS)}
        for msg in read_topic(kafka.bootstrap, topic, idle_s=0.5):
            ends[msg.partition()] = max(ends[msg.partition()], msg.offset() + 1)
        drained = wait_until(
            lambda: committed_offsets(kafka.bootstrap, "tiktok-demo", topic) == ends, 120, 0.25
        )
        elapsed = time.monotonic() - started
        metrics = worker.metrics()
        say(
            f"3. worker drained the topic in {elapsed:.1f}s"
            if drained
            else "3. worker did NOT drain the topic within 120s"
        )

        stats = fake.stats()
        accepted = fake.events()
        by_name = Counter(e["event"] for e in accepted)
        say(
            f"4. fake TikTok accepted {len(accepted)} events in {stats.get('requests_total', '?')} "
            "requests: " + ", ".join(f"{n} {k}" for k, n in by_name.most_common())
        )
        times = [e["received_at"] for e in accepted]
        span = max(times) - min(times) if times else 0.0
        requests = metric_value(metrics, "tiktok_worker_requests_total")
        batch_sum = metric_value(metrics, "tiktok_worker_batch_events_sum")
        batch_count = metric_value(metrics, "tiktok_worker_batch_events_count")
        consumed = metric_value(metrics, "tiktok_worker_messages_consumed_total")
        skipped = metric_value(metrics, "tiktok_worker_events_skipped_total")
        say(
            f"   consumed {consumed:.0f} messages, skipped {skipped:.0f} events that match no "
            f"subscription, {requests:.0f} requests, "
            f"mean batch {batch_sum / max(batch_count, 1):.1f} "
            f"events, {len(accepted) / max(span, 1e-3):.0f} events/s while sending "
            f"(first to last acceptance: {span:.2f}s; batches wait up to the 200 ms linger)"
        )

        dead = read_topic(kafka.bootstrap, dlq, idle_s=1.0)
        reasons = Counter(
            (headers_of(m)["dlq.reason"], headers_of(m).get("dlq.tiktok.code", "-")) for m in dead
        )
        say(f"5. dead-letter topic {dlq}: {len(dead)} records")
        for (reason, code), n in reasons.most_common():
            sample = next(
                headers_of(m)["dlq.error"] for m in dead if headers_of(m)["dlq.reason"] == reason
            )
            say(f"   {n} x {reason} (tiktok code {code}): {sample}")
        code = worker.terminate()
        worker = None
        say(f"6. worker stopped on SIGTERM with exit status {code}")
        return 0 if drained and code == 0 else 1
    finally:
        if worker is not None:
            worker.stop()
        fake.stop()
        redis.stop()
        kafka.stop()
        say("== everything stopped")


if __name__ == "__main__":
    sys.exit(main())
