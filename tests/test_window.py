# SPDX-License-Identifier: Apache-2.0
"""The offset window commits only up to the lowest unfinished offset of a partition."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parkpool.gateway.window import OffsetWindow


def window_with(*offsets: int, capacity: int = 16) -> OffsetWindow:
    window = OffsetWindow(capacity)
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
    """The window is full when it holds capacity offsets, finished-but-blocked ones included."""

    def test_capacity_below_one_is_refused(self) -> None:
        with pytest.raises(ValueError, match="at least 1"):
            OffsetWindow(0)

    def test_finished_but_blocked_offsets_keep_it_full(self) -> None:
        # Given a full window of three
        window = window_with(0, 1, 2, capacity=3)
        assert window.full
        # When the two newest finish, the oldest still blocks them
        window.finish(1)
        window.finish(2)
        # Then it is still full though only one is in flight
        assert window.in_flight == 1
        assert window.full
        # When the oldest finishes, all three are released
        window.finish(0)
        assert not window.full

    def test_not_full_below_capacity(self) -> None:
        window = window_with(0, 1, capacity=3)
        assert not window.full
        window.add(2)
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
