# SPDX-License-Identifier: Apache-2.0
"""A worker's settings, and what it keeps about each task it holds."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import Assignment, TaskChunk
from parkpool.worker.cancel import Cancel


@dataclass(frozen=True)
class WorkerSettings:
    vehicle_id: str
    mqtt: MqttConnection = field(default_factory=MqttConnection)
    namespace: str = "parkpool"
    concurrency: int = 1  # kernels running at once; one GPU runs one stream well
    prefetch: int = 1  # extra tasks held so the next is already here when one finishes
    heartbeat_s: float = 15.0
    # Re-send a pull while there is room: a gateway may have restarted and forgotten it.
    # Jittered per vehicle, so a large fleet does not refresh in lockstep.
    pull_refresh_s: float = 10.0
    # The K gateways of its cell a car talks to, chosen by rendezvous hash over the
    # cell's roster (0: every gateway, the pre-cell design kept as a baseline).
    gateways_per_vehicle: int = 2
    # The pull that follows a gateway or its backlog appearing waits up to this long, so
    # that a restarted gateway is not met by its whole share of the cell at once.
    pull_jitter_s: float = 1.0
    backend: str = "auto"
    simulated_delay_s: float = 0.0  # the fleet simulator's stand-in for a slower car
    gflops_per_s: float = 0.0  # the rate announced before any task was measured; 0 = unknown
    # Public keys of the gateways allowed to issue work; empty: unsigned work is accepted
    # (a development fleet). With keys, anything not signed by one of them is refused.
    trusted_keys: tuple[Path, ...] = ()
    result_key: Path | None = None  # this car's own Ed25519 key; signs every result
    # Fetched inputs kept by content hash (worker.blobcache), so the tiles of one block
    # cost one download. Bounded: the car's memory is the owner's, not ours.
    cache_bytes: int = 256 << 20
    # Outputs whose encoding is at least this large go to the store under the lease's
    # upload URL, when the gateway gave one; smaller ones ride in the result message.
    result_inline_bytes: int = 64 << 10

    @property
    def capacity(self) -> int:
        return self.concurrency + self.prefetch


@dataclass(slots=True)
class Held:
    assignment: Assignment
    task: TaskChunk
    received_at: float = field(default_factory=time.time)
    running: bool = False
    next_beat: float = 0.0  # wall clock of the next lease heartbeat while running
    # Set once the car lets the task go, however it does: its input downloads stop then.
    cancel: Cancel = field(default_factory=Cancel)

    @property
    def beat_every(self) -> float:
        """A third of the lease, so two heartbeats may be lost before it expires."""
        return max(0.5, (self.assignment.lease_deadline - self.received_at) / 3)


class HeldTasks:
    """The tasks a car holds, by lease epoch; kernels, the network and the owner's guard
    all touch them, each from its own thread. A task taken out (revoked, handed back,
    finished, the car stopping) has its ``cancel`` set, whoever took it."""

    def __init__(self) -> None:
        self._items: dict[int, Held] = {}
        self._lock = threading.Lock()
        self._releasing = 0  # hand-backs whose nacks are still being sent
        # Tasks handed back in all, counted as they leave: a reader that sees none held
        # sees them counted (the worker's guard and a kernel's thread both hand back).
        self._released = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def add(self, assignment: Assignment, task: TaskChunk) -> None:
        with self._lock:
            self._items[assignment.epoch] = Held(assignment, task)

    def sources(self) -> list[tuple[str, int]]:
        """The (gateway, epoch) of every task held: what each gateway has of our credits."""
        with self._lock:
            return [(h.assignment.gateway_id, e) for e, h in self._items.items()]

    def pop(self, epoch: int) -> Held | None:
        with self._lock:
            item = self._items.pop(epoch, None)
        _let_go([item] if item else [])
        return item

    def get(self, epoch: int) -> Held | None:
        with self._lock:
            return self._items.get(epoch)

    def start(self, epoch: int) -> Held | None:
        """Mark a task as running (its lease heartbeats start); None if it was let go."""
        with self._lock:
            item = self._items.get(epoch)
            if item is not None:
                now = time.time()
                item.running = True
                item.next_beat = now + item.beat_every
                if item.assignment.lease_deadline - now < 2 * item.beat_every:
                    # A prefetched task that waited: its first beat would come too near
                    # the deadline (or after it) to keep the lease. Beat now.
                    item.next_beat = now
            return item

    def due_beats(self, now: float) -> list[Held]:
        """Running tasks whose lease heartbeat is due, each then scheduled for the next."""
        with self._lock:
            due = [h for h in self._items.values() if h.running and h.next_beat <= now]
            for held in due:
                held.next_beat = now + held.beat_every
        return due

    def unstarted_past(self, now: float) -> list[Held]:
        """Take out the tasks not started yet (waiting for a kernel slot, or for their
        inputs) whose lease has less than a heartbeat's time left: the kernel before
        them, or the download, ran long, and no heartbeat keeps an unstarted lease."""
        with self._lock:
            late = [
                epoch
                for epoch, h in self._items.items()
                if not h.running and h.assignment.lease_deadline - now < h.beat_every
            ]
            items = [self._items.pop(epoch) for epoch in late]
        _let_go(items)
        return items

    def take_all(self) -> list[Held]:
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        _let_go(items)
        return items

    def cancel_all(self) -> None:
        """Stop every task's downloads, and keep holding them (a killed car says nothing)."""
        with self._lock:
            items = list(self._items.values())
        _let_go(items)

    @contextlib.contextmanager
    def releasing(self) -> Iterator[list[Held]]:
        """Take every task to hand back; until the block ends, ``handed_back`` is False."""
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
            self._releasing += 1
            self._released += len(items)
        _let_go(items)
        try:
            yield items
        finally:
            with self._lock:
                self._releasing -= 1

    @property
    def released(self) -> int:
        """Tasks taken out by ``releasing`` so far."""
        with self._lock:
            return self._released

    def handed_back(self) -> bool:
        """Nothing held, and every nack of a hand-back already sent."""
        with self._lock:
            return not self._items and not self._releasing


def _let_go(items: list[Held]) -> None:
    # Outside the lock: a cancel shuts sockets and wakes waiters, on this thread.
    for item in items:
        item.cancel.set()


def task_context(assignment: Assignment, task: TaskChunk) -> dict[str, object]:
    """The keys every task event carries (the vehicle id is bound to the logger)."""
    return {
        "job_id": task.job_id,
        "task_id": f"{task.job_id}:{task.chunk_id}",
        "gateway_id": assignment.gateway_id,
        "epoch": assignment.epoch,
        "attempt": assignment.attempt,
    }
