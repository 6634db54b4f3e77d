# SPDX-License-Identifier: Apache-2.0
"""The gateway's writer replaces a producer the broker fenced, and loses no write.

Pure logic: the producer is a stub whose delivery reports the test decides. The real
broker cases (a Kafka SIGKILL, a producer id the broker lost) are in
tests/test_kafka_restart.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaError, KafkaException

from parkpool.gateway.kafkawriter import KafkaWriter
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.retry import DelayQueue

Report = Callable[[KafkaError | None, Any], None]


@dataclass(frozen=True)
class Delivered:
    """What librdkafka hands a delivery report: where the record went."""

    value: bytes
    offset_: int

    def topic(self) -> str:
        return "results"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.offset_


class StubProducer:
    """Keeps what it was asked to produce; reports fire from poll or flush. Offsets go on
    from where the last producer's left off, as a partition's log does."""

    made: ClassVar[list[StubProducer]] = []
    next_offset: ClassVar[int] = 0

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.pending: list[tuple[bytes, Report]] = []
        self.reports: list[tuple[Report, KafkaError | None, Delivered]] = []
        self.raise_on_poll: KafkaError | None = None
        self.refuse: KafkaError | None = None
        self.purged = False
        StubProducer.made.append(self)

    def produce(self, topic: str, value: bytes, *, on_delivery: Report, **_: Any) -> None:
        if self.refuse is not None:
            raise KafkaException(self.refuse)
        self.pending.append((value, on_delivery))

    def deliver(self, err: KafkaError | None = None, offset: int | None = None) -> None:
        """The broker answers every pending write with ``err`` (None: delivered), at the
        log's next offsets, or from ``offset`` (librdkafka's "duplicate" acknowledgement)."""
        for value, report in self.pending:
            if offset is None:
                at = StubProducer.next_offset
                StubProducer.next_offset += 1
            else:
                at, offset = offset, offset + 1
            self.reports.append((report, err, Delivered(value, at)))
        self.pending.clear()

    def poll(self, _timeout: float) -> int:
        if self.raise_on_poll is not None:
            error, self.raise_on_poll = self.raise_on_poll, None
            raise KafkaException(error)
        served, self.reports = self.reports, []
        for report, err, message in served:
            report(err, message)
        return len(served)

    def purge(self) -> None:
        self.purged = True
        self.deliver(KafkaError(KafkaError._PURGE_QUEUE))

    def flush(self, timeout: float) -> int:
        self.poll(timeout)
        return len(self.pending)


@pytest.fixture(autouse=True)
def fresh_stubs() -> None:
    StubProducer.made = []
    StubProducer.next_offset = 100


class Outcomes:
    """What each write's ``done`` heard, by value."""

    def __init__(self) -> None:
        self.heard: dict[bytes, list[int | None]] = {}

    def done(self, value: bytes) -> Callable[[KafkaError | None], None]:
        def report(err: KafkaError | None) -> None:
            self.heard.setdefault(value, []).append(None if err is None else err.code())

        return report


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def writer(
    clock: Clock | None = None,
) -> tuple[KafkaWriter, GatewayMetrics, DelayQueue[Callable[[], None]]]:
    metrics, later = GatewayMetrics(), DelayQueue[Callable[[], None]]()
    made = KafkaWriter(
        {"bootstrap.servers": "127.0.0.1:9"},
        max_record_bytes=1 << 20,
        later=later,
        metrics=metrics,
        gateway_id="gw1",
        new_producer=StubProducer,  # type: ignore[arg-type]
        stall_s=15.0,
        clock=clock or Clock(),
    )
    return made, metrics, later


def recreated(metrics: GatewayMetrics) -> float:
    return metrics.value("parkpool_gateway_kafka_producer_recreated_total")


class TestFencedProducer:
    """Writes a fenced producer did not deliver are sent again by a new one, once."""

    def test_fenced_reports_move_the_writes_to_a_new_producer(self) -> None:
        # Given two writes in flight on the first producer
        kafka, metrics, _ = writer()
        outcomes = Outcomes()
        for value in (b"a", b"b"):
            kafka.produce("results", value, "job", outcomes.done(value))
        first = StubProducer.made[0]
        # When the broker answers both with PRODUCER_FENCED
        first.deliver(KafkaError(KafkaError.PRODUCER_FENCED))
        kafka.serve()
        # Then nobody was told of a failure, and a second producer holds both writes
        assert outcomes.heard == {}
        second = StubProducer.made[1]
        assert [value for value, _ in second.pending] == [b"a", b"b"] and first.purged
        assert recreated(metrics) == 1
        # And once it delivers them, each write hears success exactly once
        second.deliver()
        kafka.serve()
        assert outcomes.heard == {b"a": [None], b"b": [None]}

    def test_a_fatal_error_raised_by_poll_replaces_the_producer(self) -> None:
        # Given a write in flight, and librdkafka raising its fatal error from poll
        kafka, metrics, _ = writer()
        outcomes = Outcomes()
        kafka.produce("results", b"a", "job", outcomes.done(b"a"))
        first = StubProducer.made[0]
        first.raise_on_poll = KafkaError(KafkaError.UNKNOWN_PRODUCER_ID, "lost", fatal=True)
        # When the loop serves the producer
        kafka.serve()
        # Then the write went to a new producer, and the old one's purge report is ignored
        assert [value for value, _ in StubProducer.made[1].pending] == [b"a"]
        assert outcomes.heard == {} and recreated(metrics) == 1
        StubProducer.made[1].deliver()
        kafka.serve()
        assert outcomes.heard == {b"a": [None]}

    def test_a_write_refused_by_a_fatal_producer_is_not_lost(self) -> None:
        # Given a producer that has hit a fatal error and refuses new writes
        kafka, _, later = writer()
        outcomes = Outcomes()
        StubProducer.made[0].refuse = KafkaError(KafkaError._FATAL, "fatal")
        # When a result is written, and the loop turns
        kafka.produce("results", b"a", "job", outcomes.done(b"a"))
        kafka.serve()
        # Then no failure was reported, and the new producer has the write
        assert outcomes.heard == {} and not later.pop_due(float("inf"))
        assert [value for value, _ in StubProducer.made[1].pending] == [b"a"]


class TestSilentProducer:
    """A producer that delivers nothing (librdkafka retrying a producer id the broker
    forgot, for ever) is replaced after the stall time, then less and less often."""

    def test_a_stalled_producer_is_replaced(self) -> None:
        # Given a write the producer never reports on
        clock = Clock()
        kafka, metrics, _ = writer(clock)
        outcomes = Outcomes()
        kafka.produce("results", b"a", "job", outcomes.done(b"a"))
        # When less than the stall time passes, nothing happens
        clock.now += 14
        kafka.serve()
        assert len(StubProducer.made) == 1
        # When it passes, a new producer takes the write
        clock.now += 2
        kafka.serve()
        assert [value for value, _ in StubProducer.made[1].pending] == [b"a"]
        assert recreated(metrics) == 1
        # And the next replacement, with nothing delivered meanwhile, waits twice as long
        clock.now += 16
        kafka.serve()
        assert len(StubProducer.made) == 2
        clock.now += 15
        kafka.serve()
        assert len(StubProducer.made) == 3
        # And once a producer delivers, the write hears success once
        StubProducer.made[2].deliver()
        kafka.serve()
        assert outcomes.heard == {b"a": [None]}

    def test_an_idle_producer_is_left_alone(self) -> None:
        clock = Clock()
        kafka, _, _ = writer(clock)
        clock.now += 3600
        kafka.serve()
        assert len(StubProducer.made) == 1


class TestUnbelievableAcknowledgements:
    """A write acknowledged at an offset that cannot be its own (a retry the broker
    called a duplicate, which Tansu may never have stored) is written again."""

    @pytest.mark.parametrize("offset", [-1, 0, 100], ids=["none", "restarted", "repeated"])
    def test_it_is_written_again(self, offset: int) -> None:
        # Given a write delivered at offset 100
        kafka, metrics, _ = writer()
        outcomes = Outcomes()
        producer = StubProducer.made[0]
        kafka.produce("results", b"a", "job", outcomes.done(b"a"))
        producer.deliver()
        kafka.serve()
        # When the next one is acknowledged at an offset not past it
        kafka.produce("results", b"b", "job", outcomes.done(b"b"))
        producer.deliver(offset=offset)
        kafka.serve()
        # Then it is produced again, nobody told yet, and counted
        assert [value for value, _ in producer.pending] == [b"b"]
        assert b"b" not in outcomes.heard
        assert metrics.value("parkpool_gateway_kafka_writes_repeated_total") == 1
        # And once stored at a real offset, it hears success once
        producer.deliver()
        kafka.serve()
        assert outcomes.heard == {b"a": [None], b"b": [None]}

    def test_a_log_that_went_back_is_believed_in_the_end(self) -> None:
        # Given a partition whose offsets start again (a Kafka that lost its log)
        kafka, _, _ = writer()
        outcomes = Outcomes()
        producer = StubProducer.made[0]
        kafka.produce("results", b"a", "job", outcomes.done(b"a"))
        producer.deliver()
        kafka.serve()
        kafka.produce("results", b"b", "job", outcomes.done(b"b"))
        # When every attempt comes back at offset 0, it is believed after three repeats
        for _ in range(4):
            producer.deliver(offset=0)
            kafka.serve()
        assert outcomes.heard[b"b"] == [None]


class TestOrdinaryErrors:
    """An error that does not fence the producer is the write's own, reported as before."""

    def test_a_timed_out_write_is_reported_and_the_producer_kept(self) -> None:
        kafka, metrics, _ = writer()
        outcomes = Outcomes()
        kafka.produce("results", b"a", "job", outcomes.done(b"a"))
        StubProducer.made[0].deliver(KafkaError(KafkaError._MSG_TIMED_OUT))
        kafka.serve()
        assert outcomes.heard == {b"a": [KafkaError._MSG_TIMED_OUT]}
        assert len(StubProducer.made) == 1 and recreated(metrics) == 0

    def test_a_record_over_the_limit_is_refused_on_the_loops_turn(self) -> None:
        kafka, _, later = writer()
        outcomes = Outcomes()
        kafka.produce("results", b"x" * (1 << 20), "job", outcomes.done(b"big"))
        assert outcomes.heard == {}  # never from inside the call that produced
        for call in later.pop_due(float("inf")):
            call()
        assert outcomes.heard == {b"big": [KafkaError.MSG_SIZE_TOO_LARGE]}
