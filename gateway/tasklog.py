# SPDX-License-Identifier: Apache-2.0
"""The gateway's Kafka side: the tasks it reads, the records it writes, the offsets it commits.

Offsets are stored (and auto-committed) only up to the lowest unfinished record of each
partition, so a crash at any point leads to records being read again, never skipped.
A partition is paused when its window is full or no vehicle is asking for work, and
``poll`` keeps running meanwhile so the consumer stays in its group.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.tasks import PendingTask
from parkpool.gateway.window import OffsetWindow
from parkpool.runtime.kafka import consumer_config, coordinates, produce, producer_config
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import (
    CancelJob,
    DeadLetter,
    DecodeError,
    KafkaTopics,
    TaskChunk,
    decode,
    encode,
)
from parkpool.schemas.codec import peek_type

TP = tuple[str, int]
Delivered = Callable[[KafkaError | None], None]


@dataclass(frozen=True)
class CancelRecord:
    tp: TP
    offset: int
    cancel: CancelJob


@dataclass(frozen=True)
class PartitionStat:
    """One owned partition as SREs see it (gauges and ``/status``)."""

    topic: str
    partition: int
    window_used: int
    window_size: int
    paused: bool
    committed: int  # the next offset to process: the stored commit point
    end: int  # the high watermark last reported by the broker; -1 when not known yet

    @property
    def lag(self) -> int:
        return max(0, self.end - self.committed) if self.end >= 0 else 0


class TaskLog:
    def __init__(
        self,
        kafka: KafkaConnection,
        topics: KafkaTopics,
        group: str,
        *,
        gateway_id: str,
        window: int,
        session_timeout_ms: int,
        metrics: GatewayMetrics,
        on_revoked: Callable[[set[TP]], None],
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.topics = topics
        self.gateway_id = gateway_id
        self.metrics = metrics
        self.windows: dict[TP, OffsetWindow] = {}
        self.paused: set[TP] = set()
        self._starts: dict[TP, int] = {}  # committed offset found at assignment
        self._overflow: dict[TP, collections.deque[Message]] = {}
        self._window = window
        self._on_revoked = on_revoked
        self._config = consumer_config(kafka, group, session_timeout_ms, **(overrides or {}))
        self.eager = "cooperative" not in str(self._config["partition.assignment.strategy"])
        self._consumer: Consumer | None = None
        self._producer = Producer(producer_config(kafka))
        self._log = structlog.get_logger("parkpool.gateway.kafka").bind(gateway_id=gateway_id)

    # ---------------------------------------------------------------- life cycle

    def open(self) -> None:
        self._consumer = Consumer(self._config)
        self._consumer.subscribe(
            [self.topics.tasks],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def close(self, timeout: float) -> None:
        """Make produced records durable, commit finished offsets, leave the group."""
        self._producer.flush(timeout)  # delivery reports fire here and finish offsets
        if self._consumer is not None:
            self._commit(list(self.windows))
            self._consumer.close()  # on_revoke runs for whatever is still assigned
            self._consumer = None

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            raise RuntimeError("the task log is not open")
        return self._consumer

    # ---------------------------------------------------------------- reading

    def poll(self, batch: int) -> list[PendingTask | CancelRecord]:
        """Records fetched so far (never blocks): tasks, cancels; bad ones dead-lettered.

        librdkafka hands over a whole batch before a pause takes effect, so records for a
        full window wait in a per-partition overflow (at most one batch) until it drains.
        """
        accepted = [self._accept(record) for record in self._from_overflow()]
        for record in self.consumer.consume(batch, timeout=0):
            if not self._ours(record):
                continue
            tp = (record.topic() or "", record.partition() or 0)
            if self._overflow[tp] or self.windows[tp].full:
                self._overflow[tp].append(record)  # keeps the partition's order
            else:
                accepted.append(self._accept(record))
        self._producer.poll(0)
        return [item for item in accepted if item is not None]

    def _ours(self, record: Message) -> bool:
        error = record.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                self._log.warning("kafka_consume_error", error=str(error))
            return False
        # A record fetched before its partition was revoked belongs to the new owner.
        return (record.topic(), record.partition()) in self.windows

    def _from_overflow(self) -> list[Message]:
        ready: list[Message] = []
        for tp, overflow in self._overflow.items():
            room = self.windows[tp].room
            while overflow and room > 0:
                ready.append(overflow.popleft())
                room -= 1
        return ready

    def _accept(self, record: Message) -> PendingTask | CancelRecord | None:
        topic, partition, offset = coordinates(record)
        tp = (topic, partition)
        self.windows[tp].add(offset)
        raw = record.value() or b""
        try:
            if peek_type(raw) == CancelJob.TYPE:
                return CancelRecord(tp, offset, decode(raw, CancelJob))
            task = PendingTask(topic, partition, offset, raw, decode(raw, TaskChunk))
        except DecodeError as exc:
            self.metrics.dropped.labels("kafka_tasks", exc.reason).inc()
            self._log.warning("task_malformed", partition=partition, offset=offset, reason=str(exc))
            self.dead_letter(tp, offset, raw, f"decode_{exc.reason}", str(exc))
            return None
        self.metrics.tasks.labels("consumed").inc()
        return task

    # ---------------------------------------------------------------- writing

    def produce(self, topic: str, value: bytes, key: str | None, done: Delivered) -> None:
        produce(self._producer, topic, value, key, lambda err, _msg: done(err))

    def dead_letter(
        self,
        tp: TP,
        offset: int,
        raw: bytes,
        reason: str,
        detail: str,
        task: PendingTask | None = None,
    ) -> None:
        """Write a dead letter; its offset counts as finished once Kafka has it."""
        letter = DeadLetter(
            reason=reason,
            detail=detail[:2048],
            source_topic=tp[0],
            partition=tp[1],
            offset=offset,
            original=raw,
            dead_at=time.time(),
            gateway_id=self.gateway_id,
            job_id=task.task.job_id if task else "",
            chunk_id=task.task.chunk_id if task else -1,
            attempts=tuple(task.history[-64:]) if task else (),
        )
        payload = encode(letter)

        def delivered(err: KafkaError | None) -> None:
            if err is not None:
                self.metrics.delivery_errors.labels("dead_letter").inc()
                self.produce(self.topics.dead_letter, payload, letter.job_id or None, delivered)
                return
            self.metrics.dead_lettered.labels(reason).inc()
            self.metrics.tasks.labels("dead_lettered").inc()
            context = task.log_context() if task else {"partition": tp[1], "offset": offset}
            self._log.warning("dead_lettered", reason=reason, **context)
            self.finish(tp, offset)

        self.produce(self.topics.dead_letter, payload, letter.job_id or None, delivered)

    # ---------------------------------------------------------------- offsets and flow

    def owns(self, tp: TP) -> bool:
        return tp in self.windows

    def finish(self, tp: TP, offset: int) -> None:
        window = self.windows.get(tp)
        if window is None:
            return  # revoked meanwhile: the new owner redoes it, the SDK drops the copy
        if window.finish(offset) and window.commit_point is not None:
            try:
                self.consumer.store_offsets(offsets=[TopicPartition(*tp, window.commit_point)])
            except KafkaException as exc:
                self._log.warning("store_offsets_failed", partition=tp[1], error=str(exc))

    def flow(self, starving: bool) -> None:
        """Pause full partitions, or all of them when no vehicle asks for work."""
        wanted = {tp for tp, w in self.windows.items() if starving or w.full or self._overflow[tp]}
        if to_pause := wanted - self.paused:
            self.consumer.pause([TopicPartition(*tp) for tp in to_pause])
        if to_resume := self.paused - wanted:
            self.consumer.resume([TopicPartition(*tp) for tp in to_resume])
        self.paused = wanted

    def pause_all(self) -> None:
        self.flow(starving=True)

    def stats(self) -> list[PartitionStat]:
        """Each owned partition's window, commit point and end; cheap (cached watermarks)."""
        out = []
        for tp, window in sorted(self.windows.items()):
            point = window.commit_point
            committed = self._starts.get(tp, 0) if point is None else point
            try:
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            except KafkaException:
                high = -1
            high = max(high, -1)  # librdkafka says -1001 until a fetch has reported it
            paused = tp in self.paused
            out.append(PartitionStat(*tp, window.used, window.capacity, paused, committed, high))
        return out

    # ---------------------------------------------------------------- rebalance

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start every new partition at the group's committed offset.

        A partition revoked and later assigned back to this same consumer would otherwise
        resume at librdkafka's old fetch position, past records this gateway dropped on
        revoke; they would be skipped until the next restart.
        """
        for p in partitions:
            self.windows[(p.topic, p.partition)] = OffsetWindow(self._window)
            self._overflow[(p.topic, p.partition)] = collections.deque()
        if partitions:
            starts = consumer.committed(partitions, timeout=10)  # -1001: use offset reset
            self._starts.update({(p.topic, p.partition): max(0, p.offset) for p in starts})
            if self.eager:
                consumer.assign(starts)
            else:
                consumer.incremental_assign(starts)
        self.metrics.rebalances.labels("assigned").inc()
        self._log.info("partitions_assigned", partitions=[p.partition for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is done for these partitions, then forget them and their leases."""
        gone = [(p.topic, p.partition) for p in partitions]
        self._commit(gone, consumer)
        self._forget(set(gone))
        self.metrics.rebalances.labels("revoked").inc()
        self._log.info("partitions_revoked", partitions=[tp[1] for tp in gone])

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Someone else owns these now: committing would overwrite their progress."""
        self._forget({(p.topic, p.partition) for p in partitions})
        self.metrics.rebalances.labels("lost").inc()
        self._log.warning("partitions_lost", partitions=[p.partition for p in partitions])

    def _forget(self, gone: set[TP]) -> None:
        for tp in gone:
            self.windows.pop(tp, None)
            self._starts.pop(tp, None)
            self.paused.discard(tp)
            self._overflow.pop(tp, None)
        self._on_revoked(gone)

    def _commit(self, tps: list[TP], consumer: Consumer | None = None) -> None:
        offsets = [
            TopicPartition(*tp, point)
            for tp in tps
            if (window := self.windows.get(tp)) and (point := window.commit_point) is not None
        ]
        if not offsets:
            return
        try:
            (consumer or self.consumer).commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self._log.warning("commit_failed", error=str(exc))
