# SPDX-License-Identifier: Apache-2.0
"""The owner's guard on a worker: applies the owner policy to the car's signals, stops
kernels between launches when the car is taken back, and keeps the energy account.

The guard decides; the worker acts (nacks, status, pulls) in its ``on_change`` callback.
Preemption uses a generation number: every stop starts a new generation, and a kernel's
checkpoint raises ``Preempted`` once its generation is over, so a kernel started before
a stop never outlives it, even if the car is eligible again a moment later.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from parkpool.runtime import logs
from parkpool.schemas.errors import Preempted
from parkpool.worker.carstate import CarSignals, CarState
from parkpool.worker.policy import RUN, Decision, Mode, OwnerPolicy

log = logs.get_logger("parkpool.worker.guard")
OnChange = Callable[[Decision, Decision], None]


@dataclass(frozen=True)
class TimeBase:
    """The clock the policy reads: real time, or a simulated day run ``scale`` times faster."""

    now: Callable[[], float] = time.time
    scale: float = 1.0  # simulated seconds per real second


REAL_TIME = TimeBase()


@dataclass
class Preemption:
    """One stop while kernels were running: when the owner acted, and when they ended."""

    reason: str
    event_at: float  # the car's timestamp of the signal that caused it (wall clock)
    decided_at: float
    stopped_at: float | None = None  # when the last running kernel returned

    @property
    def stop_ms(self) -> float | None:
        if self.stopped_at is None:
            return None
        return (self.stopped_at - self.event_at) * 1000.0


class EnergyMeter:
    """kWh used per calendar day (the car's local time), from kernel seconds x power."""

    def __init__(self, power_w: float) -> None:
        self.power_w = power_w
        self.total_kwh = 0.0
        self._day = ""
        self._today_kwh = 0.0
        self._lock = threading.Lock()

    def add(self, busy_s: float, now: float) -> None:
        kwh = busy_s * self.power_w / 3.6e6
        with self._lock:
            self._roll(now)
            self._today_kwh += kwh
            self.total_kwh += kwh

    def today(self, now: float) -> float:
        with self._lock:
            self._roll(now)
            return self._today_kwh

    def _roll(self, now: float) -> None:
        day = time.strftime("%Y-%m-%d", time.localtime(now))
        if day != self._day:
            self._day, self._today_kwh = day, 0.0


class OwnerGuard:
    def __init__(
        self,
        car: CarSignals,
        policy: OwnerPolicy,
        on_change: OnChange,
        timebase: TimeBase = REAL_TIME,
    ) -> None:
        self.car = car
        self.policy = policy
        self.energy = EnergyMeter(policy.config.compute_power_w)
        self.preemptions: collections.deque[Preemption] = collections.deque(maxlen=10_000)
        self._on_change = on_change
        self._time = timebase
        self._decision = RUN
        self._generation = 0
        self._generation_over = threading.Event()  # set when the current generation ends
        self._stop_reason = ""
        self._running = 0
        self._pending: Preemption | None = None
        self._unreported: list[Preemption] = []  # finished stops not yet in a heartbeat
        self._lock = threading.Lock()

    @property
    def decision(self) -> Decision:
        return self._decision

    @property
    def generation(self) -> int:
        return self._generation

    def start(self) -> None:
        """Decide once now, then on every change of the car's signals."""
        self.car.subscribe(self._on_car_change)
        self.reconsider()

    def _on_car_change(self, _state: CarState) -> None:
        self.reconsider()

    def reconsider(self) -> Decision:
        """Evaluate the policy; on a change, stop kernels if needed and tell the worker."""
        with self._lock:
            state, now = self.car.current(), self._time.now()
            fresh = self.car.fresh(now)
            decision = self.policy.evaluate(state, now, self.energy.today(now), fresh)
            previous, self._decision = self._decision, decision
            if decision == previous:
                return decision
            if decision.mode is Mode.SUSPEND:
                self._stop_kernels(decision, state.at or now)
        log.info("owner_policy", mode=decision.mode.value, reason=decision.reason)
        self._on_change(previous, decision)
        return decision

    def _stop_kernels(self, decision: Decision, event_at: float) -> None:
        self._generation += 1
        ended, self._generation_over = self._generation_over, threading.Event()
        ended.set()
        self._stop_reason = decision.reason
        if self._running:
            self._pending = Preemption(decision.reason, event_at, time.time())
            self.preemptions.append(self._pending)

    # ---------------------------------------------------------------- kernels

    def checkpoint(self, generation: int) -> None:
        """Called by a kernel between launches: raise once its generation has ended."""
        if generation != self._generation:
            raise Preempted(self._stop_reason)

    def kernel_started(self) -> int:
        """Count a running kernel; returns the generation it belongs to.

        Raises Preempted while the car is suspended: a prefetched task whose turn came
        just as the owner took the car back must not start in the new generation, where
        no stop would ever reach it.
        """
        with self._lock:
            if self._decision.mode is Mode.SUSPEND:
                raise Preempted(self._stop_reason or self._decision.reason)
            self._running += 1
            return self._generation

    def generation_over(self, generation: int) -> threading.Event:
        """An event set when ``generation`` ends, for a kernel that waits rather than
        computes: it wakes at the stop instead of polling its checkpoint."""
        with self._lock:
            if generation == self._generation:
                return self._generation_over
        ended = threading.Event()
        ended.set()
        return ended

    def kernel_finished(self, busy_s: float) -> None:
        # In a sped-up simulation one real second of compute stands for ``scale`` seconds.
        self.energy.add(busy_s * self._time.scale, self._time.now())
        with self._lock:
            self._running -= 1
            if self._running == 0 and self._pending is not None:
                self._pending.stopped_at = time.time()
                self._unreported = [*self._unreported[-63:], self._pending]
                self._pending = None

    def take_reports(self) -> list[Preemption]:
        """Finished stops since the last call, for the next heartbeat (at most 64)."""
        with self._lock:
            reports, self._unreported = self._unreported, []
            return reports

    @property
    def running(self) -> int:
        return self._running

    # ---------------------------------------------------------------- dispatch hints

    def dwell_s(self) -> float:
        """Real seconds a task may still run before the departure stop; 0 = no departure
        known. (The gateway runs on real time, whatever clock the car's policy reads.)"""
        departure = self.car.current().next_departure
        if departure is None:
            return 0.0
        left = (
            departure - self.policy.config.departure_stop_s - self._time.now()
        ) / self._time.scale
        return max(1.0, left)  # 0 would read as "no prediction"
