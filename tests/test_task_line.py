# SPDX-License-Identifier: Apache-2.0
"""A car's task line against its owner's guard: what the car holds when the owner comes
back at an awkward moment. The guard, its policy and the kernels are the car's own; the
store and the MQTT outbox are stand-ins that record what the car would send."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from parkpool.schemas import Assignment, Nack, Result, Revoke, TaskChunk, encode
from parkpool.schemas.messages import NackReason
from parkpool.worker.admission import Admission
from parkpool.worker.backend import numpy_backend
from parkpool.worker.carstate import SimulatedBus
from parkpool.worker.grants import GatewayBook
from parkpool.worker.guard import OwnerGuard
from parkpool.worker.held import HeldTasks
from parkpool.worker.policy import Decision, Mode, OwnerPolicy
from parkpool.worker.runner import TaskRunner
from parkpool.worker.tasks import TaskLine
from tests.helpers import wait_for


class StoreBypass:
    """Tasks here carry no stored inputs, and results stay inline."""

    def hydrate(self, _assignment: Assignment, task: TaskChunk, _cancel: Any) -> TaskChunk:
        return task

    def offload(self, result: Result, _assignment: Assignment, _cancel: Any) -> Result:
        return result


class Outbox:
    """What the car sends its gateway."""

    too_large = 0

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.nacks: list[Nack] = []

    def result(self, result: Result) -> None:
        self.results.append(result)

    def nack(self, nack: Nack) -> None:
        self.nacks.append(nack)


class Car:
    """A task line whose owner's guard hands back every held task on a suspension, as
    ``VehicleWorker`` does."""

    def __init__(self, kernel_s: float = 0.0) -> None:
        self.bus = SimulatedBus()
        self.outbox = Outbox()
        self.admission = Admission()
        self.pool = ThreadPoolExecutor(2)  # a thread per task held, as a car has
        self.stopping = threading.Event()
        self.guard = OwnerGuard(self.bus, OwnerPolicy(), self._on_policy)
        self.line = TaskLine(
            "car",
            capacity=2,
            concurrency=1,
            admission=self.admission,
            gateways=GatewayBook("car"),
            runner=TaskRunner(
                numpy_backend(), self.guard, self.stopping, simulated_delay_s=kernel_s
            ),
            data=StoreBypass(),
            outbox=self.outbox,
            pool=self.pool,
            stopping=self.stopping,
            decision=lambda: self.guard.decision,
            on_room=lambda: None,
            on_preempted=self._hand_back_if_suspended,
        )

    def _on_policy(self, _previous: Decision, decision: Decision) -> None:
        if decision.mode is Mode.SUSPEND:
            self._hand_back_if_suspended()

    def _hand_back_if_suspended(self) -> None:
        """What the worker does on the guard's stop, and again after a stopped kernel."""
        if self.guard.decision.runs:
            return
        with self.line.held.releasing() as held:
            for item in held:
                self.line.nack(item.assignment, NackReason.RELEASED, "owner", item.task)

    def assign(self, epoch: int) -> None:
        now = time.time()
        task = TaskChunk(
            "job", 0, 1, "monte_carlo_pi", {"seed": 1, "samples": 1000}, {}, "r", now + 600, now
        )
        self.line.receive(encode(Assignment("gw", "car", epoch, 1, now + 30, encode(task))))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


@pytest.fixture
def car() -> Iterator[Car]:
    made = Car()
    made.guard.start()
    yield made
    made.close()


class TestOwnerReturnsWhileATaskArrives:
    def test_a_task_opened_as_the_owner_returns_is_handed_back_not_held(self, car: Car) -> None:
        # Given an owner who pauses the car while an assignment is being opened, after
        # the car decided it could take it and before it holds it
        opened = car.admission.open

        def owner_pauses_meanwhile(assignment: Assignment, task: TaskChunk) -> TaskChunk:
            car.bus.set(owner_paused=True)
            return opened(assignment, task)

        car.admission.open = owner_pauses_meanwhile  # type: ignore[method-assign]
        # When the assignment arrives
        car.assign(7)
        car.pool.shutdown(wait=True)
        # Then the car holds nothing, and hands the task back once, as released
        assert car.guard.decision.mode is Mode.SUSPEND
        assert len(car.line.held) == 0
        assert [(n.epoch, n.reason) for n in car.outbox.nacks] == [(7, NackReason.RELEASED)]
        # And once the owner lets it run again, no heartbeat keeps that lease alive
        car.bus.set(owner_paused=False)
        assert car.line.held.due_beats(time.time() + 3600) == []
        assert car.outbox.results == []

    def test_a_task_held_when_its_kernel_is_stopped_is_handed_back(self, car: Car) -> None:
        # Given a task the guard's stop did not see (it is held, the owner has the car)
        car.bus.set(owner_paused=True)
        assert car.guard.decision.mode is Mode.SUSPEND
        now = time.time()
        task = TaskChunk(
            "job", 0, 1, "monte_carlo_pi", {"seed": 1, "samples": 1000}, {}, "r", now + 600, now
        )
        car.line.held.add(Assignment("gw", "car", 3, 1, now + 30, encode(task)), task)
        # When its kernel starts and is stopped at once
        car.line._run(3)
        # Then it is handed back, not held for good
        assert len(car.line.held) == 0
        assert [(n.epoch, n.reason) for n in car.outbox.nacks] == [(3, NackReason.RELEASED)]


class TestRevokedWhileRunning:
    def test_a_revoked_tasks_kernel_stops_and_sends_nothing(self) -> None:
        # Given a car 0.5 s into a 30 s kernel
        car = Car(kernel_s=30.0)
        car.guard.start()
        try:
            car.assign(5)
            wait_for(lambda: bool(car.line.held.due_beats(time.time() + 3600)), 10, "a run")
            time.sleep(0.5)
            # When the gateway revokes its lease (the job was cancelled)
            revoked = time.monotonic()
            car.line.revoke(encode(Revoke("gw", "car", 5, "job_cancelled")))
            car.pool.shutdown(wait=True)
            # Then the kernel stops within a checkpoint, not after its 30 s
            assert time.monotonic() - revoked < 5
            # And nothing is sent for it: the gateway took it back
            assert (car.outbox.results, car.outbox.nacks) == ([], [])
        finally:
            car.close()


class TestPrefetchedTasks:
    def test_a_task_let_go_while_it_waits_for_the_kernel_frees_its_thread(self) -> None:
        # Given a car running a 30 s kernel with a second task waiting for the slot, on
        # a pool with a thread per task held
        car = Car(kernel_s=30.0)
        car.guard.start()
        try:
            car.assign(5)
            wait_for(lambda: bool(car.line.held.due_beats(time.time() + 3600)), 10, "a run")
            car.assign(6)
            wait_for(lambda: len(car.line.held) == 2, 10, "the second task held")
            # When the waiting task is revoked
            car.line.revoke(encode(Revoke("gw", "car", 6, "job_cancelled")))
            # Then its thread is free at once for whatever comes next, not after the kernel
            freed = threading.Event()
            car.pool.submit(freed.set)
            assert freed.wait(5), "the revoked task still holds its thread"
        finally:
            car.stopping.set()
            car.close()

    def test_a_task_that_starts_late_in_its_lease_beats_at_once(self) -> None:
        held = HeldTasks()
        now = time.time()
        task = TaskChunk("job", 0, 1, "reduce", {"op": "sum"}, {}, "r", now + 600, now)
        # Given a task received 20 s into a 30 s lease (it waited behind a long kernel)
        assignment = Assignment("gw", "car", 1, 1, now + 10, encode(task))
        held.add(assignment, task)
        item = held.get(1)
        assert item is not None
        item.received_at = now - 20
        # When it starts, Then its first lease heartbeat is due now, not at its deadline
        held.start(1)
        assert [h.assignment.epoch for h in held.due_beats(now + 0.01)] == [1]


class TestHandBacks:
    def test_tasks_are_counted_as_they_leave(self) -> None:
        # Given two held tasks
        held = HeldTasks()
        now = time.time()
        task = TaskChunk("job", 0, 1, "reduce", {"op": "sum"}, {}, "r", now + 600, now)
        for epoch in (1, 2):
            held.add(Assignment("gw", "car", epoch, 1, now + 30, encode(task)), task)
        # When they are handed back, Then a reader that finds none held finds them
        # counted, even while the nacks are still being sent (the worker's guard and a
        # stopped kernel's thread both read and hand back)
        with held.releasing() as items:
            assert (len(held), held.released, held.handed_back()) == (0, 2, False)
            assert len(items) == 2
        assert (held.released, held.handed_back()) == (2, True)
        # And a second hand-back with nothing held adds nothing
        with held.releasing() as items:
            assert items == []
        assert held.released == 2
