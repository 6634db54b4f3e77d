# SPDX-License-Identifier: Apache-2.0
"""Kafka client settings that every role must get right, in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException, Message, Producer

from parkpool.runtime.settings import KafkaConnection

# Tasks carry NumPy arrays; a 256-row float32 panel of a 4096-wide matrix is 4 MiB.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# Tansu holds an empty fetch for the full wait even when records arrive meanwhile, so the
# default 500 ms would add up to half a second to every hop. Short waits cost a few
# idle fetch requests per second per broker.
FETCH_WAIT_MS = 20


def producer_config(conn: KafkaConnection, **overrides: Any) -> dict[str, Any]:
    """Idempotent producer: acks from all replicas, no duplicates from its own retries."""
    return conn.client_config(
        **{
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.max.bytes": MAX_MESSAGE_BYTES,
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
            "fetch.message.max.bytes": MAX_MESSAGE_BYTES,
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
            "fetch.message.max.bytes": MAX_MESSAGE_BYTES,
            "fetch.wait.max.ms": FETCH_WAIT_MS,
            "queued.max.messages.kbytes": 16384,
            **overrides,
        }
    )


def produce(
    producer: Producer,
    topic: str,
    value: bytes,
    key: str | None,
    on_delivery: Callable[..., None],
) -> None:
    """Produce, waiting for room when librdkafka's local queue is full.

    BufferError only means "too much not yet sent"; serving delivery reports frees room.
    A record librdkafka refuses outright (too large, say) is reported to ``on_delivery``
    as a failed delivery, like any other, instead of raising into the caller's loop.
    """
    while True:
        try:
            producer.produce(topic, value, key=key, on_delivery=on_delivery)
        except BufferError:
            producer.poll(0.05)
        except KafkaException as exc:
            on_delivery(exc.args[0], None)
            return
        else:
            return


def coordinates(record: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed record (always set when it has no error)."""
    topic, partition, offset = record.topic(), record.partition(), record.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("a consumed record without topic, partition or offset")
    return topic, partition, offset
