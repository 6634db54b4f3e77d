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

This module holds the loop, the Kafka side, cancels, retries and the figures; what each
vehicle message does is ``gateway.handlers``, and who gets which task is
``gateway.dispatch``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from parkpool.gateway.cancels import CancelledJobs
from parkpool.gateway.dispatch import Dispatcher
from parkpool.gateway.fleet_stats import FleetStats
from parkpool.gateway.handlers import VehicleHandlers
from parkpool.gateway.leases import LeaseTable
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.mqtt_link import MqttLink
from parkpool.gateway.retry import DelayQueue
from parkpool.gateway.status import status_snapshot
from parkpool.gateway.tasklog import TP, CancelRecord, TaskLog
from parkpool.gateway.tasks import PendingTask, ReadyQueue, TaskState
from parkpool.gateway.vehicles import VehicleBook, VehicleView
from parkpool.runtime.backoff import compute_backoff
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import (
    AttemptRecord,
    GatewayState,
    KafkaTopics,
    MqttTopics,
)

log = structlog.get_logger("parkpool.gateway")


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
        self._snapshot: Mapping[str, Any] = {"gateway_id": settings.gateway_id, "ready": False}
        self._reconnects_counted = 0
        self.ready = ReadyQueue()
        self.delayed = DelayQueue()
        self.cancelled = CancelledJobs()
        self.stopping = threading.Event()
        self.last_step = time.monotonic()
        self._draining = False
        self._last_sweep = 0.0
        self.events = log.bind(gateway_id=settings.gateway_id)
        self.handlers = VehicleHandlers(self)
        self.dispatcher = Dispatcher(self)

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Subscribe on MQTT first: no task is consumed before results can come back."""
        self.mqtt.start()
        self.log.open()
        self.events.info("gateway_started", group=self.settings.group)

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
            self.dispatcher.dispatch()
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
        self.events.info("gateway_drained", revoked=len(self.leases))

    def shutdown(self, timeout: float = 10.0) -> None:
        self.events.info("gateway_stopping", leases=len(self.leases))
        self.log.close(timeout)
        self.mqtt.stop()
        self.events.info("gateway_stopped")

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
                self.skip_cancelled(item)
            else:
                self.ready.push(item)
        return bool(items)

    def _drop_partitions(self, gone: set[TP]) -> None:
        """Partitions revoked or lost: their tasks and leases belong to the next owner."""
        self.ready.remove_where(lambda t: t.tp in gone)
        self.delayed.remove_where(lambda t: t.tp in gone)
        for lease in self.leases.where(lambda lease: lease.task.tp in gone):
            self.leases.end(lease.epoch)

    def finish(self, task: PendingTask) -> None:
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
            self.skip_cancelled(task)
        for task in self.delayed.remove_where(lambda t: t.task.job_id == job_id):
            self.skip_cancelled(task)
        for lease in self.leases.where(lambda lease: lease.task.task.job_id == job_id):
            self.leases.end(lease.epoch)
            self.mqtt.send_revoke(lease.vehicle_id, lease.epoch, "job_cancelled")
            self.skip_cancelled(lease.task)
        self.log.finish(record.tp, record.offset)
        self.events.info("job_cancelled", job_id=job_id, partition=record.tp[1])

    def skip_cancelled(self, task: PendingTask) -> None:
        self.metrics.tasks.labels("cancelled").inc()
        self.finish(task)

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
        self.handlers.handle(event)

    def _drain_mqtt(self, limit: int = 512) -> bool:
        handled = 0
        while handled < limit:
            try:
                event = self.mqtt.events.get_nowait()
            except queue.Empty:
                break
            handled += 1
            self.handlers.handle(event)
        return handled > 0

    # ---------------------------------------------------------------- leases

    def _sweep(self) -> None:
        now = time.monotonic()
        for lease in self.leases.pop_expired(now):
            self.metrics.redelivered.labels("lease_expired").inc()
            self.events.info(
                "lease_expired",
                **lease.task.log_context(),
                vehicle_id=lease.vehicle_id,
                epoch=lease.epoch,
            )
            self.requeue(lease.task, "lease_expired", lease.vehicle_id, "", counts=True)
        for task in self.delayed.pop_due(now):
            if self.log.owns(task.tp):
                self.ready.push_front(task)
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        self.mqtt.announce(GatewayState.ONLINE, queued=len(self.ready) + len(self.delayed))
        for vehicle_id in self.vehicles.silent_since(now - self.settings.vehicle_silence_s):
            self.release_vehicle(vehicle_id, "vehicle_offline", "no heartbeat")
            self.vehicles.forget(vehicle_id)
        self._observe()

    def release_vehicle(
        self, vehicle_id: str, cause: str, detail: str, *, counts: bool = True
    ) -> None:
        for lease in self.leases.of_vehicle(vehicle_id):
            self.leases.end(lease.epoch)
            self.metrics.redelivered.labels(cause).inc()
            self.requeue(lease.task, cause, vehicle_id, detail, counts=counts)

    def requeue(
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
        self.events.info(
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
        fleet = self.fleet.count(self.vehicles.views(), self.leases.holds, self.available)
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

    def available(self, view: VehicleView) -> int:
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
