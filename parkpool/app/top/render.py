# SPDX-License-Identifier: Apache-2.0
"""Drawing a ``View`` with rich: the gateways, then throughput, fleet and errors side by
side, then the queue (partitions and jobs). Unknown values are ``?``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from parkpool.app.top.model import (
    CounterView,
    ErrorsView,
    FleetView,
    GatewayState,
    GatewayView,
    JobView,
    PartitionView,
    View,
)

__all__ = ["UNKNOWN", "count", "per_second", "render", "seconds"]

UNKNOWN = "?"
_STATE_STYLE = {
    GatewayState.READY: "bold green",
    GatewayState.NOT_READY: "bold yellow",
    GatewayState.DRAINING: "bold yellow",
    GatewayState.DOWN: "bold red",
    GatewayState.UNKNOWN: "dim",
}


def count(value: float | None) -> str:
    """A count, with thousands separators."""
    return UNKNOWN if value is None else f"{value:,.0f}"


def per_second(value: float | None) -> str:
    """A rate."""
    return UNKNOWN if value is None else f"{value:,.1f}/s"


def seconds(value: float | None) -> str:
    """A duration: milliseconds below one second."""
    if value is None:
        return UNKNOWN
    return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:,.2f} s"


def _flag(value: bool | None) -> str:
    return UNKNOWN if value is None else ("yes" if value else "no")


def _text(value: str | None) -> str:
    return UNKNOWN if value is None else value


def _pairs(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column table of labels and values."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value in rows:
        table.add_row(label, value)
    return table


def _state(row: GatewayView) -> Text:
    label = row.state.value if row.error is None else f"{row.state.value}: {row.error}"
    return Text(label, style=_STATE_STYLE[row.state])


def gateways_table(rows: Iterable[GatewayView]) -> Table:
    """One row per gateway: readiness and its share of the work."""
    table = Table(title="Gateways", title_justify="left", expand=True)
    for name in ("Gateway", "URL", "State"):
        table.add_column(name, overflow="fold")
    for name in ("Leases", "Queued", "Completed", "Rate", "Lag", "Status age"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(
            _text(row.gateway_id),
            row.url,
            _state(row),
            count(row.leases),
            count(row.queued),
            count(row.completed.total),
            per_second(row.completed.per_s),
            count(row.lag),
            seconds(row.status_age_s),
        )
    return table


def throughput_table(view: View) -> Table:
    """Completed tasks, work in flight and latency quantiles."""
    latency = view.latency
    return _pairs(
        "Throughput",
        [
            ("Tasks completed", count(view.completed.total)),
            ("Completion rate", per_second(view.completed.per_s)),
            ("In flight (leases)", count(view.leases)),
            ("Queued", count(view.queued)),
            ("End-to-end p50", seconds(latency.end_to_end_p50_s)),
            ("End-to-end p99", seconds(latency.end_to_end_p99_s)),
            ("Preemption p99", seconds(latency.preemption_p99_s)),
        ],
    )


def fleet_table(fleet: FleetView) -> Table:
    """Vehicles by state, suspension reasons and outstanding credits."""
    rows = [("Known", count(fleet.known))]
    rows += [(state.capitalize(), count(n)) for state, n in fleet.by_state.items()]
    rows += [(f"  suspended: {why}", count(n)) for why, n in fleet.suspended_reasons.items()]
    rows.append(("Credits outstanding", count(fleet.credits_outstanding)))
    return _pairs("Fleet", rows)


def _counter_rows(
    label: str, breakdown: Mapping[str, CounterView] | None
) -> list[tuple[str, CounterView | None]]:
    if breakdown is None:
        return [(label, None)]
    if not breakdown:
        return [(label, CounterView(0.0, 0.0))]  # declared, never incremented: zero
    return [(f"{label} {key}", c) for key, c in breakdown.items()]


def errors_table(errors: ErrorsView) -> Table:
    """Each error counter with its total and its rate over the last interval."""
    table = Table(title="Errors", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("Total", justify="right")
    table.add_column("Rate", justify="right")
    rows: list[tuple[str, CounterView | None]] = [("Dead-lettered", errors.dead_lettered)]
    rows += _counter_rows("Redelivered", errors.redelivered)
    rows += _counter_rows("Dropped", errors.dropped)
    rows += [("Kafka delivery errors", errors.delivery_errors)]
    rows += [("MQTT reconnects", errors.mqtt_reconnects)]
    for label, counter in rows:
        known = counter or CounterView()
        table.add_row(label, count(known.total), per_second(known.per_s))
    return table


def partitions_table(partitions: Sequence[PartitionView]) -> Table:
    """Each consumed partition's window and Kafka position."""
    table = Table(title="Partitions", title_justify="left", expand=True)
    if not partitions:
        table.caption = "no partition assigned"
    table.add_column("Gateway", overflow="fold")
    table.add_column("Topic", overflow="fold")
    for name in ("Partition", "Window", "Paused", "Committed", "End", "Lag"):
        table.add_column(name, justify="right")
    for p in partitions:
        window = f"{count(p.window_used)}/{count(p.window_size)}"
        table.add_row(
            _text(p.gateway_id),
            _text(p.topic),
            count(p.partition),
            window,
            _flag(p.paused),
            count(p.committed),
            count(p.end),
            count(p.lag),
        )
    return table


def jobs_table(jobs: Sequence[JobView] | None) -> Table:
    """The jobs with the most tasks in flight; ``?`` when no gateway reports jobs."""
    table = Table(title="Jobs in flight", title_justify="left", expand=True)
    table.add_column("Job", overflow="fold")
    table.add_column("Priority")
    table.add_column("Leased", justify="right")
    table.add_column("Queued", justify="right")
    if jobs is None:
        table.add_row(UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
    elif not jobs:
        table.caption = "no job has tasks at the gateways"
    for job in jobs or ():
        table.add_row(job.job_id, _text(job.priority), count(job.leased), count(job.queued))
    return table


def header(view: View, interval_s: float, clock: str) -> Text:
    """The first line: how many gateways answered, and how often the view refreshes."""
    up, total = view.up, len(view.gateways)
    style = "bold green" if up == total else "bold red"
    line = Text("parkpool top", style="bold")
    line.append(f"  {clock}  every {interval_s:g} s  ")
    line.append(f"gateways up {up}/{total}", style=style)
    return line


def render(view: View, *, interval_s: float, clock: str) -> RenderableType:
    """The whole frame."""
    middle = Table.grid(padding=(0, 2))
    middle.add_row(throughput_table(view), fleet_table(view.fleet), errors_table(view.errors))
    return Group(
        header(view, interval_s, clock),
        gateways_table(view.gateways),
        middle,
        partitions_table(view.partitions),
        jobs_table(view.jobs),
    )
