# SPDX-License-Identifier: Apache-2.0
"""The view model of ``parkpool top``: what one frame shows, before any styling.

Every number may be ``None``: the gateway did not say (an older gateway, a missing key,
a first frame with no rate yet). The renderer shows those as ``?``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "CounterView",
    "ErrorsView",
    "FleetView",
    "GatewayState",
    "GatewayView",
    "JobView",
    "LatencyView",
    "PartitionView",
    "View",
]

Number = float | None


class GatewayState(StrEnum):
    """One gateway's line in the readiness column."""

    READY = "READY"
    NOT_READY = "NOT READY"
    DRAINING = "DRAINING"
    DOWN = "DOWN"
    UNKNOWN = "?"


@dataclass(frozen=True)
class CounterView:
    """A counter: its value now and its increase per second since the last frame."""

    total: Number = None
    per_s: Number = None


@dataclass(frozen=True)
class GatewayView:
    """One gateway's row: who it is, whether it is ready, and its share of the work."""

    url: str
    state: GatewayState
    gateway_id: str | None = None
    error: str | None = None  # why it is DOWN: the exception's type name
    leases: Number = None
    queued: Number = None
    completed: CounterView = field(default_factory=CounterView)
    lag: Number = None
    status_age_s: Number = None  # how old its /status snapshot was when read


@dataclass(frozen=True)
class PartitionView:
    """One consumed partition's in-flight window and Kafka position."""

    gateway_id: str | None
    topic: str | None
    partition: Number
    window_used: Number = None
    window_size: Number = None
    paused: bool | None = None
    committed: Number = None
    end: Number = None
    lag: Number = None


@dataclass(frozen=True)
class JobView:
    """A job's tasks waiting and leased, summed over the gateways."""

    job_id: str
    priority: str | None
    queued: Number
    leased: Number


@dataclass(frozen=True)
class FleetView:
    """The vehicles the gateways know of, by state, and the credits they hold."""

    known: Number = None
    by_state: Mapping[str, Number] = field(default_factory=dict)
    suspended_reasons: Mapping[str, Number] = field(default_factory=dict)
    credits_outstanding: Number = None


@dataclass(frozen=True)
class LatencyView:
    """Quantiles over the last interval, or since start when it saw no observation."""

    end_to_end_p50_s: Number = None
    end_to_end_p99_s: Number = None
    preemption_p99_s: Number = None


@dataclass(frozen=True)
class ErrorsView:
    """What went wrong; a breakdown is ``None`` when the gateway does not export it."""

    dead_lettered: CounterView = field(default_factory=CounterView)
    redelivered: Mapping[str, CounterView] | None = None  # by cause
    dropped: Mapping[str, CounterView] | None = None  # by "source/reason"
    delivery_errors: CounterView = field(default_factory=CounterView)
    mqtt_reconnects: CounterView = field(default_factory=CounterView)


@dataclass(frozen=True)
class View:
    """One frame: the gateways, then the totals over those that answered."""

    gateways: tuple[GatewayView, ...]
    leases: Number = None
    queued: Number = None
    completed: CounterView = field(default_factory=CounterView)
    latency: LatencyView = field(default_factory=LatencyView)
    partitions: tuple[PartitionView, ...] = ()
    jobs: tuple[JobView, ...] | None = None  # None: no gateway reports jobs
    fleet: FleetView = field(default_factory=FleetView)
    errors: ErrorsView = field(default_factory=ErrorsView)

    @property
    def up(self) -> int:
        """How many gateways answered."""
        return sum(g.state is not GatewayState.DOWN for g in self.gateways)
