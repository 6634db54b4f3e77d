# SPDX-License-Identifier: Apache-2.0
"""Which gateways a car talks to, and how it splits its free credits between them.

A car talks to K gateways of its cell (two by default), chosen by rendezvous hash over
the cell's roster: the gateways whose retained status says online. Nothing it sends
reaches any other gateway, so a gateway's load follows its share of the cell, not the
fleet. Each of the K gets its own pull with its own grant, and may send only that, so
the grants must never add up to more than the car can take.

Credits go where the work is: evenly between the gateways that have some. Whether a
gateway has work is learnt from what it sends this car (a notice when it has nothing,
or has work again; an assignment's ``queued``); a gateway not heard from yet is assumed
to have work, so a new car tries both at once.
The odd credit goes to the car's first-ranked gateway, not in turns: stable grants mean
a pull goes only to a gateway whose grant changed, and a gateway refills a slot by
itself when its lease ends, so a car in steady work sends no pull at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from parkpool.runtime.rendezvous import top
from parkpool.schemas import GatewayState, GatewayStatus

# "No work here" is believed this long at most: a notice that work came back can be lost
# (a broker restart, a reconnect), and a car must not stay away from a gateway for ever.
EMPTY_TTL_S = 60.0


def allocate(credits: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Split ``credits`` between gateways by weight (gateway id -> weight, in rank order).

    Largest remainder, ties to the earlier gateway, so the total is exact and the same
    inputs always give the same grants. Gateways of weight 0 get nothing unless all are 0,
    and then the split is even.
    """
    if credits <= 0 or not weights:
        return {}
    order = list(weights)
    positive = {g: w for g, w in weights.items() if w > 0} or dict.fromkeys(order, 1)
    total = sum(positive.values())
    shares = {g: credits * w / total for g, w in positive.items()}
    grants = {g: int(share) for g, share in shares.items()}
    left = credits - sum(grants.values())
    for g in sorted(positive, key=lambda g: (grants[g] - shares[g], order.index(g)))[:left]:
        grants[g] += 1
    return {g: n for g, n in grants.items() if n > 0}


@dataclass(frozen=True)
class PullTo:
    """One pull to send: the gateway, the highest epoch seen from it, and its grant."""

    gateway_id: str
    seen: int
    grant: int


class GatewayBook:
    """The cell's roster as this car knows it, its K gateways, their backlogs, and what
    it last told each of them."""

    def __init__(self, vehicle_id: str, k: int = 2) -> None:
        self.vehicle_id = vehicle_id
        self.k = k
        self._roster: set[str] = set()
        self._mine: tuple[str, ...] = ()
        self._backlog: dict[str, int] = {}  # gateway -> last known backlog; absent: unknown
        self._empty_at: dict[str, float] = {}  # gateway -> when it said it had no work
        self._seen: dict[str, int] = {}
        self._sent: dict[str, tuple[int, int]] = {}  # gateway -> (grant, seen) last pulled
        # Gateways that answered our last pull (an assignment or a notice): they have it,
        # so a periodic refresh skips them.
        self._answered: set[str] = set()
        self._lock = threading.Lock()

    def announced(self, status: GatewayStatus) -> bool:
        """A roster entry (a retained status); True when the car should pull: its K
        changed, or one of them (re)announced itself and may have forgotten us."""
        with self._lock:
            gateway = status.gateway_id
            if status.state is GatewayState.ONLINE:
                self._roster.add(gateway)
            else:
                self._roster.discard(gateway)
                self._backlog.pop(gateway, None)
                self._sent.pop(gateway, None)
            before = self._mine
            self._mine = top(self.vehicle_id, self._roster, self.k)
            if status.state is GatewayState.ONLINE and gateway in self._mine:
                # Whatever it had of us (or told us) it may have lost in a restart.
                self._sent.pop(gateway, None)
                self._backlog.pop(gateway, None)
            return self._mine != before or gateway in self._mine

    def noticed(self, gateway_id: str, queued: int) -> bool:
        """A gateway's backlog, from a notice or an assignment; True when the split of
        credits should change at once (work appeared at a gateway known to have none, or
        one that was thought busy has nothing)."""
        if queued < 0:
            return False
        with self._lock:
            before = self._backlog.get(gateway_id)
            self._backlog[gateway_id] = queued
            if queued == 0:
                self._empty_at[gateway_id] = time.monotonic()
            # Unknown was taken to mean "has work", so only learning "none" changes it.
            was_empty = before == 0
            return gateway_id in self._mine and was_empty != (queued == 0)

    def received(self, gateway_id: str, epoch: int) -> None:
        """An assignment to this car arrived: it is no longer in transit."""
        with self._lock:
            self._seen[gateway_id] = max(self._seen.get(gateway_id, 0), epoch)
            self._answered.add(gateway_id)

    def answered(self, gateway_id: str) -> None:
        """A gateway spoke to this car (a notice): it has our last pull."""
        with self._lock:
            self._answered.add(gateway_id)

    def seen_epoch(self, gateway_id: str) -> int:
        """The highest lease epoch received from a gateway (0: none)."""
        with self._lock:
            return self._seen.get(gateway_id, 0)

    def any_online(self) -> bool:
        with self._lock:
            return bool(self._mine)

    def mine(self) -> tuple[str, ...]:
        """The car's K gateways, best first."""
        with self._lock:
            return self._mine

    def reset(self) -> None:
        """Forget what was sent, so that every gateway hears the next pull (after a
        reconnect, or when what a pull says beside the grant changed)."""
        with self._lock:
            self._sent.clear()
            self._answered.clear()
            # A notice sent while we were away is lost: what we believed may be stale.
            self._backlog.clear()

    def pulls(
        self, capacity: int, held: Iterable[tuple[str, int]], refresh: bool = False
    ) -> list[PullTo]:
        """The pulls to send, given the car's capacity and the (gateway, epoch) of every
        task it holds: to each of its K gateways whose grant changed, on ``refresh`` also
        to each that has not answered the last one (a QoS 0 pull may be lost), and a zero
        grant to a gateway that held one and left the K.

        Each gateway gets a share of the capacity (its *target*). A pull fixes a ``seen``
        epoch once per gateway and then keeps it, and grants the target less the tasks
        held from at or before it: the gateway counts every lease it sent after ``seen``
        and refills a slot by itself when one ends, so in steady state nothing changes
        and nothing is sent. A pull goes out when the split moves (roster, backlog), a
        gateway (re)appears, or a task from before its ``seen`` ends.
        """
        held = list(held)
        with self._lock:
            mine = self._mine
            others = sum(1 for gateway, _ in held if gateway not in mine)
            targets = allocate(max(0, capacity - others), self._weights())
            seen = {g: self._seen_for(g) for g in mine}
            grants = {}
            for gateway in mine:
                before = sum(1 for g, epoch in held if g == gateway and epoch <= seen[gateway])
                grants[gateway] = max(0, targets.get(gateway, 0) - before)
            self._within_room(grants, seen, held, capacity)
            out: list[PullTo] = []
            for gateway in mine:
                pull = PullTo(gateway, seen[gateway], grants[gateway])
                unanswered = refresh and gateway not in self._answered
                if unanswered or self._sent.get(gateway) != (pull.grant, pull.seen):
                    out.append(pull)
                    self._sent[gateway] = (pull.grant, pull.seen)
                    self._answered.discard(gateway)
            for gateway, (grant, old_seen) in list(self._sent.items()):
                if gateway not in mine:
                    del self._sent[gateway]
                    if grant > 0:
                        out.append(PullTo(gateway, old_seen, 0))
            return out

    def _seen_for(self, gateway: str) -> int:
        """The seen epoch of the last pull to a gateway, kept; or, for a first pull (or
        one to a gateway that reappeared), the highest epoch received from it."""
        sent = self._sent.get(gateway)
        return sent[1] if sent is not None else self._seen.get(gateway, 0)

    def _within_room(
        self,
        grants: dict[str, int],
        seen: Mapping[str, int],
        held: list[tuple[str, int]],
        capacity: int,
    ) -> None:
        """Trim grants so that all gateways together may send no more than the free
        slots: a gateway whose share just shrank may still hold more of the car than its
        new share, and until those tasks end the others must wait (lowest rank first)."""
        after = {
            gateway: sum(1 for g, epoch in held if g == gateway and epoch > seen[gateway])
            for gateway in grants
        }
        sendable = {g: max(0, grants[g] - after[g]) for g in grants}
        excess = sum(sendable.values()) - max(0, capacity - len(held))
        for gateway in reversed(list(grants)):
            if excess <= 0:
                break
            cut = min(excess, sendable[gateway])
            grants[gateway] -= cut
            excess -= cut

    def _weights(self) -> dict[str, int]:
        """Each of the K gateways' weight, in rank order: 1 with work (or not known to
        have none), 0 without. Not the backlog's size: it moves with every read and
        dispatch, and a split that followed it would change, and cost pulls, all the
        time; the partitions spread the backlog over gateways evenly enough."""
        stale = time.monotonic() - EMPTY_TTL_S
        for gateway in [g for g, at in self._empty_at.items() if at < stale]:
            del self._empty_at[gateway]
            if self._backlog.get(gateway) == 0:
                del self._backlog[gateway]  # ask again: it will say so if still idle
        return {g: 0 if self._backlog.get(g) == 0 else 1 for g in self._mine}
