# SPDX-License-Identifier: Apache-2.0
"""What a gateway does with each message a vehicle sends: pulls, statuses, results,
nacks and lease heartbeats.

Each message is rate limited per vehicle, decoded strictly, and fenced against the lease
it quotes. Anything refused is acknowledged, counted with a reason and dropped, so a
hostile car costs a counter increment, never a stalled loop or another car's task.

Every message is acknowledged in ``handle`` and nowhere else, but for a result on its
way to Kafka: that one is acknowledged from its delivery report, the middle of the ack
chain. A handler that raises is counted by kind and its message still acknowledged, so
that the broker does not hand it back after every restart of the gateway.
Runs on the gateway's loop thread, like everything that touches its state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import KafkaError

from parkpool.gateway.fleet_stats import FleetStats
from parkpool.gateway.leases import Lease, LeaseTable
from parkpool.gateway.metrics import GatewayMetrics
from parkpool.gateway.mqtt_link import MqttEvent, MqttLink
from parkpool.gateway.outcomes import TaskOutcomes
from parkpool.gateway.ratelimit import RateLimiter
from parkpool.gateway.settings import GatewaySettings
from parkpool.gateway.tasklog import TaskLog
from parkpool.gateway.tasks import PendingTask, TaskState
from parkpool.gateway.vehicles import VehicleBook
from parkpool.runtime.kafka import record_size
from parkpool.runtime.logs import Logger
from parkpool.runtime.signing import VehicleKeys
from parkpool.schemas import (
    DecodeError,
    LeaseHeartbeat,
    Nack,
    NackReason,
    PullRequest,
    Result,
    TaskChunk,
    VehicleState,
    VehicleStatus,
    decode,
)
from parkpool.schemas.kernels import BUILTIN

M = TypeVar("M")

Handler = Callable[[MqttEvent], bool]  # True: the message was handed on, acked later


class VehicleHandlers:
    """One handler per MQTT message kind, with the per-vehicle limits in front of them."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        vehicles: VehicleBook,
        leases: LeaseTable,
        fleet: FleetStats,
        mqtt: MqttLink,
        log: TaskLog,
        outcomes: TaskOutcomes,
        metrics: GatewayMetrics,
        events: Logger,
    ) -> None:
        self.settings = settings
        self.vehicles = vehicles
        self.leases = leases
        self.fleet = fleet
        self.mqtt = mqtt
        self.log = log
        self.outcomes = outcomes
        self.metrics = metrics
        self.events = events
        self.vehicle_keys = VehicleKeys(settings.vehicle_keys) if settings.vehicle_keys else None
        # Sized by the cars this gateway serves, so that its limits hold for all of them.
        keys = 2 * settings.max_vehicles
        self._limits = {
            "pull": RateLimiter(settings.pull_rate, burst=2 * settings.pull_rate, max_keys=keys),
            "result": RateLimiter(
                settings.result_rate, burst=2 * settings.result_rate, max_keys=keys
            ),
            # Statuses come every 15 s, wills once per lost connection: the pull limit is
            # far above both, and keeps a car from flooding its gateways with them.
            "status": RateLimiter(settings.pull_rate, burst=2 * settings.pull_rate, max_keys=keys),
        }
        # A lease's heartbeats and its nack share the result limit: an honest car sends
        # one of the three per lease now and then, a flood of any costs a counter.
        self._limit_of = {
            "pull": "pull",
            "result": "result",
            "heartbeat": "result",
            "nack": "result",
            "status": "status",
            "will": "status",
        }
        self._evicted: dict[str, tuple[int, int]] = {}  # kind -> (lossy, all) counted
        self._handlers: dict[str, Handler] = {
            "pull": self._on_pull,
            "status": self._on_status,
            "will": self._on_will,
            "result": self._on_result,
            "nack": self._on_nack,
            "heartbeat": self._on_heartbeat,
        }

    def count_evictions(self) -> None:
        """Fold the rate limiters' evictions into their counter (once a second)."""
        for kind, limiter in self._limits.items():
            lossy, counted = self._evicted.get(kind, (0, 0))
            self.metrics.ratelimit_evictions.labels(kind, "true").inc(
                limiter.lossy_evictions - lossy
            )
            harmless = (limiter.evictions - limiter.lossy_evictions) - (counted - lossy)
            self.metrics.ratelimit_evictions.labels(kind, "false").inc(harmless)
            self._evicted[kind] = (limiter.lossy_evictions, limiter.evictions)

    def handle(self, event: MqttEvent) -> None:
        """Handle one message, then acknowledge it, whatever happened."""
        handed_on = False
        try:
            handed_on = self._route(event)
        except Exception:
            kind = event.kind if event.kind in self._handlers else "unknown"
            self.metrics.handler_errors.labels(f"mqtt_{kind}").inc()
            self.events.exception("message_handler_failed", kind=kind, vehicle_id=event.vehicle_id)
        if not handed_on:
            self.mqtt.ack(event)

    def _route(self, event: MqttEvent) -> bool:
        handler = self._handlers.get(event.kind)
        if handler is None:
            self.metrics.dropped.labels("mqtt", "unknown_topic").inc()
            return False
        self.metrics.mqtt_messages.labels("in", event.kind).inc()
        limiter = self._limits.get(self._limit_of.get(event.kind, ""))
        if limiter is not None and not limiter.allow(event.vehicle_id, time.monotonic()):
            self.metrics.dropped.labels(f"mqtt_{event.kind}", "rate_limited").inc()
            return False
        return handler(event)

    def _on_pull(self, event: MqttEvent) -> bool:
        pull = self._decode(event, PullRequest)
        if pull is None:
            return False
        if pull.vehicle_id != event.vehicle_id:
            self.metrics.dropped.labels("mqtt_pull", "vehicle_mismatch").inc()
            return False
        view = self.vehicles.on_pull(pull)
        self.leases.quoted(view.seen_epoch)
        return False

    def _on_status(self, event: MqttEvent) -> bool:
        status = self._decode(event, VehicleStatus)
        if status is None:
            return False
        if status.vehicle_id != event.vehicle_id:
            self.metrics.dropped.labels("mqtt_status", "vehicle_mismatch").inc()
            return False
        view = self.vehicles.set_state(status.vehicle_id, status.state)
        self.fleet.heard(view, status, will=event.kind == "will")
        if status.state is VehicleState.OFFLINE:
            self.outcomes.release_vehicle(status.vehicle_id, "vehicle_offline", status.reason)
        elif status.state is VehicleState.SUSPENDED:
            # A policy stopped the car (owner, battery, heat): not the task's fault.
            self.outcomes.release_vehicle(
                status.vehicle_id, "vehicle_offline", status.reason, counts=False
            )
        return False

    def _on_will(self, event: MqttEvent) -> bool:
        """Every gateway of the cell hears each last will; only one of its own cars, or
        one holding its leases, concerns this one (no state for the others)."""
        known = self.vehicles.get(event.vehicle_id) or self.leases.holds(event.vehicle_id)
        return self._on_status(event) if known else False

    def _on_result(self, event: MqttEvent) -> bool:
        result = self._decode(event, Result)
        lease = self._lease_for(event, result)
        if lease is None and result is not None and self._own_late_result(event, result):
            # The lease ended here while the car kept working (its partition went to
            # another gateway, which sends no revoke): its slot counted as free, but the
            # car was not put back among those to serve or tell, as it is now. A repeat
            # of a result already taken does the same, harmlessly.
            self.vehicles.wake(event.vehicle_id)
        if lease is None or result is None or not self._signed_by_its_vehicle(result):
            return False
        if not _answers(result, lease.task.task):
            # The SDK takes a result as its submission's by these (a job id may be
            # submitted again); a car must not make a chunk vanish by misnaming them.
            self._refuse_result(result, "misnamed_submission")
            return False
        if lease.task.task.reply_key and not result.sealed:
            # The producer asked for sealed results: outputs in clear must not reach Kafka.
            # Dropped like a forgery, leaving the lease for a correct answer or its expiry.
            self._refuse_result(result, "unsealed_result")
            return False
        chunk = lease.task.task
        self.leases.end(lease.epoch)
        self.vehicles.heard(event.vehicle_id).fetch_failures = 0  # the store serves it
        self.vehicles.wake(event.vehicle_id)  # its slot is free: refill without a pull
        if record_size(event.payload, chunk.job_id) > self.settings.kafka.max_record_bytes:
            # Kafka will never take it; another car may answer smaller (a padded result),
            # and a job whose answers are all this large ends in the dead-letter topic.
            self._refuse_result(result, "result_too_large")
            detail = f"{len(event.payload):,}-byte result is over the Kafka record limit"
            self.outcomes.requeue(
                lease.task, "result_too_large", lease.vehicle_id, detail, counts=True
            )
            return False
        lease.task.state = TaskState.FINISHING
        seconds = result.exec_seconds
        self.log.produce(
            chunk.reply_topic,
            event.payload,
            chunk.job_id,
            lambda err: self._result_delivered(err, lease, event, seconds),
        )
        return True

    def _refuse_result(self, result: Result, reason: str) -> None:
        self.metrics.dropped.labels("mqtt_result", reason).inc()
        self.events.warning(
            "result_refused", reason=reason, vehicle_id=result.vehicle_id, epoch=result.epoch
        )

    def _result_delivered(
        self, err: KafkaError | None, lease: Lease, event: MqttEvent, exec_seconds: float
    ) -> None:
        """The ack chain's middle: the result is durable (or not), then the car's PUBACK."""
        task = lease.task
        self.mqtt.ack(event)
        if err is not None:
            # Not durable: redoing the task is the way to get its result into Kafka.
            self.metrics.delivery_errors.labels("results").inc()
            self.events.error("result_not_durable", job_id=task.task.job_id, error=str(err))
            # A refusal Kafka will repeat (a result too large, say) counts as an attempt, so
            # such a task ends in the dead-letter topic instead of being redone for ever;
            # one it may not repeat (a broker outage) waits a backoff before the next car.
            permanent = not err.retriable()
            self.outcomes.requeue(
                task,
                "delivery_failed",
                lease.vehicle_id,
                str(err),
                counts=permanent,
                backoff=not permanent,
            )
            return
        self.metrics.tasks.labels("completed").inc()
        self.metrics.execution.observe(time.monotonic() - lease.dispatched_at)
        self.metrics.end_to_end.observe(max(0.0, time.time() - task.task.created_at))
        kernel = task.task.kernel if task.task.kernel in BUILTIN else "other"
        self.metrics.kernel_execution.labels(kernel).observe(exec_seconds)
        self.outcomes.finish(task)
        self.events.debug(
            "task_completed", **task.log_context(), vehicle_id=lease.vehicle_id, epoch=lease.epoch
        )

    def _signed_by_its_vehicle(self, result: Result) -> bool:
        """With enrolled keys, a result counts only if its car signed it; a forgery leaves
        the lease alone, so the real car's result can still come."""
        if self.vehicle_keys is None:
            return True
        refusal = self.vehicle_keys.check(result)
        if refusal is not None:
            self._refuse_result(result, refusal)
            return False
        return True

    def _on_nack(self, event: MqttEvent) -> bool:
        nack = self._decode(event, Nack)
        lease = self._lease_for(event, nack)
        if nack is None or lease is None:
            return False
        self.leases.end(lease.epoch)
        if nack.reason is NackReason.FETCH_FAILED:
            self.vehicles.fetch_failed(event.vehicle_id, time.monotonic())
        elif nack.reason.frees_slot:
            self.vehicles.wake(event.vehicle_id)
        self.metrics.redelivered.labels("nack").inc()
        self.outcomes.requeue(
            lease.task,
            nack.reason.value,
            lease.vehicle_id,
            nack.detail,
            counts=nack.reason.counts_as_failure,
            shun=True,  # even uncounted: a car must not nack its way to keeping a task
            terminal=nack.reason.terminal and _confirmed(lease.task, lease.vehicle_id, nack.reason),
            backoff=nack.reason is NackReason.KERNEL_ERROR,
        )
        return False

    def _on_heartbeat(self, event: MqttEvent) -> bool:
        beat = self._decode(event, LeaseHeartbeat)
        lease = self._lease_for(event, beat)
        if lease is None:
            return False
        self.vehicles.heard(event.vehicle_id)
        # Past the job's deadline the result is of no use: the lease runs out, and the
        # task is dead-lettered when it comes back. Otherwise heartbeats keep a long
        # kernel's lease alive, up to max_lease_seconds, so that a hung kernel or a car
        # that only heartbeats cannot hold its record, and the partition's commits, for
        # ever.
        if lease.task.task.deadline >= time.time():
            self.leases.extend(
                lease.epoch, self.settings.lease_seconds, self.settings.max_lease_seconds
            )
        return False

    def _decode(self, event: MqttEvent, kind: type[M]) -> M | None:
        try:
            return decode(event.payload, kind)
        except DecodeError as exc:
            self.metrics.dropped.labels(f"mqtt_{event.kind}", exc.reason).inc()
            self.events.warning(
                "mqtt_malformed", kind=event.kind, vehicle_id=event.vehicle_id, reason=str(exc)
            )
            return None

    def _own_late_result(self, event: MqttEvent, result: Result) -> bool:
        """A result for a lease this gateway no longer has, from the car it names."""
        return (
            result.vehicle_id == event.vehicle_id
            and result.gateway_id == self.settings.gateway_id
            and self.leases.get(result.epoch) is None
        )

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
            self.events.info(
                "stale_message_dropped",
                kind=event.kind,
                vehicle_id=event.vehicle_id,
                epoch=message.epoch,
                job_id=message.job_id,
                chunk_id=message.chunk_id,
            )
            return None
        return lease


def _answers(result: Result, task: TaskChunk) -> bool:
    """Whether the result names the leased task's submission, as every honest car's does."""
    return result.task_created_at == task.created_at and result.n_chunks == task.n_chunks


def _confirmed(task: PendingTask, vehicle_id: str, reason: NackReason) -> bool:
    """Whether another car already gave this reason for this task. A car is not trusted
    to end a task alone: one that calls every task invalid would dead-letter them all.
    A task truly no car can run costs one attempt more (or max_attempts, on one car)."""
    return any(a.reason == reason.value and a.vehicle_id != vehicle_id for a in task.history)
