# SPDX-License-Identifier: Apache-2.0
"""Every car's record, folded from the compacted reputation topic (schemas.reputation).

``ReputationBook`` is the pure fold: the gateways ask it whom to keep from work, the
SDK asks it whom to trust, the CLI shows it. ``ReputationReader`` keeps a book current
from the topic on a thread of its own; ``ReputationWriter`` publishes one client's
verdicts. A reader starts from the topic's beginning, which compaction keeps at about
one record per car and writer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from parkpool.runtime import logs
from parkpool.runtime.kafka import GROWING_FETCH_WAIT_MS, produce, producer_config, reader_config
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import BrokerError, DecodeError, decode, encode, peek_type
from parkpool.schemas.reputation import (
    CarState,
    CarTally,
    Evidence,
    Level,
    QuarantineNotice,
    tally_key,
)

log = logs.get_logger("parkpool.reputation")
TALLY_EVERY_S = 1.0  # a client writes each changed tally at most this often

# BOINC's adaptive replication trusts a host after 10 consecutive valid results; so do
# we, counting only results of the car's current generation with no invalid one.
TRUST_AFTER = 10


@dataclass(frozen=True)
class CarRecord:
    """One car's standing: sums over every writer's tally of its current generation."""

    vehicle_id: str
    generation: int = 0
    valid: int = 0
    invalid: int = 0
    unchecked: int = 0
    quarantine: QuarantineNotice | None = None  # the last notice, if any

    @property
    def quarantined(self) -> bool:
        return self.quarantine is not None and self.quarantine.state is CarState.QUARANTINED

    @property
    def trusted(self) -> bool:
        return not self.quarantined and self.invalid == 0 and self.valid >= TRUST_AFTER


@dataclass
class _Car:
    generation: int = 0
    tallies: dict[str, CarTally] = field(default_factory=dict)
    quarantine: QuarantineNotice | None = None


class ReputationBook:
    """The fold of reputation records; thread-safe, last record per key wins.

    ``tallies=False`` keeps quarantine state only: what a gateway needs, in memory for
    the cars quarantined rather than ~0.5 KB for every car and client that judged it.
    """

    def __init__(self, *, tallies: bool = True) -> None:
        self._cars: dict[str, _Car] = {}
        self._lock = threading.Lock()
        self._tallies = tallies
        # Kept as notices come, for a gauge read at every gateway loop step: counting
        # would be a pass over every car the book holds.
        self._quarantined = 0

    def apply(self, message: CarTally | QuarantineNotice) -> None:
        if not self._tallies and isinstance(message, CarTally):
            return
        with self._lock:
            car = self._cars.setdefault(message.vehicle_id, _Car())
            if isinstance(message, QuarantineNotice):
                self._quarantined += _quarantines(message) - _quarantines(car.quarantine)
                car.quarantine = message
                car.generation = max(car.generation, message.generation)
            else:
                car.tallies[message.writer] = message
                car.generation = max(car.generation, message.generation)

    def record(self, vehicle_id: str) -> CarRecord:
        with self._lock:
            car = self._cars.get(vehicle_id)
            if car is None:
                return CarRecord(vehicle_id)
            current = [t for t in car.tallies.values() if t.generation == car.generation]
            return CarRecord(
                vehicle_id,
                car.generation,
                sum(t.valid for t in current),
                sum(t.invalid for t in current),
                sum(t.unchecked for t in current),
                car.quarantine,
            )

    def quarantined(self, vehicle_id: str) -> bool:
        with self._lock:
            car = self._cars.get(vehicle_id)
            notice = car.quarantine if car is not None else None
        return _quarantines(notice)

    def quarantined_count(self) -> int:
        """How many cars are quarantined: a counter's read, whatever the book's size."""
        return self._quarantined

    def cars(self) -> list[str]:
        with self._lock:
            return sorted(self._cars)

    def quarantined_cars(self) -> list[str]:
        return [car for car in self.cars() if self.quarantined(car)]


def _quarantines(notice: QuarantineNotice | None) -> bool:
    return notice is not None and notice.state is CarState.QUARANTINED


class ReputationReader(threading.Thread):
    """Keeps a book current from the reputation topic; ``caught_up`` once it read to the
    end it found at start. Records that do not decode are counted and skipped."""

    def __init__(
        self,
        conn: KafkaConnection,
        topic: str,
        book: ReputationBook,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="parkpool-reputation", daemon=True)
        self.book = book
        self.topic = topic
        self.malformed = 0
        self.caught_up = threading.Event()
        self._halt = threading.Event()
        self._on_error = on_error
        # Quarantines are rare and nothing waits on them by the millisecond: long fetch
        # waits keep many idle readers (every gateway, every client) from loading the
        # brokers; a durable Tansu lists its store on every fetch (docs/DECISIONS.md).
        self.consumer = Consumer(
            reader_config(conn, **{"fetch.wait.max.ms": GROWING_FETCH_WAIT_MS})
        )
        self._ends = self._assign()

    def _assign(self) -> dict[int, int]:
        metadata = self.consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
        if metadata is None or metadata.error is not None:
            raise BrokerError(
                f"topic {self.topic} does not exist; run `parkpool brokers bootstrap`"
            )
        ends: dict[int, int] = {}
        starts: dict[int, int] = {}
        for partition in metadata.partitions:
            low, high = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=10
            )
            # From where its records begin: a partition whose start was deleted would put
            # offset 0 out of range, and the reader past the end, never caught up.
            starts[partition] = max(low, 0)
            if high > starts[partition]:
                ends[partition] = high
        self.consumer.assign([TopicPartition(self.topic, p, o) for p, o in starts.items()])
        if not ends:
            self.caught_up.set()
        return ends

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                for record in self.consumer.consume(500, timeout=0.2):
                    self._take(record)
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def _take(self, record: Message) -> None:
        error = record.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF and self._on_error is not None:
                self._on_error(error.str())
            return
        self._fold(record.value() or b"")
        partition, offset = record.partition(), record.offset()
        if partition in self._ends and (offset or 0) + 1 >= self._ends[partition]:
            del self._ends[partition]
            if not self._ends:
                self.caught_up.set()

    def _fold(self, value: bytes) -> None:
        try:
            kind = _TYPES.get(peek_type(value) or "", CarTally)
            message: CarTally | QuarantineNotice = decode(value, kind)
        except DecodeError as exc:
            self.malformed += 1
            log.warning("reputation_record_malformed", reason=str(exc))
            return
        assert isinstance(message, CarTally | QuarantineNotice)
        self.book.apply(message)


_TYPES: dict[str, type] = {CarTally.TYPE: CarTally, QuarantineNotice.TYPE: QuarantineNotice}


class ReputationWriter:
    """Publishes one writer's tallies and quarantines, and folds them into its own book
    at once, so its next decision does not wait for the round trip through Kafka."""

    def __init__(self, conn: KafkaConnection, topic: str, writer: str, book: ReputationBook):
        self.topic = topic
        self.writer = writer
        self.book = book
        self._conn = conn
        self._renew = False  # the producer hit a fatal error (e.g. the broker forgot it)
        self._producer = self._new_producer()
        self._mine: dict[str, CarTally] = {}
        self._dirty: set[str] = set()  # cars whose tally changed since it was written
        self._sent_at = 0.0
        self._lock = threading.Lock()
        self.failed = 0  # records Kafka did not take; the next tally of the car repeats them

    def judge(self, vehicle_id: str, verdicts: Iterable[bool | None]) -> CarTally:
        """Count results of the car: True valid, False invalid, None handed over unchecked."""
        generation = self.book.record(vehicle_id).generation
        with self._lock:
            old = self._mine.get(vehicle_id)
            if old is None or old.generation != generation:
                old = CarTally(vehicle_id, self.writer, generation, 0, 0, 0, time.time())
            valid, invalid, unchecked = old.valid, old.invalid, old.unchecked
            for verdict in verdicts:
                valid += verdict is True
                invalid += verdict is False
                unchecked += verdict is None
            tally = CarTally(
                vehicle_id, self.writer, generation, valid, invalid, unchecked, time.time()
            )
            self._mine[vehicle_id] = tally
            self._dirty.add(vehicle_id)
        self.book.apply(tally)
        self._send_due()
        return tally

    def _send_due(self, now: bool = False) -> None:
        """Write the tallies that changed, at most once per ``TALLY_EVERY_S``: each is
        absolute, so only a car's latest counts matter, and a job of thousands of chunks
        costs a few records per car rather than one per chunk."""
        with self._lock:
            if not now and time.monotonic() - self._sent_at < TALLY_EVERY_S:
                return
            self._sent_at = time.monotonic()
            due = [self._mine[car] for car in self._dirty]
            self._dirty.clear()
        for tally in due:
            self._send(tally_key(tally.vehicle_id, self.writer), encode(tally))

    def quarantine(self, vehicle_id: str, evidence: tuple[Evidence, ...], reason: str) -> None:
        record = self.book.record(vehicle_id)
        if record.quarantined:
            return
        notice = QuarantineNotice(
            vehicle_id,
            CarState.QUARANTINED,
            record.generation,
            time.time(),
            self.writer,
            reason,
            evidence,
        )
        self.book.apply(notice)
        self._send(vehicle_id, encode(notice))
        log.warning(
            "vehicle_quarantined",
            vehicle_id=vehicle_id,
            reason=reason,
            evidence=[f"{e.job_id}:{e.chunk_id} {e.check}: {e.detail}" for e in evidence],
        )

    def _send(self, key: str, value: bytes) -> None:
        """Write one record; a failure is logged and counted, never raised: verdicts must
        not stop results reaching callers, and the car's next tally repeats the counts.
        A producer with a fatal error (a restarted broker forgot its id) is replaced."""
        if self._renew:
            self._renew = False
            self._producer = self._new_producer()
            log.warning("reputation_producer_recreated")
        try:
            refused = produce(self._producer, self.topic, value, key, self._report)
            self._producer.poll(0)
        except KafkaException as exc:
            refused = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            self._renew = refused is None or refused.fatal()
            log.warning("reputation_not_written", key=key, reason=str(exc))
            self.failed += 1
            return
        if refused is not None:
            self.failed += 1
            self._renew = self._renew or refused.fatal()
            log.warning("reputation_not_written", key=key, reason=str(refused))

    def _new_producer(self) -> Producer:
        # With an error callback, librdkafka reports a fatal error (a broker that lost
        # the producer's sequence, say) here; without one, flush() raised it while the
        # delivery reports it also triggered ran, and the client's close() crashed.
        return Producer(producer_config(self._conn, error_cb=self._on_error))

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._renew = True
            log.warning("reputation_producer_failed", reason=err.str())

    def _report(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.failed += 1
            self._renew = self._renew or err.fatal()
            log.warning("reputation_not_written", reason=str(err))

    def flush(self, timeout: float = 10.0) -> int:
        try:
            return int(self._producer.flush(timeout))
        except KafkaException as exc:
            log.warning("reputation_not_flushed", reason=str(exc))
            return -1

    def close(self, timeout: float = 10.0) -> None:
        """Send what is pending, then free the producer now, not at some later garbage
        collection while the brokers may already be gone."""
        self._send_due(now=True)
        left = self.flush(timeout)
        if left:
            log.warning("reputation_records_lost", records=left)
        del self._producer


def release(
    conn: KafkaConnection, topic: str, book: ReputationBook, vehicle_id: str, by: str, note: str
) -> QuarantineNotice:
    """An operator's release: the car gets work again, starting a new generation, so it
    is checked as closely as a new car until it earns trust again."""
    record = book.record(vehicle_id)
    who = f"{by}: {note}" if note else by
    notice = QuarantineNotice(
        vehicle_id, CarState.RELEASED, record.generation + 1, time.time(), who, "released"
    )
    producer = Producer(producer_config(conn))
    failures: list[str] = []

    def report(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(err.str())

    refused = produce(producer, topic, encode(notice), vehicle_id, report)
    if refused is not None or producer.flush(10) or failures:
        raise BrokerError(f"release of {vehicle_id} not confirmed by Kafka")
    book.apply(notice)
    return notice


__all__ = [
    "TRUST_AFTER",
    "CarRecord",
    "Level",
    "ReputationBook",
    "ReputationReader",
    "ReputationWriter",
    "release",
]
