# SPDX-License-Identifier: Apache-2.0
"""How the gateway's dead letters end, whatever Kafka says (gateway.deadletters).

Pure logic: Kafka is a scripted writer that records each write and answers later,
the way librdkafka's delivery reports do. The real-broker cases are tests/test_poison.py
and tests/test_record_limits.py.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from confluent_kafka import KafkaError

from parkpool.gateway.deadletters import Call, DeadLetters
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.retry import DelayQueue
from parkpool.gateway.tasks import PendingTask
from parkpool.runtime.kafka import record_size
from parkpool.schemas import AttemptRecord, DeadLetter, TaskChunk, decode, encode

TP = ("ns.tasks", 2)
Report = Callable[[KafkaError | None], None]


@dataclass
class ScriptedKafka:
    """Takes writes; the test decides when and how each is reported."""

    writes: list[tuple[bytes, Report]] = field(default_factory=list)

    def write(self, _topic: str, value: bytes, _key: str | None, report: Report) -> None:
        self.writes.append((value, report))

    def letter(self, index: int = -1) -> DeadLetter:
        return decode(self.writes[index][0], DeadLetter)

    def report(self, error: KafkaError | None, index: int = -1) -> None:
        self.writes[index][1](error)


@dataclass
class Harness:
    kafka: ScriptedKafka
    later: DelayQueue[Call]
    finished: list[tuple[tuple[str, int], int]]
    metrics: GatewayMetrics
    letters: DeadLetters

    def run_due(self, after_s: float = 0.0) -> None:
        for call in self.later.pop_due(time.monotonic() + after_s):
            call()


@pytest.fixture
def harness() -> Harness:
    kafka, later, finished, metrics = ScriptedKafka(), DelayQueue[Call](), [], GatewayMetrics()
    letters = DeadLetters(
        topic="ns.deadletter",
        gateway_id="gw1",
        max_record_bytes=64 << 10,
        write=kafka.write,
        later=later,
        finished=lambda tp, offset: finished.append((tp, offset)),
        metrics=metrics,
    )
    return Harness(kafka, later, finished, metrics, letters)


class TestSize:
    """A letter is never larger than one record: the record's bytes go first."""

    def test_small_record_is_kept_whole(self, harness: Harness) -> None:
        harness.letters.send(TP, 7, b"junk", "decode_malformed", "not msgpack")
        letter = harness.kafka.letter()
        assert letter.original == b"junk" and letter.original_kept
        assert letter.original_sha256 == hashlib.sha256(b"junk").hexdigest()

    def test_large_record_goes_without_its_bytes(self, harness: Harness) -> None:
        raw = bytes(100 << 10)
        harness.letters.send(TP, 7, raw, "decode_malformed", "not msgpack")
        letter = harness.kafka.letter()
        assert letter.original == b"" and not letter.original_kept
        assert (letter.original_size, letter.partition, letter.offset) == (len(raw), 2, 7)
        assert record_size(harness.kafka.writes[-1][0], None) <= 64 << 10
        assert harness.metrics.value("parkpool_gateway_dead_letter_bytes_dropped_total") == 1

    def test_the_key_names_the_job_when_the_record_does_not(self, harness: Harness) -> None:
        harness.letters.send(TP, 7, b"junk", "decode_malformed", "x", claimed=("job-1", 3))
        letter = harness.kafka.letter()
        assert (letter.job_id, letter.chunk_id) == ("job-1", 3)


class TestRefusals:
    """Whatever Kafka answers, the letter is written in the end, and never recursively."""

    def test_written_then_finished(self, harness: Harness) -> None:
        harness.letters.send(TP, 7, b"junk", "decode_malformed", "x")
        assert harness.finished == []
        harness.kafka.report(None)
        assert harness.finished == [(TP, 7)]
        assert (
            harness.metrics.value("parkpool_gateway_dead_lettered_total", reason="decode_malformed")
            == 1
        )

    def test_a_size_refusal_drops_the_bytes_and_tries_again_at_once(self, harness: Harness) -> None:
        # Given a broker whose limit is below ours
        harness.letters.send(TP, 7, bytes(1000), "decode_malformed", "x")
        # When it refuses the letter as too large
        harness.kafka.report(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        # Then nothing is written from inside the report, and on the loop's next turn
        # the letter goes again without the bytes
        assert len(harness.kafka.writes) == 1
        harness.run_due()
        assert len(harness.kafka.writes) == 2 and not harness.kafka.letter().original_kept
        harness.kafka.report(None)
        assert harness.finished == [(TP, 7)]

    def test_an_outage_backs_off_and_never_gives_up(self, harness: Harness) -> None:
        # Given a letter that Kafka times out ten times in a row
        harness.letters.send(TP, 7, b"junk", "decode_malformed", "x")
        for attempt in range(10):
            harness.kafka.report(KafkaError(KafkaError._MSG_TIMED_OUT))
            # Then the next write waits in the queue, not inside the report
            assert len(harness.kafka.writes) == attempt + 1
            assert len(harness.later) == 1
            harness.run_due(after_s=31.0)  # past the longest backoff (30 s)
        # And the offset is finished only once a write succeeds
        assert harness.finished == []
        harness.kafka.report(None)
        assert harness.finished == [(TP, 7)]
        errors = "parkpool_gateway_kafka_delivery_errors_total"
        assert harness.metrics.value(errors, topic_kind="dead_letter") == 10

    def test_the_first_retry_comes_within_half_a_second(self, harness: Harness) -> None:
        # Given a letter refused once by a broker that went away
        harness.letters.send(TP, 7, b"junk", "decode_malformed", "x")
        harness.kafka.report(KafkaError(KafkaError._TRANSPORT))
        # Then its next write is due within the first backoff window (0.5 s)
        assert len(harness.kafka.writes) == 1
        assert harness.later.pop_due(time.monotonic() + 0.51) != []


class TestLetterStillTooLarge:
    """Under a very low limit the oldest attempts go too, so the letter can be sent."""

    def test_attempts_are_trimmed(self) -> None:
        kafka, later = ScriptedKafka(), DelayQueue[Call]()
        letters = DeadLetters(
            topic="ns.deadletter",
            gateway_id="gw1",
            max_record_bytes=16 << 10,
            write=kafka.write,
            later=later,
            finished=lambda _tp, _offset: None,
            metrics=GatewayMetrics(),
        )
        task = TaskChunk("job-1", 0, 1, "reduce", {"op": "sum"}, {}, "ns.results", 1e10, 1.0)
        pending = PendingTask(*TP, 7, encode(task), task)
        pending.history = [
            AttemptRecord(f"car-{n}", "kernel_error", 1.0, "x" * 512) for n in range(64)
        ]
        letters.send(TP, 7, pending.raw, "kernel_error", "failed 64 times", pending)
        letter = kafka.letter()
        assert record_size(kafka.writes[-1][0], "job-1") <= 16 << 10
        assert 0 < len(letter.attempts) < 64
        assert letter.attempts[-1].vehicle_id == "car-63"  # the newest are kept
