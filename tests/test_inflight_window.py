# SPDX-License-Identifier: Apache-2.0
"""The task log reads on past a slow record, pauses on either bound, and commits safely.

Pure logic: the consumer is a stub that hands out a partition's records unless it is
paused, and records what the task log stores and pauses. The real-broker case is
``test_partitions_pause_when_windows_fill`` in tests/test_gateway_features.py.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import Message, TopicPartition

from parkpool.gateway import tasklog as tasklog_module
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.tasklog import TP, TaskLog
from parkpool.gateway.tasks import PendingTask
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import KafkaTopics, TaskChunk, encode
from parkpool.schemas.topics import task_key

TOPICS = KafkaTopics("ns")
PART: TP = (TOPICS.tasks, 0)
OFFSET_INVALID = -1001  # what librdkafka says when the group has committed nothing


def record(offset: int) -> Message:
    now = time.time()
    chunk = TaskChunk("job", 0, 1, "reduce", {}, {}, TOPICS.results, now + 3600, now)
    return Message(
        topic=PART[0],
        partition=PART[1],
        offset=offset,
        key=task_key("job", 0).encode(),
        value=encode(chunk),
    )


@dataclass
class StubConsumer:
    """Hands out each partition's records in order while it is not paused."""

    config: dict[str, Any]
    records: deque[Message] = field(default_factory=deque)
    in_transit: list[Message] = field(default_factory=list)  # fetched before a pause
    paused: set[TP] = field(default_factory=set)
    stored: list[int] = field(default_factory=list)
    callbacks: dict[str, Callable[..., None]] = field(default_factory=dict)

    def subscribe(self, _topics: list[str], **callbacks: Callable[..., None]) -> None:
        self.callbacks = callbacks

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, OFFSET_INVALID) for p in partitions]

    def incremental_assign(self, _partitions: list[TopicPartition]) -> None:
        pass

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        out, self.in_transit = self.in_transit[:num_messages], self.in_transit[num_messages:]
        while self.records and PART not in self.paused and len(out) < num_messages:
            out.append(self.records.popleft())
        return out

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(p.topic, p.partition) for p in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(p.topic, p.partition) for p in partitions}

    def store_offsets(self, offsets: list[TopicPartition]) -> None:
        self.stored.extend(p.offset for p in offsets)

    def get_watermark_offsets(
        self, _tp: TopicPartition, cached: bool = False, timeout: float = 0.0
    ) -> tuple[int, int]:
        return 0, OFFSET_INVALID  # no fetch has reported the end yet

    def seek(self, tp: TopicPartition) -> None:
        """Read again from ``tp.offset``: the partition's log as it is now."""
        self.records = deque(r for r in self.log if (r.offset() or 0) >= tp.offset)

    log: list[Message] = field(default_factory=list)  # every record, for a seek


class StubProducer:
    def __init__(self, _config: dict[str, Any]) -> None:
        pass

    def poll(self, _timeout: float) -> int:
        return 0


@pytest.fixture(autouse=True)
def stub_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasklog_module, "Consumer", StubConsumer)
    monkeypatch.setattr(tasklog_module, "Producer", StubProducer)


@dataclass
class Harness:
    log: TaskLog
    consumer: StubConsumer
    tasks: dict[int, PendingTask] = field(default_factory=dict)

    def turn(self, batch: int = 8) -> list[int]:
        """One loop turn: pause or resume, poll; the offsets of the tasks read."""
        self.log.flow(starving=False)
        read = [t.offset for t in self.log.poll(batch) if isinstance(t, PendingTask)]
        self.log.flow(starving=False)
        return read

    def turns(self, batch: int = 8) -> Iterator[int]:
        """Offsets read, turn after turn, until a turn reads nothing."""
        while read := self.turn(batch):
            yield from read

    def finish(self, *offsets: int) -> None:
        for offset in offsets:
            self.log.finish(PART, offset)


def harness(records: int, window: int, window_span: int) -> Harness:
    log = TaskLog(
        KafkaConnection("127.0.0.1:9"),
        TOPICS,
        "ns.gateways",
        gateway_id="gw1",
        window=window,
        window_span=window_span,
        session_timeout_ms=6000,
        metrics=GatewayMetrics(),
        on_revoked=lambda _gone: None,
    )
    log.open()
    consumer = log.consumer
    assert isinstance(consumer, StubConsumer)
    consumer.records.extend(record(offset) for offset in range(records))
    consumer.callbacks["on_assign"](consumer, [TopicPartition(*PART)])
    return Harness(log, consumer)


class TestSlowRecord:
    """One record held by a slow car does not stop the partition; the span bound does."""

    def test_reads_on_past_a_slow_record_until_the_span_is_used(self) -> None:
        # Given a window of 4 in flight and a span of 32, and 100 records waiting
        h = harness(records=100, window=4, window_span=32)
        # When every record but the first finishes as soon as it is read
        read = []
        while batch := h.turn():
            read += batch
            h.finish(*(o for o in batch if o != 0))
            assert h.log.windows[PART].in_flight <= 4
        # Then the partition was read 32 offsets deep, then paused on the span
        assert read == list(range(32))
        assert PART in h.consumer.paused
        # And nothing was stored past the unfinished record
        assert h.consumer.stored == []
        [stat] = h.log.stats()
        assert (stat.window_used, stat.window_size) == (1, 4)
        assert (stat.window_span, stat.window_max_span) == (32, 32)
        assert stat.committed == 0

    def test_slow_record_finishing_stores_past_everything_and_resumes(self) -> None:
        h = harness(records=100, window=4, window_span=32)
        for batch in iter(h.turn, []):
            h.finish(*(o for o in batch if o != 0))
        # When the slow record finishes at last
        h.finish(0)
        # Then the commit point jumps past every finished record
        assert h.consumer.stored == [32]
        # And the partition reads on from there, four in flight again
        assert list(h.turns()) == [32, 33, 34, 35]

    def test_in_flight_bound_pauses_when_nothing_finishes(self) -> None:
        # Given a window of 4 in flight and no record finishing
        h = harness(records=100, window=4, window_span=32)
        # Then four are read and the partition pauses
        assert list(h.turns()) == [0, 1, 2, 3]
        assert PART in h.consumer.paused
        [stat] = h.log.stats()
        assert (stat.window_used, stat.window_span) == (4, 4)
        # When one in the middle finishes, one more is read, though nothing can commit
        h.finish(2)
        assert list(h.turns()) == [4]
        assert h.consumer.stored == []


class TestOverflow:
    """Records fetched before a pause wait in order, and enter as the window makes room."""

    def test_a_batch_larger_than_the_room_waits_in_order(self) -> None:
        # Given a window of 2 in flight, and 6 records librdkafka had already fetched
        h = harness(records=0, window=2, window_span=64)
        h.consumer.in_transit = [record(offset) for offset in range(6)]
        # When they are polled, two are taken and the partition pauses
        assert h.turn() == [0, 1]
        assert PART in h.consumer.paused
        # When the newer one finishes, the next waiting record takes its place
        h.finish(1)
        assert h.turn() == [2]
        # And the oldest, still unfinished, holds the commit point
        h.finish(2, 0)
        assert h.consumer.stored == [3]
        assert h.turn() == [3, 4]


class TestFinishes:
    """Late or unknown finishes change nothing."""

    def test_unknown_and_repeated_offsets_are_ignored(self) -> None:
        h = harness(records=3, window=4, window_span=32)
        assert list(h.turns()) == [0, 1, 2]
        # When offsets never read, or finished twice, are finished
        h.finish(7, 1, 1)
        h.log.finish((TOPICS.tasks, 5), 0)  # a partition this gateway does not own
        # Then only offset 1 counts, and nothing is stored
        assert h.log.windows[PART].in_flight == 2
        assert h.consumer.stored == []


class TestSettings:
    """A span smaller than the window is refused when the task log is made."""

    def test_span_below_window_is_refused_at_once(self) -> None:
        with pytest.raises(ValueError, match="below the window capacity"):
            harness(records=0, window=8, window_span=4)

    def test_zero_span_is_a_multiple_of_the_window(self) -> None:
        h = harness(records=0, window=8, window_span=0)
        assert h.log.windows[PART].max_span == 64 * 8


class TestPassedOverTasks:
    """Tasks a fetch passed over (Tansu showed a later batch first) are gone back for,
    read once, and never committed past while missed."""

    def test_a_hole_is_read_again_and_the_commit_waits_for_it(self) -> None:
        # Given a partition whose fetches hand out 0-4, then 8-9: 5-7 came late
        h = harness(records=10, window=16, window_span=64)
        h.consumer.log = list(h.consumer.records)
        h.consumer.records = deque(r for r in h.consumer.log if r.offset() not in (5, 6, 7))
        # When the gateway reads and finishes what it was handed
        assert h.turn(batch=16) == [0, 1, 2, 3, 4, 8, 9]
        h.finish(0, 1, 2, 3, 4, 8, 9)
        # Then nothing past the hole is committed
        assert max(h.consumer.stored) == 5
        # And the next turn goes back for 5-7, reads them once, and not 8-9 again
        assert list(h.turns()) == [5, 6, 7]
        h.finish(5, 6, 7)
        assert h.consumer.stored[-1] == 10
        assert h.log.metrics.offset_holes.labels("filled")._value.get() == 3

    def test_a_late_task_holds_the_commit_until_it_is_done(self) -> None:
        # Given a window of 3 whose fetch handed out 0, 1, 3, 4, 5: 2 came late
        h = harness(records=8, window=3, window_span=64)
        h.consumer.log = list(h.consumer.records)
        h.consumer.records = deque(r for r in h.consumer.log if r.offset() != 2)
        assert h.turn(batch=16) == [0, 1, 3]
        h.finish(0, 1)
        # When the gateway looks again for 2 and goes on finishing what it reads
        h.consumer.records.clear()
        h.log._reread_holes()
        read = [0, 1, 3]
        h.finish(3)
        while more := h.turn(16):
            if 2 not in read:
                # Then nothing past 2 is committed until 2 itself is done
                assert max(h.consumer.stored) <= 2
            read += more
            h.finish(*more)
        # And every task was read once, and the commit reaches the end
        assert sorted(read) == list(range(8))
        assert max(h.consumer.stored) == 8
