# SPDX-License-Identifier: Apache-2.0
"""Small tools the integration tests share: read a topic, wait for a condition, talk raw MQTT."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.kafka import producer_config, reader_config
from parkpool.runtime.mqtt import connect_and_wait, new_client
from parkpool.runtime.settings import KafkaConnection, MqttConnection, StoreConnection
from parkpool.schemas import (
    Assignment,
    CancelJob,
    Capabilities,
    DecodeError,
    MqttTopics,
    PullRequest,
    Result,
    TaskChunk,
    decode,
    encode,
)
from parkpool.schemas.blobref import job_prefix
from parkpool.schemas.codec import peek_type
from parkpool.schemas.reputation import Level
from parkpool.worker.kernels import REGISTRY


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until ``condition()`` is truthy; fail the test with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_topic(
    conn: KafkaConnection, topic: str, expect: int, timeout: float = 30.0
) -> list[Message]:
    """Read a topic from the start until ``expect`` records arrived (or fail)."""
    consumer = Consumer(reader_config(conn))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        records: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(records) < expect and time.monotonic() < deadline:
            records += [r for r in consumer.consume(100, timeout=0.2) if r.error() is None]
        assert len(records) >= expect, f"{topic}: {len(records)} records, expected {expect}"
        return records
    finally:
        consumer.close()


def produce_raw_task(
    conn: KafkaConnection,
    topic: str,
    kernel: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
    reply_topic: str,
) -> TaskChunk:
    """Produce a one-chunk job straight to a tasks topic, skipping the SDK's checks.

    The SDK refuses tasks that break a built-in kernel's contract; tests of how gateways
    and cars handle such tasks (from another producer, or a kernel registered only on
    the cars) write them as any Kafka client could.
    """
    now = time.time()
    task = TaskChunk(uuid.uuid4().hex, 0, 1, kernel, params, inputs, reply_topic, now + 3600, now)
    producer = Producer(producer_config(conn))
    producer.produce(topic, encode(task), key=f"{task.job_id}:{task.chunk_id}")
    assert producer.flush(10) == 0, "the raw task was not confirmed by Kafka"
    return task


def committed(conn: KafkaConnection, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition (-1001 when none)."""
    consumer = Consumer(reader_config(conn, **{"group.id": group}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in offsets}
    finally:
        consumer.close()


def read_all(
    conn: KafkaConnection, topic: str, idle: float = 1.0, **overrides: Any
) -> list[Message]:
    """Every record of a topic, read from the start until nothing arrives for ``idle`` s;
    ``overrides`` go to the reader's consumer configuration.

    Tansu 0.6.0 answers ListOffsets(latest) with the last *batch's* base offset + 1, which
    under-counts whenever the last batch holds several records, so the watermark API
    cannot tell when a topic has been read to its end.
    """
    consumer = Consumer(reader_config(conn, **overrides))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        records: list[Message] = []
        # Short polls: one consume() waits its whole timeout unless 500 records come, so
        # polling for ``idle`` at a time would wait twice that for any topic not empty.
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle:
            if batch := consumer.consume(500, timeout=min(idle, 0.1)):
                records += [r for r in batch if r.error() is None]
                quiet_since = time.monotonic()
        return records
    finally:
        consumer.close()


def end_offsets(conn: KafkaConnection, topic: str) -> dict[int, int]:
    """One past the last offset of each partition, found by reading the records."""
    consumer = Consumer(reader_config(conn))
    try:
        partitions = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    finally:
        consumer.close()
    ends = dict.fromkeys(partitions, 0)
    for record in read_all(conn, topic):
        partition, offset = record.partition(), record.offset()
        if partition is not None and offset is not None:
            ends[partition] = max(ends[partition], offset + 1)
    return ends


def wait_committed_to_end(conn: KafkaConnection, group: str, topic: str) -> None:
    """Wait until the group has committed every partition of ``topic`` to its end.

    A partition that never got a record has nothing to commit, and Kafka reports its
    committed offset as -1001 (none) rather than 0; that counts as at its end. Chunks are
    keyed by hash, so a small job leaves a partition empty now and then.
    """
    ends: dict[int, int] = {}
    seen: dict[int, int] = {}

    def at_end() -> bool:
        # Read again on each look: the durable embedded Kafka may list a partition's
        # newest batch a moment late, and a stale end read once would never be met.
        ends.update(end_offsets(conn, topic))
        seen.update({p: max(o, 0) for p, o in committed(conn, group, topic).items()})
        return seen == ends

    try:
        wait_for(at_end, 20, "commits to reach the end of every partition")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: committed {seen}, ends {ends}") from None


def first_assignment(car: RawMqtt) -> mqtt.MQTTMessage | None:
    """The first Assignment a scripted car received; the gateway's notices ("no work
    here yet") may come before it on the same topic."""
    return next((m for m in car.received if peek_type(m.payload) == Assignment.TYPE), None)


class RawMqtt:
    """A bare MQTT 5 client, to speak the protocol by hand as a scripted or hostile peer."""

    def __init__(self, conn: MqttConnection, client_id: str) -> None:
        self.received: list[mqtt.MQTTMessage] = []
        self._connected = threading.Event()
        self.client = new_client(client_id, conn)
        self.client.on_connect = lambda *_a: self._connected.set()
        self.client.on_message = lambda _c, _u, msg: self.received.append(msg)
        connect_and_wait(self.client, conn, connected=self._connected)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10), f"subscription to {topic} not acknowledged"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class LeaseHolder:
    """A scripted vehicle holding one lease: it pulled once and got an assignment, and it
    says only what the test makes it say."""

    car: RawMqtt
    assignment: Assignment
    task: TaskChunk

    def result(self, outputs: Mapping[str, np.ndarray], **forged: Any) -> Result:
        """The result its car would send for the lease; ``forged`` fields change it."""
        a, t = self.assignment, self.task
        result = Result(
            t.job_id,
            t.chunk_id,
            t.n_chunks,
            a.vehicle_id,
            a.gateway_id,
            a.epoch,
            a.attempt,
            outputs,
            0.01,
            time.time(),
            t.created_at,
        )
        return dataclasses.replace(result, **forged)

    def close(self) -> None:
        self.car.close()


def hold_lease(
    conn: MqttConnection,
    topics: MqttTopics,
    vehicle_id: str = "holder",
    gateway_id: str = "gw1",
    box_key: bytes = b"",
    seen: int = 0,
) -> LeaseHolder:
    """Script a vehicle that asks ``gateway_id`` for one task and holds its lease; with a
    ``box_key`` it may be sent confidential tasks; ``seen``: the highest epoch its pull
    says it received from that gateway."""
    car = RawMqtt(conn, f"{vehicle_id}-{topics.namespace}")
    car.subscribe(topics.task(vehicle_id))
    caps = Capabilities("numpy", tuple(REGISTRY), box_key=box_key)
    pull = PullRequest(vehicle_id, 1, caps, {gateway_id: seen} if seen else {}, {gateway_id: 1})
    car.publish(topics.pull(vehicle_id, gateway_id), encode(pull))
    message = wait_for(lambda: first_assignment(car), 30, f"{vehicle_id}'s lease")
    assignment = decode(message.payload, Assignment)
    return LeaseHolder(car, assignment, decode(assignment.task, TaskChunk))


class TopicTail:
    """Reads a topic from its start and hands over each record once, as it arrives.

    For tests that produce in rounds and check each round's outcome: ``take(n)`` returns
    the next ``n`` records (or fails), never one it returned before.
    """

    def __init__(self, conn: KafkaConnection, topic: str) -> None:
        self._consumer = Consumer(reader_config(conn))
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        self._topic = topic

    def take(self, n: int, timeout: float = 30.0) -> list[Message]:
        records: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(records) < n and time.monotonic() < deadline:
            batch = self._consumer.consume(n - len(records), timeout=0.1)
            records += [r for r in batch if r.error() is None]
        assert len(records) == n, f"{self._topic}: {len(records)} new records, expected {n}"
        return records

    def nothing_more(self, wait: float = 0.5) -> bool:
        """True when no further record arrives within ``wait`` seconds."""
        return not [r for r in self._consumer.consume(1, timeout=wait) if r.error() is None]

    def close(self) -> None:
        self._consumer.close()


class Unconfirmed:
    """A producer whose records Kafka never confirms: flush says one is still out."""

    def __init__(self, producer: object) -> None:
        self._producer = producer

    def __getattr__(self, name: str) -> object:
        return getattr(self._producer, name)

    def flush(self, timeout: float = -1) -> int:
        self._producer.flush(timeout)  # type: ignore[attr-defined]
        return 1


def job_objects(store: BlobStore, job_id: str) -> list[str]:
    """The keys of a job's objects in the store."""
    return [key for key, _ in store.keys(job_prefix(job_id))]


SMALL_INLINE = 4096  # a 64x64 float32 block, or tile, goes to the store


def claim_check_client(
    namespace: str, kafka: KafkaConnection, store: StoreConnection | None, **more: object
) -> ParkpoolClient:
    """An SDK client without checks that stores anything over ``SMALL_INLINE`` bytes
    (``store=None``: everything inline); ``more`` goes to its settings."""
    options: dict[str, object] = {"verification": Level.UNCHECKED, **more}
    if store is not None:
        options["store"] = dataclasses.replace(store, inline_max_bytes=SMALL_INLINE)
    return ParkpoolClient(ProducerSettings(kafka, namespace, **options))  # type: ignore[arg-type]


def cancels_of(kafka: KafkaConnection, topic: str, job_id: str) -> list[CancelJob]:
    """The CancelJob records for one job on a tasks topic."""
    found = []
    for record in read_all(kafka, topic):
        try:
            cancel = decode(record.value() or b"", CancelJob)
        except DecodeError:
            continue  # a task record
        if cancel.job_id == job_id:
            found.append(cancel)
    return found
