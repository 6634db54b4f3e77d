# SPDX-License-Identifier: Apache-2.0
"""Reading a gateway's ``/status`` JSON, tolerantly: a missing key or a wrong type is
``None`` (shown as ``?``), never an exception, so an older or newer gateway still renders.

The contract (keys may be missing)::

    {"gateway_id": str, "ready": bool, "draining": bool, "updated_at": unix_seconds,
     "leases": int, "queued": int,
     "partitions": [{"topic", "partition", "window_used", "window_size", "paused",
                     "committed", "end", "lag"}],
     "jobs": [{"job_id", "queued", "leased", "priority"}],   # top 20 by tasks in flight
     "fleet": {"known": int, "by_state": {state: int}, "suspended_reasons": {reason: int},
               "credits_outstanding": int}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from parkpool.app.top.model import FleetView, JobView, PartitionView

__all__ = [
    "FLEET_STATES",
    "flag",
    "fleet_of",
    "jobs_of",
    "mapping",
    "number",
    "partitions_of",
    "text",
]

# The states the contract names, in the order the fleet section shows them.
FLEET_STATES = ("eligible", "computing", "draining", "suspended", "offline")


def number(obj: Mapping[str, Any] | None, key: str) -> float | None:
    """``obj[key]`` when it is a number (not a bool), else ``None``."""
    value = obj.get(key) if obj is not None else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def offset(obj: Mapping[str, Any] | None, key: str) -> float | None:
    """A Kafka offset; a negative one is librdkafka's "not known yet" and is ``None``."""
    value = number(obj, key)
    return value if value is not None and value >= 0 else None


def text(obj: Mapping[str, Any] | None, key: str) -> str | None:
    """``obj[key]`` when it is a string, else ``None``."""
    value = obj.get(key) if obj is not None else None
    return value if isinstance(value, str) else None


def flag(obj: Mapping[str, Any] | None, key: str) -> bool | None:
    """``obj[key]`` when it is a bool, else ``None``."""
    value = obj.get(key) if obj is not None else None
    return value if isinstance(value, bool) else None


def mapping(obj: Mapping[str, Any] | None, key: str) -> Mapping[str, Any] | None:
    """``obj[key]`` when it is an object, else ``None``."""
    value = obj.get(key) if obj is not None else None
    return value if isinstance(value, dict) else None


def _records(obj: Mapping[str, Any] | None, key: str) -> list[Mapping[str, Any]]:
    """The objects in the list ``obj[key]``; anything else in it is skipped."""
    value = obj.get(key) if obj is not None else None
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _counts(obj: Mapping[str, Any] | None) -> dict[str, float | None]:
    """A ``{name: int}`` object as numbers, a non-number as ``None``."""
    return {str(k): number(obj, k) for k in obj} if obj is not None else {}


def partitions_of(status: Mapping[str, Any] | None) -> tuple[PartitionView, ...]:
    """The partitions a gateway reports, with its id on each."""
    gateway_id = text(status, "gateway_id")
    return tuple(
        PartitionView(
            gateway_id=gateway_id,
            topic=text(p, "topic"),
            partition=number(p, "partition"),
            window_used=number(p, "window_used"),
            window_size=number(p, "window_size"),
            paused=flag(p, "paused"),
            committed=offset(p, "committed"),
            end=offset(p, "end"),
            lag=number(p, "lag"),
        )
        for p in _records(status, "partitions")
    )


def jobs_of(status: Mapping[str, Any] | None) -> tuple[JobView, ...]:
    """The jobs a gateway reports; one without a ``job_id`` cannot be merged and is skipped."""
    return tuple(
        JobView(job_id, text(j, "priority"), number(j, "queued"), number(j, "leased"))
        for j in _records(status, "jobs")
        if (job_id := text(j, "job_id")) is not None
    )


def fleet_of(status: Mapping[str, Any] | None) -> FleetView | None:
    """The fleet a gateway reports; ``None`` when it reports none."""
    fleet = mapping(status, "fleet")
    if fleet is None:
        return None
    return FleetView(
        known=number(fleet, "known"),
        by_state=_counts(mapping(fleet, "by_state")),
        suspended_reasons=_counts(mapping(fleet, "suspended_reasons")),
        credits_outstanding=number(fleet, "credits_outstanding"),
    )
