# SPDX-License-Identifier: Apache-2.0
"""The edge gateway: Kafka tasks in, leased to pulling vehicles over MQTT, results out.

All state lives on one thread (the loop in ``run``). Kafka rebalance and delivery
callbacks run inside ``poll`` on that thread, and MQTT messages arrive through a queue,
so no lock guards the gateway's state.

The ack chain for a result, in order:
1. the result is produced to Kafka and its delivery report says it is durable;
2. then the MQTT message that carried it is acknowledged (PUBACK to the broker);
3. then the task's offset is finished, and the partition's commit point may move.
A crash between any two steps redoes work; it never loses it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import structlog
from confluent_kafka import KafkaError

from gateway.cancels import CancelledJobs
from gateway.fleet_stats import FleetStats
from gateway.leases import Lease, LeaseTable
from gateway.metrics import GatewayMetrics
from gateway.mqtt_link import MqttEvent, MqttLink
from gateway.ratelimit import RateLimiter
from gateway.retry import DelayQueue, compute_backoff
from gateway.status import status_snapshot
from gateway.tasklog import TP, CancelRecord, TaskLog
from gateway.tasks import PendingTask, ReadyQueue, TaskState
from gateway.vehicles import VehicleBook, VehicleView
from parkpool.sealing import GatewayBox
from parkpool.settings import KafkaConnection, MqttConnection
from parkpool.signing import TaskSigner, VehicleKeys
from schemas import (
    Assignment,
    AttemptRecord,
    DecodeError,
    GatewayState,
    KafkaTopics,
    LeaseHeartbeat,
    MqttTopics,
    Nack,
    NackReason,
    PullRequest,
    Result,
    VehicleState,
    VehicleStatus,
    decode,
    encode,
)
from schemas.kernels import BUILTIN

log = structlog.get_logger("parkpool.gateway")
M = TypeVar("M")


@dataclass(frozen=True)
class GatewaySettings:
    gateway_id: str
    kafka: KafkaConnection
    mqtt: MqttConnection
    namespace: str = "parkpool"
    group_id: str = ""  # empty: "<namespace>.gateways"
    lease_seconds: float = 30.0
    max_attempts: int = 5
    window: int = 512
    session_timeout_ms: int = 6000
    vehicle_silence_s: float = 45.0
    drain_seconds: float = 20.0  # on SIGTERM, how long leases may finish before revoking
    batch: int = 256
    # Per vehicle: far above an honest car (one pull and one result per task, tasks of
    # at least tens of milliseconds), far below a flood.
    pull_rate: float = 50.0
    result_rate: float = 50.0
    kafka_overrides: dict[str, object] = field(default_factory=dict)
    signing_key: Path | None = None  # Ed25519 key that signs every assignment; None: unsigned
    vehicle_keys: Path | None = None  # enrolled cars' public keys; results must be signed
    # X25519 keys that open confidential tasks' data keys (newest first); none: such tasks
    # are dead-lettered as unsealable, since no car could ever run them from here.
    box_keys: tuple[Path, ...] = ()

    @property
    def group(self) -> str:
        return self.group_id or f"{self.namespace}.gateways"


class Gateway:
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or GatewayMetrics()
        self.mqtt = MqttLink(settings.gateway_id, settings.mqtt, MqttTopics(settings.namespace))
        self.log = TaskLog(
            settings.kafka,
            KafkaTopics(settings.namespace),
            settings.group,
            gateway_id=settings.gateway_id,
            window=settings.window,
            session_timeout_ms=settings.session_timeout_ms,
            metrics=self.metrics,
            on_revoked=self._drop_partitions,
            overrides=dict(settings.kafka_overrides),
        )
        self.leases = LeaseTable()
        self.vehicles = VehicleBook(settings.gateway_id)
        self.fleet = FleetStats(self.metrics.registry)
        self.signer = TaskSigner.load(settings.signing_key) if settings.signing_key else None
        self.vehicle_keys = VehicleKeys(settings.vehicle_keys) if settings.vehicle_keys else None
        self.box = GatewayBox.load(settings.box_keys)
        self._limits = {
            "pull": RateLimiter(settings.pull_rate, burst=2 * settings.pull_rate),
            "result": RateLimiter(settings.result_rate, burst=2 * settings.result_rate),
        }
        self._snapshot: Mapping[str, Any] = {"gateway_id": settings.gateway_id, "ready": False}
        self._reconnects_counted = 0
        self.ready = ReadyQueue()
        self.delayed = DelayQueue()
        self.cancelled = CancelledJobs()
        self.stopping = threading.Event()
        self.last_step = time.monotonic()
        self._draining = False
        self._last_sweep = 0.0
        self._log = log.bind(gateway_id=settings.gateway_id)

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Subscribe on MQTT first: no task is consumed before results can come back."""
        self.mqtt.start()
        self.log.open()
        self._log.info("gateway_started", group=self.settings.group)

    def run(self) -> None:
        """Loop until ``stopping`` is set, then drain and shut down."""
        try:
            while not self.stopping.is_set():
                self.step()
            self.drain()
        finally:
            self.shutdown()

    def step(self) -> None:
        self.last_step = time.monotonic()
        busy = self._consume()
        busy |= self._drain_mqtt()
        self._sweep()
        if not self._draining:
            self._dispatch()
        self.log.flow(starving=self._starving())
        self._update_gauges()
        if not busy:
            self._idle(0.005)

    def drain(self) -> None:
        """Stop taking work; let running leases finish for a bounded time, revoke the rest."""
        self._draining = True
        self.log.pause_all()
        deadline = time.monotonic() + self.settings.drain_seconds
        while len(self.leases) and time.monotonic() < deadline:
            self.step()
        for lease in self.leases.all():
            self.leases.end(lease.epoch)
            self.mqtt.send_revoke(lease.vehicle_id, lease.epoch, "gateway_shutdown")
        self._log.info("gateway_drained", revoked=len(self.leases))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._log.info("gateway_stopping", leases=len(self.leases))
        self.log.close(timeout)
        self.mqtt.stop()
        self._log.info("gateway_stopped")

    @property
    def draining(self) -> bool:
        return self._draining

    def health(self) -> tuple[bool, Mapping[str, Any]]:
        """Alive while the loop keeps turning."""
        stalled = time.monotonic() - self.last_step
        return stalled < 10.0, {"loop_stalled_s": round(stalled, 3)}

    def readiness(self) -> tuple[bool, Mapping[str, Any]]:
        """Ready when MQTT is subscribed and Kafka partitions are assigned."""
        details = {
            "mqtt_subscribed": self.mqtt.subscribed.is_set() and self.mqtt.connected,
            "partitions": len(self.log.windows),
            "draining": self._draining,
        }
        ok = bool(details["mqtt_subscribed"]) and bool(details["partitions"])
        return ok and not self._draining, details

    # ---------------------------------------------------------------- Kafka side

    def _consume(self) -> bool:
        items = self.log.poll(self.settings.batch)
        for item in items:
            if isinstance(item, CancelRecord):
                self._cancel(item)
            elif item.task.job_id in self.cancelled:
                self._skip_cancelled(item)
            else:
                self.ready.push(item)
        return bool(items)

    def _drop_partitions(self, gone: set[TP]) -> None:
        """Partitions revoked or lost: their tasks and leases belong to the next owner."""
        self.ready.remove_where(lambda t: t.tp in gone)
        self.delayed.remove_where(lambda t: t.tp in gone)
        for lease in self.leases.where(lambda lease: lease.task.tp in gone):
            self.leases.end(lease.epoch)

    def _finish(self, task: PendingTask) -> None:
        task.state = TaskState.DONE
        self.log.finish(task.tp, task.offset)

    def _starving(self) -> bool:
        """Work is piling up and nobody asks for it: stop reading more."""
        return len(self.ready) >= 64 and not self.vehicles.any_hungry()

    # ---------------------------------------------------------------- cancel

    def _cancel(self, record: CancelRecord) -> None:
        job_id = record.cancel.job_id
        self.cancelled.add(job_id)
        for task in self.ready.remove_where(lambda t: t.task.job_id == job_id):
            self._skip_cancelled(task)
        for task in self.delayed.remove_where(lambda t: t.task.job_id == job_id):
            self._skip_cancelled(task)
        for lease in self.leases.where(lambda lease: lease.task.task.job_id == job_id):
            self.leases.end(lease.epoch)
            self.mqtt.send_revoke(lease.vehicle_id, lease.epoch, "job_cancelled")
            self._skip_cancelled(lease.task)
        self.log.finish(record.tp, record.offset)
        self._log.info("job_cancelled", job_id=job_id, partition=record.tp[1])

    def _skip_cancelled(self, task: PendingTask) -> None:
        self.metrics.tasks.labels("cancelled").inc()
        self._finish(task)

    # ---------------------------------------------------------------- MQTT side

    def _idle(self, timeout: float) -> None:
        """Sleep until an MQTT message arrives or ``timeout`` passes, then handle it.

        Kafka records are prefetched by librdkafka's own threads, so the next step picks
        them up without blocking; MQTT is what the loop would otherwise react to late.
        """
        try:
            event = self.mqtt.events.get(timeout=timeout)
        except queue.Empty:
            return
        self._handle(event)

    def _drain_mqtt(self, limit: int = 512) -> bool:
        handled = 0
        while handled < limit:
            try:
                event = self.mqtt.events.get_nowait()
            except queue.Empty:
                break
            handled += 1
            self._handle(event)
        return handled > 0

    def _handle(self, event: MqttEvent) -> None:
        handler = self._handlers.get(event.kind)
        if handler is None:
            self.metrics.dropped.labels("mqtt", "unknown_topic").inc()
            self.mqtt.ack(event)
            return
        limiter = self._limits.get(event.kind)
        if limiter is not None and not limiter.allow(event.vehicle_id, time.monotonic()):
            self.metrics.dropped.labels(f"mqtt_{event.kind}", "rate_limited").inc()
            self.mqtt.ack(event)
            return
        handler(self, event)

    def _on_pull(self, event: MqttEvent) -> None:
        pull = self._decode(event, PullRequest)
        self.mqtt.ack(event)
        if pull is None:
            return
        if pull.vehicle_id != event.vehicle_id:
            self.metrics.dropped.labels("mqtt_pull", "vehicle_mismatch").inc()
            return
        self.vehicles.on_pull(pull)

    def _on_status(self, event: MqttEvent) -> None:
        status = self._decode(event, VehicleStatus)
        self.mqtt.ack(event)
        if status is None:
            return
        if status.vehicle_id != event.vehicle_id:
            self.metrics.dropped.labels("mqtt_status", "vehicle_mismatch").inc()
            return
        view = self.vehicles.set_state(status.vehicle_id, status.state)
        self.fleet.heard(view, status)
        if status.state is VehicleState.OFFLINE:
            self._release_vehicle(status.vehicle_id, "vehicle_offline", status.reason)
        elif status.state is VehicleState.SUSPENDED:
            # A policy stopped the car (owner, battery, heat): not the task's fault.
            self._release_vehicle(status.vehicle_id, "vehicle_offline", status.reason, counts=False)

    def _on_result(self, event: MqttEvent) -> None:
        result = self._decode(event, Result)
        lease = self._lease_for(event, result)
        if lease is None or not self._signed_by_its_vehicle(result):
            self.mqtt.ack(event)
            return
        self.leases.end(lease.epoch)
        lease.task.state = TaskState.FINISHING
        self.vehicles.heard(event.vehicle_id)
        chunk = lease.task.task
        assert result is not None  # a lease was found for it
        seconds = result.exec_seconds
        self.log.produce(
            chunk.reply_topic,
            event.payload,
            chunk.job_id,
            lambda err: self._result_delivered(err, lease, event, seconds),
        )

    def _result_delivered(
        self, err: KafkaError | None, lease: Lease, event: MqttEvent, exec_seconds: float
    ) -> None:
        task = lease.task
        self.mqtt.ack(event)
        if err is not None:
            # Not durable: redoing the task is the way to get its result into Kafka.
            self.metrics.delivery_errors.labels("results").inc()
            self._log.error("result_not_durable", job_id=task.task.job_id, error=str(err))
            # A refusal Kafka will repeat (a result too large, say) counts as an attempt, so
            # such a task ends in the dead-letter topic instead of being redone for ever.
            permanent = not err.retriable()
            self._requeue(task, "delivery_failed", lease.vehicle_id, str(err), counts=permanent)
            return
        self.metrics.tasks.labels("completed").inc()
        self.metrics.execution.observe(time.monotonic() - lease.dispatched_at)
        self.metrics.end_to_end.observe(max(0.0, time.time() - task.task.created_at))
        kernel = task.task.kernel if task.task.kernel in BUILTIN else "other"
        self.metrics.kernel_execution.labels(kernel).observe(exec_seconds)
        self._finish(task)
        self._log.debug(
            "task_completed", **task.log_context(), vehicle_id=lease.vehicle_id, epoch=lease.epoch
        )

    def _signed_by_its_vehicle(self, result: Result | None) -> bool:
        """With enrolled keys, a result counts only if its car signed it; a forgery leaves
        the lease alone, so the real car's result can still come."""
        if self.vehicle_keys is None or result is None:
            return True
        refusal = self.vehicle_keys.check(result)
        if refusal is not None:
            self.metrics.dropped.labels("mqtt_result", refusal).inc()
            self._log.warning(
                "result_refused", reason=refusal, vehicle_id=result.vehicle_id, epoch=result.epoch
            )
            return False
        return True

    def _on_nack(self, event: MqttEvent) -> None:
        nack = self._decode(event, Nack)
        lease = self._lease_for(event, nack)
        self.mqtt.ack(event)
        if nack is None or lease is None:
            return
        self.leases.end(lease.epoch)
        self.metrics.redelivered.labels("nack").inc()
        self._requeue(
            lease.task,
            nack.reason.value,
            lease.vehicle_id,
            nack.detail,
            counts=nack.reason.counts_as_failure,
            terminal=nack.reason.terminal,
            backoff=nack.reason is NackReason.KERNEL_ERROR,
        )

    def _on_heartbeat(self, event: MqttEvent) -> None:
        beat = self._decode(event, LeaseHeartbeat)
        lease = self._lease_for(event, beat)
        self.mqtt.ack(event)
        if lease is not None:
            self.leases.extend(lease.epoch, self.settings.lease_seconds)
            self.vehicles.heard(event.vehicle_id)

    _handlers: ClassVar[dict[str, Callable[[Gateway, MqttEvent], None]]] = {
        "pull": _on_pull,
        "status": _on_status,
        "result": _on_result,
        "nack": _on_nack,
        "heartbeat": _on_heartbeat,
    }

    def _decode(self, event: MqttEvent, kind: type[M]) -> M | None:
        try:
            return decode(event.payload, kind)
        except DecodeError as exc:
            self.metrics.dropped.labels(f"mqtt_{event.kind}", exc.reason).inc()
            self._log.warning(
                "mqtt_malformed", kind=event.kind, vehicle_id=event.vehicle_id, reason=str(exc)
            )
            return None

    def _lease_for(
        self, event: MqttEvent, message: Result | Nack | LeaseHeartbeat | None
    ) -> Lease | None:
        """The lease a message speaks for, or None when it is stale or forged (fencing)."""
        if message is None:
            return None
        lease = self.leases.get(message.epoch)
        valid = (
            lease is not None
            and message.vehicle_id == event.vehicle_id == lease.vehicle_id
            and message.gateway_id == self.settings.gateway_id
            and lease.task.task.key == (message.job_id, message.chunk_id)
        )
        if not valid:
            self.metrics.dropped.labels(f"mqtt_{event.kind}", "stale_or_fenced").inc()
            self._log.info(
                "stale_message_dropped",
                kind=event.kind,
                vehicle_id=event.vehicle_id,
                epoch=message.epoch,
                job_id=message.job_id,
                chunk_id=message.chunk_id,
            )
            return None
        return lease

    # ---------------------------------------------------------------- dispatch and leases

    def _dispatch(self) -> None:
        # One task per hungry vehicle per turn, longest-waiting first; bounded by the
        # hungry count, so an empty queue costs nothing however large the fleet is.
        for _ in range(self.vehicles.hungry_count()):
            if not len(self.ready):
                return
            view = self.vehicles.first_hungry()
            available = view.credits - self.leases.count_after(view.vehicle_id, view.seen_epoch)
            if available > 0 and self._send_one(view):
                available -= 1
            self.vehicles.served(view.vehicle_id, available > 0)

    def _send_one(self, view: VehicleView) -> bool:
        task = self._next_dispatchable(self._fit_for(view))
        if task is None:
            if len(self.ready):
                self.metrics.dispatch_skipped.labels(_skip_reason(view)).inc()
            return False
        inputs_key = self._inputs_key_for(task, view)
        if inputs_key is None:
            return False
        vehicle_id = view.vehicle_id
        lease = self.leases.grant(vehicle_id, task, self.settings.lease_seconds)
        task.dispatches += 1
        task.state = TaskState.LEASED
        assignment = Assignment(
            gateway_id=self.settings.gateway_id,
            vehicle_id=vehicle_id,
            epoch=lease.epoch,
            attempt=task.dispatches,
            lease_deadline=time.time() + self.settings.lease_seconds,
            task=task.raw,
            inputs_key=inputs_key,
        )
        if self.signer is not None:
            assignment = self.signer.sign(assignment)
        self.mqtt.send_assignment(vehicle_id, encode(assignment), self.settings.lease_seconds)
        self.metrics.tasks.labels("dispatched").inc()
        self._log.debug(
            "task_dispatched", **task.log_context(), vehicle_id=vehicle_id, epoch=lease.epoch
        )
        self.metrics.queue_wait.observe(lease.dispatched_at - task.queued_at)
        self.metrics.dispatch.observe(lease.dispatched_at - max(task.queued_at, view.asked_at))
        return True

    @staticmethod
    def _fit_for(view: VehicleView) -> Callable[[PendingTask], bool] | None:
        """Only tasks that should finish before the car leaves, and confidential ones only
        for a car that can open them; None when any task will do."""
        can_open = _can_open(view)
        if view.dwell_s <= 0 and can_open:
            return None
        now = time.monotonic()
        return lambda task: (
            (can_open or not task.task.confidential) and view.fits(task.task.cost_gflop, now)
        )

    def _inputs_key_for(self, task: PendingTask, view: VehicleView) -> bytes | None:
        """A confidential task's data key sealed to this car (b"" for any other task);
        None when no key of ours opens it, and the task is dead-lettered."""
        if not task.task.confidential:
            return b""
        assert view.capabilities is not None  # _fit_for gives sealed work only to such cars
        try:
            return self.box.rewrap(task.task, view.capabilities.box_key)
        except DecodeError as exc:
            task.state = TaskState.FINISHING
            self.log.dead_letter(task.tp, task.offset, task.raw, exc.reason, exc.detail, task)
            return None

    def _next_dispatchable(
        self, accept: Callable[[PendingTask], bool] | None = None
    ) -> PendingTask | None:
        """The next ready task, checking cancellation and deadline at dispatch time."""
        while (task := self.ready.pop(accept)) is not None:
            if task.task.job_id in self.cancelled:
                self._skip_cancelled(task)
            elif task.task.deadline < time.time():
                self.log.dead_letter(
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

    def _sweep(self) -> None:
        now = time.monotonic()
        for lease in self.leases.pop_expired(now):
            self.metrics.redelivered.labels("lease_expired").inc()
            self._log.info(
                "lease_expired",
                **lease.task.log_context(),
                vehicle_id=lease.vehicle_id,
                epoch=lease.epoch,
            )
            self._requeue(lease.task, "lease_expired", lease.vehicle_id, "", counts=True)
        for task in self.delayed.pop_due(now):
            if self.log.owns(task.tp):
                self.ready.push_front(task)
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        self.mqtt.announce(GatewayState.ONLINE, queued=len(self.ready) + len(self.delayed))
        for vehicle_id in self.vehicles.silent_since(now - self.settings.vehicle_silence_s):
            self._release_vehicle(vehicle_id, "vehicle_offline", "no heartbeat")
            self.vehicles.forget(vehicle_id)
        self._observe()

    def _release_vehicle(
        self, vehicle_id: str, cause: str, detail: str, *, counts: bool = True
    ) -> None:
        for lease in self.leases.of_vehicle(vehicle_id):
            self.leases.end(lease.epoch)
            self.metrics.redelivered.labels(cause).inc()
            self._requeue(lease.task, cause, vehicle_id, detail, counts=counts)

    def _requeue(
        self,
        task: PendingTask,
        reason: str,
        vehicle_id: str,
        detail: str,
        *,
        counts: bool,
        terminal: bool = False,
        backoff: bool = False,
    ) -> None:
        if not self.log.owns(task.tp):
            return  # partition revoked: its new owner has the task
        task.history.append(AttemptRecord(vehicle_id, reason, time.time(), detail[:512]))
        task.failures += int(counts)
        if counts:
            self.metrics.tasks.labels("failed").inc()
            self.metrics.failures.labels(reason).inc()
        self._log.info(
            "task_requeued",
            **task.log_context(),
            vehicle_id=vehicle_id,
            reason=reason,
            failures=task.failures,
        )
        if terminal or task.failures >= self.settings.max_attempts:
            task.state = TaskState.FINISHING
            self.log.dead_letter(
                task.tp,
                task.offset,
                task.raw,
                reason,
                detail or f"failed {task.failures} times",
                task,
            )
            return
        task.state = TaskState.QUEUED
        if backoff:
            self.delayed.push(task, compute_backoff(task.failures))
        else:
            self.ready.push_front(task)

    # ---------------------------------------------------------------- observability

    def _observe(self) -> None:
        """Once a second, not every step: the fleet and partition figures take full passes."""
        fleet = self.fleet.count(self.vehicles.views(), self.leases.holds, self._available)
        partitions = self.log.stats()
        for p in partitions:
            label = str(p.partition)
            self.metrics.window_used.labels(label).set(p.window_used)
            self.metrics.window_size.labels(label).set(p.window_size)
            self.metrics.committed.labels(label).set(p.committed)
            self.metrics.lag.labels(label).set(p.lag)
            if p.end >= 0:
                self.metrics.end_offset.labels(label).set(p.end)
        ready, _ = self.readiness()
        self.metrics.ready.set(1 if ready else 0)
        reconnects = self.mqtt.reconnects
        self.metrics.mqtt_reconnects.inc(max(0, reconnects - self._reconnects_counted))
        self._reconnects_counted = reconnects
        self._snapshot = status_snapshot(self, ready, partitions, fleet)

    def _available(self, view: VehicleView) -> int:
        if view.credits <= 0:
            return 0
        return view.credits - self.leases.count_after(view.vehicle_id, view.seen_epoch)

    def status_snapshot(self) -> Mapping[str, Any]:
        """The latest ``/status`` JSON, built on the loop thread; safe from any thread."""
        return self._snapshot

    def _update_gauges(self) -> None:
        self.metrics.leases.set(len(self.leases))
        self.metrics.queued.set(len(self.ready) + len(self.delayed))
        self.metrics.paused.set(len(self.log.paused))


def _can_open(view: VehicleView) -> bool:
    """Whether the car announced a box key, so it can be sent confidential tasks."""
    return bool(view.capabilities and view.capabilities.box_key)


def _skip_reason(view: VehicleView) -> str:
    return "dwell" if _can_open(view) else "no_box_key"
