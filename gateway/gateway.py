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

This module holds the loop and wires the parts: what each vehicle message does is
``gateway.handlers``, who gets which task is ``gateway.dispatch``, how a task ends is
``gateway.outcomes``, and the Kafka side is ``gateway.tasklog``. Each part is handed
the few pieces of state it needs, not the gateway, so none of them imports this module.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from parkpool.gateway.cancels import CancelledJobs
from parkpool.gateway.dispatch import Dispatcher
from parkpool.gateway.fleet_stats import FleetCounts, FleetStats
from parkpool.gateway.handlers import VehicleHandlers
from parkpool.gateway.leases import LeaseTable
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.mqtt_link import MqttLink
from parkpool.gateway.outcomes import TaskOutcomes
from parkpool.gateway.retry import DelayQueue
from parkpool.gateway.settings import GatewaySettings
from parkpool.gateway.status import status_snapshot
from parkpool.gateway.tasklog import TP, CancelRecord, TaskLog
from parkpool.gateway.tasks import PendingTask, ReadyQueue
from parkpool.gateway.vehicles import VehicleBook
from parkpool.runtime import logs
from parkpool.runtime.reputation import ReputationBook, ReputationReader
from parkpool.schemas import GatewayState, KafkaTopics, MqttTopics

__all__ = ["Gateway", "GatewaySettings"]

log = logs.get_logger("parkpool.gateway")


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
            window_span=settings.window_span,
            session_timeout_ms=settings.session_timeout_ms,
            metrics=self.metrics,
            on_revoked=self._drop_partitions,
            overrides=dict(settings.kafka_overrides),
            fetch_wait_ms=settings.task_fetch_wait_ms,
        )
        self.leases = LeaseTable()
        self.reputation = ReputationBook(tallies=False)  # who is quarantined, nothing more
        self.vehicles = VehicleBook(
            settings.gateway_id, settings.kernel_grace_s, self.reputation.quarantined
        )
        self.fleet = FleetStats(self.metrics.registry)
        self._snapshot: Mapping[str, Any] = {"gateway_id": settings.gateway_id, "ready": False}
        self._reconnects_counted = 0
        self._sent_counted: dict[str, int] = {}
        self._observed_partitions: set[str] = set()  # those with per-partition series
        self._fleet = FleetCounts(0, {}, {}, 0, 0.0, 0.0)  # the last completed census
        self.ready = ReadyQueue()
        self.delayed: DelayQueue[PendingTask] = DelayQueue()
        self.cancelled = CancelledJobs()
        self.stopping = threading.Event()
        self.last_step = time.monotonic()
        self._draining = False
        self._last_sweep = 0.0
        self._idle_since: float | None = None  # no car and no lease since then
        self.events = log.bind(gateway_id=settings.gateway_id)
        self.outcomes = TaskOutcomes(
            max_attempts=settings.max_attempts,
            shun_s=settings.lease_seconds,
            log=self.log,
            leases=self.leases,
            ready=self.ready,
            delayed=self.delayed,
            metrics=self.metrics,
            events=self.events,
        )
        self.handlers = VehicleHandlers(
            settings,
            vehicles=self.vehicles,
            leases=self.leases,
            fleet=self.fleet,
            mqtt=self.mqtt,
            log=self.log,
            outcomes=self.outcomes,
            metrics=self.metrics,
            events=self.events,
        )
        self._reputation_reader: ReputationReader | None = None
        self.dispatcher = Dispatcher(
            settings,
            reputation=self.reputation,
            vehicles=self.vehicles,
            ready=self.ready,
            leases=self.leases,
            cancelled=self.cancelled,
            mqtt=self.mqtt,
            outcomes=self.outcomes,
            metrics=self.metrics,
            events=self.events,
        )

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Subscribe on MQTT first: no task is consumed before results can come back."""
        self._start_store()
        self.mqtt.start()
        # Quarantines first: a car caught lying must not get work from a fresh gateway.
        self._reputation_reader = ReputationReader(
            self.settings.kafka, KafkaTopics(self.settings.namespace).reputation, self.reputation
        )
        self._reputation_reader.start()
        self._reputation_reader.caught_up.wait(10)
        self.log.open()
        self.events.info("gateway_started", group=self.settings.group)

    def _start_store(self) -> None:
        """Warn of plain-HTTP URLs for cars, and renew the store's credentials on a thread
        of their own, never the loop's."""
        store = self.dispatcher.store
        if store is None:
            return
        if store.conn.urls_in_clear:
            self.events.warning(
                "store_urls_in_clear",
                endpoint=store.conn.public_endpoint or store.conn.endpoint,
                detail="cars get plain-HTTP presigned URLs: use https:// in production",
            )
        refreshes = self.metrics.store_credential_refreshes
        store.start(lambda outcome: refreshes.labels(outcome).inc())

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
        # A draining gateway dispatches nothing more: reading on would only take in
        # tasks for the next owner to read again. (Nor does it read cancels then: the
        # leases left when the drain ends are revoked anyway.)
        self.log.flow(starving=self._draining or self._starving() or self._holding_enough())
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
        revoked = self.leases.all()
        for lease in revoked:
            self.leases.end(lease.epoch)
            self.mqtt.send_revoke(lease.vehicle_id, lease.epoch, "gateway_shutdown")
        self.events.info("gateway_drained", revoked=len(revoked))

    def shutdown(self, timeout: float = 10.0) -> None:
        self.events.info("gateway_stopping", leases=len(self.leases))
        self.log.close(timeout)
        self.mqtt.stop()
        if self._reputation_reader is not None:
            self._reputation_reader.stop()
        if self.dispatcher.store is not None:
            self.dispatcher.store.stop()
        self.events.info("gateway_stopped")

    @property
    def draining(self) -> bool:
        return self._draining

    def health(self) -> tuple[bool, Mapping[str, Any]]:
        """Alive while the loop keeps turning."""
        stalled = time.monotonic() - self.last_step
        return stalled < 10.0, {"loop_stalled_s": round(stalled, 3)}

    def readiness(self) -> tuple[bool, Mapping[str, Any]]:
        """Ready when MQTT is subscribed and Kafka partitions are assigned (or, with no
        car to serve, when it stands by outside the task group on purpose)."""
        details = {
            "mqtt_subscribed": self.mqtt.subscribed.is_set() and self.mqtt.connected,
            "partitions": len(self.log.windows),
            "standby": self.log.standby,
            "draining": self._draining,
        }
        consuming = bool(details["partitions"]) or self.log.standby
        ok = bool(details["mqtt_subscribed"]) and consuming
        return ok and not self._draining, details

    # ---------------------------------------------------------------- Kafka side

    def _consume(self) -> bool:
        items = self.log.poll(self.settings.batch)
        for item in items:
            if isinstance(item, CancelRecord):
                self._cancel_guarded(item)
            elif self.cancelled.covers(item.task):
                self.outcomes.skip_cancelled(item)
            else:
                self.ready.push(item)
        return bool(items)

    def _drop_partitions(self, gone: set[TP]) -> None:
        """Partitions revoked or lost: their tasks and leases belong to the next owner."""
        self.ready.remove_where(lambda t: t.tp in gone)
        self.delayed.remove_where(lambda t: t.tp in gone)
        for lease in self.leases.where(lambda lease: lease.task.tp in gone):
            self.leases.end(lease.epoch)

    def _holding_enough(self) -> bool:
        """The gateway-wide bound on tasks read and not finished, whatever the number of
        partitions it owns: what bounds its memory (tasks x record size)."""
        held = len(self.ready) + len(self.delayed) + len(self.leases)
        return held >= self.settings.max_in_flight

    def _starving(self) -> bool:
        """Work is piling up and nobody asks for it: stop reading more."""
        return len(self.ready) >= 64 and not self.vehicles.any_hungry()

    # ---------------------------------------------------------------- cancel

    def _cancel_guarded(self, record: CancelRecord) -> None:
        """A cancel whose handling fails is counted and still finished: re-reading it after
        every restart would fail the same way."""
        try:
            self._cancel(record)
        except Exception:
            self.metrics.handler_errors.labels("kafka_cancel").inc()
            self.events.exception("cancel_handler_failed", job_id=record.cancel.job_id)
        self.log.finish(record.tp, record.offset)

    def _cancel(self, record: CancelRecord) -> None:
        job_id = record.cancel.job_id
        self.cancelled.add(record.cancel)
        covered = self.cancelled.covers
        for task in self.ready.remove_where(lambda t: covered(t.task)):
            self.outcomes.skip_cancelled(task)
        for task in self.delayed.remove_where(lambda t: covered(t.task)):
            self.outcomes.skip_cancelled(task)
        for lease in self.leases.where(lambda lease: covered(lease.task.task)):
            self.leases.end(lease.epoch)
            self.mqtt.send_revoke(lease.vehicle_id, lease.epoch, "job_cancelled")
            self.vehicles.wake(lease.vehicle_id)  # it drops the task: its slot is free
            self.outcomes.skip_cancelled(lease.task)
        self.events.info("job_cancelled", job_id=job_id, partition=record.tp[1])

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
            self.outcomes.requeue(lease.task, "lease_expired", lease.vehicle_id, "", counts=True)
            # Its slot is free again: a car that stays silent is dropped by the silence
            # check, but one whose answer was refused would otherwise wait for a pull it
            # has no reason to send.
            self.vehicles.wake(lease.vehicle_id)
        for task in self.delayed.pop_due(now):
            if self.log.owns(task.tp):
                self.ready.push_front(task)
        self.vehicles.wake_due(now)
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        self.mqtt.announce(GatewayState.ONLINE)  # once, and again after a broker restart
        for vehicle_id in self.vehicles.silent_since(now - self.settings.vehicle_silence_s):
            self.outcomes.release_vehicle(vehicle_id, "vehicle_offline", "no heartbeat")
            self.vehicles.forget(vehicle_id)
        self._stand_by_or_join(now)
        self._observe()

    def _stand_by_or_join(self, now: float) -> None:
        """A gateway with no car to serve leaves the task group, so that its partitions
        go to gateways that have cars, and joins again when a car turns up: a cell
        without cars never holds work hostage."""
        idle = not len(self.vehicles) and not len(self.leases) and not self._draining
        if not idle:
            self._idle_since = None
            if self.log.standby and not self._draining:
                self.events.info("gateway_joining", vehicles=len(self.vehicles))
                self.log.join()
            return
        if self._idle_since is None:
            self._idle_since = now
        if not self.log.standby and now - self._idle_since >= self.settings.standby_after_s:
            self.events.info("gateway_standing_by", idle_s=round(now - self._idle_since, 1))
            self.log.leave()

    # ---------------------------------------------------------------- observability

    def _observe(self) -> None:
        """Once a second, not every step: the partition figures and the fleet census take
        work (the census a bounded slice of the cars each time)."""
        census = self.fleet.census(
            self.vehicles.views, self.leases.holds, self.dispatcher.available
        )
        self._fleet = census or self._fleet
        fleet = self._fleet
        partitions = self.log.stats()
        owned = {str(p.partition) for p in partitions}
        self.metrics.forget_partitions(self._observed_partitions - owned)
        self._observed_partitions = owned
        for p in partitions:
            label = str(p.partition)
            self.metrics.window_used.labels(label).set(p.window_used)
            self.metrics.window_size.labels(label).set(p.window_size)
            self.metrics.window_span.labels(label).set(p.window_span)
            self.metrics.window_max_span.labels(label).set(p.window_max_span)
            self.metrics.committed.labels(label).set(p.committed)
            self.metrics.lag.labels(label).set(p.lag)
            if p.end >= 0:
                self.metrics.end_offset.labels(label).set(p.end)
        ready, _ = self.readiness()
        self.metrics.ready.set(1 if ready else 0)
        for kind, sent in self.mqtt.sent.items():
            before = self._sent_counted.get(kind, 0)
            self.metrics.mqtt_messages.labels("out", kind).inc(sent - before)
            self._sent_counted[kind] = sent
        self.handlers.count_evictions()
        reconnects = self.mqtt.reconnects
        self.metrics.mqtt_reconnects.inc(max(0, reconnects - self._reconnects_counted))
        self._reconnects_counted = reconnects
        self._snapshot = status_snapshot(
            self.settings.gateway_id,
            ready=ready,
            draining=self._draining,
            queue=self.ready,
            delayed=len(self.delayed),
            leases=self.leases,
            partitions=partitions,
            fleet=fleet,
            standby=self.log.standby,
            cell=self.settings.cell,
        )

    def status_snapshot(self) -> Mapping[str, Any]:
        """The latest ``/status`` JSON, built on the loop thread; safe from any thread."""
        return self._snapshot

    def _update_gauges(self) -> None:
        self.metrics.leases.set(len(self.leases))
        self.metrics.quarantined.set(self.reputation.quarantined_count())
        self.metrics.queued.set(len(self.ready) + len(self.delayed))
        self.metrics.paused.set(len(self.log.paused))
