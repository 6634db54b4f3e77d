# SPDX-License-Identifier: Apache-2.0
"""The gateway's Kafka side: the tasks it reads, the records it writes, the offsets it commits.

Offsets are stored (and auto-committed) only up to the lowest unfinished record of each
partition, so a crash at any point leads to records being read again, never skipped.
A partition is paused when its window is full (too many records in flight, or read too
far past the lowest unfinished one) or no vehicle is asking for work, and ``poll`` keeps
running meanwhile so the consumer stays in its group.

Every record read ends here in one of two ways: it becomes a task (or a cancel) for the
gateway, or it is dead-lettered (``gateway.deadletters``). A record whose handling raises
is dead-lettered too, and counted, so no record can stop the loop or come back after a
restart. Delivery reports, and writes Kafka refused at once, are answered from ``poll``
on the loop's own turn, never from inside the call that produced.

Writes go through ``gateway.kafkawriter``, which replaces a producer the broker fenced.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from parkpool.gateway.deadletters import Call, DeadLetters
from parkpool.gateway.kafkawriter import KafkaWriter
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.retry import DelayQueue
from parkpool.gateway.tasks import PendingTask
from parkpool.gateway.window import OffsetWindow
from parkpool.runtime import logs
from parkpool.runtime.fetchwait import MAX_FETCH_WAIT_MS, FetchWaitLadder
from parkpool.runtime.kafka import (
    TASK_FETCH_WAIT_MS,
    answers,
    cached_high,
    consumer_config,
    coordinates,
    producer_config,
)
from parkpool.runtime.offsets import OffsetLedger
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import CancelJob, ConfigError, DecodeError, KafkaTopics, TaskChunk, decode
from parkpool.schemas.codec import peek_type
from parkpool.schemas.topics import parse_task_key

TP = tuple[str, int]
Delivered = Callable[[KafkaError | None], None]

# A stalled partition costs a new consumer, so leaving and joining the group (seconds):
# only one behind this long, with room to read and nothing read, counts as stalled.
STALL_PATIENCE_S = 10.0
STALL_CHECK_S = 0.5


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
    window_used: int  # records in flight (read, not finished)
    window_size: int  # how many may be in flight (--window)
    paused: bool
    committed: int  # the next offset to process: the stored commit point
    end: int  # the high watermark last reported by the broker; -1 when not known yet
    window_span: int = 0  # offsets from the commit point to the next to read
    window_max_span: int = 0  # how far that may grow (--window-span)

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
        window_span: int = 0,
        session_timeout_ms: int,
        metrics: GatewayMetrics,
        on_revoked: Callable[[set[TP]], None],
        overrides: dict[str, Any] | None = None,
        fetch_wait_ms: int = TASK_FETCH_WAIT_MS,
    ) -> None:
        self.topics = topics
        self.gateway_id = gateway_id
        self.metrics = metrics
        self.windows: dict[TP, OffsetWindow] = {}
        self.paused: set[TP] = set()
        self._starts: dict[TP, int] = {}  # committed offset found at assignment
        # Offsets read per partition: a fetch that passed some over is gone back for,
        # and nothing is committed past them meanwhile (runtime.offsets).
        self._ledger = OffsetLedger()
        self._overflow: dict[TP, collections.deque[Message]] = {}
        self._window = (window, window_span)  # window_span 0: SPAN_PER_SLOT x window
        OffsetWindow(*self._window)  # bad sizes fail here, not inside a rebalance callback
        self._on_revoked = on_revoked
        overrides = {"fetch.wait.max.ms": fetch_wait_ms, **(overrides or {})}
        self._config = consumer_config(kafka, group, session_timeout_ms, **overrides)
        wait = int(self._config["fetch.wait.max.ms"])  # a kafka override wins
        if not 1 <= wait <= MAX_FETCH_WAIT_MS:
            detail = f"the task fetch wait must be 1-{MAX_FETCH_WAIT_MS} ms, got {wait}"
            raise ConfigError(detail)
        # Raised when a partition stalls on the durable embedded Kafka (runtime.fetchwait).
        self._ladder = FetchWaitLadder(wait, MAX_FETCH_WAIT_MS, STALL_PATIENCE_S)
        self._next_stall_check = 0.0
        self.eager = "cooperative" not in str(self._config["partition.assignment.strategy"])
        self._consumer: Consumer | None = None
        self._standby = False
        self._later: DelayQueue[Call] = DelayQueue()
        self.writer = KafkaWriter(
            producer_config(kafka),
            max_record_bytes=kafka.max_record_bytes,
            later=self._later,
            metrics=metrics,
            gateway_id=gateway_id,
            new_producer=Producer,  # looked up here, so that tests may replace it
        )
        self._log = logs.get_logger("parkpool.gateway.kafka").bind(gateway_id=gateway_id)
        self.letters = DeadLetters(
            topic=topics.dead_letter,
            gateway_id=gateway_id,
            max_record_bytes=kafka.max_record_bytes,
            write=self.produce,
            later=self._later,
            finished=self.finish,
            metrics=metrics,
        )

    # ---------------------------------------------------------------- life cycle

    def open(self) -> None:
        self._consumer = Consumer(self._config)
        self._subscribe(self._consumer)

    def _subscribe(self, consumer: Consumer) -> None:
        consumer.subscribe(
            [self.topics.tasks],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    @property
    def standby(self) -> bool:
        """Out of the task group on purpose (``leave``), holding no partition."""
        return self._standby

    def leave(self) -> None:
        """Leave the task group but keep producing: done work is committed on revoke, and
        the partitions go to the other members at once."""
        if self._consumer is not None and not self._standby:
            self._standby = True
            self._consumer.unsubscribe()

    def join(self) -> None:
        """Join the task group again after ``leave``."""
        if self._consumer is not None and self._standby:
            self._standby = False
            self._subscribe(self._consumer)

    def close(self, timeout: float) -> None:
        """Make produced records durable, commit finished offsets, leave the group.

        Writes still waiting for a retry are given up: their records' offsets are not
        finished, so the partition's next owner reads them again.
        """
        self.writer.flush(timeout)  # delivery reports fire here and finish offsets
        if len(self._later):
            self._log.warning("writes_abandoned_on_close", count=len(self._later))
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
        full window wait in a per-partition overflow (at most one batch) until it has room.
        """
        for call in self._later.pop_due():
            call()
        self._reread_holes()
        self._check_stalls()
        accepted = self._from_overflow()
        for record in self.consumer.consume(batch, timeout=0):
            if not self._ours(record):
                continue
            tp = (record.topic() or "", record.partition() or 0)
            offset = record.offset() or 0
            self._ladder.read()
            if not self._ledger.admit(tp, offset):
                continue  # read again for a hole: it was had the first time
            if self.windows[tp].is_late(offset):
                # A hole filled: older than all that waits, so it goes first, even past
                # a full window (holes are rare); waiting, it would sit below the point.
                accepted.append(self._accept(record))
            elif self._overflow[tp] or self.windows[tp].full:
                self._overflow[tp].append(record)  # keeps the partition's order
            else:
                accepted.append(self._accept(record))
        self.writer.serve()
        return [item for item in accepted if item is not None]

    def _ours(self, record: Message) -> bool:
        error = record.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                self._log.warning("kafka_consume_error", error=str(error))
                self._ladder.read()  # fetches that fail are not a stall of the listing
            return False
        # A record fetched before its partition was revoked belongs to the new owner.
        return (record.topic(), record.partition()) in self.windows

    def _from_overflow(self) -> list[PendingTask | CancelRecord | None]:
        """Accept waiting records, oldest first, while their windows have room."""
        accepted: list[PendingTask | CancelRecord | None] = []
        for tp, overflow in self._overflow.items():
            window = self.windows[tp]
            while overflow and not window.full:  # each accept adds to the window
                accepted.append(self._accept(overflow.popleft()))
        return accepted

    def _accept(self, record: Message) -> PendingTask | CancelRecord | None:
        topic, partition, offset = coordinates(record)
        tp = (topic, partition)
        self.windows[tp].add_late(offset)  # in its turn, or a hole filled
        raw = record.value() or b""
        claimed = parse_task_key(record.key())
        try:
            return self._read(tp, offset, raw, claimed)
        except Exception as exc:
            # A bug met by one record must not stop the loop, nor meet every restart.
            self.metrics.handler_errors.labels("kafka_tasks").inc()
            self._log.exception("record_handler_failed", partition=partition, offset=offset)
            self.letters.send(tp, offset, raw, "handler_error", repr(exc), claimed=claimed)
            return None

    def _read(
        self, tp: TP, offset: int, raw: bytes, claimed: tuple[str, int] | None
    ) -> PendingTask | CancelRecord | None:
        try:
            if peek_type(raw) == CancelJob.TYPE:
                return CancelRecord(tp, offset, decode(raw, CancelJob))
            task = PendingTask(*tp, offset, raw, decode(raw, TaskChunk))
        except DecodeError as exc:
            self.metrics.dropped.labels("kafka_tasks", exc.reason).inc()
            self._log.warning(
                "task_malformed", partition=tp[1], offset=offset, size=len(raw), reason=str(exc)
            )
            self.letters.send(tp, offset, raw, f"decode_{exc.reason}", str(exc), claimed=claimed)
            return None
        self.metrics.tasks.labels("consumed").inc()
        return task

    # ---------------------------------------------------------------- writing

    def produce(self, topic: str, value: bytes, key: str | None, done: Delivered) -> None:
        """Write a record; ``done`` hears how it went, always later, on the loop's turn."""
        self.writer.produce(topic, value, key, done)

    # ---------------------------------------------------------------- offsets and flow

    def _reread_holes(self) -> None:
        """Go back for tasks a fetch passed over: Tansu can show a later batch of a
        partition before an earlier one when several clients write to it, and a task
        passed over would otherwise be committed past, never run, its job never done."""
        for tp, offset in self._ledger.due():
            if tp not in self.windows:
                continue
            try:
                self.consumer.seek(TopicPartition(*tp, offset))
            except KafkaException as exc:  # not fetching yet: the next look tries again
                self._log.warning("hole_seek_failed", partition=tp[1], error=str(exc))
        filled, lost = self._ledger.news()
        if filled or lost:
            self.metrics.offset_holes.labels("filled").inc(filled)
            self.metrics.offset_holes.labels("lost").inc(lost)
        if lost:
            self._log.error("tasks_never_read", records=lost)

    def _check_stalls(self) -> None:
        """Wait longer per fetch once a partition that may read has records past what
        was read and its fetches keep coming back without them: the durable embedded
        Kafka no longer lists its history within the wait. The consumer is made again
        with the longer wait (librdkafka fixes it when a consumer is made), so its
        partitions go back through the group as in any rebalance."""
        now = time.monotonic()
        if now < self._next_stall_check or self._consumer is None or self._standby:
            return
        self._next_stall_check = now + STALL_CHECK_S
        behind = [
            tp
            for tp in self._reading()
            if cached_high(self.consumer, tp) > (self._ledger.top(tp) or 0)
        ]
        if not self._ladder.due(behind, now):
            return
        if not answers(self._consumer, behind[0]):
            self._ladder.read()  # Kafka (or the store under it) out of reach: no stall
            return
        wait = self._ladder.raise_wait()
        self._log.warning("task_fetch_wait_raised", wait_ms=wait, behind=len(behind))
        self.metrics.task_fetch_wait_raised.inc()
        self._config = {**self._config, "fetch.wait.max.ms": wait}
        old, self._consumer = self._consumer, Consumer(self._config)
        try:
            old.close()  # on_revoke commits what is done and forgets the partitions
        except KafkaException as exc:
            self._log.warning("consumer_close_failed", error=str(exc))
        self._subscribe(self._consumer)

    def _reading(self) -> list[TP]:
        """Owned partitions with room to read: not paused, nothing waiting for room."""
        return [
            tp
            for tp, window in self.windows.items()
            if tp not in self.paused and not self._overflow[tp] and not window.full
        ]

    def _committable(self, tp: TP, window: OffsetWindow) -> int | None:
        """The window's commit point, never past a task still missed."""
        point = window.commit_point
        hole = self._ledger.first_hole(tp)
        if point is None or hole is None:
            return point
        return min(point, hole)

    def owns(self, tp: TP) -> bool:
        return tp in self.windows

    def finish(self, tp: TP, offset: int) -> None:
        window = self.windows.get(tp)
        if window is None:
            return  # revoked meanwhile: the new owner redoes it, the SDK drops the copy
        if window.finish(offset) and (point := self._committable(tp, window)) is not None:
            try:
                self.consumer.store_offsets(offsets=[TopicPartition(*tp, point)])
            except KafkaException as exc:
                self._log.warning("store_offsets_failed", partition=tp[1], error=str(exc))

    def flow(self, starving: bool) -> None:
        """Pause full partitions, or all of them (``starving``) when no vehicle asks for
        work or the gateway holds as many unfinished tasks as it may."""
        wanted = {tp for tp, w in self.windows.items() if starving or w.full or self._overflow[tp]}
        if to_pause := wanted - self.paused:
            self.consumer.pause([TopicPartition(*tp) for tp in to_pause])
        if to_resume := self.paused - wanted:
            self.consumer.resume([TopicPartition(*tp) for tp in to_resume])
        for tp in to_pause | to_resume:
            self._ledger.hold(tp, tp in wanted)  # a paused partition's holes wait, unaged
        self.paused = wanted

    def pause_all(self) -> None:
        self.flow(starving=True)

    def stats(self) -> list[PartitionStat]:
        """Each owned partition's window, commit point and end; cheap (cached watermarks)."""
        out = []
        for tp, window in sorted(self.windows.items()):
            point = self._committable(tp, window)
            committed = self._starts.get(tp, 0) if point is None else point
            high = cached_high(self.consumer, tp)
            out.append(
                PartitionStat(
                    *tp,
                    window_used=window.in_flight,
                    window_size=window.capacity,
                    paused=tp in self.paused,
                    committed=committed,
                    end=high,
                    window_span=window.span,
                    window_max_span=window.max_span,
                )
            )
        return out

    # ---------------------------------------------------------------- rebalance

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start every new partition at the group's committed offset.

        A partition revoked and later assigned back to this same consumer would otherwise
        resume at librdkafka's old fetch position, past records this gateway dropped on
        revoke; they would be skipped until the next restart. It would also still be
        paused if it was when it went (librdkafka keeps that across assignments), while
        ``flow`` counts it as running and would never resume it: a Kafka restart that
        timed out the session left partitions unread for good that way.
        """
        for p in partitions:
            self.windows[(p.topic, p.partition)] = OffsetWindow(*self._window)
            self._overflow[(p.topic, p.partition)] = collections.deque()
        if partitions:
            starts = consumer.committed(partitions, timeout=10)  # -1001: use offset reset
            self._starts.update({(p.topic, p.partition): max(0, p.offset) for p in starts})
            for p in starts:
                self._ledger.forget((p.topic, p.partition))
                self._ledger.start((p.topic, p.partition), self._first(consumer, p))
            if self.eager:
                consumer.assign(starts)
            else:
                consumer.incremental_assign(starts)
            consumer.resume([TopicPartition(p.topic, p.partition) for p in partitions])
        self.metrics.rebalances.labels("assigned").inc()
        self._log.info("partitions_assigned", partitions=[p.partition for p in partitions])

    def _first(self, consumer: Consumer, committed: TopicPartition) -> int:
        """The first offset this gateway will read of a partition: the group's commit,
        or with none, the partition's start (the consumer reads from the earliest)."""
        if committed.offset >= 0:
            return int(committed.offset)
        try:
            low, _high = consumer.get_watermark_offsets(committed, timeout=5)
        except KafkaException:
            return 0
        return max(0, int(low))

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
            self._ledger.forget(tp)
            self.paused.discard(tp)
            self._overflow.pop(tp, None)
        self._on_revoked(gone)

    def _commit(self, tps: list[TP], consumer: Consumer | None = None) -> None:
        offsets = [
            TopicPartition(*tp, point)
            for tp in tps
            if (window := self.windows.get(tp))
            and (point := self._committable(tp, window)) is not None
        ]
        if not offsets:
            return
        try:
            (consumer or self.consumer).commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self._log.warning("commit_failed", error=str(exc))
