# SPDX-License-Identifier: Apache-2.0
"""The owner's guard: decisions on signal changes, kernel generations, energy, dwell."""

from __future__ import annotations

import time

import pytest

from parkpool.schemas.errors import Preempted
from parkpool.worker.carstate import SimulatedBus
from parkpool.worker.guard import EnergyMeter, OwnerGuard, TimeBase
from parkpool.worker.policy import Decision, Mode, OwnerPolicy, PolicyConfig


def guarded(
    bus: SimulatedBus, timebase: TimeBase | None = None
) -> tuple[OwnerGuard, list[tuple[Decision, Decision]]]:
    changes: list[tuple[Decision, Decision]] = []
    guard = OwnerGuard(
        bus,
        OwnerPolicy(PolicyConfig(owner_away_s=0.0)),
        lambda old, new: changes.append((old, new)),
        timebase or TimeBase(),
    )
    guard.start()
    return guard, changes


class TestDecisions:
    """A signal change is decided on at once, and the worker is told only of changes."""

    def test_owner_event_suspends_before_set_returns(self) -> None:
        bus = SimulatedBus()
        guard, changes = guarded(bus)
        assert guard.decision.runs and changes == []
        bus.set(locked=False)
        assert [(old.mode, new.mode, new.reason) for old, new in changes] == [
            (Mode.RUN, Mode.SUSPEND, "owner_present")
        ]
        bus.set(owner_nearby=True)  # another owner signal: still suspended, no new call
        assert len(changes) == 1


class TestGenerations:
    """A kernel started before a stop is stopped at its next checkpoint, even if the car
    is eligible again by then."""

    def test_checkpoint_raises_after_a_stop(self) -> None:
        bus = SimulatedBus()
        guard, _ = guarded(bus)
        generation = guard.kernel_started()
        guard.checkpoint(generation)  # nothing happened: carries on
        bus.set(locked=False)
        bus.set(locked=True)  # back to eligible at once (owner_away_s = 0 here)
        assert guard.decision.runs
        with pytest.raises(Preempted, match="owner_present"):
            guard.checkpoint(generation)
        # A kernel of the new generation runs normally
        guard.checkpoint(guard.kernel_started())

    def test_no_kernel_starts_while_suspended(self) -> None:
        # Given a car the owner has just taken back
        bus = SimulatedBus()
        guard, _ = guarded(bus)
        bus.set(locked=False)
        # Then a prefetched task whose turn comes now does not start, and is not counted
        with pytest.raises(Preempted, match="owner_present"):
            guard.kernel_started()
        assert guard.running == 0

    def test_a_waiting_kernel_is_woken_by_the_stop(self) -> None:
        # Given a kernel that waits on its generation's event
        bus = SimulatedBus()
        guard, _ = guarded(bus)
        generation = guard.kernel_started()
        over = guard.generation_over(generation)
        assert not over.is_set()
        # When the owner unlocks the car, the event is set before set() returns
        bus.set(locked=False)
        assert over.is_set()
        # And a generation that has already ended gives an event that is set
        assert guard.generation_over(generation).is_set()

    def test_preemption_is_timed_from_the_signal_to_the_last_kernel(self) -> None:
        bus = SimulatedBus()
        guard, _ = guarded(bus)
        guard.kernel_started()
        guard.kernel_started()
        unlocked = bus.set(locked=False)
        record = guard.preemptions[-1]
        assert (record.reason, record.event_at, record.stopped_at) == (
            "owner_present",
            unlocked.at,
            None,
        )
        guard.kernel_finished(0.1)
        assert record.stopped_at is None  # one kernel still runs
        guard.kernel_finished(0.1)
        assert record.stop_ms is not None and record.stop_ms >= 0

    def test_stop_with_nothing_running_records_nothing(self) -> None:
        bus = SimulatedBus()
        guard, _ = guarded(bus)
        bus.set(locked=False)
        assert not guard.preemptions


class TestEnergy:
    """Kernel seconds times power, per local calendar day; the budget drains the car."""

    def test_meter_counts_and_rolls_over(self) -> None:
        meter = EnergyMeter(power_w=1000.0)
        noon = time.mktime((2026, 11, 28, 12, 0, 0, 0, 0, -1))
        meter.add(3600.0, noon)
        assert meter.today(noon) == pytest.approx(1.0)
        assert meter.today(noon + 86400) == 0.0
        assert meter.total_kwh == pytest.approx(1.0)

    def test_budget_reached_drains(self) -> None:
        bus = SimulatedBus()
        guard, changes = guarded(bus)
        generation = guard.kernel_started()
        # 2.5 kWh at 300 W is 30,000 s of kernel time
        guard.kernel_finished(30_000.0)
        assert guard.reconsider().mode is Mode.DRAIN
        assert changes[-1][1].reason == "energy_budget"
        guard.checkpoint(generation)  # a drain stops no running kernel

    def test_simulated_seconds_count_scaled(self) -> None:
        bus = SimulatedBus()
        guard, _ = guarded(bus, TimeBase(scale=100.0))
        guard.kernel_started()
        guard.kernel_finished(300.0)  # stands for 30,000 simulated seconds
        assert guard.energy.total_kwh == pytest.approx(2.5)


class TestDwell:
    """The dwell a pull reports: real seconds to the departure stop, or 0 when unknown."""

    def test_real_seconds_to_the_departure_stop(self) -> None:
        bus = SimulatedBus()
        guard, _ = guarded(bus, TimeBase(now=lambda: 1000.0, scale=10.0))
        assert guard.dwell_s() == 0.0
        bus.set(next_departure=1000.0 + 300.0 + 6000.0)  # 300 s stop margin, 6000 s sim
        assert guard.dwell_s() == pytest.approx(600.0)
