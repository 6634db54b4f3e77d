# SPDX-License-Identifier: Apache-2.0
"""``parkpool capacity``: what a fleet of a given size needs, in cells, gateways, broker
nodes and Kafka brokers, and the load on every hop, for the cell design beside the old
one. The arithmetic is ``capacity_model``; the measured inputs are
``capacity_inputs.json``, which ``--inputs`` re-derives from ``make bench`` lines and
single flags override for other hardware. docs/SCALE.md explains the model.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from parkpool.app.capacity_inputs import Input, bench_inputs, stored_inputs
from parkpool.app.capacity_model import (
    Capacities,
    Design,
    Scenario,
    flag,
    new_design,
    old_design,
    old_limit,
    total,
)
from parkpool.schemas.errors import ConfigError

__all__ = ["Input", "add_parser", "bench_inputs", "report", "run", "stored_inputs"]

HELP = {
    "vehicles": "cars in the pool, connected",
    "task_seconds": "seconds a task runs on a car",
    "eligible": "share of the cars parked, plugged in and allowed to work, in (0, 1]",
    "utilisation": "share of the eligible cars running a task; the rest pull for work",
    "input_mib": "MiB of one task record (Kafka) and of the task in its assignment, <= 1",
    "output_mib": "MiB of one result (MQTT, then a Kafka record), <= 1",
    "lease_seconds": "lease length; a running task heartbeats every third of it",
    "heartbeat_s": "seconds between a car's status heartbeats (to each of its gateways)",
    "pull_refresh_s": "seconds between pull refreshes while a car has room",
    "gateways_per_vehicle": "K: the gateways of its cell each car talks to",
    "tasks_per_assignment": "tasks one Assignment message carries",
    "cell_vehicles": "cars per cell (one MQTT broker or broker cluster) at most",
    "window": "in-flight tasks per Kafka partition",
    "mean_parked_s": "mean seconds a car stays connected; each departure is a last will",
    "gateway_restarts_per_day": "restarts of each gateway a day (each: two roster changes)",
    "headroom": "size every component to run at most at this share of its capacity",
    "sdk_clients": "SDK clients reading the results topic (each reads all of it)",
    "gateway_memory_mib": "memory one gateway may use (a budget you choose)",
}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "capacity",
        help="capacity model: cells, gateways, brokers, Kafka and every hop, new vs old",
        description="What a fleet needs, from measured capacities (docs/SCALE.md).",
    )
    for f in fields(Scenario):
        default = None if f.name == "vehicles" else f.default
        shown = "required" if default is None else f"default {default:g}"
        p.add_argument(
            flag(f.name), type=float, default=default, required=default is None,
            help=f"{HELP[f.name]} [{shown}]",
        )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--inputs", type=Path, help="make bench JSON lines to re-derive inputs from")
    group = p.add_argument_group("capacities", "override one measured input (other hardware)")
    for f in fields(Capacities):
        group.add_argument(flag(f.name), type=float, default=None, metavar="VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    scenario = scenario_from_args(args)
    inputs = stored_inputs()
    if args.inputs is not None:
        inputs |= bench_inputs(args.inputs)
    for f in fields(Capacities):
        given = getattr(args, f.name)
        if given is not None:
            if not math.isfinite(given) or given <= 0:
                raise ConfigError(f"{flag(f.name)} must be a positive number: {given}")
            inputs[f.name] = Input(given, inputs[f.name].unit, {"how": flag(f.name)}, True)
    result = report(scenario, inputs)
    print(json.dumps(result, allow_nan=False) if args.json else render(result))
    return 0


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(Scenario)}
    for f in fields(Scenario):
        value = values[f.name]
        if f.type == "int" and float(value).is_integer():
            values[f.name] = int(value)
    return Scenario(**values)


def report(s: Scenario, inputs: Mapping[str, Input]) -> dict[str, Any]:
    """Both designs for the scenario, and the inputs they were computed from."""
    c = Capacities(**{f.name: inputs[f.name].value for f in fields(Capacities)})
    new = new_design(s, c)
    old = old_design(s, c, new.gateways)
    rounded: dict[str, Any] = _rounded(
        {
            "scenario": asdict(s),
            "new": as_dict(new),
            "old": as_dict(old) | {"max_vehicles": old_limit(s, c)},
            "inputs": {
                name: {"value": i.value, "unit": i.unit, "overridden": i.overridden}
                | {"source": dict(i.source)}
                for name, i in inputs.items()
            },
        }
    )
    return rounded


ROWS = (
    ("tasks/s", "tasks_per_s"),
    ("busy vehicles", "busy_vehicles"),
    ("tasks in flight", "in_flight_tasks"),
    ("cells (MQTT brokers or clusters)", "cells"),
    ("vehicles per cell", "vehicles_per_cell"),
    ("gateways", "gateways"),
    ("  per cell", "gateways_per_cell"),
    ("vehicles known per gateway", "vehicles_known_per_gateway"),
    ("gateway memory, MiB", "gateway_memory_mib"),
    ("MQTT broker nodes", "broker_nodes"),
    ("  per cell", "broker_nodes_per_cell"),
    ("Kafka partitions, tasks topic", "kafka_task_partitions"),
    ("  with the results topic", "kafka_partitions"),
    ("Kafka brokers", "kafka_brokers"),
)


def as_dict(d: Design) -> dict[str, Any]:
    """A design as plain JSON values."""
    hops = {
        hop: {"msgs_per_s": total(kinds).msgs, "mib_per_s": total(kinds).mib}
        | {"by_kind": {k: {"msgs_per_s": f.msgs, "mib_per_s": f.mib} for k, f in kinds.items()}}
        for hop, kinds in d.hops.items()
    }
    loads = {
        name: {"load": x.load, "capacity": x.capacity, "unit": x.unit}
        | {"utilisation": x.utilisation}
        for name, x in d.loads.items()
    }
    return {key: getattr(d, key) for _, key in ROWS} | {
        "sized_by": d.sized_by,
        "hops": hops,
        "reconnect": d.reconnect,
        "utilisation": loads,
        "binding_constraint": {
            "component": d.binding,
            "utilisation": d.loads[d.binding].utilisation,
        },
        "saturated": bool(d.saturated_by),
        "saturated_by": d.saturated_by,
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# The readable form


def render(r: Mapping[str, Any]) -> str:
    """The report as a table: the new design beside the old."""
    s, new, old = r["scenario"], r["new"], r["old"]
    out = [
        f"parkpool capacity: {s['vehicles']:,} vehicles, {s['eligible']:.0%} eligible, "
        f"{s['utilisation']:.0%} of those busy; {s['task_seconds']:g} s tasks of "
        f"{s['input_mib']:g} MiB in, {s['output_mib']:g} MiB out; headroom {s['headroom']:g}",
        "",
        _row("", "new (cells)", "old (all hear all)"),
    ]
    out += [_row(label, _n(new[key]), _n(old[key])) for label, key in ROWS]
    out += ["", _row("hop: msgs/s, MiB/s", "", "")]
    for hop, h in new["hops"].items():
        was = old["hops"][hop]
        both = (f"{_n(x['msgs_per_s'])}, {_n(x['mib_per_s'])}" for x in (h, was))
        out.append(_row("  " + hop.replace("_to_", " -> ").replace("_", " "), *both))
    out += ["", "one cell's broker restarts (old: the one broker)"]
    out += [
        _row("  " + k.replace("_", " "), _n(v), _n(old["reconnect"][k]))
        for k, v in new["reconnect"].items()
    ]
    out += ["", "utilisation (load / capacity, per unit)"]
    for name, u in new["utilisation"].items():
        was = old["utilisation"][name]["utilisation"]
        out.append(_row(f"  {name} ({u['unit']})", _u(u["utilisation"]), _u(was)))
    binding, limit = new["binding_constraint"], old["max_vehicles"]
    verdict = "saturated by " + ", ".join(old["saturated_by"]) if old["saturated"] else "fits"
    out += [
        "",
        f"binds first (new): {binding['component']} at {binding['utilisation']:.3f}",
        "counts sized by (new): " + ", ".join(f"{k} by {v}" for k, v in new["sized_by"].items()),
        f"old design: {verdict}; it carries at most {limit:,} vehicles",
        "",
        "inputs (value, unit, source)",
    ]
    for name, i in r["inputs"].items():
        where = (
            "overridden: " + i["source"]["how"] if i["overridden"] else i["source"].get("line", "")
        )
        out.append(f"  {name:<30}{_n(i['value']):>12} {i['unit']:<11} {where}")
    return "\n".join(out)


def _row(label: str, new: str, old: str) -> str:
    return f"{label:<42}{new:>22}{old:>24}".rstrip()


def _u(x: float) -> str:
    return f"{x:.3f}" if x < 10 else _n(x)


def _n(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 or x == int(x) else f"{x:,.3g}"
