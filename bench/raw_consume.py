"""The raw ceiling: confluent-kafka batched consume of the benchmark topic, no processing.

Same librdkafka settings as the worker (`worker.kafka.settings.consumer_settings`), a fresh group,
`consume(2000, timeout)` in a loop, each message's error checked and value touched, nothing
else. Timed from the first message to the last, so the group join is not counted. Also reports
events per CPU-second of this process (librdkafka's threads included).
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer

from worker.kafka.settings import consumer_settings

BATCH = 2000


def raw_consume(bootstrap: str, topic: str, messages: int, *, group: str) -> dict[str, Any]:
    conf = consumer_settings(bootstrap_servers=bootstrap, group_id=group, client={})
    conf.pop("statistics.interval.ms", None)  # no stats callback here
    consumer = Consumer(conf)
    consumer.subscribe([topic])
    count = untimed = 0
    size = 0
    first = cpu0 = 0.0
    deadline = time.monotonic() + 300
    try:
        while count < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"raw consume: {count}/{messages} messages after 300s")
            batch = consumer.consume(BATCH, 1.0)
            if not batch:
                continue
            if count == 0:  # the clock starts when the first batch is in hand
                first = time.perf_counter()
                cpu0 = time.process_time()
                untimed = len(batch)
            for msg in batch:
                if msg.error() is None:
                    value = msg.value()
                    size += len(value) if value else 0
                    count += 1
        wall = time.perf_counter() - first
        cpu = time.process_time() - cpu0
    finally:
        consumer.close()
    timed = count - untimed
    return {
        "messages": count,
        "seconds": round(wall, 3),
        "events_per_s": round(timed / wall),
        "mb_per_s": round(size * timed / count / wall / 1e6, 1),
        "events_per_cpu_s": round(timed / cpu) if cpu > 0 else None,
    }
