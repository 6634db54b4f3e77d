# SPDX-License-Identifier: Apache-2.0
"""Fleet-level series, from what vehicles say about themselves.

Vehicles cannot be scraped. Their heartbeats (``VehicleStatus``) carry cumulative kernel
time and energy and the owner-first stops since the previous heartbeat; this module turns
them into counters and a histogram, and counts the fleet by state in a rolling census
that visits a bounded number of cars a second. A car sends its heartbeat to each of its
K gateways and marks the first of them ``primary``; only that one counts the car, so
every fleet series adds up across gateways with ``sum``. (Credits outstanding are per
gateway, and add up too.)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from parkpool.gateway.vehicles import VehicleView
from parkpool.schemas import VehicleState, VehicleStatus
from parkpool.schemas.reasons import POLICY_REASONS

# Preemption latency objective is 100 ms; buckets resolve it well on both sides.
PREEMPTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)
STATES = ("eligible", "computing", "draining", "suspended", "offline")
CENSUS_BUDGET = 5_000  # cars a census visits per second at most


def reason_label(reason: str) -> str:
    """Cars send free text; only the contract's reasons become label values, anything
    else is "other", so a car cannot mint series."""
    return reason if reason in POLICY_REASONS else "other"


@dataclass(frozen=True)
class FleetCounts:
    """The fleet by state as this gateway sees it, for the gauges and ``/status``."""

    known: int
    by_state: dict[str, int]
    reasons: dict[tuple[str, str], int]  # (draining|suspended, policy reason) -> vehicles
    credits_outstanding: int
    heartbeat_age_p50: float
    heartbeat_age_max: float


class FleetStats:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.vehicles = Gauge(
            "parkpool_fleet_vehicles",
            "Vehicles by state (eligible, computing, draining, suspended, offline) and the "
            "owner-policy reason for draining or suspended ones",
            ["state", "reason"],
            registry=r,
        )
        self.known = Gauge("parkpool_fleet_vehicles_known", "Vehicles heard from", registry=r)
        self.credits = Gauge(
            "parkpool_fleet_credits_outstanding",
            "Tasks hungry vehicles may still be sent by this gateway",
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "parkpool_fleet_heartbeat_age_seconds",
            "Seconds since each vehicle was last heard from: median and maximum",
            ["stat"],
            registry=r,
        )
        self.preemptions = Counter(
            "parkpool_fleet_preemptions",
            "Owner-first stops with kernels running",
            ["reason"],
            registry=r,
        )
        self.preemption_latency = Histogram(
            "parkpool_fleet_preemption_seconds",
            "From the owner's event to no kernel running on the car",
            buckets=PREEMPTION_BUCKETS,
            registry=r,
        )
        self.busy = Counter(
            "parkpool_fleet_gpu_busy_seconds", "Kernel time on the fleet's cars", registry=r
        )
        self.energy = Counter(
            "parkpool_fleet_energy_joules", "Energy the fleet's kernels used", registry=r
        )
        self._shown: set[tuple[str, str]] = set()
        self._round: tuple[Iterator[VehicleView], _Tally] | None = None

    def heard(self, view: VehicleView, status: VehicleStatus, will: bool = False) -> None:
        """Fold one heartbeat's figures into the fleet counters, if this gateway is the
        one that counts the car (its first of K). A last will (which cannot say which
        gateway is first) leaves that as it was, so the car counts as offline there."""
        view.reason, view.held = status.reason, status.held
        if will:
            return
        counted_before, view.primary = view.primary, status.primary
        if not status.primary:
            return
        if counted_before:  # cumulative figures: from the first one counted here on
            self.busy.inc(_increase(view.busy_s, status.busy_s))
            self.energy.inc(_increase(view.energy_j, status.energy_j))
        view.busy_s, view.energy_j = status.busy_s, status.energy_j
        for stop in status.preemptions:
            self.preemptions.labels(reason_label(stop.reason)).inc()
            self.preemption_latency.observe(stop.stop_s)

    def count(
        self,
        views: Iterable[VehicleView],
        computing: Callable[[str], bool],
        available: Callable[[VehicleView], int],
    ) -> FleetCounts:
        """Count the fleet by state in one pass and set the gauges."""
        tally = _Tally(computing, available)
        for view in views:
            tally.add(view)
        counts = tally.finish()
        self._publish(counts)
        return counts

    def census(
        self,
        views: Callable[[], list[VehicleView]],
        computing: Callable[[str], bool],
        available: Callable[[VehicleView], int],
        budget: int = CENSUS_BUDGET,
    ) -> FleetCounts | None:
        """Go on with a census that visits at most ``budget`` cars per call (once a
        second): no pass over the whole fleet every second, however many cars a gateway
        serves. The gauges move when a census completes (every known / budget seconds,
        at least every second); returns its counts then, else None."""
        if self._round is None:
            self._round = (iter(views()), _Tally(computing, available))
        cars, tally = self._round
        for view in itertools.islice(cars, budget):
            tally.add(view)
        if tally.seen < budget * tally.calls:
            self._round = None
            counts = tally.finish()
            self._publish(counts)
            return counts
        tally.calls += 1
        return None

    def _publish(self, counts: FleetCounts) -> None:
        shown = {(state, "") for state in ("eligible", "computing", "offline")} | set(
            counts.reasons
        )
        for state in ("eligible", "computing", "offline"):
            self.vehicles.labels(state, "").set(counts.by_state[state])
        for (state, reason), n in counts.reasons.items():
            self.vehicles.labels(state, reason).set(n)
        # A reason nobody has any more reads 0 rather than its last count.
        for state, reason in self._shown - shown:
            self.vehicles.labels(state, reason).set(0)
        self._shown = shown
        self.known.set(counts.known)
        self.credits.set(counts.credits_outstanding)
        self.heartbeat_age.labels("p50").set(counts.heartbeat_age_p50)
        self.heartbeat_age.labels("max").set(counts.heartbeat_age_max)


class _Tally:
    """One census in progress: what the cars visited so far add up to."""

    def __init__(
        self, computing: Callable[[str], bool], available: Callable[[VehicleView], int]
    ) -> None:
        self.computing = computing
        self.available = available
        self.by_state = dict.fromkeys(STATES, 0)
        self.reasons: dict[tuple[str, str], int] = {}
        self.ages: list[float] = []
        self.credits = 0
        self.seen = 0
        self.calls = 1
        self.now = time.monotonic()

    def add(self, view: VehicleView) -> None:
        self.seen += 1
        # Credits are this gateway's own, whichever gateway counts the car.
        if view.state is not VehicleState.OFFLINE:
            self.credits += max(0, self.available(view))
        if not view.primary:
            return  # counted by the gateway that is its first
        state = _state_of(view, self.computing)
        self.by_state[state] += 1
        if state in ("draining", "suspended"):
            key = (state, reason_label(view.reason))
            self.reasons[key] = self.reasons.get(key, 0) + 1
        if state != "offline":
            self.ages.append(self.now - view.last_heard)

    def finish(self) -> FleetCounts:
        known = sum(self.by_state.values())
        return FleetCounts(
            known, self.by_state, self.reasons, self.credits, *_median_max(self.ages)
        )


def _state_of(view: VehicleView, computing: Callable[[str], bool]) -> str:
    if view.state is VehicleState.OFFLINE:
        return "offline"
    if view.state is VehicleState.SUSPENDED:
        return "suspended"
    if view.state is VehicleState.DRAINING:
        return "draining"
    # Its leases here, or the tasks it said it holds (for its other gateway, say).
    busy = computing(view.vehicle_id) or view.held > 0
    return "computing" if busy else "eligible"


def _increase(last: float, now: float) -> float:
    """A cumulative figure's growth; a restarted worker starts again from zero."""
    return now - last if now >= last else now


def _median_max(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    values.sort()
    return values[len(values) // 2], values[-1]
