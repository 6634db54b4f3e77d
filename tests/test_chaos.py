# SPDX-License-Identifier: Apache-2.0
"""The chaos scenarios of `make chaos`, reduced so that every CI run checks the semantics.

It runs on its own brokers (it restarts them), with two gateway processes, one of them
SIGKILLed and restarted, 30 % of the vehicles killed without a clean disconnect and
replaced, a Mosquitto restart, a Kafka SIGKILL and restart, an object-store SIGKILL and
restart, and a forced rebalance, all while tasks are in flight.
The cell scenario does the same across two cells (a Mosquitto each), restarting one
cell's broker and changing the other's gateway roster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import ChaosPlan, fault_schedule, fault_thresholds, run_chaos

pytestmark = pytest.mark.integration

REDUCED = ChaosPlan(
    tasks=480,
    vehicles=12,
    gateways=2,
    gateway_kills=1,
    vehicle_waves=1,
    broker_restarts=1,
    rebalances=1,
    task_seconds=0.6,
    # Under pytest-timeout's 240 s, so that a stalled run ends with its report and a
    # snapshot of every gateway and of the group, not with a bare timeout.
    timeout_s=180.0,
)


class TestReducedChaos:
    """Under every fault at once, no chunk is lost and the caller sees each chunk once."""

    def test_nothing_lost_nothing_doubled(self, tmp_path: Path) -> None:
        # Given the reduced plan, When it runs with faults injected while work flows
        report = run_chaos(REDUCED, tmp_path, say=print)
        # Then every fault happened while the job was running
        assert report.gateway_kills >= REDUCED.gateway_kills
        assert report.vehicle_kills >= int(REDUCED.vehicles * REDUCED.vehicle_kill_fraction)
        assert report.broker_restarts >= 1
        assert report.kafka_restarts >= 1 and report.store_restarts >= 1
        assert report.rebalances >= 1
        # And every chunk came back exactly once, with its own value
        assert (report.completed, report.lost) == (REDUCED.tasks, 0)
        assert report.duplicates_to_caller == 0
        assert report.wrong_values == 0
        assert report.ok(REDUCED)


REDUCED_CELLS = ChaosPlan(
    tasks=480,
    vehicles=16,
    gateways=2,
    cells=2,
    gateway_kills=1,
    vehicle_waves=1,
    broker_restarts=1,
    rebalances=0,
    roster_changes=1,
    task_seconds=0.6,
    timeout_s=180.0,  # as in REDUCED
)


class TestReducedCellChaos:
    """Across two cells, under a gateway kill, a cell's broker restart, car kills and a
    roster change, nothing is lost and the caller sees each chunk once."""

    def test_nothing_lost_nothing_doubled_across_cells(self, tmp_path: Path) -> None:
        report = run_chaos(REDUCED_CELLS, tmp_path, say=print)
        assert report.gateway_kills >= 1 and report.broker_restarts >= 1
        assert report.roster_changes >= 1
        assert report.vehicle_kills >= int(REDUCED_CELLS.vehicles * 0.3)
        assert (report.completed, report.lost) == (REDUCED_CELLS.tasks, 0)
        assert report.duplicates_to_caller == 0 and report.wrong_values == 0
        assert report.ok(REDUCED_CELLS)


class TestFaultPlan:
    def test_faults_spread_over_the_progress_span(self) -> None:
        plan = ChaosPlan(tasks=2000, fault_span=(0.05, 0.7))
        assert fault_thresholds(plan, 8) == [100, 285, 471, 657, 842, 1028, 1214, 1400]
        assert fault_thresholds(plan, 1) == [100]

    def test_every_fault_kind_is_scheduled_as_planned(self) -> None:
        plan = ChaosPlan(gateway_kills=3, vehicle_waves=3, broker_restarts=1, rebalances=1)
        order = fault_schedule(plan)
        once = ["rebalance", "broker", "kafka", "store"]
        assert sorted(order) == sorted(["gateway"] * 3 + ["vehicles"] * 3 + once)
        # Round-robin: each kind appears before any kind repeats.
        assert set(order[:6]) == {"gateway", "vehicles", *once}
