# SPDX-License-Identifier: Apache-2.0
"""From scrapes to a frame: ``build_view(pairs)`` takes, per gateway, the previous and the
current ``Sample`` and returns the ``View`` to render.

Pure: no clock, no I/O. ``/status`` is preferred where it says something; where it is
absent (an older gateway) the gauges of ``/metrics`` stand in. Totals are over the gateways
that answered; a DOWN gateway is listed, and counted nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from parkpool.app.top.model import (
    CounterView,
    ErrorsView,
    FleetView,
    GatewayState,
    GatewayView,
    JobView,
    LatencyView,
    PartitionView,
    View,
)
from parkpool.app.top.rates import bucket_window, merge_buckets, quantile, rate, sum_known
from parkpool.app.top.scrape import Sample
from parkpool.app.top.series import Buckets, Series
from parkpool.app.top.status import (
    FLEET_STATES,
    flag,
    fleet_of,
    jobs_of,
    mapping,
    number,
    partitions_of,
    text,
)

__all__ = [
    "Pair",
    "build_view",
    "counter_view",
    "errors_view",
    "gateway_view",
    "latency_view",
    "merge_fleets",
    "merge_jobs",
]

Pair = tuple[Sample | None, Sample]  # (previous, current) scrape of one gateway

TASKS = "parkpool_gateway_tasks_total"
DEAD_LETTERED = "parkpool_gateway_dead_lettered_total"
REDELIVERED = "parkpool_gateway_redelivered_total"
DROPPED = "parkpool_gateway_dropped_total"
DELIVERY_ERRORS = "parkpool_gateway_kafka_delivery_errors_total"
MQTT_RECONNECTS = "parkpool_gateway_mqtt_reconnects_total"
END_TO_END = "parkpool_gateway_end_to_end_seconds"
PREEMPTION = "parkpool_fleet_preemption_seconds"
# Stand-ins for /status on a gateway that does not serve it.
LEASES_GAUGE = "parkpool_gateway_leases"
QUEUED_GAUGE = "parkpool_gateway_queued_tasks"
READY_GAUGE = "parkpool_gateway_ready"
# (vehicles by state, vehicles known): the fleet's own series, then an older gateway's.
FLEET_GAUGES = (
    ("parkpool_fleet_vehicles", "parkpool_fleet_vehicles_known"),
    ("parkpool_gateway_vehicles", "parkpool_gateway_vehicles_known"),
)
CREDITS_GAUGE = "parkpool_fleet_credits_outstanding"
PARTITION_GAUGES = {
    "window_used": "parkpool_gateway_partition_window_used",
    "window_size": "parkpool_gateway_partition_window_size",
    "committed": "parkpool_gateway_kafka_committed_offset",
    "end": "parkpool_gateway_kafka_end_offset",
    "lag": "parkpool_gateway_kafka_lag",
}
TOP_JOBS = 20


def _previous(pair: Pair) -> Series | None:
    return pair[0].series if pair[0] is not None else None


def _seconds(pair: Pair) -> float:
    return pair[1].at - pair[0].at if pair[0] is not None else 0.0


def counter_view(pair: Pair, name: str, **match: str) -> CounterView:
    """A counter's total now and its rate since the previous scrape."""
    current = pair[1].series
    now = current.total(name, **match) if current is not None else None
    before = _previous(pair)
    then = before.total(name, **match) if before is not None else None
    return CounterView(now, rate(then, now, _seconds(pair)))


def _breakdown(pair: Pair, name: str, *keys: str) -> dict[str, CounterView] | None:
    """A labelled counter, one ``CounterView`` per value of *keys*."""
    current = pair[1].series
    now = current.by_label(name, *keys) if current is not None else None
    if now is None:
        return None
    before = _previous(pair)
    then = (before.by_label(name, *keys) if before is not None else None) or {}
    seconds = _seconds(pair)
    known_before = before is not None and before.known(name)
    return {
        key: CounterView(v, rate(then.get(key, 0.0) if known_before else None, v, seconds))
        for key, v in sorted(now.items())
    }


def _ready(sample: Sample, series: Series) -> bool | None:
    """Live /readyz first, then the /status snapshot, then the readiness gauge."""
    if sample.readiness is not None:
        return text(sample.readiness, "status") == "ok"
    if (said := flag(sample.status, "ready")) is not None:
        return said
    gauge = series.total(READY_GAUGE)
    return None if gauge is None else gauge > 0


def _state(sample: Sample) -> GatewayState:
    if sample.series is None:
        return GatewayState.DOWN
    draining = flag(mapping(sample.readiness, "details"), "draining")
    if draining is None:
        draining = flag(sample.status, "draining")
    ready = _ready(sample, sample.series)
    if draining:
        return GatewayState.DRAINING
    if ready is None:
        return GatewayState.UNKNOWN
    return GatewayState.READY if ready else GatewayState.NOT_READY


def _status_or_gauge(sample: Sample, key: str, gauge: str) -> float | None:
    said = number(sample.status, key)
    if said is None and sample.series is not None:
        return sample.series.total(gauge)
    return said


def _partitions(sample: Sample) -> tuple[PartitionView, ...]:
    """From /status, else from the per-partition gauges of /metrics (no topic, no pause)."""
    if sample.series is None:
        return ()
    reported = partitions_of(sample.status)
    if reported or mapping(sample.status, "partitions") is not None:
        return reported
    col = {k: sample.series.by_label(g, "partition") or {} for k, g in PARTITION_GAUGES.items()}
    ids = sorted({p for values in col.values() for p in values}, key=_partition_order)
    return tuple(
        PartitionView(
            gateway_id=text(sample.status, "gateway_id"),
            topic=None,
            partition=float(p) if p.isdigit() else None,
            window_used=col["window_used"].get(p),
            window_size=col["window_size"].get(p),
            committed=col["committed"].get(p),
            end=col["end"].get(p),
            lag=col["lag"].get(p),
        )
        for p in ids
    )


def _partition_order(label: str) -> tuple[int, str]:
    return (int(label), "") if label.isdigit() else (-1, label)


def gateway_view(pair: Pair) -> GatewayView:
    """One gateway's row."""
    sample = pair[1]
    state = _state(sample)
    if state is GatewayState.DOWN:
        return GatewayView(sample.url, state, error=sample.error)
    updated_at = number(sample.status, "updated_at")
    return GatewayView(
        url=sample.url,
        state=state,
        gateway_id=text(sample.status, "gateway_id"),
        leases=_status_or_gauge(sample, "leases", LEASES_GAUGE),
        queued=_status_or_gauge(sample, "queued", QUEUED_GAUGE),
        completed=counter_view(pair, TASKS, status="completed"),
        lag=sum_known(p.lag for p in _partitions(sample)),
        status_age_s=sample.wall - updated_at if updated_at is not None else None,
    )


def _fleet(sample: Sample) -> FleetView | None:
    """From /status, else from the fleet gauges of /metrics (newer names first)."""
    reported = fleet_of(sample.status)
    if reported is not None or sample.series is None:
        return reported
    for by_state, known in FLEET_GAUGES:
        states = sample.series.by_label(by_state, "state")
        if states is not None:
            reasons = sample.series.by_label(by_state, "state", "reason") or {}
            return FleetView(
                known=sample.series.total(known),
                by_state=states,
                suspended_reasons={
                    key.removeprefix("suspended/"): n
                    for key, n in reasons.items()
                    if key.startswith("suspended/") and key != "suspended/"
                },
                credits_outstanding=sample.series.total(CREDITS_GAUGE),
            )
    return None


def merge_fleets(fleets: Iterable[FleetView | None]) -> FleetView:
    """The fleet over several gateways: each count added up, key by key."""
    parts = [f for f in fleets if f is not None]
    contract: dict[str, float | None] = dict.fromkeys(FLEET_STATES)
    return FleetView(
        known=sum_known(f.known for f in parts),
        by_state=contract | _merge_counts(f.by_state for f in parts),
        suspended_reasons=_merge_counts(f.suspended_reasons for f in parts),
        credits_outstanding=sum_known(f.credits_outstanding for f in parts),
    )


def _merge_counts(parts: Iterable[Mapping[str, float | None]]) -> dict[str, float | None]:
    merged: dict[str, list[float | None]] = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, []).append(value)
    return {key: sum_known(values) for key, values in merged.items()}


def _add_jobs(a: JobView, b: JobView) -> JobView:
    priority = a.priority or b.priority
    queued, leased = sum_known((a.queued, b.queued)), sum_known((a.leased, b.leased))
    return JobView(a.job_id, priority, queued, leased)


def merge_jobs(jobs: Iterable[JobView], limit: int = TOP_JOBS) -> tuple[JobView, ...]:
    """Jobs of several gateways, one row per job id, most tasks in flight first."""
    merged: dict[str, JobView] = {}
    for job in jobs:
        seen = merged.get(job.job_id)
        merged[job.job_id] = job if seen is None else _add_jobs(seen, job)
    ranked = sorted(merged.values(), key=lambda j: (-(j.leased or 0), -(j.queued or 0), j.job_id))
    return tuple(ranked[:limit])


def _jobs(pairs: Sequence[Pair]) -> tuple[JobView, ...] | None:
    """The top jobs; ``None`` when no gateway reports jobs (none serves /status)."""
    reporting = [p[1].status for p in pairs if isinstance((p[1].status or {}).get("jobs"), list)]
    if not reporting:
        return None
    return merge_jobs(job for status in reporting for job in jobs_of(status))


def _buckets(pairs: Sequence[Pair], histogram: str) -> Buckets | None:
    """The last interval's observations over all gateways, or all of them when it has none."""
    current = [p[1].series.buckets(histogram) if p[1].series else None for p in pairs]
    previous = [s.buckets(histogram) if (s := _previous(p)) else None for p in pairs]
    window = merge_buckets(bucket_window(b, c) for b, c in zip(previous, current, strict=True))
    if window and window[-1][1] > 0:
        return window
    return merge_buckets(current)


def latency_view(pairs: Sequence[Pair]) -> LatencyView:
    """End-to-end p50 and p99 and preemption p99, estimated from histogram buckets."""
    end_to_end = _buckets(pairs, END_TO_END)
    return LatencyView(
        end_to_end_p50_s=quantile(0.5, end_to_end),
        end_to_end_p99_s=quantile(0.99, end_to_end),
        preemption_p99_s=quantile(0.99, _buckets(pairs, PREEMPTION)),
    )


def _sum_counters(views: Iterable[CounterView]) -> CounterView:
    parts = list(views)
    return CounterView(sum_known(v.total for v in parts), sum_known(v.per_s for v in parts))


def _sum_breakdowns(
    parts: Iterable[Mapping[str, CounterView] | None],
) -> dict[str, CounterView] | None:
    known = [p for p in parts if p is not None]
    if not known:
        return None
    keys = sorted({key for part in known for key in part})
    return {key: _sum_counters(p[key] for p in known if key in p) for key in keys}


def errors_view(pairs: Sequence[Pair]) -> ErrorsView:
    """Error counters over all gateways, with rates."""
    return ErrorsView(
        dead_lettered=_sum_counters(counter_view(p, DEAD_LETTERED) for p in pairs),
        redelivered=_sum_breakdowns(_breakdown(p, REDELIVERED, "cause") for p in pairs),
        dropped=_sum_breakdowns(_breakdown(p, DROPPED, "source", "reason") for p in pairs),
        delivery_errors=_sum_counters(counter_view(p, DELIVERY_ERRORS) for p in pairs),
        mqtt_reconnects=_sum_counters(counter_view(p, MQTT_RECONNECTS) for p in pairs),
    )


def build_view(pairs: Sequence[Pair]) -> View:
    """The frame for these gateways, in the order given."""
    rows = tuple(gateway_view(p) for p in pairs)
    up = [p for p, row in zip(pairs, rows, strict=True) if row.state is not GatewayState.DOWN]
    return View(
        gateways=rows,
        leases=sum_known(r.leases for r in rows),
        queued=sum_known(r.queued for r in rows),
        completed=_sum_counters(r.completed for r in rows),
        latency=latency_view(up),
        partitions=tuple(part for p in up for part in _partitions(p[1])),
        jobs=_jobs(up),
        fleet=merge_fleets(_fleet(p[1]) for p in up),
        errors=errors_view(up),
    )
