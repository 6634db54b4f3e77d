# SPDX-License-Identifier: Apache-2.0
"""Handing ready tasks to hungry vehicles: which task, to whom, and the signed lease.

A vehicle gets at most what it granted this gateway, minus the leases it holds from
after the pull's ``seen`` epoch, several tasks in one message when it may take several;
a car about to leave gets only tasks that should finish first, and only a car that
announced a box key gets confidential ones. Cars that pull while there is no work are
told so, and told again when work comes, so that they move their credits meanwhile.
Cancellation and deadlines are checked here, at dispatch time, not only when the task
was read.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import combinations

from parkpool.gateway.cancels import CancelledJobs
from parkpool.gateway.kernel_routes import BUILT_IN, KernelRoutes
from parkpool.gateway.leases import Lease, LeaseTable
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.mqtt_link import MqttLink
from parkpool.gateway.outcomes import TaskOutcomes
from parkpool.gateway.settings import GatewaySettings
from parkpool.gateway.tasks import SCAN, PendingTask, ReadyQueue, TaskState
from parkpool.gateway.vehicles import VehicleBook, VehicleView
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.logs import Logger
from parkpool.runtime.reputation import ReputationBook
from parkpool.runtime.sealing import GatewayBox
from parkpool.runtime.signing import TaskSigner
from parkpool.schemas import Assignment, AssignmentBatch, BrokerError, DecodeError, encode
from parkpool.schemas.blobref import input_key, output_key

# Car ids, queued and msgpack framing of a batch around its assignments, generously.
BATCH_OVERHEAD = 1024
MAX_NOTICES_PER_TURN = 256
QUIET_S = 2.0  # an empty queue for this long means "no work here", not a gap between reads
# A car that found no task it may take looks again once a task arrives, or after this
# long (a shun ends, its stay shortens): a look may pass over SCAN_LIMIT tasks.
RESCAN_S = 1.0
# Per car, the stored inputs last sent to it, for cache-aware picks: as 64-bit hash
# prefixes, about 300 bytes a car, so 200,000 cars cost some 60 MB at most.
BLOBS_REMEMBERED = 8
# The look-ahead of the input rank: what one freed task is worth against one reused
# input (simulated: 1 made cars chase free tiles over reuse, worse than none), and the
# most new inputs a task may need for it to be looked at (their subsets are counted).
LOOKAHEAD_WEIGHT = 0.25
LOOKAHEAD_MAX_NEW = 3
SKIP_SAMPLE = 32  # the head of the queue, sampled to name why none fit
# After the store's credentials failed to presign, dispatch waits this long: they are
# refused only once they are about to expire and refreshing them failed (an instance
# role's, a container's). The refresh runs on its own thread (runtime/store_keys), which
# a refused presign wakes at once; each try may take seconds (botocore's container
# provider makes 3 tries 1 s apart), so the loop gives it that long, not one loop step.
PRESIGN_RETRY_S = 5.0


class Dispatcher:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        vehicles: VehicleBook,
        ready: ReadyQueue,
        leases: LeaseTable,
        cancelled: CancelledJobs,
        mqtt: MqttLink,
        outcomes: TaskOutcomes,
        metrics: GatewayMetrics,
        events: Logger,
        reputation: ReputationBook | None = None,
    ) -> None:
        self.settings = settings
        self.reputation = reputation or ReputationBook()
        self.vehicles = vehicles
        self.ready = ready
        self.leases = leases
        self.cancelled = cancelled
        self.mqtt = mqtt
        self.outcomes = outcomes
        self.metrics = metrics
        self.events = events
        self.signer = TaskSigner.load(settings.signing_key) if settings.signing_key else None
        self._empty_since: float | None = None  # the ready queue has been empty since
        self._told_idle = False  # the cars waiting here heard "no work" since then
        self._fresh_while_quiet: list[VehicleView] = []
        self.box = GatewayBox.load(settings.box_keys)
        self.store = BlobStore(settings.store) if settings.store.enabled else None
        self._presign_retry_at = 0.0  # monotonic; no task is sent before then

    def available(self, view: VehicleView) -> int:
        """Tasks a car may still be sent: what it asked for, less what is on its way."""
        if view.credits <= 0:
            return 0
        return view.credits - self.leases.count_after(view.vehicle_id, view.seen_epoch)

    def dispatch(self) -> None:
        """Serve hungry cars, longest-waiting first, each with up to all it may take in one
        message; tell cars that pulled while there is no work, and cars told so before
        once work has come. Bounded by the hungry and waiting counts, so an idle gateway
        costs nothing however many cars it serves."""
        fresh = self.vehicles.take_fresh()
        if not len(self.ready):
            self._tell_idle(fresh)
            return
        self._empty_since, self._told_idle, self._fresh_while_quiet = None, False, []
        if self.vehicles.any_waiting():
            # About one car per task waiting, a turn at a time: enough to take the work,
            # not the whole waiting list at once.
            for view in self.vehicles.waiting(min(len(self.ready), MAX_NOTICES_PER_TURN)):
                self._tell(view, len(self.ready))
        vehicles = self.vehicles
        for _ in range(vehicles.hungry_count()):
            if not len(self.ready) or self._presign_held():
                return
            view = vehicles.first_hungry()
            if self.reputation.quarantined(view.vehicle_id):
                # Its results cannot be trusted: it gets no work until an operator
                # releases it (docs/OPERATIONS.md, "A quarantined car").
                self.metrics.dispatch_skipped.labels("quarantined").inc()
                vehicles.served(view.vehicle_id, False)
                vehicles.refused(view.vehicle_id)
                continue
            if self._nothing_new_for(view):
                vehicles.served(view.vehicle_id, True)
                continue
            available = self.available(view)
            if available > 0:
                available -= self._send(view, min(available, self.settings.max_batch))
            vehicles.served(view.vehicle_id, available > 0)

    def _nothing_new_for(self, view: VehicleView) -> bool:
        """Whether a car that lately found no task it may take would find none again: no
        task came since, and too little time passed for a shun to end or its stay to
        change. A look may pass over a thousand tasks; without this, a car that may take
        none of them would pay for it on every turn of the loop."""
        found = view.found_none
        if found is None:
            return False
        arrivals, when = found
        return arrivals == self.ready.arrivals and time.monotonic() - when < RESCAN_S

    def _tell_idle(self, fresh: list[VehicleView]) -> None:
        """Say "no work here" only once the queue stayed empty for ``QUIET_S``: between
        two Kafka reads it is empty for an instant, and telling cars then would only
        send them away and back. Then every car waiting here hears it once, and after
        that each car that pulls or whose slot here frees."""
        now = time.monotonic()
        if self._empty_since is None:
            self._empty_since = now
        if now - self._empty_since < QUIET_S:
            self._fresh_while_quiet.extend(fresh)
            return
        pulled = self._fresh_while_quiet + fresh
        self._fresh_while_quiet = []
        waiting: list[VehicleView] = []
        if not self._told_idle:
            self._told_idle = True
            # Cars waiting here hear it, but not twice: those told already, before the
            # work came and went, and not asking again, know.
            hungry = (self.vehicles.get(v) for v in self.vehicles.hungry())
            waiting = [v for v in hungry if v is not None and v.told != 0]
        # A car that asks while there is nothing is answered, even if told before: it
        # asks because it forgot (a reconnect clears what a car believes) or stopped
        # believing it (grants.EMPTY_TTL_S), and unanswered it would leave its credit
        # here, idle, while another of its gateways has work.
        to_tell = {v.vehicle_id: v for v in [*waiting, *pulled]}
        for view in to_tell.values():
            if self.available(view) > 0:
                self._tell(view, 0)

    def _tell(self, view: VehicleView, queued: int) -> None:
        self.mqtt.send_notice(view.vehicle_id, queued)
        self.vehicles.told(view, queued)

    def _send(self, view: VehicleView, wanted: int) -> int:
        """Lease up to ``wanted`` tasks to the car, in one message when more than one fits
        under the MQTT limit; how many were sent."""
        payloads: list[bytes] = []
        runs = _runs(view)  # the car's kernels do not change while it is served
        alone = not self.vehicles.others_granting(view.vehicle_id)
        for _ in range(wanted):
            if self._presign_held():
                break
            task = self.next_dispatchable(
                _fit_for(view, runs, self.vehicles.kernels, alone=alone),
                _holds_inputs(view, self.vehicles, lambda: self.ready.head(SCAN)),
                runs,
            )
            if task is None:
                if len(self.ready):
                    view.found_none = (self.ready.arrivals, time.monotonic())
                    why = _skip_reason(runs, self.ready.head(SKIP_SAMPLE), view, alone)
                    self.metrics.dispatch_skipped.labels(why).inc()
                break
            view.found_none = None
            if task.task.kernel in view.plugin_kernels:
                self.vehicles.kernels.heard((task.task.kernel,))  # a car here runs it
            inputs_key = self._inputs_key_for(task, view)
            if inputs_key is None:
                continue
            payload = self._assignment(task, view, inputs_key, len(self.ready))
            if payload is not None:
                payloads.append(payload)
        if payloads:
            self._deliver(view, payloads)
            if len(self.ready):  # an empty queue now is no news: the next read may fill it
                self.vehicles.told(view, len(self.ready))
            self.metrics.tasks.labels("dispatched").inc(len(payloads))
        return len(payloads)

    def _deliver(self, view: VehicleView, payloads: list[bytes]) -> None:
        """One message when one is enough; a batch over the MQTT limit is split in two."""
        expiry, limit = self.settings.lease_seconds, self.settings.mqtt.max_message_bytes
        if len(payloads) == 1:
            self.mqtt.send_assignment(view.vehicle_id, payloads[0], expiry)
            return
        batch = AssignmentBatch(
            self.settings.gateway_id, view.vehicle_id, tuple(payloads), len(self.ready)
        )
        if sum(map(len, payloads)) + BATCH_OVERHEAD > limit:
            half = len(payloads) // 2
            self._deliver(view, payloads[:half])
            self._deliver(view, payloads[half:])
            return
        self.mqtt.send_batch(batch, expiry)

    def _assignment(
        self, task: PendingTask, view: VehicleView, inputs_key: bytes, queued: int
    ) -> bytes | None:
        """The signed assignment under a new lease, or None when MQTT cannot carry it or
        its URLs cannot be presigned."""
        lease_seconds = self.settings.lease_seconds
        if task.task.refs and self.store is None:
            detail = "its inputs are in the object store and this gateway has no --store-endpoint"
            self.outcomes.dead_letter(task, "no_object_store", detail)
            return None
        lease = self.leases.grant(view.vehicle_id, task, lease_seconds)
        try:
            urls, upload_url = self._urls(task, lease.epoch)
        except BrokerError as exc:
            self._presign_failed(lease, exc)
            return None
        task.dispatches += 1
        task.state = TaskState.LEASED
        assignment = Assignment(
            gateway_id=self.settings.gateway_id,
            vehicle_id=view.vehicle_id,
            epoch=lease.epoch,
            attempt=task.dispatches,
            lease_deadline=time.time() + lease_seconds,
            task=task.raw,
            inputs_key=inputs_key,
            queued=queued,
            urls=urls,
            upload_url=upload_url,
        )
        if self.signer is not None:
            assignment = self.signer.sign(assignment)
        payload = encode(assignment)
        limit = self.settings.mqtt.max_message_bytes
        if len(payload) > limit:
            # No car behind this broker could ever be sent it: not worth an attempt each.
            self.leases.end(lease.epoch)
            detail = f"its assignment is {len(payload):,} bytes, over the MQTT limit of {limit:,}"
            self.outcomes.dead_letter(task, "too_large_for_mqtt", detail)
            return None
        if task.task.refs:  # only now: the car is sent them
            _remember_inputs(self.vehicles, view, task)
        self.events.debug(
            "task_dispatched", **task.log_context(), vehicle_id=view.vehicle_id, epoch=lease.epoch
        )
        self.metrics.queue_wait.observe(lease.dispatched_at - task.queued_at)
        self.metrics.dispatch.observe(lease.dispatched_at - max(task.queued_at, view.asked_at))
        return payload

    def _presign_held(self) -> bool:
        """Whether presigning failed lately: with a store, every assignment carries a
        presigned upload URL, so no task is sent until ``PRESIGN_RETRY_S`` has passed."""
        return time.monotonic() < self._presign_retry_at

    def _presign_failed(self, lease: Lease, exc: BrokerError) -> None:
        """The store's credentials could not sign (their refresh failed): neither the
        car's fault nor the task's. The lease ends unsent, the task goes back uncounted,
        and dispatch stops for ``PRESIGN_RETRY_S``."""
        self.leases.end(lease.epoch)
        self._presign_retry_at = time.monotonic() + PRESIGN_RETRY_S
        self.metrics.dispatch_skipped.labels("presign_failed").inc()
        task, car = lease.task, lease.vehicle_id
        self.events.error("presign_failed", **task.log_context(), vehicle_id=car, error=str(exc))
        self.outcomes.requeue(task, "presign_failed", car, str(exc), counts=False)

    def _urls(self, task: PendingTask, epoch: int) -> tuple[tuple[str, ...], str]:
        """Presigned URLs for the lease: a GET per stored input, good until the lease
        ends (a car fetches before it starts), and a write-once PUT for its outputs under
        a key no other lease shares. Local HMAC: no bytes and no round trip here."""
        if self.store is None:
            return (), ""
        t = task.task
        get_s = self.settings.lease_seconds
        urls = tuple(self.store.presign_get(input_key(t.job_id, r.sha256), get_s) for r in t.refs)
        put_s = min(self.settings.upload_url_s, max(1.0, t.deadline - time.time()))
        key = output_key(t.job_id, self.settings.gateway_id, t.chunk_id, epoch)
        upload = self.store.presign_put(key, put_s)
        return urls, upload

    def _inputs_key_for(self, task: PendingTask, view: VehicleView) -> bytes | None:
        """A confidential task's data key sealed to this car (b"" for any other task).

        None when it cannot be: a task no key of ours opens is dead-lettered; a car whose
        announced key is unusable gets no sealed work until its next pull, and the task
        goes back to the front of the queue for another car.
        """
        caps = view.capabilities
        if not task.task.confidential:
            return b""
        assert caps is not None  # _fit_for gives sealed work only to cars with a box key
        try:
            return self.box.rewrap(task.task, caps.box_key)
        except DecodeError as exc:
            if exc.reason == "bad_box_key":
                self.metrics.dropped.labels("mqtt_pull", exc.reason).inc()
                view.capabilities = dataclasses.replace(caps, box_key=b"")
                self.ready.push_front(task)
                return None
            self.outcomes.dead_letter(task, exc.reason, exc.detail)
            return None

    def next_dispatchable(
        self,
        accept: Callable[[PendingTask], bool] | None = None,
        prefer: Callable[[PendingTask], float] | None = None,
        runs: Callable[[str], bool] | None = None,
    ) -> PendingTask | None:
        """The next ready task, checking cancellation and deadline at dispatch time, and,
        for a car that does not run its kernel (``runs``), whether any car here does."""
        while (task := self.ready.pop(accept, prefer=prefer)) is not None:
            if self.cancelled.covers(task.task):
                self.outcomes.skip_cancelled(task)
            elif task.task.deadline < time.time():
                detail = "the job's deadline passed in the queue"
                self.outcomes.dead_letter(task, "deadline_passed", detail)
            elif self._nobody_runs(task.task.kernel, runs):
                detail = f"no car of this gateway runs kernel {task.task.kernel!r}"
                self.outcomes.dead_letter(task, "unknown_kernel", detail)
            else:
                return task
        return None

    def _nobody_runs(self, kernel: str, runs: Callable[[str], bool] | None) -> bool:
        """Whether the task must be dead-lettered for its kernel: the car being served
        does not run it, and no car of this gateway does."""
        return runs is not None and not runs(kernel) and self.vehicles.kernels.unrunnable(kernel)


def _fit_for(
    view: VehicleView, runs: Callable[[str], bool], kernels: KernelRoutes, *, alone: bool
) -> Callable[[PendingTask], bool]:
    """Only tasks that should finish before the car leaves, confidential ones only for a
    car that can open them, plugin kernels only for a car that announced it runs them
    (or when no car here does: such a task is taken only to be dead-lettered), never
    one that checks or redoes this car's result, and not one this car last failed or
    handed back, lately, unless no other online car grants work here (``alone``)."""
    can_open = _can_open(view)
    car = view.vehicle_id
    now = time.monotonic()

    def kernel_ok(kernel: str) -> bool:
        return runs(kernel) or kernels.unrunnable(kernel)

    def ours(task: PendingTask) -> bool:
        return car not in task.task.avoid and (alone or not task.shuns(car, now))

    if view.dwell_s <= 0 and can_open:
        return lambda task: ours(task) and kernel_ok(task.task.kernel)
    return lambda task: (
        (can_open or not task.task.confidential)
        and view.fits(task.task.cost_gflop, now)
        and ours(task)
        and kernel_ok(task.task.kernel)
    )


def _runs(view: VehicleView) -> Callable[[str], bool]:
    """Whether the car runs a kernel: every car runs the built-ins; a plugin kernel only
    where the car's fleet manifest approved it, which its pulls announce."""
    announced = view.plugin_kernels
    return lambda kernel: kernel in BUILT_IN or kernel in announced


def _holds_inputs(
    view: VehicleView, book: VehicleBook, window: Callable[[], Sequence[PendingTask]] = tuple
) -> Callable[[PendingTask], float] | None:
    """Rank tasks for a car by the stored inputs it likely holds (sent to it lately):
    gemm tiles of one row or column block then share one download. Then, a quarter point
    for each task of ``window()`` (the first SCAN queued tasks, read only when stored
    inputs are about: it is asked for each task a pull picks) whose every missing input this
    task's download would bring: of two tiles that each need one new block, the car takes
    the one that makes a third tile free for it, so it grows a square of tiles rather
    than a line. Last, between tasks that reuse as much, the one whose other inputs fewer
    cars here hold goes first, so cars spread over a job's blocks rather than crowd the
    same ones.

    Simulated (gemm, 4 to 32 row and column blocks, 3 to 16 cars, 12 draws each), inputs
    served from the cache: 0.47 with any reuse counted, 0.54 with the crowd term, 0.57
    with the look-ahead on 8x8 tiles and 8 cars; over ten shapes and five timings the
    look-ahead raised the mean by 0.015 to 0.037 and lowered no shape by more than 0.013."""
    if not view.blobs and not book.holds_any():  # no stored inputs about: keep the order
        return None
    held = set(view.blobs)
    # Each scanned task's inputs the car lacks: one count per distinct missing set.
    missing = Counter(
        frozenset(h for h in task.blob_keys if h not in held) for task in window() if task.blob_keys
    )

    def freed(new: frozenset[int]) -> int:
        """Scanned tasks, other than this one, whose missing inputs are all in ``new``."""
        if not new or len(new) > LOOKAHEAD_MAX_NEW:
            return 0
        subsets = (frozenset(c) for n in range(1, len(new) + 1) for c in combinations(new, n))
        return max(0, sum(missing[s] for s in subsets) - 1)  # less the task itself

    def rank(task: PendingTask) -> float:
        hashes = task.blob_keys
        reused = sum(h in held for h in hashes)
        new = frozenset(h for h in hashes if h not in held)
        crowd = sum(book.holders(h) for h in new)
        return reused + LOOKAHEAD_WEIGHT * freed(new) + 1 / (1 + crowd)

    return rank


def _remember_inputs(book: VehicleBook, view: VehicleView, task: PendingTask) -> None:
    book.remember_blobs(view, task.blob_keys, BLOBS_REMEMBERED)


def _can_open(view: VehicleView) -> bool:
    """Whether the car announced a box key, so it can be sent confidential tasks."""
    return bool(view.capabilities and view.capabilities.box_key)


def _skip_reason(
    runs: Callable[[str], bool], queued: list[PendingTask], view: VehicleView, alone: bool
) -> str:
    """Why no queued task fit the car: the likeliest of its filters."""
    if queued and not any(runs(t.task.kernel) for t in queued):
        return "no_kernel"
    car, now = view.vehicle_id, time.monotonic()
    if queued and all(car in t.task.avoid for t in queued):
        return "avoided"  # each checks or redoes this car's own result
    if queued and not alone and all(t.shuns(car, now) for t in queued):
        return "failed_here"
    return "dwell" if _can_open(view) else "no_box_key"
