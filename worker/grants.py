# SPDX-License-Identifier: Apache-2.0
"""How a vehicle splits its free credits between gateways.

Every gateway sees every pull, and may send only what it was granted, so the grants
must never add up to more than the vehicle can take. Credits go where the work is:
in proportion to each gateway's announced backlog, or evenly (rotating who gets the
odd credit) when no gateway has a backlog. ``GatewayBook`` keeps what a car knows of
the gateways to do this with.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from parkpool.schemas import GatewayState, GatewayStatus

MAX_GATEWAYS = 64  # a PullRequest's limit for its seen and grants maps


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


class GatewayBook:
    """The gateways a car knows to be online, with their backlogs, and the highest lease
    epoch it has received from each: what each of its pulls is made of."""

    def __init__(self) -> None:
        self._online: dict[str, int] = {}  # gateway id -> announced backlog
        self._seen: dict[str, int] = {}
        self._rotation = 0
        self._lock = threading.Lock()

    def announced(self, status: GatewayStatus) -> bool:
        """Note a gateway's retained status; True when the car should pull at once: a
        gateway that (re)appeared knows nothing of our last pull, and one whose backlog
        just appeared has none of our credits yet."""
        with self._lock:
            before = self._online.get(status.gateway_id)
            if status.state is GatewayState.ONLINE:
                self._online[status.gateway_id] = status.queued
            else:
                self._online.pop(status.gateway_id, None)
        online = status.state is GatewayState.ONLINE
        return online and (before is None or (not before and bool(status.queued)))

    def received(self, gateway_id: str, epoch: int) -> None:
        """An assignment to this car arrived: it is no longer in transit."""
        with self._lock:
            self._seen[gateway_id] = max(self._seen.get(gateway_id, 0), epoch)

    def any_online(self) -> bool:
        with self._lock:
            return bool(self._online)

    def split(self, credits: int) -> tuple[dict[str, int], dict[str, int]]:
        """The ``seen`` and ``grants`` maps of a pull for ``credits`` free slots.

        A pull names at most 64 gateways, the busiest online ones: a car that has seen
        more gateway ids over time must not grow its pulls past the limit.
        """
        with self._lock:
            busiest = sorted(self._online.items(), key=lambda g: -g[1])[:MAX_GATEWAYS]
            gateways = dict(busiest)
            seen = {g: e for g, e in self._seen.items() if g in gateways}
            self._rotation += 1
            return seen, allocate(credits, gateways, self._rotation)
