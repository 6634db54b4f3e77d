# SPDX-License-Identifier: Apache-2.0
"""The gateway's Kafka writes: results and dead letters, through one idempotent producer.

Each write's report (delivered, or why not) is answered from ``serve`` on the loop's own
turn, never from inside the call that produced, and a report handler that raises is
counted instead of ending the loop.

An idempotent producer that the broker fenced, or whose id it lost (a Kafka restart, an
outage of the object store under Tansu), can never deliver again. librdkafka says so in
one of two ways: every later write fails with the same error (or a fatal error), or, when
Tansu has forgotten the producer id, nothing at all: it bumps the epoch and retries for
ever, and no report comes until ``message.timeout.ms``. ``serve`` replaces such a producer
with a new one (a new id from the broker), on the error, or once it has delivered nothing
for ``stall_s`` with writes outstanding, and produces again every write the old one had
not reported delivered. Some of those may have been written: results are at least once,
and the SDK drops the copies by chunk id, as it does after a gateway crash. While Kafka is
down, a stalled producer is replaced after ``stall_s``, then after twice as long each
time up to ``MAX_STALL_S``: a reconnect each time, nothing lost.

A write whose retry the broker calls a duplicate is reported delivered by librdkafka
("previous send succeeded but was not acknowledged"), with an offset that cannot be its
own: below zero, or not past one this writer already had acknowledged in that
partition. Tansu records a batch's sequence before it writes the batch, so when it is
killed in between, that "duplicate" was never stored. Such a write is produced again
(up to ``MAX_REPEATS`` times, then believed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.retry import DelayQueue
from parkpool.runtime import logs
from parkpool.runtime.kafka import produce, record_size

Delivered = Callable[[KafkaError | None], None]
Call = Callable[[], None]
# Delivery errors after which a producer delivers nothing more: the broker fenced it or
# lost its id, or librdkafka purged its queue after a fatal error.
FENCED = frozenset(
    {
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
        KafkaError._FATAL,
        KafkaError._FENCED,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
    }
)
# How long a fenced producer may still report what it did deliver before it is dropped.
SALVAGE_S = 1.0
# A producer with writes outstanding that delivered nothing for this long is replaced.
STALL_S = 15.0
MAX_STALL_S = 120.0
# How often a write acknowledged at an impossible offset is produced again.
MAX_REPEATS = 3


@dataclass(eq=False)
class _Write:
    """One record on its way to Kafka, until its delivery is reported."""

    topic: str
    value: bytes
    key: str | None
    report: Delivered
    producer: Any = field(default=None, repr=False)  # the current attempt's producer
    sent_at: float = 0.0  # monotonic, of the current attempt
    repeats: int = 0  # produced again after an acknowledgement at an impossible offset


class KafkaWriter:
    def __init__(
        self,
        config: dict[str, Any],
        *,
        max_record_bytes: int,
        later: DelayQueue[Call],
        metrics: GatewayMetrics,
        gateway_id: str,
        new_producer: Callable[[dict[str, Any]], Producer] = Producer,
        stall_s: float = STALL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._new_producer = new_producer
        self._producer = self._start()
        self._max_record_bytes = max_record_bytes
        self._later = later
        self.metrics = metrics
        self._unsettled: dict[int, _Write] = {}  # produced, delivery not reported yet
        self._acked: dict[tuple[str, int], int] = {}  # highest acknowledged offset, by TP
        self._fenced = ""  # why the producer can deliver nothing more; "" while it can
        self._clock = clock
        self._stall_s = self._next_stall_s = stall_s
        self._delivered_at = clock()  # the current producer's last delivery, or its start
        self._log = logs.get_logger("parkpool.gateway.kafka").bind(gateway_id=gateway_id)

    def produce(self, topic: str, value: bytes, key: str | None, done: Delivered) -> None:
        """Write a record; ``done`` hears how it went, always later, on the loop's turn."""
        report = self._guarded(done)
        size = record_size(value, key)
        if size > self._max_record_bytes:
            reason = f"{size} bytes exceeds the {self._max_record_bytes}-byte record limit"
            refused = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, reason)
            self._later.push(lambda: report(refused), 0.0)
        else:
            self._send(_Write(topic, value, key, report))

    def serve(self) -> None:
        """Answer delivery reports; replace the producer if it can deliver no more."""
        try:
            self._producer.poll(0)
        except KafkaException as exc:  # confluent-kafka raises librdkafka's fatal error
            self._fenced_by(self._producer, exc.args[0])
        if not self._fenced and self._stalled():
            self._fenced = f"no delivery for {self._clock() - self._delivered_at:.0f} s"
        if self._fenced:
            self._replace()

    def _stalled(self) -> bool:
        """Writes outstanding, and none delivered for the stall time."""
        if not self._unsettled:
            return False
        oldest = next(iter(self._unsettled.values()))
        limit = self._clock() - self._next_stall_s
        return oldest.sent_at < limit and self._delivered_at < limit

    def flush(self, timeout: float) -> int:
        """Wait for outstanding writes (their reports fire here); how many are left."""
        try:
            left: int = self._producer.flush(timeout)
        except KafkaException as exc:
            self._log.warning("kafka_producer_failed_on_flush", error=str(exc))
            return len(self._unsettled)
        return left

    # ---------------------------------------------------------------- internals

    def _send(self, write: _Write) -> None:
        producer = write.producer = self._producer
        write.sent_at = self._clock()
        self._unsettled[id(write)] = write
        try:
            refused = produce(
                producer,
                write.topic,
                write.value,
                write.key,
                lambda err, msg: self._delivered(producer, write, err, msg),
            )
        except KafkaException as exc:  # raised by a poll for room in a full queue
            refused = exc.args[0]
        if refused is None or self._fenced_by(producer, refused):
            return  # a fenced producer's writes stay unsettled: its successor sends them
        del self._unsettled[id(write)]
        self._later.push(lambda: write.report(refused), 0.0)

    def _delivered(
        self, producer: Producer, write: _Write, err: KafkaError | None, msg: Message
    ) -> None:
        if write.producer is not producer:
            return  # a late report of an attempt already made again
        if err is not None and self._fenced_by(producer, err):
            return
        if err is None and not self._believable(write, msg):
            write.repeats += 1
            self.metrics.writes_repeated.inc()
            self._log.warning(
                "kafka_write_repeated", partition=msg.partition(), offset=msg.offset()
            )
            self._send(write)  # a new sequence number: stored this time
            return
        del self._unsettled[id(write)]
        if err is None:
            self._delivered_at = self._clock()
            self._next_stall_s = self._stall_s
        write.report(err)

    def _believable(self, write: _Write, msg: Message) -> bool:
        """Whether an acknowledgement's offset can be the write's own (see the module)."""
        tp = (msg.topic() or "", msg.partition() or 0)
        offset = msg.offset()
        if offset is None or offset < 0:
            return False
        if offset <= self._acked.get(tp, -1) and write.repeats < MAX_REPEATS:
            return False  # after MAX_REPEATS, the partition's log itself went back
        self._acked[tp] = offset
        return True

    def _fenced_by(self, producer: Producer, err: KafkaError) -> bool:
        """Whether ``err`` means the producer delivers nothing more; if it is the
        current one, ``serve`` replaces it."""
        if err.code() not in FENCED and not err.fatal():
            return False
        if producer is self._producer and not self._fenced:
            self._fenced = err.str()
            self._log.warning("kafka_producer_fenced", error=err.str(), code=err.name())
        return True

    def _start(self) -> Producer:
        """A new producer whose error events name it (an old one may still report)."""
        started: list[Producer] = []

        def on_error(err: KafkaError) -> None:  # served by poll; only fatal ones matter
            if err.fatal():
                self._fenced_by(started[0], err)

        started.append(self._new_producer({**self._config, "error_cb": on_error}))
        return started[0]

    def _replace(self) -> None:
        old, reason = self._producer, self._fenced
        self._producer, self._fenced = self._start(), ""
        self._acked.clear()  # a Kafka that lost its log (in memory) starts offsets again
        self._delivered_at = self._clock()
        self._next_stall_s = min(2 * self._next_stall_s, MAX_STALL_S)  # reset by a delivery
        with contextlib.suppress(KafkaException):
            old.purge()
            old.flush(SALVAGE_S)  # reports what it did deliver; the purged stay unsettled
        again = [write for write in self._unsettled.values() if write.producer is old]
        self.metrics.producer_recreated.inc()
        self._log.warning("kafka_producer_recreated", reason=reason, resending=len(again))
        for write in again:
            self._send(write)

    def _guarded(self, done: Delivered) -> Delivered:
        def report(err: KafkaError | None) -> None:
            try:
                done(err)
            except Exception:
                # Raised inside librdkafka's poll(), it would end the gateway's loop.
                self.metrics.handler_errors.labels("kafka_delivery").inc()
                self._log.exception("delivery_handler_failed", error=str(err))

        return report
