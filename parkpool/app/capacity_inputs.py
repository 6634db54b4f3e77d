# SPDX-License-Identifier: Apache-2.0
"""The capacity model's measured inputs: those shipped in ``capacity_inputs.json``, and
those ``--inputs`` re-derives from ``make bench`` JSON lines."""

from __future__ import annotations

import datetime
import json
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from parkpool.app.capacity_model import MIB, Capacities
from parkpool.schemas.errors import ConfigError

__all__ = ["Input", "bench_inputs", "read_bench", "stored_inputs"]

INPUTS_FILE = "capacity_inputs.json"
LARGE_PAYLOAD = 64 << 10  # an mqtt_baseline line with payloads this big measures bytes


@dataclass(frozen=True)
class Input:
    """One measured input: its value and where it came from."""

    value: float
    unit: str
    source: Mapping[str, str]
    overridden: bool = False


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
