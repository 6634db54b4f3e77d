# SPDX-License-Identifier: Apache-2.0
"""``parkpool capacity``: what a fleet of a given size needs, in cells, gateways, broker
nodes and Kafka brokers, and the load on every hop, for the cell design beside the old
one. The arithmetic is ``capacity_model``; the measured inputs are
``capacity_inputs.json``, which ``--inputs`` re-derives from ``make bench`` lines and
single flags override for other hardware. docs/SCALE.md explains the model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from parkpool.app.capacity_model import (
    MIB,
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

INPUTS_FILE = "capacity_inputs.json"
LARGE_PAYLOAD = 64 << 10  # an mqtt_baseline line with payloads this big measures bytes

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


@dataclass(frozen=True)
class Input:
    """One measured input: its value and where it came from."""

    value: float
    unit: str
    source: Mapping[str, str]
    overridden: bool = False


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


# Inputs


def stored_inputs() -> dict[str, Input]:
    """The inputs measured on the development machine, shipped with the package."""
    raw = json.loads(resources.files("parkpool.app").joinpath(INPUTS_FILE).read_text())
    entries = raw.get("inputs") if isinstance(raw, dict) else None
    missing = {f.name for f in fields(Capacities)} - set(entries or {})
    if not isinstance(entries, dict) or missing:
        raise ConfigError(f"{INPUTS_FILE} lacks inputs: {', '.join(sorted(missing)) or 'all'}")
    found = {}
    for name, entry in entries.items():
        value = _positive(entry.get("value")) if isinstance(entry, dict) else None
        if value is None:
            raise ConfigError(f"{INPUTS_FILE}: {name} has no positive value")
        about = {k: str(v) for k, v in entry.items() if k not in {"value", "unit"}}
        found[name] = Input(value, str(entry.get("unit", "")), about)
    return found


def _positive(value: object, zero_ok: bool = False) -> float | None:
    """The value as a float if it is a finite number above 0 (or 0 itself), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    ok = math.isfinite(value) and (value > 0 or (zero_ok and value == 0))
    return float(value) if ok else None


Lines = dict[str, list[dict[str, Any]]]


def read_bench(path: Path) -> Lines:
    """``make bench`` JSON lines by name. A line that is no JSON object at all (make
    echoes its command) is skipped; one that starts like an object must be a bench line."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read --inputs {path}: {exc.strerror or exc}") from exc
    lines: Lines = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path} line {number} is not valid JSON: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("name"), str):
            raise ConfigError(f'{path} line {number} has no "name": not a make bench line')
        lines.setdefault(record["name"], []).append(record | {"_where": f"{path}:{number}"})
    return lines


def _field(record: Mapping[str, Any], name: str, zero_ok: bool = False) -> float:
    """A bench line's field: a number above 0 (or 0 itself, where it may be)."""
    value = _positive(record.get(name), zero_ok)
    if value is None:
        kind = "a number, at least 0" if zero_ok else "a positive number"
        raise ConfigError(f"{record['_where']}: {record['name']}.{name} is not {kind}")
    return value


def bench_inputs(path: Path) -> dict[str, Input]:
    """The inputs that the bench lines in ``path`` measure again."""
    lines = read_bench(path)
    date = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC).date()
    found: dict[str, Input] = {}
    derived = [_simple(lines), _fleet(lines.get("fleet_scale", [])), _broker(lines)]
    for name, (value, unit, line, field, how) in (d for rule in derived for d in rule.items()):
        machines = sorted({str(r["machine"]) for r in lines[line] if "machine" in r})
        about = {"line": line, "field": field, "how": how, "where": str(path)}
        about |= {"machine": "; ".join(machines) or "not in the line", "date": str(date)}
        found[name] = Input(value, unit, about)
    if not found:
        raise ConfigError(f"{path} has no line parkpool capacity reads ({', '.join(READS)})")
    return found


Derived = dict[str, tuple[float, str, str, str, str]]  # input: value, unit, line, field, how
_max, _median = max, statistics.median

# input, line, field, how many of it, the lines' aggregate, unit. A later line for the
# same input wins: a saturated gateway_capacity over the whole path's e2e_small_tasks.
SIMPLE: tuple[tuple[str, str, str, float, Callable[[list[float]], float], str], ...] = (
    ("gateway_msgs_per_s", "e2e_small_tasks", "tasks_per_s", 2, _median, "msgs/s"),
    ("gateway_msgs_per_s", "gateway_capacity", "msgs_per_s", 1, _median, "msgs/s"),
    ("sdk_encode_mib_per_s", "codec", "encode_mib_per_s", 1, _median, "MiB/s"),
    ("reconnect_p90_s", "reconnect_spread", "jittered_p90_s", 1, _max, "s"),
    (
        "broker_connects_per_s",
        "reconnect_spread",
        "baseline_peak_per_100ms",
        10,
        _max,
        "connects/s",
    ),
)
READS: tuple[str, ...] = (
    "e2e_small_tasks",
    "gateway_capacity",
    "codec",
    "reconnect_spread",
    "fleet_scale",
)
READS += ("mqtt_baseline", "cells")


def _simple(lines: Lines) -> Derived:
    found: Derived = {}
    for name, line, field, times, aggregate, unit in SIMPLE:
        if records := lines.get(line):
            value = times * aggregate([_field(r, field) for r in records])
            how = f"the {aggregate.__name__} of {len(records)} line(s)"
            how = how if times == 1 else f"{times:g} x {how}"
            found[name] = (value, unit, line, field, how)
    if records := lines.get("reconnect_spread"):
        share = max(_field(r, "jittered_due_peak_per_100ms") / _field(r, "cars") for r in records)
        field = "jittered_due_peak_per_100ms / cars"
        found["reconnect_due_peak_per_100ms"] = (share, "share", "reconnect_spread", field, "max")
    return found


def _fleet(records: list[dict[str, Any]]) -> Derived:
    """Bytes per car and the base, from runs at two fleet sizes at least."""
    by_size: dict[float, list[float]] = {}
    for r in records:
        rss = _field(r, "gateway_rss_mb")
        by_size.setdefault(_field(r, "vehicles_known_to_gateway"), []).append(rss)
    if len(by_size) < 2:
        return {}  # one fleet size cannot tell the base from the per-car part
    small, large = min(by_size), max(by_size)
    rss_small, rss_large = statistics.median(by_size[small]), statistics.median(by_size[large])
    per_car = (rss_large - rss_small) * MIB / (large - small)
    how = f"({rss_large:g} - {rss_small:g}) MiB / ({large:g} - {small:g}) cars"
    field = "gateway_rss_mb, vehicles_known_to_gateway"
    base = rss_small - small * per_car / MIB
    return {
        "gateway_bytes_per_car": (per_car, "bytes", "fleet_scale", field, how),
        "gateway_base_mib": (base, "MiB", "fleet_scale", field, f"{rss_small:g} MiB less the cars"),
    }


def _broker(lines: Lines) -> Derived:
    """mqtt_baseline: one publish in and one delivery out each, so twice its rate; with
    large payloads it measures MiB/s. The cells bench's busiest broker (in + out) is a
    lower bound of a broker's capacity, used where it is higher."""
    records = lines.get("mqtt_baseline", [])
    found: Derived = {}
    for large in (False, True):
        chosen = [r for r in records if (r.get("payload_bytes", 0) >= LARGE_PAYLOAD) == large]
        if chosen:
            each = [
                _field(r, "msgs_per_s") * (_field(r, "payload_bytes") / MIB if large else 1)
                for r in chosen
            ]
            name, unit = (
                ("broker_node_mib_per_s", "MiB/s")
                if large
                else ("broker_node_msgs_per_s", "msgs/s")
            )
            how = f"2 x the median of {len(chosen)} line(s): in and out"
            found[name] = (2 * statistics.median(each), unit, "mqtt_baseline", "msgs_per_s", how)
    runs = [_run(r, run) for r in lines.get("cells", []) for run in _cells_runs(r)]
    if runs:
        busiest = max(
            _field(r, "broker_in_per_s", True) + _field(r, "broker_out_per_s", True) for r in runs
        )
        if busiest > found.get("broker_node_msgs_per_s", (0.0,))[0]:
            how = "the busiest run, in + out: a lower bound"
            fields_ = "broker_in_per_s + broker_out_per_s"
            found["broker_node_msgs_per_s"] = (busiest, "msgs/s", "cells", fields_, how)
    return found


def _cells_runs(record: Mapping[str, Any]) -> list[Any]:
    """The cells line's runs, and its single-broker baseline's: each is one broker."""
    baseline = record.get("baseline", {})
    runs, more = (
        record.get("runs", []),
        baseline.get("runs", []) if isinstance(baseline, dict) else 0,
    )
    if not isinstance(runs, list) or not isinstance(more, list):
        raise ConfigError(f"{record['_where']}: cells.runs (or baseline.runs) is not a list")
    return runs + more


def _run(record: Mapping[str, Any], run: object) -> dict[str, Any]:
    if not isinstance(run, dict):
        raise ConfigError(f"{record['_where']}: a run of {record['name']} is not an object")
    return run | {"_where": f"{record['_where']} (a run)", "name": record["name"]}
