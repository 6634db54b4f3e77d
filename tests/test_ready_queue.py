# SPDX-License-Identifier: Apache-2.0
"""The ready queue: high priority first, batch never starved, redeliveries ahead."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from parkpool.gateway import dispatch
from parkpool.gateway.tasks import MAX_SHUN_DOUBLINGS, SCAN_LIMIT, PendingTask, ReadyQueue
from parkpool.gateway.vehicles import VehicleBook
from parkpool.schemas import BlobRef, Priority, TaskChunk
from parkpool.schemas.sealing import KEY_BYTES, WRAPPED_KEY_BYTES


def pending_task(priority: Priority, offset: int, partition: int = 0) -> PendingTask:
    chunk = TaskChunk(
        job_id=f"job-{priority.value}",
        chunk_id=offset % 1000,
        n_chunks=1000,
        kernel="reduce",
        params={"op": "sum"},
        inputs={"x": np.zeros(2, dtype=np.float32)},
        reply_topic="parkpool.results",
        deadline=time.time() + 60,
        created_at=time.time(),
        priority=priority,
    )
    return PendingTask("parkpool.tasks", partition, offset, b"raw", chunk)


def high(offset: int) -> PendingTask:
    return pending_task(Priority.HIGH, offset)


def batch(offset: int) -> PendingTask:
    return pending_task(Priority.BATCH, offset)


def drain(queue: ReadyQueue) -> list[PendingTask]:
    out = []
    while (task := queue.pop()) is not None:
        out.append(task)
    return out


def priorities(tasks: list[PendingTask]) -> str:
    return "".join("H" if t.task.priority is Priority.HIGH else "B" for t in tasks)


class TestOrder:
    """High priority goes first; within a priority, first in first out."""

    def test_empty_queue_pops_none(self) -> None:
        queue = ReadyQueue()
        assert queue.pop() is None
        assert len(queue) == 0

    def test_high_before_batch(self) -> None:
        queue = ReadyQueue()
        tasks = [batch(0), high(1), batch(2), high(3)]
        for task in tasks:
            queue.push(task)
        assert len(queue) == 4
        out = drain(queue)
        assert [t.offset for t in out] == [1, 3, 0, 2]
        assert len(queue) == 0

    def test_push_front_puts_redeliveries_first(self) -> None:
        queue = ReadyQueue()
        queue.push(batch(0))
        queue.push(batch(1))
        # When a redelivered task comes back
        queue.push_front(batch(9))
        # Then it goes ahead of new work of its priority, but not ahead of high
        queue.push(high(5))
        assert [t.offset for t in drain(queue)] == [5, 9, 0, 1]


class TestStarvation:
    """After high_burst high tasks in a row, one waiting batch task goes out."""

    @pytest.mark.parametrize("burst", [1, 3, 8])
    def test_exact_bound(self, burst: int) -> None:
        # Given many high and many batch tasks waiting
        queue = ReadyQueue(high_burst=burst)
        for i in range(4 * burst):
            queue.push(high(i))
        for i in range(100, 103):
            queue.push(batch(i))
        # When the queue is drained
        order = priorities(drain(queue))
        # Then every run of high tasks is exactly burst long, each followed by one batch
        assert order == ("H" * burst + "B") * 3 + "H" * burst

    def test_default_burst_is_eight(self) -> None:
        queue = ReadyQueue()
        for i in range(20):
            queue.push(high(i))
        queue.push(batch(100))
        assert priorities(drain(queue)) == "H" * 8 + "B" + "H" * 12

    def test_streak_without_waiting_batch_does_not_block_high(self) -> None:
        # Given a long run of high tasks while no batch waits
        queue = ReadyQueue(high_burst=2)
        for i in range(5):
            queue.push(high(i))
        first = [queue.pop() for _ in range(4)]
        assert [t.offset for t in first if t is not None] == [0, 1, 2, 3]
        # When a batch task arrives, it goes out next: the streak is already over the bound
        queue.push(batch(100))
        queue.push(high(6))
        assert priorities(drain(queue)) == "BHH"

    def test_zero_burst_alternates_batch_first(self) -> None:
        queue = ReadyQueue(high_burst=0)
        for i in range(2):
            queue.push(high(i))
            queue.push(batch(100 + i))
        assert priorities(drain(queue)) == "BBHH"


class TestRemoveWhere:
    """remove_where takes out exactly the matching tasks and keeps the others in order."""

    def test_removes_matching_tasks_from_both_priorities(self) -> None:
        queue = ReadyQueue()
        tasks = [
            pending_task(Priority.HIGH, 0, partition=1),
            pending_task(Priority.HIGH, 1, partition=2),
            pending_task(Priority.BATCH, 2, partition=1),
            pending_task(Priority.BATCH, 3, partition=2),
            pending_task(Priority.BATCH, 4, partition=1),
        ]
        for task in tasks:
            queue.push(task)
        # When the tasks of partition 1 are taken out (it was revoked)
        removed = queue.remove_where(lambda t: t.partition == 1)
        # Then they come back, and the rest stays in order
        assert sorted(t.offset for t in removed) == [0, 2, 4]
        assert len(queue) == 2
        assert [t.offset for t in drain(queue)] == [1, 3]

    def test_no_match_removes_nothing(self) -> None:
        queue = ReadyQueue()
        queue.push(batch(0))
        assert queue.remove_where(lambda t: False) == []
        assert len(queue) == 1


class TestAccept:
    """A vehicle about to leave takes the first task it can finish, keeping the order."""

    def test_first_acceptable_task_within_the_scan(self) -> None:
        queue = ReadyQueue()
        for offset in range(5):
            queue.push(batch(offset))
        # When only odd offsets are acceptable
        task = queue.pop(lambda t: t.offset % 2 == 1)
        # Then the first odd one comes out, and the rest keep their order
        assert task is not None and task.offset == 1
        assert [t.offset for t in drain(queue)] == [0, 2, 3, 4]

    def test_tasks_the_car_may_not_take_do_not_hide_those_behind_them(self) -> None:
        # Given 40 tasks at the head that the car may not take (a plugin kernel it does
        # not run, say), and one it may take behind them
        queue = ReadyQueue()
        for offset in range(41):
            queue.push(batch(offset))
        # When it pulls, Then it gets the one behind them, the rest in their order
        task = queue.pop(lambda t: t.offset == 40, scan=32)
        assert task is not None and task.offset == 40
        assert [t.offset for t in drain(queue)] == list(range(40))

    def test_a_pull_looks_as_far_as_the_limit_and_then_leaves_the_queue_untouched(
        self,
    ) -> None:
        queue = ReadyQueue()
        for offset in range(SCAN_LIMIT + 1):
            queue.push(batch(offset))
        assert queue.pop(lambda t: t.offset == SCAN_LIMIT) is None
        assert len(queue) == SCAN_LIMIT + 1
        assert queue.pop(lambda t: t.offset == SCAN_LIMIT - 1) is not None

    def test_ranking_weighs_only_the_first_tasks_the_car_may_take(self) -> None:
        # Given tasks the car may not take, then 40 it may, the last of which it prefers
        queue = ReadyQueue()
        for offset in range(50):
            queue.push(batch(offset))
        task = queue.pop(lambda t: t.offset >= 10, scan=32, prefer=lambda t: t.offset == 49)
        # Then it gets the first it may take: the preferred one is past the 32 it ranks
        assert task is not None and task.offset == 10

    def test_falls_back_to_the_other_priority(self) -> None:
        queue = ReadyQueue()
        queue.push(high(1))
        queue.push(batch(2))
        task = queue.pop(lambda t: t.task.priority is Priority.BATCH)
        assert task is not None and task.offset == 2
        assert [t.offset for t in drain(queue)] == [1]


class TestPreferred:
    """A car's cached inputs steer which of the next tasks it gets, never past others."""

    def test_the_first_preferred_task_of_the_scan_goes_first(self) -> None:
        # Given five batch tasks, of which the fourth reuses what the car holds
        queue = ReadyQueue()
        for offset in range(5):
            queue.push(batch(offset))
        # When the car's pick prefers offset 3
        task = queue.pop(prefer=lambda t: t.offset == 3)
        # Then it gets offset 3, and the others keep their order
        assert task is not None and task.offset == 3
        assert [t.offset for t in drain(queue)] == [0, 1, 2, 4]

    def test_without_a_preferred_task_the_order_is_kept(self) -> None:
        queue = ReadyQueue()
        for offset in range(3):
            queue.push(batch(offset))
        task = queue.pop(prefer=lambda _t: False)
        assert task is not None and task.offset == 0

    def test_preference_never_overrides_what_the_car_may_take(self) -> None:
        # Given a preferred task the car may not take (it leaves too soon, say)
        queue = ReadyQueue()
        for offset in range(3):
            queue.push(batch(offset))
        task = queue.pop(accept=lambda t: t.offset != 1, prefer=lambda t: t.offset == 1)
        # Then it gets the first task it may take
        assert task is not None and task.offset == 0

    def test_preference_looks_only_as_far_as_the_scan(self) -> None:
        queue = ReadyQueue()
        for offset in range(40):
            queue.push(batch(offset))
        task = queue.pop(prefer=lambda t: t.offset == 35, scan=32)
        assert task is not None and task.offset == 0

    def test_the_highest_rank_wins_and_equals_keep_their_order(self) -> None:
        # Given six tasks ranked 0, 1, 2, 1, 2, 0 by a car
        queue = ReadyQueue()
        for offset in range(6):
            queue.push(batch(offset))
        ranks = [0.0, 1.0, 2.0, 1.0, 2.0, 0.0]
        # When it pulls twice
        first = queue.pop(prefer=lambda t: ranks[t.offset])
        second = queue.pop(prefer=lambda t: ranks[t.offset])
        # Then it gets the first of the best, then the next best
        assert first is not None and second is not None
        assert (first.offset, second.offset) == (2, 4)
        assert [t.offset for t in drain(queue)] == [0, 1, 3, 5]


class TestInputRank:
    """How the gateway ranks tasks for a car by the stored inputs (gemm blocks) involved."""

    @staticmethod
    def tile(offset: int, row: int, col: int) -> PendingTask:
        refs = tuple(
            BlobRef(name, f"{kind}{index:x}".ljust(64, "0"), 16, "<f4", (2, 2))
            for name, kind, index in (("a", "a", row), ("b", "b", col))
        )
        task = batch(offset)
        return PendingTask(
            task.topic, task.partition, offset, task.raw, replace(task.task, refs=refs)
        )

    def test_reuse_first_then_the_blocks_fewest_other_cars_hold(self) -> None:
        # Given a car sent row block 0 and column block 0, another car sent row block 1
        book = VehicleBook("gw1")
        car, other = book.heard("car-a"), book.heard("car-b")
        for view, task in ((car, self.tile(0, 0, 0)), (other, self.tile(1, 1, 5))):
            dispatch._remember_inputs(book, view, task)
        rank = dispatch._holds_inputs(car, book)
        assert rank is not None
        # Then a tile reusing both blocks ranks over one reusing one, over one reusing
        # none; and of two reusing none, the one whose blocks no other car holds is first
        both, one, crowded, free = (
            self.tile(2, 0, 0),
            self.tile(3, 0, 7),
            self.tile(4, 1, 5),
            self.tile(5, 2, 6),
        )
        assert rank(both) > rank(one) > rank(free) > rank(crowded)

    def test_of_two_tiles_needing_a_new_block_the_one_that_frees_another_goes_first(
        self,
    ) -> None:
        # Given a car sent tiles (0,0) and (0,1): it holds row block 0, columns 0 and 1
        book = VehicleBook("gw1")
        car = book.heard("car-a")
        for task in (self.tile(0, 0, 0), self.tile(1, 0, 1)):
            dispatch._remember_inputs(book, car, task)
        line, square, freed = self.tile(2, 0, 2), self.tile(3, 1, 0), self.tile(4, 1, 1)
        # When the scan holds (0,2), (1,0) and (1,1)
        rank = dispatch._holds_inputs(car, book, lambda: [line, square, freed])
        assert rank is not None
        # Then (1,0) goes before (0,2): row block 1 also brings (1,1), which needs no more
        assert rank(square) > rank(line)
        # And without the scan to look at, the two rank alike (each reuses one block)
        alone = dispatch._holds_inputs(car, book)
        assert alone is not None and alone(square) == alone(line)

    def test_a_task_does_not_count_itself_or_tasks_the_car_can_run_already(self) -> None:
        book = VehicleBook("gw1")
        car = book.heard("car-a")
        dispatch._remember_inputs(book, car, self.tile(0, 0, 0))
        held, needy = self.tile(1, 0, 0), self.tile(2, 1, 1)
        scan = [held, needy, self.tile(3, 5, 5)]
        with_scan = dispatch._holds_inputs(car, book, lambda: scan)
        without = dispatch._holds_inputs(car, book)
        assert with_scan is not None and without is not None
        # A tile whose blocks the car holds frees nothing; nor does one whose blocks no
        # other scanned tile waits for (itself and a tile of other blocks)
        assert with_scan(held) == without(held)
        assert with_scan(needy) == without(needy)

    def test_without_stored_inputs_about_the_queue_order_stands(self) -> None:
        book = VehicleBook("gw1")

        # nor is the scan read at all: no stored inputs are about
        def unread() -> list[PendingTask]:
            raise AssertionError("the scan was read")

        assert dispatch._holds_inputs(book.heard("car-a"), book, unread) is None


class TestShun:
    """A car that fails a task or hands it back is kept from it, longer each time in a
    row, so that it cannot take the task back after every lease and hold it for ever."""

    def test_a_car_shunned_again_in_a_row_is_shunned_twice_as_long(self) -> None:
        # Given a task a car handed back once, shunned for one base period
        task = high(1)
        task.shun("hostile", now=100.0, base_s=30.0)
        assert task.shuns("hostile", 129.9) and not task.shuns("hostile", 130.0)
        # When the same car hands it back again, and again
        task.shun("hostile", now=130.0, base_s=30.0)
        first_again = task.shunned_until
        task.shun("hostile", now=190.0, base_s=30.0)
        # Then each shun is twice the last
        assert (first_again, task.shunned_until) == (190.0, 310.0)
        assert task.shun_streak == 3

    def test_the_doubling_stops_at_its_cap(self) -> None:
        task = high(1)
        for _ in range(MAX_SHUN_DOUBLINGS + 5):
            task.shun("hostile", now=0.0, base_s=30.0)
        assert task.shunned_until == 30.0 * 2**MAX_SHUN_DOUBLINGS

    @pytest.mark.parametrize(
        "change",
        [
            {"kernel": "my_plugin"},
            {
                "sealed_inputs": b"ciphertext",
                "inputs": {},
                "inputs_key": bytes(WRAPPED_KEY_BYTES),
                "reply_key": bytes(KEY_BYTES),
            },
        ],
        ids=["plugin kernel", "confidential"],
    )
    def test_a_task_only_some_cars_can_run_is_shunned_one_period_at_a_time(
        self, change: dict[str, object]
    ) -> None:
        # Given a task only some cars can take (the shun yields to a car alone here,
        # not to one alone able to run it), handed back by the same car again and again
        task = high(1)
        task = PendingTask(
            task.topic, task.partition, task.offset, task.raw, replace(task.task, **change)
        )
        for _ in range(4):
            task.shun("only-able", now=0.0, base_s=30.0)
        # Then it is kept from that car one base period only, as before the doubling
        assert task.shunned_until == 30.0

    def test_another_car_starts_its_own_streak_and_lets_the_first_back(self) -> None:
        # Given a task handed back by one car three times in a row
        task = high(1)
        for _ in range(3):
            task.shun("first", now=0.0, base_s=30.0)
        # When another car fails it
        task.shun("second", now=50.0, base_s=30.0)
        # Then only the last car is shunned, for one base period: two cars that both
        # fail a task take turns with it rather than both wait
        assert task.shuns("second", 79.0) and not task.shuns("first", 51.0)
        assert task.shun_streak == 1
