# SPDX-License-Identifier: Apache-2.0
"""The ``reconnect_spread`` line of ``make bench``: a fleet coming back after its broker
restarts.

A simulated fleet (``parkpool sim``'s ``Fleet``: real ``VehicleWorker`` cars on one
shared ``NetworkLoop``, each re-subscribing and announcing itself when it is back)
connects to the embedded Mosquitto, which is then stopped, kept down for a few seconds
and started again on the same port. Each car's reconnection (its CONNACK) is timed from
the moment the launcher saw the broker ready again. The CONNACKs show how this fleet
came back, through its one network thread, which on a small machine opens only so many
connections a second and so spreads any herd itself. So the moment each car's successful
attempt was due by its own schedule (the loss, then each wait its backoff drew) is
recorded too: what the policy offers a broker when every car has a processor of its own.

It runs twice in the same process, against the same broker: with the shipped policy
(capped exponential backoff, full jitter: the first retry within 1 s, the window
doubling to a minute), and with jitter off, the baseline: 1 s, then every 2 s, for
every car alike, as the loop retried before. ``peak_per_100ms`` is the most
reconnections in any 100 ms window, ``due_peak_per_100ms`` the same for due attempts;
``peak_ratio`` and ``due_peak_ratio`` are the baseline's peaks over the jittered ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime.backoff import Backoff
from parkpool.runtime.settings import MqttConnection
from parkpool.worker.fleet import Fleet
from parkpool.worker.netloop import jittered_reconnects
from parkpool.worker.worker import VehicleWorker, WorkerSettings

NAMESPACE = "benchreconnect"
WINDOW_S = 0.1
COME_BACK_S = 180.0  # far beyond the jittered window after a few seconds down


@dataclass
class _Dated(Backoff):
    """A car's backoff that keeps its schedule: the first wait is drawn at the loss, each
    next one after an attempt that was due at the end of the last wait."""

    due: float = 0.0

    def next_delay(self) -> float:
        delay = super().next_delay()
        self.due = (time.monotonic() if self.failures == 1 else self.due) + delay
        return delay


def reconnect_spread(brokers: EmbeddedBrokers, cars: int, down_s: float) -> dict[str, Any]:
    shipped = jittered_reconnects()
    jittered = _one_restart(brokers, cars, down_s, shipped, "jit")
    # The loop's policy before jitter: 1 s after the loss, then every 2 s.
    fixed = Backoff(base=1.0, cap=2.0, jitter=False)
    baseline = _one_restart(brokers, cars, down_s, fixed, "fixed")
    return {
        "name": "reconnect_spread",
        "cars": cars,
        "broker_down_s": down_s,
        **{f"jittered_{key}": value for key, value in jittered.items()},
        **{f"baseline_{key}": value for key, value in baseline.items()},
        "peak_ratio": _ratio(baseline, jittered, "peak_per_100ms"),
        "due_peak_ratio": _ratio(baseline, jittered, "due_peak_per_100ms"),
    }


def _ratio(baseline: dict[str, Any], jittered: dict[str, Any], key: str) -> float:
    return round(baseline[key] / max(1, jittered[key]), 2)


def _one_restart(
    brokers: EmbeddedBrokers,
    count: int,
    down_s: float,
    policy: Backoff,
    prefix: str,
) -> dict[str, Any]:
    conn = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
    template = WorkerSettings("template", conn, NAMESPACE, backend="numpy")
    backoffs: list[_Dated] = []

    def dated() -> Backoff:
        backoffs.append(_Dated(base=policy.base, cap=policy.cap, jitter=policy.jitter))
        return backoffs[-1]

    fleet = Fleet(template, prefix=f"spread-{prefix}", reconnect=dated)
    try:
        fleet.add(count, parallel=32)
        cars = list(fleet.vehicles.values())
        before = {car.vehicle_id: car.connections for car in cars}
        brokers.stop_mosquitto()
        time.sleep(down_s)
        brokers.start_mosquitto()
        up = time.monotonic()
        deadline = up + COME_BACK_S
        while len(_back(cars, before)) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        delays = sorted(at - up for at in _back(cars, before))
        # Each car's last wait ended in the attempt that succeeded.
        due = sorted(backoff.due for backoff in backoffs if backoff.due)
        return _summary(delays, due, count)
    finally:
        fleet.stop_all()


def _back(cars: list[VehicleWorker], before: dict[str, int]) -> list[float]:
    """When each car that has reconnected since the restart got its CONNACK."""
    return [
        car.connected_at
        for car in cars
        if car.connections > before[car.vehicle_id] and car.connected_at is not None
    ]


def _summary(delays: list[float], due: list[float], count: int) -> dict[str, Any]:
    if not delays:
        return {"reconnected": 0, "peak_per_100ms": 0, "due_peak_per_100ms": 0}
    return {
        "reconnected": len(delays),
        "missing": count - len(delays),
        # A car may be accepted a moment before the launcher sees the broker ready, which
        # is where the delays are counted from: those count as 0.
        "p50_s": round(max(0.0, delays[len(delays) // 2]), 3),
        "p90_s": round(max(0.0, delays[int(len(delays) * 0.9)]), 3),
        "max_s": round(max(0.0, delays[-1]), 3),
        "peak_per_100ms": _peak(delays, WINDOW_S),
        "due_peak_per_100ms": _peak(due, WINDOW_S),
    }


def _peak(delays: list[float], window: float) -> int:
    """The most reconnections inside any window of ``window`` seconds (sorted input)."""
    peak, first = 0, 0
    for last, at in enumerate(delays):
        while at - delays[first] >= window:
            first += 1
        peak = max(peak, last - first + 1)
    return peak
