# SPDX-License-Identifier: Apache-2.0
"""Tasks the gateway has consumed and not finished, and the queue of those ready to go."""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from parkpool.schemas import AttemptRecord, Priority, TaskChunk
from parkpool.schemas.kernels import BUILTIN

# How many tasks a pull ranks, of those at the head of each priority's queue that fit
# the car: bounds the cost of ranking whatever the queue's length.
SCAN = 32
# How far a pull looks, past tasks the car may not take (a plugin kernel it does not
# run, a confidential task it cannot open, a redo that avoids it, one too long for its
# stay), for those: when only the first 32 were looked at, 32 such tasks at the head
# left every other car idle however much it could run behind them.
SCAN_LIMIT = 1024
# A car shunned by a task again and again is shunned at most 2**4 = 16 base shuns (leases)
# at a time: long enough to leave the task to any other car, short enough that a car
# wrongly thought at fault is not locked out of a job's last task for good.
MAX_SHUN_DOUBLINGS = 4


class TaskState(enum.Enum):
    QUEUED = "queued"  # waiting for a vehicle with credit
    LEASED = "leased"  # on a vehicle
    FINISHING = "finishing"  # result or dead letter produced, waiting for Kafka's report
    DONE = "done"  # durable; its offset may be committed


@dataclass(slots=True, eq=False)
class PendingTask:
    topic: str
    partition: int
    offset: int
    raw: bytes  # the record value exactly as read; forwarded to vehicles untouched
    task: TaskChunk
    dispatches: int = 0  # how many times it was sent to a vehicle
    failures: int = 0  # attempts that count towards the maximum
    history: list[AttemptRecord] = field(default_factory=list)
    state: TaskState = TaskState.QUEUED
    queued_at: float = 0.0  # monotonic; when it last became ready, for queue-wait latency
    # Its distinct stored inputs as dispatch tracks them, the first 64 bits of each hash:
    # ranking a pull's candidates reads them for every task it scans, so they are parsed
    # once. Distinct: content addressing gives gemm(A, A)'s diagonal tiles one hash twice.
    blob_keys: tuple[int, ...] = field(init=False, repr=False)
    # The car whose attempt last counted as a failure, not offered the task again before
    # shunned_until (monotonic) while another car here grants work: only the last, so
    # two cars that both fail a task take turns with it rather than both wait.
    shunned_by: str = ""
    shunned_until: float = 0.0
    shun_streak: int = 0  # how many times in a row shunned_by failed it or handed it back

    def __post_init__(self) -> None:
        self.blob_keys = tuple(dict.fromkeys(int(ref.sha256[:16], 16) for ref in self.task.refs))

    def shun(self, vehicle_id: str, now: float, base_s: float) -> None:
        """Keep the task from a car that failed it or handed it back, for ``base_s``,
        twice as long each time in a row (up to 2**MAX_SHUN_DOUBLINGS times) when any
        car could take it: a shun of one lease only let a car that waits out each one,
        while the other cars are busy on long leases, take the task back every lease and
        hold it to its deadline."""
        self.shun_streak = self.shun_streak + 1 if vehicle_id == self.shunned_by else 1
        self.shunned_by = vehicle_id
        doublings = min(self.shun_streak - 1, MAX_SHUN_DOUBLINGS) if self._any_car_runs() else 0
        self.shunned_until = now + base_s * 2**doublings

    def _any_car_runs(self) -> bool:
        """Whether any car could take the task: a built-in kernel's, not sealed. The shun
        yields only to a car alone here, not to one alone able to run the task (a plugin
        kernel's, a box key), so such a task is shunned one base period at a time."""
        return self.task.kernel in BUILTIN and not self.task.confidential

    def shuns(self, vehicle_id: str, now: float) -> bool:
        """Whether the car failed this task last, lately, so that another should have it."""
        return vehicle_id == self.shunned_by and now < self.shunned_until

    @property
    def tp(self) -> tuple[str, int]:
        return (self.topic, self.partition)

    def log_context(self) -> dict[str, object]:
        """The keys every task event carries, so one task's story greps out of the logs."""
        return {
            "job_id": self.task.job_id,
            "task_id": f"{self.task.job_id}:{self.task.chunk_id}",
            "partition": self.partition,
            "offset": self.offset,
            "attempt": self.dispatches,
        }


class ReadyQueue:
    """Tasks waiting for a vehicle: high priority first, redeliveries ahead of new work.

    Batch is never starved completely: after ``high_burst`` high tasks in a row, one
    batch task goes out if any is waiting.
    """

    def __init__(self, high_burst: int = 8) -> None:
        self._queues: dict[Priority, deque[PendingTask]] = {p: deque() for p in Priority}
        self._high_burst = high_burst
        self._high_streak = 0
        # Tasks put in so far: a car that found nothing it may take is looked at again
        # once this moves (gateway.dispatch), not on every turn of the loop.
        self.arrivals = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def push(self, task: PendingTask) -> None:
        task.queued_at = time.monotonic()
        self._queues[task.task.priority].append(task)
        self.arrivals += 1

    def push_front(self, task: PendingTask) -> None:
        """Redeliveries go first: they have waited longest."""
        task.queued_at = time.monotonic()
        self._queues[task.task.priority].appendleft(task)
        self.arrivals += 1

    def pop(
        self,
        accept: Callable[[PendingTask], bool] | None = None,
        scan: int = SCAN,
        prefer: Callable[[PendingTask], float] | None = None,
    ) -> PendingTask | None:
        """The next task by priority; with ``accept``, the first in each queue that it
        accepts (a vehicle about to leave takes only short tasks), looking no further
        than SCAN_LIMIT tasks; with ``prefer``, the one it ranks highest of the first
        ``scan`` it accepts, the first of equals (a car's cached inputs; a bool ranks
        True over False)."""
        high, batch = self._queues[Priority.HIGH], self._queues[Priority.BATCH]
        batch_turn = bool(batch) and self._high_streak >= self._high_burst
        order = (batch, high) if batch_turn else (high, batch)
        for queue in order:
            task = _take(queue, accept, scan, prefer)
            if task is not None:
                self._high_streak = self._high_streak + 1 if queue is high else 0
                return task
        return None

    def head(self, count: int) -> list[PendingTask]:
        """Up to ``count`` of the tasks a pull would look at first, high priority first."""
        return [task for queue in self._queues.values() for task in itertools.islice(queue, count)]

    def tasks(self) -> list[PendingTask]:
        """Every queued task (a copy), high priority first."""
        return [task for queue in self._queues.values() for task in queue]

    def remove_where(self, predicate: object) -> list[PendingTask]:
        """Take out every queued task for which ``predicate(task)`` is true."""
        removed: list[PendingTask] = []
        for priority, queue in self._queues.items():
            keep = deque(t for t in queue if not predicate(t))  # type: ignore[operator]
            removed.extend(t for t in queue if predicate(t))  # type: ignore[operator]
            self._queues[priority] = keep
        return removed


def _take(
    queue: deque[PendingTask],
    accept: Callable[[PendingTask], bool] | None,
    scan: int,
    prefer: Callable[[PendingTask], float] | None = None,
) -> PendingTask | None:
    if not queue:
        return None
    if accept is None and prefer is None:
        return queue.popleft()
    best: int | None = None
    best_rank = 0.0
    ranked = 0
    look = scan if accept is None else SCAN_LIMIT
    for index, task in enumerate(itertools.islice(queue, look)):
        if accept is not None and not accept(task):
            continue
        if prefer is None:
            best = index
            break
        rank = prefer(task)
        if best is None or rank > best_rank:  # ties keep the queue's order
            best, best_rank = index, rank
        ranked += 1
        if ranked == scan:
            break
    if best is None:
        return None
    task = queue[best]
    del queue[best]
    return task
