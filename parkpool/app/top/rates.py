# SPDX-License-Identifier: Apache-2.0
"""Arithmetic between two scrapes: counter rates, bucket windows and quantiles.

Pure functions on numbers; ``None`` means "unknown" and propagates, never raises.
A counter that went down was reset (the gateway restarted): like Prometheus, count it
from zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from parkpool.app.top.series import Buckets

__all__ = ["bucket_window", "merge_buckets", "quantile", "rate", "sum_known"]


def rate(previous: float | None, current: float | None, seconds: float) -> float | None:
    """Per-second increase of a counter between two scrapes *seconds* apart."""
    if previous is None or current is None or seconds <= 0:
        return None
    increase = current - previous if current >= previous else current
    return increase / seconds


def sum_known(values: Iterable[float | None]) -> float | None:
    """Sum of the known values; ``None`` when none is known."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def bucket_window(previous: Buckets | None, current: Buckets | None) -> Buckets | None:
    """Observations made between two scrapes, bucket by bucket."""
    if previous is None or current is None:
        return None
    before = dict(previous)
    if _count(current) < _count(previous):  # reset: everything now is new
        return current
    return tuple((le, max(0.0, n - before.get(le, 0.0))) for le, n in current)


def merge_buckets(parts: Iterable[Buckets | None]) -> Buckets | None:
    """Buckets of several gateways added bound by bound; ``None`` when all are unknown."""
    merged: dict[float, float] = {}
    known = False
    for part in parts:
        if part is None:
            continue
        known = True
        for le, n in part:
            merged[le] = merged.get(le, 0.0) + n
    return tuple(sorted(merged.items())) if known else None


def quantile(q: float, buckets: Buckets | None) -> float | None:
    """Estimate the *q* quantile by linear interpolation within a bucket, as
    Prometheus's ``histogram_quantile`` does; ``None`` with no observations.

    A rank that falls in the ``+Inf`` bucket answers the highest finite bound.
    """
    total = _count(buckets)
    if not buckets or total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(le):
                return lower
            inside = cumulative - below
            fraction = (rank - below) / inside if inside > 0 else 1.0
            return lower + (le - lower) * fraction
        lower, below = le, cumulative
    return lower


def _count(buckets: Buckets | None) -> float:
    """Observations in all buckets: the last (widest) cumulative count."""
    return buckets[-1][1] if buckets else 0.0
