# SPDX-License-Identifier: Apache-2.0
"""How a vehicle splits its free credits between gateways.

Every gateway sees every pull, and may send only what it was granted, so the grants
must never add up to more than the vehicle can take. Credits go where the work is:
in proportion to each gateway's announced backlog, or evenly (rotating who gets the
odd credit) when no gateway has a backlog.
"""

from __future__ import annotations

from collections.abc import Mapping


def allocate(credits: int, backlog: Mapping[str, int], rotation: int = 0) -> dict[str, int]:
    """Split ``credits`` between the gateways in ``backlog`` (gateway id -> queued tasks)."""
    if credits <= 0 or not backlog:
        return {}
    gateways = sorted(backlog)
    start = rotation % len(gateways)
    gateways = gateways[start:] + gateways[:start]
    weights = {g: backlog[g] for g in gateways if backlog[g] > 0} or dict.fromkeys(gateways, 1)
    total = sum(weights.values())
    shares = {g: credits * w / total for g, w in weights.items()}
    grants = {g: int(share) for g, share in shares.items()}
    # Largest remainder, ties broken by the rotated order, so the total is exact.
    left = credits - sum(grants.values())
    for g in sorted(weights, key=lambda g: (grants[g] - shares[g], gateways.index(g)))[:left]:
        grants[g] += 1
    return {g: n for g, n in grants.items() if n > 0}
