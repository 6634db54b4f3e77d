# SPDX-License-Identifier: Apache-2.0
"""The fleet census visits a bounded number of cars a second, and still counts them all."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from parkpool.gateway.fleet_stats import FleetStats
from parkpool.gateway.vehicles import VehicleView
from parkpool.schemas import VehicleState


class TestRollingCensus:
    """A census of more cars than its budget takes several calls; the gauges move only
    when it completes, with every car counted once."""

    def test_counts_every_car_over_several_calls(self) -> None:
        # Given 12,000 cars, a sixth of them suspended, and a budget of 5,000 a call
        stats = FleetStats(CollectorRegistry())
        views = [VehicleView(f"car-{i}", primary=True) for i in range(12_000)]
        for view in views[::6]:
            view.state = VehicleState.SUSPENDED
        visited: list[int] = []

        def source() -> list[VehicleView]:
            visited.append(len(views))
            return views

        def census() -> object:
            return stats.census(source, lambda v: False, lambda v: 0, budget=5_000)

        # When the census runs once a second
        first, second, third = census(), census(), census()
        # Then it completes on the third call, with one snapshot of the cars
        assert first is None and second is None and third is not None
        assert visited == [12_000]
        assert third.known == 12_000  # type: ignore[attr-defined]
        assert third.by_state["suspended"] == 2_000  # type: ignore[attr-defined]
        assert stats.known._value.get() == 12_000

    def test_a_small_fleet_is_counted_every_call(self) -> None:
        stats = FleetStats(CollectorRegistry())
        views = [VehicleView("a", primary=True), VehicleView("b", primary=True, held=1)]
        counts = stats.census(lambda: views, lambda v: v == "a", lambda v: 1)
        # "b" holds a task for another gateway: computing too
        assert counts is not None and counts.by_state["computing"] == 2
        assert counts.credits_outstanding == 2

    def test_only_cars_whose_first_gateway_this_is_are_counted(self) -> None:
        # Given a car that names this gateway first and one that names another
        stats = FleetStats(CollectorRegistry())
        views = [VehicleView("mine", primary=True), VehicleView("theirs")]
        counts = stats.census(lambda: views, lambda v: False, lambda v: 1)
        # Then only the first is in this gateway's census: the other gateway counts it
        assert counts is not None and counts.known == 1
        # But credits are this gateway's own: both cars may still be sent work from here
        assert counts.credits_outstanding == 2
