"""Fuzzing through the real pipeline: hostile Kafka messages between good ones, one worker
process, real Kafka, the fake TikTok server.

SPEC §3: bad input never stops the worker. Every bad message (or bad event of a multi-event
message) is dead-lettered with the right reason, its key and value byte for byte; every good
event around them is delivered; the worker is still healthy afterwards, exits 0 on SIGTERM
and has committed every offset.

The mapper's own property-based fuzzing is in tests/test_mapping.py; this test feeds what
reaches it through Kafka (tombstones, >1 MiB values, arrays and batch objects mixing good and
bad events) and checks what comes out the other side.

Each produced message has a unique key; dead letters are matched by (key, dlq.batch_index).
Where the right outcome is not obvious from the category (a field of the wrong type may be
coerced or ignored rather than refused), the expectation comes from the mapper (`Mapper`), the
unit whose contract tests/test_mapping.py pins down, and the pipeline must agree with it.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from devkit.fake_tiktok.validate import validate
from devkit.harness import (
    PIXEL,
    TOKEN,
    FakeTikTokProcess,
    TopicSet,
    WorkerProcess,
    committed_offsets,
    headers_of,
    metric_value,
    read_topic,
    wait_until,
    worker_config,
    write_config,
)
from devkit.sample_events import DOCUMENTED_TRACK_EVENTS, SampleEvents, encode
from worker.config import parse_config
from worker.mapping.body import build_body
from worker.mapping.mapper import Mapper

pytestmark = pytest.mark.integration

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # topics and the test producer take messages over 1 MiB
MIB = 1024 * 1024

Expect = str | None  # a dead-letter reason, or None: delivered (or skipped) per the mapper


class Corpus:
    """Messages to produce, with what must become of each."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.gen = SampleEvents(seed=seed, prefix=f"fz{uuid.uuid4().hex[:6]}")
        self.messages: list[tuple[bytes, bytes | None]] = []  # (key, value)
        # (key, batch_index or None) -> expected dead-letter reason
        self.dead: dict[tuple[bytes, int | None], str] = {}
        self.dead_values: dict[tuple[bytes, int | None], bytes | None] = {}
        self.good_ids: set[str] = set()  # must be accepted by TikTok
        self.categories: Counter[str] = Counter()
        self._n = 0

    def good_event(self) -> dict[str, Any]:
        if self.rng.random() < 0.25:
            return self.gen.page()
        return self.gen.track(self.rng.choice(DOCUMENTED_TRACK_EVENTS))

    def _key(self, kind: str) -> bytes:
        self._n += 1
        return f"{kind}-{self._n}".encode()

    def add_good(self, event: dict[str, Any] | None = None, value: bytes | None = None) -> None:
        event = event if event is not None else self.good_event()
        self.good_ids.add(event["messageId"])
        self.messages.append((self._key("good"), value if value is not None else encode(event)))

    def add_bad(self, category: str, value: bytes | None, reason: str) -> None:
        key = self._key("bad")
        self.messages.append((key, value))
        self.dead[(key, None)] = reason
        self.dead_values[(key, None)] = value
        self.categories[category] += 1
        self.add_good()  # a good event right behind every bad one

    def add_multi(self, category: str, parts: list[tuple[bytes, Expect]], batch: bool) -> None:
        """An array (or a batch object) of events; `parts` are the raw event bytes."""
        key = self._key("multi")
        body = b"[" + b",".join(raw for raw, _ in parts) + b"]"
        value = b'{"batch":' + body + b',"sentAt":"2026-11-25T12:00:00Z"}' if batch else body
        self.messages.append((key, value))
        for index, (raw, reason) in enumerate(parts):
            if reason is not None:
                self.dead[(key, index)] = reason
                self.dead_values[(key, index)] = raw
            else:
                self.good_ids.add(json.loads(raw)["messageId"])
        self.categories[category] += 1

    def add_judged(self, category: str, event: dict[str, Any], mapper: Mapper) -> None:
        """A hostile event whose fate the mapper decides (invalid, skipped or mapped) and, when
        it is mapped, TikTok's validation (the fake's validator): accepted, or refused and
        dead-lettered as `permanent_api_error`."""
        value = json.dumps(event).encode()
        outcome = mapper.map_message(value)[0]
        if outcome.invalid:
            self.add_bad(category, value, outcome.invalid[0].reason)
            return
        if outcome.mapped:
            mapped = outcome.mapped[0]
            body = build_body(mapped.key, [mapped.payload])
            _, rejection = validate(body, now=time.time())
            if rejection is not None:
                self.add_bad(category, value, "permanent_api_error")
                return
        key = self._key("judged")
        self.messages.append((key, value))
        self.categories[category] += 1
        if outcome.mapped and isinstance(event.get("messageId"), str):
            self.good_ids.add(event["messageId"])


def _wrong_type_events(corpus: Corpus) -> list[dict[str, Any]]:
    """A field of the wrong type, for every field the mapping reads (one field per event)."""
    wrong_values: list[Any] = [[], {}, 12345, -1.5, True, "a string", None, [{"x": 1}]]
    paths = [
        ("type",),
        ("messageId",),
        ("timestamp",),
        ("userId",),
        ("anonymousId",),
        ("event",),
        ("properties",),
        ("context",),
        ("integrations",),
        ("context", "traits"),
        ("context", "traits", "email"),
        ("context", "traits", "phone"),
        ("context", "traits", "address"),
        ("context", "page"),
        ("context", "page", "url"),
        ("context", "ip"),
        ("context", "userAgent"),
        ("properties", "value"),
        ("properties", "currency"),
        ("properties", "products"),
        ("properties", "order_id"),
        ("properties", "query"),
    ]
    events = []
    for path in paths:
        for wrong in wrong_values:
            event = corpus.gen.track("Order Completed")
            node = event
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[path[-1]] = wrong
            events.append(event)
    return events


def build_corpus(seed: int = 5) -> Corpus:
    c = Corpus(seed)
    rng = c.rng
    mapper = Mapper(
        parse_config(
            f"destinations:\n- {{name: web-shop, pixel_code: {PIXEL}, access_token: {TOKEN}}}\n"
        )
    )
    for _ in range(20):
        c.add_good()

    # Random bytes (never valid JSON), the empty value and a tombstone.
    made = 0
    while made < 40:
        value = rng.randbytes(rng.randrange(1, 400))
        try:
            json.loads(value.decode())
            continue  # valid JSON by chance: not this category
        except ValueError:
            pass
        c.add_bad("random bytes", value, "decode_error")
        made += 1
    c.add_bad("empty value", b"", "decode_error")
    c.add_bad("tombstone", None, "decode_error")

    # Truncated JSON.
    for _ in range(30):
        raw = encode(c.good_event())
        c.add_bad("truncated JSON", raw[: rng.randrange(1, len(raw) - 1)], "decode_error")

    # Deeply nested JSON (arrays and objects, inside an event and at the top level).
    base = encode(c.gen.track("Order Completed"))[:-1]
    c.add_bad("deep nesting", base + b',"deep":' + b"[" * 50000 + b"]" * 50000 + b"}",
              "decode_error")  # fmt: skip
    c.add_bad("deep nesting", base + b',"deep":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
              "decode_error")  # fmt: skip
    c.add_bad("deep nesting", b"[" * 50000 + b"]" * 50000, "decode_error")
    shallow = c.gen.track("Order Completed")
    shallow["properties"]["nested"] = json.loads("[" * 100 + "]" * 100)
    c.add_good(shallow)

    # Invalid UTF-8 in values and keys; an overlong encoding; a lone surrogate.
    for bad in (b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"caf\xe9"):
        raw = encode(c.gen.track("Order Completed"))
        c.add_bad("invalid UTF-8", raw.replace(b'"Order Completed"', b'"' + bad + b'"'),
                  "decode_error")  # fmt: skip
        c.add_bad("invalid UTF-8", raw.replace(b'"currency"', b'"' + bad + b'"'),
                  "decode_error")  # fmt: skip

    # Numbers out of range.
    for number in (b"1e400", b"-1e400", b"1" + b"0" * 400, b"-" + b"9" * 400):
        raw = encode(c.gen.track("Order Completed"))
        start = raw.index(b'"value":') + len(b'"value":')
        end = raw.index(b",", start)
        c.add_bad("number out of range", raw[:start] + number + raw[end:], "invalid_event")
    raw = encode(c.gen.track("Order Completed"))
    c.add_bad("number out of range", raw.replace(b'"messageId":"', b'"messageId":1e999,"x":"'),
              "invalid_event")  # fmt: skip

    # Not a Segment event.
    for value in (b"42", b'"a string"', b"null", b"true", b'{"no":"type"}',
                  b'{"type":"not-a-type","messageId":"x"}', b'{"type":["track"]}'):  # fmt: skip
        c.add_bad("not an event", value, "invalid_event")

    # Wrong types in every field the mapping reads (outcome decided by the mapper).
    for event in _wrong_type_events(c):
        c.add_judged("wrong type", event, mapper)

    # Huge strings and arrays under 1 MiB: delivered.
    big = c.gen.track("Order Completed")
    big["properties"]["description"] = "x" * (900 * 1024)
    c.add_good(big)
    wide = c.gen.track("Checkout Started")
    wide["properties"]["tags"] = [0] * 200_000
    c.add_good(wide)

    # Over 1 MiB: event_too_large (the broker takes them: the topics allow 4 MiB).
    for size in (MIB + 1, 2 * MIB, 3 * MIB):
        huge = c.gen.track("Order Completed")
        huge["properties"]["description"] = "y" * size
        c.add_bad("over 1 MiB", encode(huge), "event_too_large")
    array = c.gen.page()
    array["properties"]["items"] = list(range(300_000))
    c.add_bad("over 1 MiB", encode(array), "event_too_large")

    # Multi-event messages: only the bad events are dead-lettered.
    for batch in (False, True):
        huge = c.gen.track("Order Completed")
        huge["properties"]["description"] = "z" * (MIB + 10)
        parts: list[tuple[bytes, Expect]] = [
            (encode(c.good_event()), None),
            (b"5", "invalid_event"),
            (b'{"type":"nope","messageId":"m"}', "invalid_event"),
            (encode(c.good_event()), None),
            (encode(huge), "event_too_large"),
            (b'{"type":"track","event":"Order Completed","properties":[]}', "invalid_event"),
            (encode(c.good_event()), None),
        ]
        c.add_multi("batch object" if batch else "array", parts, batch)
    for _ in range(10):
        c.add_good()
    return c


def _message_id(value: bytes | None) -> str | None:
    try:
        event = json.loads(value or b"")
    except (ValueError, RecursionError):
        return None
    mid = event.get("messageId") if isinstance(event, dict) else None
    return mid if isinstance(mid, str) else None


def produce_corpus(bootstrap: str, topic: str, corpus: Corpus) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": MAX_MESSAGE_BYTES + 1024,
        }
    )
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    for key, value in corpus.messages:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert failures == []


def test_hostile_messages_are_dead_lettered_and_good_ones_delivered(
    kafka: Any, tmp_path: Path
) -> None:
    corpus = build_corpus()
    # The test broker writes 1 MiB segments; a record batch must fit in one.
    big = {"max.message.bytes": str(MAX_MESSAGE_BYTES), "segment.bytes": str(16 * MIB)}
    topics = TopicSet.create(kafka, "fuzz", 2, config=big, dlq_config=big, retry_config=big)
    topic, dlq_topic, group = topics.topic, topics.dlq_topic, topics.group
    produce_corpus(kafka.bootstrap, topic, corpus)

    with FakeTikTokProcess(tmp_path) as fake:
        config = worker_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            dlq_topic=dlq_topic,
            base_url=fake.url,
            group_id=group,
            tiktok={"max_batch_events": 50},
        )
        worker = WorkerProcess(write_config(tmp_path / "worker.yaml", config)).start()
        try:
            worker.wait_ready()

            def settled() -> bool:
                dead = metric_value(worker.metrics(), "tiktok_worker_dead_letters_total")
                return dead >= len(corpus.dead) and corpus.good_ids <= set(fake.event_ids())

            if not wait_until(settled, 90, 0.5):
                dead = metric_value(worker.metrics(), "tiktok_worker_dead_letters_total")
                pending = corpus.good_ids - set(fake.event_ids())
                pytest.fail(
                    f"not settled: {dead:.0f}/{len(corpus.dead)} dead letters, "
                    f"{len(pending)} good events not delivered (e.g. {sorted(pending)[:5]}); "
                    f"worker log tail:\n{worker.log_tail(10)}"
                )
            assert worker.running(), worker.log_tail()
            text = worker.metrics()
            assert worker.terminate() == 0, worker.log_tail()
        finally:
            worker.stop()
        accepted = Counter(fake.event_ids())

    # Every good event delivered; nothing bad delivered.
    missing = corpus.good_ids - accepted.keys()
    assert missing == set()
    bad_ids = {i for v in corpus.dead_values.values() if (i := _message_id(v)) is not None}
    assert bad_ids
    assert bad_ids & accepted.keys() == set()

    # Every bad message (or bad event of a multi-event message) dead-lettered once per
    # reason expected, with its key and value byte for byte, and nothing else dead-lettered.
    records = read_topic(kafka.bootstrap, dlq_topic, idle_s=1.5)
    got: dict[tuple[bytes, int | None], tuple[str, bytes | None]] = {}
    for msg in records:
        headers = headers_of(msg)
        index = int(headers["dlq.batch_index"]) if "dlq.batch_index" in headers else None
        got[(msg.key(), index)] = (headers["dlq.reason"], msg.value())
        assert headers["dlq.original.topic"] == topic
        assert headers["dlq.error"], headers
    wrong = {
        k: (got[k][0] if k in got else "not dead-lettered", want)
        for k, want in corpus.dead.items()
        if got.get(k, ("", None))[0] != want
    }
    assert wrong == {}, f"(got, expected) by key: {wrong}"
    assert set(got) == set(corpus.dead), "dead-lettered but not expected: " + repr(
        sorted(set(got) - set(corpus.dead))[:10]
    )
    # A tombstone (null value) is dead-lettered with an empty value: null would be a delete
    # marker if the dead-letter topic were compacted.
    altered = [
        k
        for k, (_, value) in got.items()
        if value != corpus.dead_values[k] and not (corpus.dead_values[k] is None and value == b"")
    ]
    assert altered == []
    reasons = Counter(reason for reason, _ in got.values())
    assert reasons["decode_error"] > 0
    assert reasons["invalid_event"] > 0
    assert reasons["event_too_large"] >= 6
    print(f"fuzz corpus: {dict(corpus.categories)}; dead letters by reason: {dict(reasons)}")
    assert metric_value(text, "tiktok_worker_dead_letters_total") == len(records)

    # The worker finished everything: all offsets committed.
    ends: dict[int, int] = {}
    for msg in read_topic(kafka.bootstrap, topic, idle_s=1.0):
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)
    assert committed_offsets(kafka.bootstrap, group, topic) == ends
