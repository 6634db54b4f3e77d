# SPDX-License-Identifier: Apache-2.0
"""The offset window commits only up to the lowest unfinished offset of a partition.

It is full when ``capacity`` records are in flight, or when the next offset to read is
``max_span`` past the commit point; finished records free room at once, wherever they are.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parkpool.gateway.window import SPAN_PER_SLOT, OffsetWindow


def window_with(*offsets: int, capacity: int = 16, max_span: int = 0) -> OffsetWindow:
    window = OffsetWindow(capacity, max_span)
    for offset in offsets:
        window.add(offset)
    return window


class TestCommitPoint:
    """The commit point is the lowest unfinished offset, or one past the last when none is."""

    def test_none_before_any_offset(self) -> None:
        window = OffsetWindow(4)
        assert window.commit_point is None
        assert window.in_flight == 0
        assert not window.full

    def test_first_offset_is_the_commit_point_until_it_finishes(self) -> None:
        # Given offsets 10, 11, 12 consumed
        window = window_with(10, 11, 12)
        assert window.commit_point == 10
        # When the first one finishes
        moved = window.finish(10)
        # Then the commit point moves to the next unfinished one
        assert moved
        assert window.commit_point == 11
        assert window.in_flight == 2

    def test_out_of_order_finish_does_not_move_until_the_low_end_finishes(self) -> None:
        window = window_with(0, 1, 2, 3)
        # When later offsets finish first
        assert not window.finish(2)
        assert not window.finish(3)
        # Then the commit point stays at the lowest unfinished
        assert window.commit_point == 0
        assert window.in_flight == 2
        assert window.finish(1) is False
        assert window.commit_point == 0
        # When the lowest finishes, the point jumps past every finished offset
        assert window.finish(0)
        assert window.commit_point == 4
        assert window.in_flight == 0

    def test_all_finished_commits_one_past_the_last(self) -> None:
        window = window_with(7)
        window.finish(7)
        assert window.commit_point == 8

    def test_gaps_in_offsets_are_skipped(self) -> None:
        # Given offsets with gaps, as Kafka may skip offsets (compaction, transactions)
        window = window_with(0, 1, 5, 9)
        # When 0 and 1 finish, the point jumps to the next consumed offset, not to 2
        window.finish(1)
        window.finish(0)
        assert window.commit_point == 5
        # When 9 finishes before 5, the point waits at 5
        window.finish(9)
        assert window.commit_point == 5
        # When 5 finishes, the point is one past the last consumed offset
        assert window.finish(5)
        assert window.commit_point == 10


class TestFinishNoOps:
    """Finishing an old, repeated or never-consumed offset changes nothing."""

    def test_finish_on_empty_window(self) -> None:
        window = OffsetWindow(4)
        assert window.finish(3) is False
        assert window.commit_point is None
        assert window.in_flight == 0

    def test_old_offset_is_a_no_op(self) -> None:
        window = window_with(0, 1, 2)
        window.finish(0)
        # When an offset below the commit point finishes again
        assert window.finish(0) is False
        # Then nothing moves
        assert window.commit_point == 1
        assert window.in_flight == 2

    def test_repeated_finish_of_a_blocked_offset_is_a_no_op(self) -> None:
        window = window_with(0, 1, 2)
        window.finish(2)
        assert window.finish(2) is False
        assert window.in_flight == 2
        assert window.commit_point == 0

    def test_unknown_offset_in_a_gap_is_a_no_op(self) -> None:
        # Given offsets 0 and 5 (1..4 were skipped by Kafka)
        window = window_with(0, 5)
        # When an offset never consumed finishes
        window.finish(3)
        # Then it is not counted: two offsets are still in flight
        assert window.in_flight == 2

    def test_offset_finished_before_it_was_consumed_still_blocks(self) -> None:
        # Given offset 0 consumed, and offset 1 finished before it was ever consumed
        window = window_with(0)
        window.finish(1)
        # When 1 is consumed and 0 finishes
        window.add(1)
        window.finish(0)
        # Then 1 is still in flight: committing past it would lose it on a restart
        assert window.commit_point == 1


class TestCapacity:
    """The window is full when capacity records are in flight; finished ones do not count."""

    def test_capacity_below_one_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least 1"):
            OffsetWindow(0)

    def test_finished_records_above_an_unfinished_one_free_room(self) -> None:
        # Given a full window of three
        window = window_with(0, 1, 2, capacity=3)
        assert window.full
        assert window.room == 0
        # When the two newest finish while the oldest is still in flight
        window.finish(1)
        window.finish(2)
        # Then two more may be read, though the commit point has not moved
        assert window.in_flight == 1
        assert window.room == 2
        assert not window.full
        assert window.commit_point == 0
        # And the finished ones are still remembered until the low end moves
        assert window.used == 3

    def test_not_full_below_capacity(self) -> None:
        window = window_with(0, 1, capacity=3)
        assert not window.full
        window.add(2)
        assert window.full


class TestSpan:
    """The window is full when the next offset to read is max_span past the commit point."""

    def test_default_span_is_a_multiple_of_capacity(self) -> None:
        window = OffsetWindow(4)
        assert window.max_span == SPAN_PER_SLOT * 4
        assert window.span == 0

    def test_span_below_capacity_is_refused(self) -> None:
        with pytest.raises(ValueError, match="below the window capacity"):
            OffsetWindow(8, max_span=4)

    def test_one_slow_record_does_not_stop_the_others(self) -> None:
        # Given a window of 4 in flight and a span of 32, and offset 0 held by a slow car
        window = window_with(0, capacity=4, max_span=32)
        # When the records after it are read and finished as fast as they come
        offset = 1
        while not window.full:
            window.add(offset)
            assert window.in_flight <= 2  # the slow one and the one just read
            window.finish(offset)
            offset += 1
        # Then the partition was read on past it until the span was used up
        assert offset == 32
        assert window.span == 32
        assert window.in_flight == 1
        # And the commit point never passed the unfinished record
        assert window.commit_point == 0

    def test_slow_record_finishing_releases_the_span(self) -> None:
        window = window_with(*range(32), capacity=4, max_span=32)
        for offset in range(1, 32):
            window.finish(offset)
        assert window.full
        # When the slow record finishes at last
        assert window.finish(0)
        # Then the commit point jumps past everything and the window is empty
        assert window.commit_point == 32
        assert (window.span, window.used, window.in_flight) == (0, 0, 0)
        assert window.room == 4

    def test_room_is_the_smaller_of_both_bounds(self) -> None:
        window = window_with(0, 1, 2, capacity=4, max_span=8)
        window.finish(1)
        window.finish(2)
        # One in flight of four (room 3), span 3 of 8 (room 5)
        assert window.room == 3
        window.add(7)  # Kafka skipped 3..6
        # Two in flight (room 2), span 8 of 8 (room 0)
        assert window.span == 8
        assert window.room == 0

    def test_skipped_offsets_count_towards_the_span(self) -> None:
        # Given offsets with a gap, as Kafka may leave (transaction markers)
        window = window_with(0, 10, capacity=4, max_span=64)
        # Then the span is in offsets, which is what a restart reads again
        assert window.span == 11
        assert window.used == 2

    def test_a_gap_past_the_span_is_still_taken_and_leaves_no_room(self) -> None:
        window = window_with(0, capacity=4, max_span=8)
        window.add(100)
        assert window.span == 101
        assert window.room == 0
        assert window.full


class TestAdd:
    """Offsets must arrive in increasing order."""

    def test_offset_going_backwards_is_refused(self) -> None:
        window = window_with(5, 6)
        with pytest.raises(ValueError, match="arrived after 6"):
            window.add(3)
        # And the window is unchanged
        assert window.commit_point == 5
        assert window.in_flight == 2

    def test_repeated_offset_is_refused(self) -> None:
        window = window_with(5)
        with pytest.raises(ValueError):
            window.add(5)

    def test_offset_below_a_fully_finished_point_is_refused(self) -> None:
        window = window_with(5)
        window.finish(5)
        with pytest.raises(ValueError):
            window.add(4)
        assert window.commit_point == 6


@st.composite
def offsets_and_finish_order(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    steps = draw(st.lists(st.integers(1, 5), min_size=1, max_size=30))
    start = draw(st.integers(0, 1000))
    offsets = [start + sum(steps[:i]) for i in range(len(steps))]
    order = draw(st.permutations(offsets))
    return offsets, order


class TestCommitPointProperty:
    """For any order of finishes, the commit point is min(unfinished) or last + 1."""

    @given(offsets_and_finish_order())
    def test_commit_point_is_lowest_unfinished(self, case: tuple[list[int], list[int]]) -> None:
        offsets, order = case
        window = window_with(*offsets, capacity=len(offsets))
        unfinished = set(offsets)
        for offset in order:
            before = window.commit_point
            moved = window.finish(offset)
            unfinished.discard(offset)
            expected = min(unfinished) if unfinished else offsets[-1] + 1
            assert window.commit_point == expected
            assert moved == (window.commit_point != before)
            assert window.in_flight == len(unfinished)
        assert window.commit_point == offsets[-1] + 1
        assert not window.full
        assert window.span == 0


@st.composite
def interleaved_steps(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Reads and finishes in any order a gateway could do them, unknown offsets included."""
    steps: list[tuple[str, int]] = []
    read: list[int] = []
    offset = draw(st.integers(0, 1000))
    for _ in range(draw(st.integers(1, 60))):
        step = draw(st.sampled_from(["read", "finish_read", "finish_any"]))
        if step == "read":
            offset += draw(st.integers(1, 3))
            read.append(offset)
            steps.append(("add", offset))
        elif step == "finish_read" and read:
            steps.append(("finish", draw(st.sampled_from(read))))
        else:
            steps.append(("finish", draw(st.integers(0, 1200))))  # possibly never read
    return steps


class TestBoundsProperty:
    """For any reads and finishes: in_flight, span, room and the commit point agree with a model."""

    @given(interleaved_steps(), st.integers(1, 8), st.integers(0, 40))
    def test_model(self, steps: list[tuple[str, int]], capacity: int, extra: int) -> None:
        window = OffsetWindow(capacity, capacity + extra)
        read: list[int] = []
        unfinished: set[int] = set()
        for op, offset in steps:
            if op == "add":
                window.add(offset)
                read.append(offset)
                unfinished.add(offset)
            else:
                window.finish(offset)
                unfinished.discard(offset)
            low = min(unfinished) if unfinished else read[-1] + 1 if read else None
            span = read[-1] + 1 - low if read and low is not None else 0
            assert window.commit_point == low
            assert window.in_flight == len(unfinished)
            assert window.span == span
            assert window.used == len([o for o in read if low is not None and o >= low])
            room = max(0, min(capacity - len(unfinished), window.max_span - span))
            assert window.room == room
            assert window.full == (room == 0)


class TestLateOffsets:
    """A record a fetch passed over, read again later, is held in its place."""

    def test_a_late_offset_holds_the_commit_point_until_it_finishes(self) -> None:
        window = OffsetWindow(capacity=8)
        for offset in (0, 1, 4):
            window.add(offset)
        window.finish(0)
        window.finish(1)
        window.add_late(2)
        assert window.commit_point == 2 and window.in_flight == 2
        window.finish(4)
        assert window.commit_point == 2
        window.finish(2)
        assert window.commit_point == 5

    def test_an_offset_read_twice_is_refused(self) -> None:
        window = OffsetWindow(capacity=8)
        window.add(0)
        window.add(3)
        with pytest.raises(ValueError, match="already read"):
            window.add_late(3)
