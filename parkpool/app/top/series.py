# SPDX-License-Identifier: Apache-2.0
"""One ``/metrics`` page, parsed: sample values by name and labels, with lookups that say
"absent" (``None``) apart from "zero", so an older gateway shows ``?`` rather than 0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Buckets", "Labels", "Series", "parse_metrics"]

Labels = frozenset[tuple[str, str]]
# Cumulative histogram buckets: (upper bound, observations at or below it), by bound.
Buckets = tuple[tuple[float, float], ...]

# A family declared with no samples yet (a labelled counter nobody has incremented) is
# present and zero; these are the sample names its type may expose.
_SUFFIXES = ("", "_total", "_bucket", "_count", "_sum")


@dataclass(frozen=True)
class Series:
    """The samples of one exposition, by sample name, then by label set."""

    samples: Mapping[str, Mapping[Labels, float]]
    declared: frozenset[str] = frozenset()

    def known(self, name: str) -> bool:
        """Whether the page declares or carries the sample *name*."""
        return name in self.samples or name in self.declared

    def total(self, name: str, **match: str) -> float | None:
        """Sum of *name*'s samples whose labels include *match*; ``None`` when absent."""
        if not self.known(name):
            return None
        wanted = set(match.items())
        return sum(v for labels, v in self.samples.get(name, {}).items() if wanted <= labels)

    def by_label(self, name: str, *keys: str) -> dict[str, float] | None:
        """*name* summed by the values of *keys*, joined with ``/``; ``None`` when absent."""
        if not self.known(name):
            return None
        out: dict[str, float] = {}
        for labels, value in self.samples.get(name, {}).items():
            found = dict(labels)
            key = "/".join(found.get(k, "") for k in keys)
            out[key] = out.get(key, 0.0) + value
        return out

    def buckets(self, histogram: str) -> Buckets | None:
        """The cumulative buckets of *histogram*, summed over its other labels."""
        by_bound: dict[float, float] = {}
        for labels, value in self.samples.get(f"{histogram}_bucket", {}).items():
            bound = dict(labels).get("le")
            if bound is not None:
                le = float(bound)
                by_bound[le] = by_bound.get(le, 0.0) + value
        if not by_bound:
            return () if self.known(f"{histogram}_bucket") else None
        return tuple(sorted(by_bound.items()))


def parse_metrics(text: str) -> Series:
    """Parse Prometheus text format; raises ``ValueError`` on a malformed page."""
    samples: dict[str, dict[Labels, float]] = {}
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared.update(family.name + suffix for suffix in _SUFFIXES)
        for sample in family.samples:
            labels = frozenset(sample.labels.items())
            samples.setdefault(sample.name, {})[labels] = float(sample.value)
    return Series(samples, frozenset(declared))
