# SPDX-License-Identifier: Apache-2.0
"""``parkpool capacity``: the model's arithmetic on hand-checkable inputs, how each design
scales, the command's JSON and table, and inputs from ``make bench`` lines.

Everything here is arithmetic: no broker is started.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from parkpool.app import capacity
from parkpool.app.capacity_model import (
    HOP_ORDER,
    MIB,
    Capacities,
    Scenario,
    beats_per_task,
    new_design,
    old_design,
    old_limit,
    total,
)
from parkpool.app.cli import build_parser, main
from parkpool.schemas.errors import ConfigError

# Round capacities, so that every figure below can be checked by hand.
ROUND = Capacities(
    gateway_msgs_per_s=1000.0,
    gateway_data_mib_per_s=100.0,
    gateway_bytes_per_car=1024.0,
    gateway_base_mib=50.0,
    broker_node_msgs_per_s=10_000.0,
    broker_node_mib_per_s=1000.0,
    broker_connects_per_s=1000.0,
    kafka_broker_msgs_per_s=10_000.0,
    kafka_broker_mib_per_s=100.0,
    kafka_partitions_per_broker=4000.0,
    kafka_partitions_per_cluster=200_000.0,
    sdk_encode_mib_per_s=1000.0,
    reconnect_due_peak_per_100ms=0.05,
    reconnect_p90_s=4.0,
    pull_bytes=100.0,
    status_bytes=100.0,
    lease_heartbeat_bytes=100.0,
    gateway_status_bytes=100.0,
    assignment_overhead_bytes=0.0,
)
# 1,000 cars, half eligible, 80 % of those busy: 400 busy, 100 idle, 40 tasks/s of 10 s,
# no lease heartbeats (a 10 s task ends before a third of a 30 s lease), and departures
# so rare that last wills vanish from the sums.
SMALL = Scenario(
    vehicles=1000,
    task_seconds=10.0,
    heartbeat_s=10.0,
    pull_refresh_s=10.0,
    cell_vehicles=1000,
    mean_parked_s=1e12,
)
REQUIRED = {
    "tasks_per_s",
    "cells",
    "gateways",
    "broker_nodes",
    "kafka_partitions",
    "kafka_brokers",
    "gateway_memory_mib",
    "hops",
    "reconnect",
    "utilisation",
    "binding_constraint",
    "saturated",
}


def stored() -> Capacities:
    inputs = capacity.stored_inputs()
    return Capacities(**{name: inputs[name].value for name in Capacities.__dataclass_fields__})


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["capacity", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


class TestArithmetic:
    """Each figure of the model is the arithmetic docs/SCALE.md states."""

    def test_per_gateway_inbound_is_k_cars_per_gateway_times_the_per_car_rate(self) -> None:
        # Given 1,000 cars in one cell, K = 2, and capacities that need only 2 gateways
        design = new_design(SMALL, ROUND)
        assert design.gateways_per_cell == 2
        # When each car sends each of its 2 gateways a status every 10 s (0.1/s), its
        # refreshed pulls while idle (10 % of cars, every 10 s: 0.01/s), and half of its
        # results (one per task, 0.04 tasks/s: 0.02/s; the slot refills without a pull)
        per_pair = 0.1 + 0.01 + 0.02
        # Then a gateway receives K x V_cell / G_cell x that rate: 2 x 1000 / 2 x 0.13
        assert design.loads["gateway_inbound"].load == pytest.approx(2 * 1000 / 2 * per_pair)
        assert design.loads["gateway_inbound"].load == pytest.approx(130.0)

    def test_hops_tasks_and_counts(self) -> None:
        # Given the small scenario
        design = new_design(SMALL, ROUND)
        hops = design.hops
        # Then 40 tasks/s move, and the car publishes 200 statuses, 20 pulls (idle cars'
        # refreshes only), 40 results
        assert design.tasks_per_s == pytest.approx(40.0)
        assert hops["car_to_broker"]["status"].msgs == pytest.approx(200.0)
        assert hops["car_to_broker"]["pull"].msgs == pytest.approx(20.0)
        assert hops["car_to_broker"]["result"].msgs == pytest.approx(40.0)
        assert hops["car_to_broker"]["heartbeat"].msgs == 0
        # And bytes follow the sizes: 40 tasks of 1 MiB out, 40 results of 0.25 MiB back
        assert total(hops["broker_to_car"]).mib == pytest.approx(40.0, rel=1e-3)
        assert total(hops["gateway_to_kafka"]).mib == pytest.approx(10.0)
        assert total(hops["kafka_to_sdk"]).msgs == pytest.approx(40.0)
        # And 400 tasks in flight need one partition, but each gateway gets one
        assert design.in_flight_tasks == pytest.approx(400.0)
        assert design.kafka_task_partitions == 2
        assert design.kafka_partitions == 4  # the results topic has as many
        # And 50 MiB/s written at 100 MiB/s per broker with headroom 0.5 needs one broker
        assert design.kafka_brokers == 1

    def test_gateway_memory_is_base_plus_bytes_per_known_car(self) -> None:
        # Given 2 gateways, each car known to K = 2 of them: every gateway knows 1,000
        design = new_design(SMALL, ROUND)
        # Then its memory is 50 MiB + 1,000 x 1 KiB
        assert design.vehicles_known_per_gateway == pytest.approx(1000.0)
        expected = 50.0 + 1000 * 1024 / MIB
        assert design.loads["gateway_memory"].load == pytest.approx(expected)

    def test_old_design_every_gateway_hears_every_car(self) -> None:
        # Given the same cars on one broker with 4 gateways
        design = old_design(SMALL, ROUND, gateways=4)
        # Then each gateway hears all 100 statuses/s and 50 pulls/s (40 on a finished
        # task, 10 refreshes), and a quarter of the 40 results/s
        assert design.loads["gateway_inbound"].load == pytest.approx(100 + 50 + 10)
        # And every car hears every gateway's status every 10 s: 4 x 1000 / 10
        assert design.hops["broker_to_car"]["roster"].msgs == pytest.approx(400.0)
        # And in flight: 6 partitions x 512
        assert design.loads["in_flight_window"].capacity == 3072

    def test_reconnect_burst(self) -> None:
        # Given 5 % of a restarted cell's cars due in the busiest 100 ms
        design = new_design(SMALL, ROUND)
        burst = design.reconnect
        # Then the peak is 1,000 x 0.05 x 10 connects/s, and each car gets the roster
        assert burst["peak_connects_per_s"] == pytest.approx(500.0)
        assert burst["roster_deliveries"] == pytest.approx(1000 * 2)
        # And each car sends a status to each of its 2 gateways, and half of them a pull
        assert burst["peak_gateway_msgs_per_s"] == pytest.approx(500 * 2 * 1.5 / 2)

    @pytest.mark.parametrize(
        ("task_s", "lease_s", "beats"), [(30, 30, 2), (10, 30, 0), (31, 30, 3), (60, 15, 11)]
    )
    def test_lease_heartbeats_every_third_of_the_lease(
        self, task_s: float, lease_s: float, beats: int
    ) -> None:
        # Given a task and a lease, Then it heartbeats at each third until it ends
        scenario = replace(SMALL, task_seconds=task_s, lease_seconds=lease_s)
        assert beats_per_task(scenario) == beats

    def test_the_old_design_stops_at_its_in_flight_bound(self) -> None:
        # Given capacities so large that only the old window of 3,072 tasks can bind
        big = replace(ROUND, gateway_msgs_per_s=1e12, broker_node_msgs_per_s=1e15)
        big = replace(big, broker_node_mib_per_s=1e12, gateway_data_mib_per_s=1e12)
        # Then the largest fleet is 3,072 / (0.5 eligible x 0.8 busy)
        assert old_limit(SMALL, big) == 7680


class TestScaling:
    """Cells keep a gateway's load flat as the fleet grows; the old design's grows with it."""

    def test_new_flat_old_linear(self) -> None:
        # Given the measured capacities and fleets of 1M, 2M and 8M cars
        c = stored()
        fleets = (1_000_000, 2_000_000, 8_000_000)
        new = [new_design(Scenario(vehicles=v, cell_vehicles=200_000), c) for v in fleets]
        old = [
            old_design(Scenario(vehicles=v), c, d.gateways)
            for v, d in zip(fleets, new, strict=True)
        ]
        # Then cells are added and each gateway's inbound load does not change
        assert [d.cells for d in new] == [5, 10, 40]
        inbound = [d.loads["gateway_inbound"].load for d in new]
        assert inbound[1] == pytest.approx(inbound[0])
        assert inbound[2] == pytest.approx(inbound[0])
        # And in the old design it grows with the fleet, 8 times for 8 times the cars
        was = [d.loads["gateway_inbound"].load for d in old]
        assert was[2] / was[0] == pytest.approx(8.0, rel=0.02)
        assert all(d.loads["gateway_inbound"].utilisation > 1 for d in old)


class TestCommand:
    """The command prints one JSON object with every figure, or a readable table."""

    def test_json_has_every_key(self, capsys: pytest.CaptureFixture[str]) -> None:
        # When the 7M-car fleet is asked for as JSON
        rc, out, _ = run_cli(capsys, "--vehicles", "7000000", "--json")
        # Then one line holds one JSON object with both designs and the inputs
        assert rc == 0
        assert out.count("\n") == 1
        report = json.loads(out)
        assert set(report) == {"scenario", "new", "old", "inputs"}
        for design in ("new", "old"):
            assert set(report[design]) >= REQUIRED
            assert list(report[design]["hops"]) == list(HOP_ORDER)
            for hop in report[design]["hops"].values():
                assert {"msgs_per_s", "mib_per_s"} <= set(hop)
        for name in Capacities.__dataclass_fields__:
            assert report["inputs"][name]["value"] > 0
            assert report["inputs"][name]["source"]["line"]
        # And the new design fits while the old one is saturated
        assert report["new"]["saturated"] is False
        assert report["new"]["binding_constraint"]["component"] in report["new"]["utilisation"]
        assert report["old"]["saturated"] is True
        assert "gateway_inbound" in report["old"]["saturated_by"]
        assert report["old"]["max_vehicles"] < 7_000_000

    def test_readable_table(self, capsys: pytest.CaptureFixture[str]) -> None:
        # When the same is asked for without --json
        rc, out, _ = run_cli(capsys, "--vehicles", "7000000")
        # Then a table puts the designs side by side, with every hop and the verdicts
        assert rc == 0
        assert "new (cells)" in out
        assert "old (all hear all)" in out
        for hop in HOP_ORDER:
            assert hop.replace("_to_", " -> ").replace("_", " ") in out
        assert "binds first (new):" in out
        assert "old design: saturated by" in out

    def test_a_flag_overrides_one_capacity(self, capsys: pytest.CaptureFixture[str]) -> None:
        # When the broker node's capacity is given for production hardware
        rc, out, _ = run_cli(
            capsys, "--vehicles", "1000000", "--json", "--broker-node-msgs-per-s", "1e6"
        )
        # Then the input says so, and the other inputs are still the measured ones
        inputs = json.loads(out)["inputs"]
        assert rc == 0
        assert inputs["broker_node_msgs_per_s"] == {
            "value": 1e6,
            "unit": "msgs/s",
            "overridden": True,
            "source": {"how": "--broker-node-msgs-per-s"},
        }
        assert inputs["gateway_msgs_per_s"]["overridden"] is False


def bench_file(tmp_path: Path, *records: dict[str, Any]) -> Path:
    # make echoes its command before the lines, so the file starts with it
    lines = [".venv/bin/python -m tests.bench", *(json.dumps(r) for r in records)]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


class TestBenchInputs:
    """--inputs re-derives the inputs its bench lines measure; a bad file is refused."""

    def test_lines_override_stored_inputs(self, tmp_path: Path) -> None:
        # Given a bench file with a gateway rate, two fleet sizes and a cells run
        path = bench_file(
            tmp_path,
            {"name": "e2e_small_tasks", "tasks_per_s": 500.0, "machine": "test box"},
            {"name": "fleet_scale", "vehicles_known_to_gateway": 1000, "gateway_rss_mb": 60.0},
            {"name": "fleet_scale", "vehicles_known_to_gateway": 3000, "gateway_rss_mb": 62.0},
            {"name": "mqtt_baseline", "payload_bytes": 512, "msgs_per_s": 1000.0},
            {"name": "mqtt_baseline", "payload_bytes": 1 << 20, "msgs_per_s": 300.0},
            {"name": "cells", "runs": [{"broker_in_per_s": 0, "broker_out_per_s": 0}]},
        )
        # When it is read
        found = capacity.bench_inputs(path)
        # Then a pull and a result per task make the gateway rate, with its source
        assert found["gateway_msgs_per_s"].value == 1000.0
        assert found["gateway_msgs_per_s"].source["line"] == "e2e_small_tasks"
        assert found["gateway_msgs_per_s"].source["machine"] == "test box"
        assert found["gateway_msgs_per_s"].source["where"] == str(path)
        # And memory per car is the slope between the two fleet sizes
        assert found["gateway_bytes_per_car"].value == pytest.approx(2 * MIB / 2000)
        assert found["gateway_base_mib"].value == pytest.approx(59.0)
        # And a broker handles each message twice (in and out); an idle cells run is lower
        assert found["broker_node_msgs_per_s"].value == 2000.0
        assert found["broker_node_mib_per_s"].value == 600.0
        assert "kafka_broker_mib_per_s" not in found

    def test_gateway_capacity_and_busier_cells_win(self, tmp_path: Path) -> None:
        # Given a saturated gateway line and a cells run busier than mqtt_baseline
        run = {"broker_in_per_s": 9000.0, "broker_out_per_s": 12000.0}
        path = bench_file(
            tmp_path,
            {"name": "e2e_small_tasks", "tasks_per_s": 500.0},
            {"name": "gateway_capacity", "msgs_per_s": 4321.0},
            {"name": "mqtt_baseline", "payload_bytes": 512, "msgs_per_s": 1000.0},
            {"name": "cells", "runs": [run], "baseline": {"runs": []}},
        )
        # When it is read, Then the saturated figures are the ones used
        found = capacity.bench_inputs(path)
        assert found["gateway_msgs_per_s"].value == 4321.0
        assert found["broker_node_msgs_per_s"].value == 21000.0
        assert found["broker_node_msgs_per_s"].source["line"] == "cells"

    def test_the_command_uses_them(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # Given a bench file with a codec line
        path = bench_file(tmp_path, {"name": "codec", "encode_mib_per_s": 123.0})
        # When the command reads it
        rc, out, _ = run_cli(capsys, "--vehicles", "10000", "--json", "--inputs", str(path))
        # Then the input names the file as its source
        sdk = json.loads(out)["inputs"]["sdk_encode_mib_per_s"]
        assert rc == 0
        assert sdk["value"] == 123.0
        assert sdk["source"]["where"] == str(path)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ('{"name": "codec", "encode', "line 1 is not valid JSON"),
            ('{"encode_mib_per_s": 1}', 'line 1 has no "name"'),
            ('{"name": "codec", "encode_mib_per_s": "fast"}', "codec.encode_mib_per_s is not"),
            ('{"name": "cells", "runs": 3}', "cells.runs (or baseline.runs) is not a list"),
            ('{"name": "chaos", "tasks": 2000}', "has no line parkpool capacity reads"),
            ("", "has no line parkpool capacity reads"),
        ],
    )
    def test_malformed_file(self, tmp_path: Path, text: str, message: str) -> None:
        # Given a file that is not what make bench prints
        path = tmp_path / "bad.jsonl"
        path.write_text(text + "\n")
        # When it is read, Then a ConfigError says what is wrong and where
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            capacity.bench_inputs(path)

    def test_missing_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        # When --inputs names no file
        rc, _, err = run_cli(capsys, "--vehicles", "10", "--inputs", str(tmp_path / "none"))
        # Then the command says so, without a traceback
        assert rc == 2
        assert "cannot read --inputs" in err
        assert "Traceback" not in err


class TestBadFlags:
    """A bad flag is refused with a ConfigError that names it."""

    @pytest.mark.parametrize(
        ("argv", "named"),
        [
            (["--vehicles=-5"], "--vehicles"),
            (["--vehicles", "0"], "--vehicles"),
            (["--vehicles", "10.5"], "--vehicles"),
            (["--vehicles", "inf"], "--vehicles"),
            (["--vehicles", "10", "--eligible", "0"], "--eligible"),
            (["--vehicles", "10", "--eligible", "1.5"], "--eligible"),
            (["--vehicles", "10", "--input-mib", "2"], "--input-mib"),
            (["--vehicles", "10", "--headroom", "0"], "--headroom"),
            (["--vehicles", "10", "--task-seconds", "0"], "--task-seconds"),
            (["--vehicles", "10", "--gateway-restarts-per-day=-1"], "--gateway-restarts-per-day"),
            (["--vehicles", "10", "--tasks-per-assignment", "2"], "--tasks-per-assignment"),
            (["--vehicles", "10", "--gateway-msgs-per-s", "0"], "--gateway-msgs-per-s"),
        ],
    )
    def test_refused(self, argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
        # Given the parsed flags
        args = build_parser().parse_args(["capacity", *argv])
        # When the command runs, Then it raises a ConfigError naming the flag
        with pytest.raises(ConfigError, match=named):
            args.func(args)
        # And through main it exits 2 with one line, no traceback
        rc, out, err = run_cli(capsys, *argv)
        assert (rc, out) == (2, "")
        assert err.startswith("parkpool capacity: ")
        assert "Traceback" not in err
