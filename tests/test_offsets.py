# SPDX-License-Identifier: Apache-2.0
"""The offset ledger: a record never had is handed on once; a hole is read again."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

from confluent_kafka import TopicPartition

from parkpool.producer.client import _ResultReader, _Rewind
from parkpool.producer.metrics import SdkMetrics
from parkpool.runtime.fetchwait import FetchWaitLadder
from parkpool.runtime.offsets import PATIENCE_S, REREAD_EVERY_S, OffsetLedger

P = ("acme.results", 3)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TestLedger:
    def test_records_in_order_are_new_once(self) -> None:
        ledger = OffsetLedger()
        ledger.start(P, 10)
        assert [ledger.admit(P, o) for o in (10, 11, 12)] == [True, True, True]
        # read again (after a rewind): none is new
        assert [ledger.admit(P, o) for o in (10, 11, 12)] == [False, False, False]
        assert ledger.due() == []

    def test_a_hole_is_read_again_and_filled_once(self) -> None:
        # Given a partition read to 87, then handed 89 first (88 not yet stored)
        clock = Clock()
        ledger = OffsetLedger(clock=clock)
        for offset in range(80, 88):
            ledger.admit(P, offset)
        assert ledger.admit(P, 89) is True
        # Then 88 is a hole, and the partition is to be read again from it, at once
        assert ledger.holes(P) == [88]
        assert ledger.due() == [(P, 88)]
        assert ledger.due() == []  # not again before REREAD_EVERY_S
        # When it is read again: 88 is new, 89 is not
        assert ledger.admit(P, 88) is True
        assert ledger.admit(P, 89) is False
        assert (ledger.holes(P), ledger.filled, ledger.lost) == ([], 1, 0)
        clock.now += REREAD_EVERY_S
        assert ledger.due() == []

    def test_a_hole_still_missing_is_read_again_later_then_given_up(self) -> None:
        clock = Clock()
        ledger = OffsetLedger(clock=clock)
        ledger.admit(P, 0)
        ledger.admit(P, 3)  # 1 and 2 missing
        assert ledger.due() == [(P, 1)]
        ledger.admit(P, 2)  # a read again brought 2, not yet 1
        clock.now += REREAD_EVERY_S
        assert ledger.due() == [(P, 1)]
        clock.now += PATIENCE_S
        assert ledger.due() == []
        assert (ledger.holes(P), ledger.filled, ledger.lost) == ([], 1, 1)

    def test_a_wide_hole_is_one_range(self) -> None:
        # Several producers' batches passed over at once: 50,000 offsets, one range
        ledger = OffsetLedger()
        ledger.admit(P, 5)
        assert ledger.admit(P, 50_006) is True
        assert ledger.first_hole(P) == 6 and ledger.due() == [(P, 6)]
        assert ledger.admit(P, 20_000) is True  # one from the middle comes
        assert ledger.first_hole(P) == 6 and ledger.filled == 1
        assert ledger.admit(P, 20_000) is False  # and is had once

    def test_a_held_partition_s_holes_do_not_age(self) -> None:
        # Given a hole in a partition that is paused (nothing could fill it)
        clock = Clock()
        ledger = OffsetLedger(clock=clock)
        ledger.admit(P, 0)
        ledger.admit(P, 2)
        ledger.hold(P, True)
        clock.now += 10 * PATIENCE_S
        ledger.due()
        # Then it is still looked for; once read again, its patience runs
        assert (ledger.first_hole(P), ledger.lost) == (1, 0)
        ledger.hold(P, False)
        clock.now += PATIENCE_S
        ledger.due()
        assert (ledger.first_hole(P), ledger.lost) == (None, 1)

    def test_partitions_are_apart(self) -> None:
        other = ("acme.results", 4)
        ledger = OffsetLedger()
        ledger.admit(P, 0)
        ledger.admit(other, 0)
        ledger.admit(other, 2)
        assert ledger.holes(P) == [] and ledger.holes(other) == [1]
        assert ledger.admit(P, 1) is True


class _Record:
    def __init__(self, offset: int, key: bytes = b"job-1") -> None:
        self._offset, self._key = offset, key

    def topic(self) -> str:
        return P[0]

    def partition(self) -> int:
        return P[1]

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key


class _Consumer:
    def __init__(self) -> None:
        self.assigned: list[list[tuple[str, int, int]]] = []

    def assign(self, partitions: list[Any]) -> None:
        self.assigned.append([(tp.topic, tp.partition, tp.offset) for tp in partitions])


class TestResultReaderHoles:
    """The SDK's result reader goes back for a result a fetch passed over (the broker
    and librdkafka are stood in for: a hole cannot be made on demand on a real one)."""

    def reader(self) -> Any:
        reader = _ResultReader.__new__(_ResultReader)
        reader.client = SimpleNamespace(metrics=SdkMetrics())
        reader.consumer = _Consumer()
        reader._next = {P: 0}
        reader._ledger = OffsetLedger()
        reader._ledger.start(P, 0)
        reader._replaying = {}
        reader._ladder = FetchWaitLadder(100)
        return reader

    def test_a_passed_over_result_is_read_again_and_routed_once(self) -> None:
        reader = self.reader()
        # Given results 0 and 1 read, then 3 before 2 (Tansu showed 3's batch first)
        assert [reader._routes(_Record(o)) for o in (0, 1, 3)] == [True, True, True]
        # When the reader looks for holes
        reader._reread_holes()
        # Then it goes back to 2, where it routes 2 and not 3 again
        assert reader.consumer.assigned == [[(P[0], P[1], 2)]]
        assert [reader._routes(_Record(o)) for o in (2, 3, 4)] == [True, False, True]
        reader._reread_holes()
        assert len(reader.consumer.assigned) == 1
        filled = reader.client.metrics.offset_holes.labels("filled")._value.get()
        assert filled == 1

    def test_a_rewound_job_gets_its_records_again_and_no_other_job_does(self) -> None:
        reader = self.reader()
        for offset in range(5):
            reader._routes(_Record(offset, b"mine" if offset % 2 else b"other"))
        reader._replaying[P] = (5, {b"mine"})
        reread = [reader._routes(_Record(o, b"mine" if o % 2 else b"other")) for o in range(5)]
        assert reread == [False, True, False, True, False]

    def test_a_job_attached_during_another_s_replay_gets_its_records(self) -> None:
        # Given a reader that had read 0-99 (job B's result at 80, when nobody waited
        # for B), then went back to 0 for job A, and is at 50 of that replay
        reader = self.reader()
        reader._rewinds = queue.SimpleQueue()
        key = {80: b"B"}
        for offset in range(100):
            reader._routes(_Record(offset, key.get(offset, b"x")))
        reader._rewinds.put(_Rewind(b"A", [TopicPartition(*P, 0)], threading.Event()))
        reader._serve_rewinds()
        for offset in range(50):
            reader._routes(_Record(offset, key.get(offset, b"x")))
        # When job B is attached, its results from 70
        reader._rewinds.put(_Rewind(b"B", [TopicPartition(*P, 70)], threading.Event()))
        reader._serve_rewinds()
        # Then the replay goes on for both, and B's result at 80 is routed
        routed = [o for o in range(50, 100) if reader._routes(_Record(o, key.get(o, b"x")))]
        assert routed == [80]
