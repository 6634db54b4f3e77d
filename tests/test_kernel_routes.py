# SPDX-License-Identifier: Apache-2.0
"""Which plugin kernels a gateway's cars run: heard from pulls and from tasks given, a
kernel no car runs known as such only after the cars' grace period, and no car able to
grow the table or to make a kernel other cars run look unrunnable."""

from __future__ import annotations

import dataclasses
import time
import uuid

from parkpool.gateway.dispatch import _fit_for, _runs, _skip_reason
from parkpool.gateway.kernel_routes import KernelRoutes
from parkpool.gateway.tasks import PendingTask
from parkpool.gateway.vehicles import VehicleBook
from parkpool.schemas import Capabilities, PullRequest, TaskChunk


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def routes(clock: Clock, announcers: dict[str, float] | None = None) -> KernelRoutes:
    known = announcers or {}
    return KernelRoutes(known.get, grace_s=30.0, memory_s=600.0, clock=clock)


def pull(vehicle: str, *kernels: str) -> PullRequest:
    caps = Capabilities("numpy", ("gemm", *kernels))
    return PullRequest(vehicle, 1, caps, grants={"gw1": 1})


def task(kernel: str) -> PendingTask:
    now = time.time()
    chunk = TaskChunk(uuid.uuid4().hex, 0, 1, kernel, {}, {}, "r", now + 3600, now)
    return PendingTask("t", 0, 0, b"", chunk)


class TestRoutes:
    def test_unrunnable_only_after_the_grace_and_while_unheard(self) -> None:
        # Given a gateway that just started (30 s grace, 600 s memory), no car heard
        clock = Clock()
        table = routes(clock)
        # Then during the grace nothing is unrunnable, and built-ins never are
        assert not table.unrunnable("softmax_grad")
        clock.now += 31
        assert table.unrunnable("softmax_grad")
        assert not table.unrunnable("gemm")
        # When a car lists it, Then it is runnable until nothing was heard for 600 s
        table.heard(["softmax_grad"])
        clock.now += 600
        assert not table.unrunnable("softmax_grad")
        clock.now += 1
        assert table.unrunnable("softmax_grad")

    def test_a_kernel_first_named_after_the_cars_pulled_is_found_in_their_pulls(self) -> None:
        # Given a car that listed the kernel 100 s before any task named it
        clock = Clock()
        table = routes(clock, {"softmax_grad": clock.now})
        clock.now += 100
        # When a task first names it, Then the cars' last pulls say a car runs it
        assert not table.unrunnable("softmax_grad")

    def test_names_no_task_asked_for_are_not_kept(self) -> None:
        # Given a car announcing a thousand names that no task names
        clock = Clock()
        table = routes(clock)
        table.heard([f"junk{i}" for i in range(1000)])
        clock.now += 31
        # Then they were not kept: junk0 is as unknown as any name
        assert table.unrunnable("junk0")

    def test_new_names_past_the_scan_budget_wait_instead_of_dying(self) -> None:
        # Given a gateway past its grace, allowed 5 passes over its cars a second
        clock = Clock()
        looked_up: list[str] = []

        def announcers(kernel: str) -> float | None:
            looked_up.append(kernel)
            return None

        table = KernelRoutes(announcers, grace_s=0.0, memory_s=600.0, clock=clock, scans_per_s=5)
        # When tasks name 100 new kernels at once
        verdicts = [table.unrunnable(f"flood{i}") for i in range(100)]
        # Then only 5 were looked up: those are known unrunnable, the rest merely wait
        assert len(looked_up) == 5 and verdicts[:5] == [True] * 5
        assert not any(verdicts[5:]) and table.scans_deferred == 95
        # And a second later the next 5 are looked up, and found unrunnable in turn
        clock.now += 1.0
        assert [table.unrunnable(f"flood{i}") for i in range(5, 10)] == [True] * 5
        assert looked_up[5:] == [f"flood{i}" for i in range(5, 10)]


class TestDispatchFilter:
    def test_a_car_that_listed_the_kernel_gets_its_task_however_long_ago(self) -> None:
        # Given a car that listed softmax_grad once, long ago, and a car that did not
        book = VehicleBook("gw1", kernel_grace_s=0.0)
        runner = book.on_pull(pull("car-1", "softmax_grad"))
        plain = book.on_pull(pull("car-2"))
        work = task("softmax_grad")
        # Then the first always takes it (a busy car need not pull again to keep it)
        runs = _runs(runner)
        assert _fit_for(runner, runs, book.kernels, alone=False)(work)
        # And the other takes it only if no car here runs it: here one does
        assert not _fit_for(plain, _runs(plain), book.kernels, alone=False)(work)
        # And built-ins go to every car
        assert _fit_for(plain, _runs(plain), book.kernels, alone=False)(task("gemm"))

    def test_a_car_that_failed_a_task_lately_gets_it_only_when_alone(self) -> None:
        # Given a task whose last failure was car-1's, lately, and car-2 that did not fail it
        book = VehicleBook("gw1", kernel_grace_s=0.0)
        failed, other = book.on_pull(pull("car-1")), book.on_pull(pull("car-2"))
        work = task("gemm")
        work.shunned_by, work.shunned_until = "car-1", time.monotonic() + 60
        # Then car-1 does not get it while another car grants work here, and car-2 does
        assert not _fit_for(failed, _runs(failed), book.kernels, alone=False)(work)
        assert _fit_for(other, _runs(other), book.kernels, alone=False)(work)
        # And a car alone with its gateway gets it at once: nobody else would run it
        assert _fit_for(failed, _runs(failed), book.kernels, alone=True)(work)
        # And once the window has passed, car-1 may have it again
        work.shunned_until = time.monotonic() - 1
        assert _fit_for(failed, _runs(failed), book.kernels, alone=False)(work)

    def test_a_car_kept_from_checks_of_its_own_results_is_told_why(self) -> None:
        # Given a car, and queued tasks that each check or redo its own result
        book = VehicleBook("gw1", kernel_grace_s=0.0)
        car = book.on_pull(pull("car-1"))
        checks = [task("gemm") for _ in range(3)]
        for check in checks:
            check.task = dataclasses.replace(check.task, avoid=("car-1",))
        # Then none fits it, and the skip names the reason, not its dwell or box key
        assert not any(map(_fit_for(car, _runs(car), book.kernels, alone=False), checks))
        assert _skip_reason(_runs(car), checks, car, False) == "avoided"
        # And when one of them is some other car's check, the reason is not "avoided"
        checks[1].task = dataclasses.replace(checks[1].task, avoid=("car-2",))
        assert _skip_reason(_runs(car), checks, car, False) != "avoided"

    def test_a_flood_of_names_from_one_car_leaves_other_cars_kernels_alone(self) -> None:
        # Given a car that runs softmax_grad, and a task naming it
        book = VehicleBook("gw1", kernel_grace_s=0.0)
        book.on_pull(pull("car-1", "softmax_grad"))
        assert not book.kernels.unrunnable("softmax_grad")
        # When a hostile car announces 256 new names in each of 40 pulls
        for batch in range(40):
            names = tuple(f"junk{batch}-{i}" for i in range(255))
            book.on_pull(pull("car-bad", *names))
        # Then softmax_grad is still known to run here
        assert not book.kernels.unrunnable("softmax_grad")
