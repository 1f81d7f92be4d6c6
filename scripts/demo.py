"""`make demo`: the whole product on this machine in about a minute.

Starts Apache Kafka, Redis and the fake TikTok server on loopback, creates the topics, produces
a few thousand realistic Segment events (with some malformed messages and a few events TikTok
rejects), runs the worker until everything is committed, prints what happened, and stops it all.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from devkit.harness import (
    PIXEL,
    WORKER_CMD,
    FakeTikTokProcess,
    WorkerProcess,
    committed_offsets,
    destination,
    headers_of,
    metric_value,
    produce,
    read_topic,
    retry_topic_for,
    wait_until,
    worker_config,
    write_config,
)
from devkit.infra.kafka import KafkaServer
from devkit.infra.redis_server import RedisServer
from devkit.sample_events import MALFORMED_VALUES, SampleEvents, encode

EVENTS = 5000
PARTITIONS = 3
# A second destination that only reports orders, on a pixel whose requests fail for a while.
ORDERS_PIXEL = "C5PIXEL0000000000002"


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
        kafka.create_topic(retry_topic_for(dlq), partitions=1)

        gen = SampleEvents(seed=2026, prefix="demo")
        events = list(gen.stream(EVENTS))
        values = [encode(e) for e in events]
        values += list(MALFORMED_VALUES)
        # Two events TikTok will refuse (the fake answers 40002 for them), and an outage of the
        # orders pixel (HTTP 503) that outlasts the retry deadline.
        rejected = [e["messageId"] for e in events if e["type"] == "page"][:2]
        fake.fault(kind="reject_event_ids", event_ids=rejected)
        fake.fault(kind="http_503", pixel=ORDERS_PIXEL)
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
            tiktok={
                "batch_linger_ms": 200,
                "retry": {"initial_backoff_s": 0.2, "max_backoff_s": 1, "deadline_s": 3},
            },
            destinations=[
                destination("web-shop"),
                destination(
                    "orders-only",
                    pixel=ORDERS_PIXEL,
                    when='type = "track" and event = "Order Completed"',
                ),
            ],
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
            f"3. worker drained the topic in {elapsed:.1f}s (offsets committed to the end)"
            if drained
            else "3. worker did NOT drain the topic within 120s"
        )

        accepted = fake.events()
        say(f"4. fake TikTok accepted {len(accepted)} events:")
        for pixel in sorted({e["pixel"] for e in accepted}):
            names = Counter(e["event"] for e in accepted if e["pixel"] == pixel)
            say(f"   pixel {pixel}: " + ", ".join(f"{n} {k}" for k, n in names.most_common()))
        times = [e["received_at"] for e in accepted]
        span = max(times) - min(times) if times else 0.0
        requests = metric_value(metrics, "tiktok_worker_requests_total")
        batch_sum = metric_value(metrics, "tiktok_worker_batch_events_sum")
        batch_count = metric_value(metrics, "tiktok_worker_batch_events_count")
        consumed = metric_value(metrics, "tiktok_worker_messages_consumed_total")
        skipped = metric_value(metrics, "tiktok_worker_events_skipped_total")
        say(
            f"   consumed {consumed:.0f} messages; {skipped:.0f} events matched no subscription "
            f"(skipped); {requests:.0f} requests, mean batch "
            f"{batch_sum / max(batch_count, 1):.1f} events; {len(accepted) / max(span, 1e-3):.0f} "
            f"events/s from first to last acceptance ({span:.2f}s, with a 200 ms batch linger)"
        )

        dead = read_topic(kafka.bootstrap, dlq, idle_s=1.0)
        reasons = Counter(
            (
                headers_of(m)["dlq.reason"],
                headers_of(m)["dlq.destination"] or "-",
                headers_of(m).get("dlq.tiktok.code", "-"),
            )
            for m in dead
        )
        say(f"5. dead-letter topic {dlq}: {len(dead)} records (reason, destination, TikTok code)")
        for (reason, dest, code), n in reasons.most_common():
            sample = next(
                headers_of(m)["dlq.error"] for m in dead if headers_of(m)["dlq.reason"] == reason
            )
            say(f"   {n:4d} x {reason:20s} {dest:12s} {code:6s} e.g. {sample}")
        code = worker.terminate()
        worker = None
        say(f"6. worker stopped on SIGTERM with exit status {code}")

        fake.clear_faults()
        before = {e["event_id"] for e in fake.events() if e["pixel"] == PIXEL}
        say("7. the orders pixel is back: `tiktok-worker dlq redrive --reason retries_exhausted`")
        redrive = subprocess.run(
            [
                *WORKER_CMD,
                "dlq",
                "redrive",
                "--config",
                str(work / "worker.yaml"),
                "--reason",
                "retries_exhausted",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        say("   " + (redrive.stdout.strip().splitlines() or ["(no output)"])[-1])
        after = fake.events()
        orders = [e for e in after if e["pixel"] == ORDERS_PIXEL]
        resent_to_web = [e for e in after if e["pixel"] == PIXEL and e["duplicate"]]
        say(
            f"   orders-only pixel now has {len(orders)} events; web-shop received "
            f"{len(resent_to_web)} duplicates ({len(before)} events before the redrive)"
        )
        ok = drained and code == 0 and redrive.returncode == 0
        return 0 if ok else 1
    finally:
        if worker is not None:
            worker.stop()
        fake.stop()
        redis.stop()
        kafka.stop()
        say("== everything stopped")


if __name__ == "__main__":
    sys.exit(main())
