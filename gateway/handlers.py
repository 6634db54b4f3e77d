# SPDX-License-Identifier: Apache-2.0
"""What a gateway does with each message a vehicle sends: pulls, statuses, results,
nacks and lease heartbeats.

Each message is rate limited per vehicle, decoded strictly, and fenced against the lease
it quotes. Anything refused is acknowledged, counted with a reason and dropped, so a
hostile car costs a counter increment, never a stalled loop or another car's task.
Runs on the gateway's loop thread, like everything that touches its state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from confluent_kafka import KafkaError

from parkpool.gateway.leases import Lease
from parkpool.gateway.mqtt_link import MqttEvent
from parkpool.gateway.ratelimit import RateLimiter
from parkpool.gateway.tasks import TaskState
from parkpool.runtime.signing import VehicleKeys
from parkpool.schemas import (
    DecodeError,
    LeaseHeartbeat,
    Nack,
    NackReason,
    PullRequest,
    Result,
    VehicleState,
    VehicleStatus,
    decode,
)
from parkpool.schemas.kernels import BUILTIN

if TYPE_CHECKING:
    from parkpool.gateway.gateway import Gateway

M = TypeVar("M")


class VehicleHandlers:
    """One handler per MQTT message kind, with the per-vehicle limits in front of them."""

    def __init__(self, gateway: Gateway) -> None:
        settings = gateway.settings
        self.gw = gateway
        self.vehicle_keys = VehicleKeys(settings.vehicle_keys) if settings.vehicle_keys else None
        self._limits = {
            "pull": RateLimiter(settings.pull_rate, burst=2 * settings.pull_rate),
            "result": RateLimiter(settings.result_rate, burst=2 * settings.result_rate),
        }
        self._handlers: dict[str, Callable[[MqttEvent], None]] = {
            "pull": self._on_pull,
            "status": self._on_status,
            "result": self._on_result,
            "nack": self._on_nack,
            "heartbeat": self._on_heartbeat,
        }

    def handle(self, event: MqttEvent) -> None:
        handler = self._handlers.get(event.kind)
        metrics = self.gw.metrics
        if handler is None:
            metrics.dropped.labels("mqtt", "unknown_topic").inc()
            self.gw.mqtt.ack(event)
            return
        limiter = self._limits.get(event.kind)
        if limiter is not None and not limiter.allow(event.vehicle_id, time.monotonic()):
            metrics.dropped.labels(f"mqtt_{event.kind}", "rate_limited").inc()
            self.gw.mqtt.ack(event)
            return
        handler(event)

    def _on_pull(self, event: MqttEvent) -> None:
        pull = self._decode(event, PullRequest)
        self.gw.mqtt.ack(event)
        if pull is None:
            return
        if pull.vehicle_id != event.vehicle_id:
            self.gw.metrics.dropped.labels("mqtt_pull", "vehicle_mismatch").inc()
            return
        self.gw.vehicles.on_pull(pull)

    def _on_status(self, event: MqttEvent) -> None:
        status = self._decode(event, VehicleStatus)
        self.gw.mqtt.ack(event)
        if status is None:
            return
        if status.vehicle_id != event.vehicle_id:
            self.gw.metrics.dropped.labels("mqtt_status", "vehicle_mismatch").inc()
            return
        view = self.gw.vehicles.set_state(status.vehicle_id, status.state)
        self.gw.fleet.heard(view, status)
        if status.state is VehicleState.OFFLINE:
            self.gw.release_vehicle(status.vehicle_id, "vehicle_offline", status.reason)
        elif status.state is VehicleState.SUSPENDED:
            # A policy stopped the car (owner, battery, heat): not the task's fault.
            self.gw.release_vehicle(
                status.vehicle_id, "vehicle_offline", status.reason, counts=False
            )

    def _on_result(self, event: MqttEvent) -> None:
        result = self._decode(event, Result)
        lease = self._lease_for(event, result)
        if lease is None or not self._signed_by_its_vehicle(result):
            self.gw.mqtt.ack(event)
            return
        assert result is not None  # a lease was found for it
        if lease.task.task.reply_key and not result.sealed_outputs:
            # The producer asked for sealed results: outputs in clear must not reach Kafka.
            # Dropped like a forgery, leaving the lease for a correct answer or its expiry.
            self.gw.metrics.dropped.labels("mqtt_result", "unsealed_result").inc()
            self.gw.events.warning(
                "result_refused",
                reason="unsealed_result",
                vehicle_id=result.vehicle_id,
                epoch=result.epoch,
            )
            self.gw.mqtt.ack(event)
            return
        self.gw.leases.end(lease.epoch)
        lease.task.state = TaskState.FINISHING
        self.gw.vehicles.heard(event.vehicle_id)
        chunk = lease.task.task
        seconds = result.exec_seconds
        self.gw.log.produce(
            chunk.reply_topic,
            event.payload,
            chunk.job_id,
            lambda err: self._result_delivered(err, lease, event, seconds),
        )

    def _result_delivered(
        self, err: KafkaError | None, lease: Lease, event: MqttEvent, exec_seconds: float
    ) -> None:
        """The ack chain's middle: the result is durable (or not), then the car's PUBACK."""
        gw, task = self.gw, lease.task
        gw.mqtt.ack(event)
        if err is not None:
            # Not durable: redoing the task is the way to get its result into Kafka.
            gw.metrics.delivery_errors.labels("results").inc()
            gw.events.error("result_not_durable", job_id=task.task.job_id, error=str(err))
            # A refusal Kafka will repeat (a result too large, say) counts as an attempt, so
            # such a task ends in the dead-letter topic instead of being redone for ever.
            permanent = not err.retriable()
            gw.requeue(task, "delivery_failed", lease.vehicle_id, str(err), counts=permanent)
            return
        gw.metrics.tasks.labels("completed").inc()
        gw.metrics.execution.observe(time.monotonic() - lease.dispatched_at)
        gw.metrics.end_to_end.observe(max(0.0, time.time() - task.task.created_at))
        kernel = task.task.kernel if task.task.kernel in BUILTIN else "other"
        gw.metrics.kernel_execution.labels(kernel).observe(exec_seconds)
        gw.finish(task)
        gw.events.debug(
            "task_completed", **task.log_context(), vehicle_id=lease.vehicle_id, epoch=lease.epoch
        )

    def _signed_by_its_vehicle(self, result: Result | None) -> bool:
        """With enrolled keys, a result counts only if its car signed it; a forgery leaves
        the lease alone, so the real car's result can still come."""
        if self.vehicle_keys is None or result is None:
            return True
        refusal = self.vehicle_keys.check(result)
        if refusal is not None:
            self.gw.metrics.dropped.labels("mqtt_result", refusal).inc()
            self.gw.events.warning(
                "result_refused", reason=refusal, vehicle_id=result.vehicle_id, epoch=result.epoch
            )
            return False
        return True

    def _on_nack(self, event: MqttEvent) -> None:
        nack = self._decode(event, Nack)
        lease = self._lease_for(event, nack)
        self.gw.mqtt.ack(event)
        if nack is None or lease is None:
            return
        self.gw.leases.end(lease.epoch)
        self.gw.metrics.redelivered.labels("nack").inc()
        self.gw.requeue(
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
        self.gw.mqtt.ack(event)
        if lease is not None:
            self.gw.leases.extend(lease.epoch, self.gw.settings.lease_seconds)
            self.gw.vehicles.heard(event.vehicle_id)

    def _decode(self, event: MqttEvent, kind: type[M]) -> M | None:
        try:
            return decode(event.payload, kind)
        except DecodeError as exc:
            self.gw.metrics.dropped.labels(f"mqtt_{event.kind}", exc.reason).inc()
            self.gw.events.warning(
                "mqtt_malformed", kind=event.kind, vehicle_id=event.vehicle_id, reason=str(exc)
            )
            return None

    def _lease_for(
        self, event: MqttEvent, message: Result | Nack | LeaseHeartbeat | None
    ) -> Lease | None:
        """The lease a message speaks for, or None when it is stale or forged (fencing)."""
        if message is None:
            return None
        lease = self.gw.leases.get(message.epoch)
        valid = (
            lease is not None
            and message.vehicle_id == event.vehicle_id == lease.vehicle_id
            and message.gateway_id == self.gw.settings.gateway_id
            and lease.task.task.key == (message.job_id, message.chunk_id)
        )
        if not valid:
            self.gw.metrics.dropped.labels(f"mqtt_{event.kind}", "stale_or_fenced").inc()
            self.gw.events.info(
                "stale_message_dropped",
                kind=event.kind,
                vehicle_id=event.vehicle_id,
                epoch=message.epoch,
                job_id=message.job_id,
                chunk_id=message.chunk_id,
            )
            return None
        return lease
