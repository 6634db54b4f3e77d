# SPDX-License-Identifier: Apache-2.0
"""Kafka client settings that every role must get right, in one place."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas.errors import ValidationError

# The largest record a parkpool consumer reads. Far above what parkpool writes (the
# connection's max_record_bytes), so that a foreign or misconfigured writer's record is
# still read, and dead-lettered without its bytes, instead of stalling its partition.
MAX_FETCH_RECORD_BYTES = 32 * 1024 * 1024
# What a one-record batch adds to key, value and headers: the batch header (61 bytes)
# plus the record's own length, delta and attribute varints, with room to spare.
RECORD_OVERHEAD_BYTES = 128
Header = tuple[str, str | bytes | None]
# An empty fetch on Tansu sleeps half of what is left of its wait before it looks for
# records again, so the default 500 ms would add up to a quarter second to every hop.
# Short waits cost a few idle fetch requests per second per broker.
FETCH_WAIT_MS = 20
# Tansu's S3 engine lists every batch of a partition within a fetch's wait, and returns
# the partition empty when that takes longer. The task and result topics only grow (it
# has no retention), so their readers wait longer than FETCH_WAIT_MS: librdkafka's
# default, within which the embedded store lists ~12,000 batches (docs/DECISIONS.md,
# "Reads cost a listing").
GROWING_FETCH_WAIT_MS = 500
# The SDK's result reader and the gateway's task reader start here and raise their wait
# when a partition stalls (runtime.fetchwait): a job's first task and its last result
# each wait for the next look of one of them.
RESULT_FETCH_WAIT_MS = 100
TASK_FETCH_WAIT_MS = 100


def producer_config(conn: KafkaConnection, **overrides: Any) -> dict[str, Any]:
    """Idempotent producer: acks from all replicas, no duplicates from its own retries."""
    return conn.client_config(
        **{
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            # librdkafka checks key + value + headers against it; record_size() adds the
            # framing on top, so nothing we check as fitting is refused here.
            "message.max.bytes": conn.max_record_bytes,
            **overrides,
        }
    )


def consumer_config(
    conn: KafkaConnection, group_id: str, session_timeout_ms: int, **overrides: Any
) -> dict[str, Any]:
    """At-least-once consumer: offsets are stored by the application after the work is durable.

    The session timeout also sets how long a new member waits to join (about half of it on
    Tansu), so it decides how fast a restarted gateway is back; see docs/ARCHITECTURE.md.
    """
    return conn.client_config(
        **{
            "group.id": group_id,
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": 1000,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(100, session_timeout_ms // 3),
            **_fetch_limits(),
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            # Bounds the prefetch buffer per partition; backpressure does the rest.
            "queued.max.messages.kbytes": 16384,
            "queued.min.messages": 1000,
            **overrides,
        }
    )


def reader_config(conn: KafkaConnection, **overrides: Any) -> dict[str, Any]:
    """A consumer that uses assign(), never a group: no join delay, nothing committed."""
    return conn.client_config(
        **{
            "group.id": "parkpool-reader",  # required by librdkafka, unused with assign()
            "enable.auto.commit": False,
            **_fetch_limits(),
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            "queued.max.messages.kbytes": 16384,
            **overrides,
        }
    )


def _fetch_limits() -> dict[str, int]:
    # receive.message.max.bytes must exceed fetch.max.bytes by librdkafka's 512 bytes.
    return {
        "fetch.message.max.bytes": MAX_FETCH_RECORD_BYTES,
        "fetch.max.bytes": MAX_FETCH_RECORD_BYTES,
        "receive.message.max.bytes": MAX_FETCH_RECORD_BYTES + 65536,
    }


def record_size(
    value: bytes, key: str | bytes | None = None, headers: Sequence[Header] = ()
) -> int:
    """Bytes a one-record batch takes against the broker's max.message.bytes."""
    size = len(value) + RECORD_OVERHEAD_BYTES + _length(key)
    return size + sum(len(name.encode()) + _length(data) for name, data in headers)


def _length(data: str | bytes | None) -> int:
    if data is None:
        return 0
    return len(data.encode() if isinstance(data, str) else data)


def check_record(
    conn: KafkaConnection, value: bytes, key: str | bytes | None, what: str, how: str
) -> None:
    """Refuse a record the connection's limit does not allow, before anything is sent,
    saying how much finer to split and ``how``."""
    size = record_size(value, key)
    if size > conn.max_record_bytes:
        finer = math.ceil(size / conn.max_record_bytes)
        raise ValidationError(
            "record_too_large",
            f"{what} is {size:,} bytes as a Kafka record, over the limit of "
            f"{conn.max_record_bytes:,} (PARKPOOL_KAFKA_MAX_RECORD_BYTES; Apache Kafka's "
            f"default max.message.bytes is 1 MiB); split the job at least {finer}x finer: "
            f"{how}",
        )


def produce(
    producer: Producer,
    topic: str,
    value: bytes,
    key: str | None,
    on_delivery: Callable[..., None],
    headers: Sequence[Header] | None = None,
) -> KafkaError | None:
    """Produce, waiting for room when librdkafka's local queue is full.

    BufferError only means "too much not yet sent"; serving delivery reports frees room.
    A record librdkafka refuses outright (too large, an unknown topic) is returned, and
    ``on_delivery`` is then never called: the caller handles it in its own flow. Calling
    the report from here would let a report that produces again recurse without bound.
    """
    while True:
        try:
            producer.produce(
                topic, value, key=key, on_delivery=on_delivery, headers=list(headers or ())
            )
        except BufferError:
            producer.poll(0.05)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            return error
        else:
            return None


def coordinates(record: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed record (always set when it has no error)."""
    topic, partition, offset = record.topic(), record.partition(), record.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("a consumed record without topic, partition or offset")
    return topic, partition, offset


def cached_high(consumer: Consumer, where: tuple[str, int]) -> int:
    """The partition's high watermark as the last fetch answer gave it; -1 while none
    has (librdkafka says -1001), or when the consumer does not know the partition."""
    try:
        _low, high = consumer.get_watermark_offsets(TopicPartition(*where), cached=True)
    except KafkaException:
        return -1
    return max(int(high), -1)


def answers(consumer: Consumer, where: tuple[str, int], timeout_s: float = 1.0) -> bool:
    """Whether the broker answers a live ask for the partition's offsets now: a reader
    that gets nothing because the broker (or the store under it) is out of reach is not
    stalled, and a longer fetch wait would not help it."""
    try:
        consumer.get_watermark_offsets(TopicPartition(*where), timeout=timeout_s, cached=False)
    except KafkaException:
        return False
    return True
