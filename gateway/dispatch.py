# SPDX-License-Identifier: Apache-2.0
"""Handing ready tasks to hungry vehicles: which task, to whom, and the signed lease.

A vehicle gets at most what it asked this gateway for, minus what is still in transit
to it; a car about to leave gets only tasks that should finish first, and only a car
that announced a box key gets confidential ones. Cancellation and deadlines are checked
here, at dispatch time, not only when the task was read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from parkpool.gateway.tasks import PendingTask, TaskState
from parkpool.gateway.vehicles import VehicleView
from parkpool.runtime.sealing import GatewayBox
from parkpool.runtime.signing import TaskSigner
from parkpool.schemas import Assignment, DecodeError, encode

if TYPE_CHECKING:
    from parkpool.gateway.gateway import Gateway


class Dispatcher:
    def __init__(self, gateway: Gateway) -> None:
        settings = gateway.settings
        self.gw = gateway
        self.signer = TaskSigner.load(settings.signing_key) if settings.signing_key else None
        self.box = GatewayBox.load(settings.box_keys)

    def dispatch(self) -> None:
        # One task per hungry vehicle per turn, longest-waiting first; bounded by the
        # hungry count, so an empty queue costs nothing however large the fleet is.
        vehicles = self.gw.vehicles
        for _ in range(vehicles.hungry_count()):
            if not len(self.gw.ready):
                return
            view = vehicles.first_hungry()
            available = self.gw.available(view)
            if available > 0 and self._send_one(view):
                available -= 1
            vehicles.served(view.vehicle_id, available > 0)

    def _send_one(self, view: VehicleView) -> bool:
        gw = self.gw
        task = self.next_dispatchable(_fit_for(view))
        if task is None:
            if len(gw.ready):
                gw.metrics.dispatch_skipped.labels(_skip_reason(view)).inc()
            return False
        inputs_key = self._inputs_key_for(task, view)
        if inputs_key is None:
            return False
        lease_seconds = gw.settings.lease_seconds
        lease = gw.leases.grant(view.vehicle_id, task, lease_seconds)
        task.dispatches += 1
        task.state = TaskState.LEASED
        assignment = Assignment(
            gateway_id=gw.settings.gateway_id,
            vehicle_id=view.vehicle_id,
            epoch=lease.epoch,
            attempt=task.dispatches,
            lease_deadline=time.time() + lease_seconds,
            task=task.raw,
            inputs_key=inputs_key,
        )
        if self.signer is not None:
            assignment = self.signer.sign(assignment)
        gw.mqtt.send_assignment(view.vehicle_id, encode(assignment), lease_seconds)
        gw.metrics.tasks.labels("dispatched").inc()
        gw.events.debug(
            "task_dispatched", **task.log_context(), vehicle_id=view.vehicle_id, epoch=lease.epoch
        )
        gw.metrics.queue_wait.observe(lease.dispatched_at - task.queued_at)
        gw.metrics.dispatch.observe(lease.dispatched_at - max(task.queued_at, view.asked_at))
        return True

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
                self.gw.metrics.dropped.labels("mqtt_pull", exc.reason).inc()
                view.capabilities = dataclasses.replace(caps, box_key=b"")
                self.gw.ready.push_front(task)
                return None
            task.state = TaskState.FINISHING
            self.gw.log.dead_letter(task.tp, task.offset, task.raw, exc.reason, exc.detail, task)
            return None

    def next_dispatchable(
        self, accept: Callable[[PendingTask], bool] | None = None
    ) -> PendingTask | None:
        """The next ready task, checking cancellation and deadline at dispatch time."""
        gw = self.gw
        while (task := gw.ready.pop(accept)) is not None:
            if task.task.job_id in gw.cancelled:
                gw.skip_cancelled(task)
            elif task.task.deadline < time.time():
                gw.log.dead_letter(
                    task.tp,
                    task.offset,
                    task.raw,
                    "deadline_passed",
                    "the job's deadline passed in the queue",
                    task,
                )
            else:
                return task
        return None


def _fit_for(view: VehicleView) -> Callable[[PendingTask], bool] | None:
    """Only tasks that should finish before the car leaves, and confidential ones only for
    a car that can open them; None when any task will do."""
    can_open = _can_open(view)
    if view.dwell_s <= 0 and can_open:
        return None
    now = time.monotonic()
    return lambda task: (
        (can_open or not task.task.confidential) and view.fits(task.task.cost_gflop, now)
    )


def _can_open(view: VehicleView) -> bool:
    """Whether the car announced a box key, so it can be sent confidential tasks."""
    return bool(view.capabilities and view.capabilities.box_key)


def _skip_reason(view: VehicleView) -> str:
    return "dwell" if _can_open(view) else "no_box_key"
