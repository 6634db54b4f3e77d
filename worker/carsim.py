# SPDX-License-Identifier: Apache-2.0
"""Cars that behave like cars, for ``parkpool sim --realistic``.

Each simulated car follows a day built from the two kinds of parking stay (short errands;
long stays at home, at work and overnight) that vary with the time of day. It charges on
AC at home and sometimes at work, drains its battery while driving and a little while
parked off the plug, warms its compute module while kernels run, has the odd hot
afternoon, and its owner sometimes comes back early, without the departure the car
predicted. Time runs ``scale`` times faster than the wall clock, so a day takes minutes.

The model drives each car's ``SimulatedBus``; the real worker and owner policy react to
it exactly as they would to a real car.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from parkpool.worker.carstate import CarState, Charging, Gear, SimulatedBus
from parkpool.worker.guard import TimeBase

HOUR = 3600.0
PACK_KWH = 75.0
AC_KW = 11.0
DRIVE_PCT_PER_MIN = 0.25  # about 18 kWh per 100 km at 50 km/h
PARKED_DRAIN_PCT_PER_H = 0.05
EARLY_RETURN_P = 0.15  # share of stays the owner cuts short, unannounced
HOT_AFTERNOON_P = 0.2  # share of days with a pack above 40 °C in the afternoon


@dataclass(frozen=True)
class Stay:
    """One parked period: where, from when to when, and whether the owner announced its end."""

    place: str  # home, work or errand
    start: float
    end: float
    plugged: bool
    announced: bool  # the owner's calendar or the nav knows when they leave


def plan_day(rng: random.Random, day_start: float) -> list[Stay]:
    """A weekday of stays: overnight at home, a working day, errands, home again."""
    h = HOUR
    leave_home = day_start + rng.uniform(6.5, 8.5) * h
    arrive_work = leave_home + rng.uniform(0.25, 0.75) * h
    leave_work = arrive_work + rng.uniform(7.5, 9.0) * h
    stays = [Stay("home", day_start, leave_home, True, True)]
    stays.append(Stay("work", arrive_work, leave_work, rng.random() < 0.4, True))
    t = leave_work + rng.uniform(0.2, 0.5) * h
    for _ in range(rng.randint(0, 2)):  # errands on the way home: short, unannounced
        length = rng.uniform(0.25, 1.0) * h
        stays.append(Stay("errand", t, t + length, False, False))
        t += length + rng.uniform(0.1, 0.4) * h
    stays.append(Stay("home", t, day_start + 24 * h + rng.uniform(6.5, 8.5) * h, True, True))
    return [_maybe_early(rng, stay) for stay in stays]


def _maybe_early(rng: random.Random, stay: Stay) -> Stay:
    """The owner sometimes leaves well before the end the car predicted."""
    if rng.random() >= EARLY_RETURN_P:
        return stay
    cut = stay.start + (stay.end - stay.start) * rng.uniform(0.2, 0.8)
    return Stay(stay.place, stay.start, cut, stay.plugged, False)


@dataclass
class CarModel:
    vehicle_id: str
    bus: SimulatedBus
    rng: random.Random
    soc_pct: float = 60.0
    compute_temp_c: float = 35.0
    stays: list[Stay] = field(default_factory=list)
    hot_day: bool = False
    trips: int = 0
    early_returns: int = 0

    def step(self, now: float, dt: float, computing: bool) -> None:
        """Advance the car by ``dt`` simulated seconds and publish what changed."""
        stay = self._stay_at(now)
        if stay is None:
            self._drive(dt)
        else:
            self._park(stay, now, dt)
        self._warm(dt, computing and stay is not None, self._hot(now))
        self.bus.set(**self._signals(now, stay))

    def _stay_at(self, now: float) -> Stay | None:
        while self.stays and self.stays[0].end <= now:
            done = self.stays.pop(0)
            self.trips += 1
            self.early_returns += int(not done.announced and done.place != "errand")
        if not self.stays:
            day = now - now % (24 * HOUR)
            self.stays = [s for s in plan_day(self.rng, day) if s.end > now]
            self.hot_day = self.rng.random() < HOT_AFTERNOON_P
        first = self.stays[0] if self.stays else None
        return first if first is not None and first.start <= now else None

    def _drive(self, dt: float) -> None:
        self.soc_pct = max(5.0, self.soc_pct - DRIVE_PCT_PER_MIN * dt / 60.0)

    def _park(self, stay: Stay, now: float, dt: float) -> None:
        if stay.plugged and self.soc_pct < 80.0:
            self.soc_pct = min(80.0, self.soc_pct + AC_KW * dt / HOUR / PACK_KWH * 100.0)
        elif not stay.plugged:
            self.soc_pct = max(0.0, self.soc_pct - PARKED_DRAIN_PCT_PER_H * dt / HOUR)

    def _hot(self, now: float) -> bool:
        hour = (now % (24 * HOUR)) / HOUR
        return self.hot_day and 13.0 <= hour <= 17.0

    def _warm(self, dt: float, computing: bool, hot: bool) -> None:
        # First-order approach, time constant 10 minutes: 80 °C under load (92 °C on a hot
        # afternoon, past the 85 °C gate: the thermal events), ambient + 5 °C idle.
        target = (92.0 if hot else 80.0) if computing else (40.0 if hot else 30.0)
        self.compute_temp_c += (target - self.compute_temp_c) * min(1.0, dt / 600.0)

    def _signals(self, now: float, stay: Stay | None) -> dict[str, object]:
        hot = self._hot(now)
        common = {
            "soc_pct": round(self.soc_pct, 2),
            "battery_temp_c": 42.0 if hot else 24.0,
            "compute_temp_c": round(self.compute_temp_c, 1),
        }
        if stay is None:  # driving: the owner is in the car
            return {**common, "gear": Gear.DRIVE, "locked": False, "charging": "unplugged"}
        charging = Charging.UNPLUGGED
        if stay.plugged:
            charging = Charging.AC if self.soc_pct < 80.0 else Charging.PLUGGED
        return {
            **common,
            "gear": Gear.PARK,
            "locked": True,
            "charging": charging,
            "next_departure": stay.end if stay.announced else None,
        }


class Driver:
    """Moves every car's model on a simulated clock, from one thread."""

    def __init__(self, scale: float, start: float, seed: int = 1, tick_s: float = 0.1) -> None:
        self.scale = scale
        self.start_sim = start
        self.tick_s = tick_s
        self.cars: dict[str, CarModel] = {}
        self._rng = random.Random(seed)
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="carsim", daemon=True)
        # Set by whoever runs the workers: whether a car's kernels are busy (it heats up).
        self.computing: Callable[[str], bool] = lambda _vehicle_id: False

    @property
    def timebase(self) -> TimeBase:
        return TimeBase(now=self.now, scale=self.scale)

    def now(self) -> float:
        return self.start_sim + (time.monotonic() - self._started) * self.scale

    def bus_for(self, vehicle_id: str) -> SimulatedBus:
        """A new car's bus, its model starting wherever its day has got to."""
        rng = random.Random(self._rng.random())
        bus = SimulatedBus(CarState(at=time.time()))
        self.cars[vehicle_id] = CarModel(vehicle_id, bus, rng, soc_pct=rng.uniform(40, 80))
        self.cars[vehicle_id].step(self.now(), 0.0, False)
        return bus

    def start(self) -> Driver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        last = self.now()
        while not self._stop.wait(self.tick_s):
            now = self.now()
            for vehicle_id, car in list(self.cars.items()):
                car.step(now, now - last, self.computing(vehicle_id))
            last = now
