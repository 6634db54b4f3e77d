# SPDX-License-Identifier: Apache-2.0
"""The car's state as the worker sees it, and where that state comes from.

``CarState`` is one small, frozen snapshot of what the owner policy needs: gear, owner
presence, charging, battery, temperatures, cabin preconditioning, the next departure and
the owner's pause switch. A ``CarSignals`` source holds the latest snapshot and calls its
subscribers on every change, so an owner event reaches the worker without polling.

Two sources ship: ``SimulatedBus`` (tests and the fleet simulator set fields directly)
and ``FileFeed`` (a JSON file that an in-car integration rewrites; see docs/OWNER_POLICY.md).
"""

from __future__ import annotations

import enum
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

from parkpool.runtime import logs
from parkpool.schemas.errors import ValidationError

log = logs.get_logger("parkpool.worker.carstate")


class Gear(enum.StrEnum):
    PARK = "park"
    REVERSE = "reverse"
    NEUTRAL = "neutral"
    DRIVE = "drive"


class Charging(enum.StrEnum):
    UNPLUGGED = "unplugged"
    PLUGGED = "plugged"  # on a charger, not drawing (charge limit reached, or scheduled)
    AC = "ac"  # charging from an AC wallbox or socket
    DC_FAST = "dc_fast"  # on a DC fast charger: paid per kWh and hard on the pack


@dataclass(frozen=True)
class CarState:
    gear: Gear = Gear.PARK
    locked: bool = True
    owner_nearby: bool = False  # key fob or phone key in range
    charging: Charging = Charging.PLUGGED
    soc_pct: float = 80.0
    charge_limit_pct: float = 80.0
    battery_temp_c: float = 25.0
    compute_temp_c: float = 45.0
    preconditioning: bool = False
    next_departure: float | None = None  # unix seconds of the owner's next scheduled trip
    next_trip_need_pct: float | None = None  # the car's own estimate for that trip
    owner_paused: bool = False
    at: float = 0.0  # unix seconds of this reading; 0 = unknown

    def __post_init__(self) -> None:
        object.__setattr__(self, "gear", _enum(Gear, "gear", self.gear))
        object.__setattr__(self, "charging", _enum(Charging, "charging", self.charging))
        for name in ("locked", "owner_nearby", "preconditioning", "owner_paused"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError("wrong_type", f"{name} must be a boolean")
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError("wrong_type", f"{name} must be a number")
            if not low <= value <= high:
                raise ValidationError("out_of_range", f"{name}={value} is outside [{low}, {high}]")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CarState:
        """Build from a feed's JSON object; missing keys keep their defaults, and keys it
        does not know are ignored (``unknown_fields`` names them): an in-car integration
        newer than this agent must not stop the car from being read."""
        if not isinstance(data, Mapping):
            raise ValidationError("wrong_type", "a car state must be a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def unknown_fields(cls, data: Mapping[str, Any]) -> list[str]:
        known = {f.name for f in fields(cls)}
        return sorted(str(key) for key in data if key not in known)


_RANGES = (
    ("soc_pct", 0.0, 100.0),
    ("charge_limit_pct", 0.0, 100.0),
    ("battery_temp_c", -60.0, 120.0),
    ("compute_temp_c", -60.0, 150.0),
    ("next_departure", 0.0, 1e11),
    ("next_trip_need_pct", 0.0, 100.0),
    ("at", 0.0, 1e11),
)
_OPTIONAL = ("next_departure", "next_trip_need_pct")


def _enum(kind: type[enum.StrEnum], name: str, value: object) -> Any:
    if not isinstance(value, str):
        raise ValidationError("wrong_type", f"{name} must be a string")
    try:
        return kind(value)
    except ValueError:
        raise ValidationError("bad_value", f"{name}={value!r} is not one of {list(kind)}") from None


Subscriber = Callable[[CarState], None]


class CarSignals(Protocol):
    """Where the car's state comes from; any adapter to a real car implements this."""

    def current(self) -> CarState:
        """The latest snapshot."""
        ...

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(state)`` on every change, on the source's own thread."""
        ...

    def fresh(self, now: float) -> bool:
        """Whether the latest snapshot is recent enough to act on."""
        ...

    def close(self) -> None:
        """Stop watching the car."""
        ...


class _Broadcast:
    """The latest state plus its subscribers; what every adapter shares."""

    def __init__(self, initial: CarState) -> None:
        self._state = initial
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def current(self) -> CarState:
        return self._state

    def subscribe(self, callback: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def _publish(self, state: CarState) -> None:
        with self._lock:
            if state == self._state:
                return
            self._state = state
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback(state)


class SimulatedBus(_Broadcast):
    """A car whose signals are set by code: tests, the simulator, the preemption bench."""

    def __init__(self, initial: CarState | None = None) -> None:
        super().__init__(initial or CarState(at=time.time()))

    def set(self, **changes: Any) -> CarState:
        """Change some signals at once; subscribers run before this returns.

        A call that changes nothing but the timestamp publishes nothing."""
        at = changes.pop("at", None)
        current = self.current()
        state = replace(current, **changes)
        if state == current and at is None:
            return current
        state = replace(state, at=time.time() if at is None else at)
        self._publish(state)
        return state

    def fresh(self, now: float) -> bool:
        return True  # set by code in this process: never out of date

    def close(self) -> None:
        return None


class FileFeed(_Broadcast):
    """A JSON object in a file, rewritten by an in-car integration (write a temporary
    file, then rename it over this one, so a reader never sees half a state).

    An unreadable or invalid file is logged and counted and the last good state stays;
    the owner policy treats a state older than its ``stale_after_s`` as unsafe to run on.
    """

    def __init__(self, path: Path, poll_s: float = 0.1, stale_after_s: float = 30.0) -> None:
        self.path = path
        self.poll_s = poll_s
        self.stale_after_s = stale_after_s
        self.errors = 0
        self.unknown_fields: set[str] = set()  # ignored keys seen so far, each warned once
        self._seen: tuple[int, int] | None = None
        # Until the first good read the car is assumed unavailable: stale on purpose.
        super().__init__(CarState(at=0.0))
        self._stop = threading.Event()
        self._read()
        self._thread = threading.Thread(target=self._watch, name="carstate-file", daemon=True)
        self._thread.start()

    def fresh(self, now: float) -> bool:
        """The integration must rewrite the file at least every ``stale_after_s``."""
        return now - self.current().at <= self.stale_after_s

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._read()

    def _read(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return  # not written yet: the state stays what it was (stale at first)
        if (stat.st_mtime_ns, stat.st_ino) == self._seen:
            return
        self._seen = (stat.st_mtime_ns, stat.st_ino)
        try:
            data = json.loads(self.path.read_text())
            state = CarState.from_mapping(data)
        except (OSError, ValueError, TypeError, ValidationError) as exc:
            self.errors += 1
            log.warning("car_state_invalid", path=str(self.path), error=str(exc)[:200])
            return
        self._note_unknown(CarState.unknown_fields(data))
        if not state.at:
            state = replace(state, at=stat.st_mtime_ns / 1e9)
        self._publish(state)

    def _note_unknown(self, keys: list[str]) -> None:
        new = [key for key in keys if key not in self.unknown_fields]
        if new:
            self.unknown_fields.update(new)
            log.warning("car_state_unknown_fields", path=str(self.path), ignored=new)
