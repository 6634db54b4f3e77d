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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from gateway.leases import Lease, LeaseTable
from gateway.metrics import GatewayMetrics
from gateway.mqtt_link import MqttEvent, MqttLink
from gateway.tasks import PendingTask, ReadyQueue, TaskState
from gateway.vehicles import VehicleBook
from gateway.window import OffsetWindow
from parkpool.kafka import consumer_config, coordinates, produce, producer_config
from parkpool.settings import KafkaConnection, MqttConnection
from schemas import (
    Assignment,
    AttemptRecord,
    DeadLetter,
    DecodeError,
    KafkaTopics,
    MqttTopics,
    Nack,
    PullRequest,
    Result,
    TaskChunk,
    VehicleState,
    VehicleStatus,
    decode,
    encode,
)

log = structlog.get_logger("parkpool.gateway")
TP = tuple[str, int]
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
    batch: int = 256
    kafka_overrides: dict[str, object] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return self.group_id or f"{self.namespace}.gateways"


class Gateway:
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or GatewayMetrics()
        self.kafka_topics = KafkaTopics(settings.namespace)
        self.mqtt = MqttLink(settings.gateway_id, settings.mqtt, MqttTopics(settings.namespace))
        self.leases = LeaseTable()
        self.vehicles = VehicleBook(settings.gateway_id)
        self.ready = ReadyQueue()
        self.windows: dict[TP, OffsetWindow] = {}
        self.pending: dict[TP, dict[int, PendingTask]] = {}
        self.paused: set[TP] = set()
        self.stopping = threading.Event()
        self.is_ready = False
        self._consumer: Consumer | None = None
        self._producer = Producer(producer_config(settings.kafka))
        self._last_sweep = 0.0
        self._log = log.bind(gateway_id=settings.gateway_id)

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Subscribe on MQTT first: no task is consumed before results can come back."""
        self.mqtt.start()
        config = consumer_config(
            self.settings.kafka,
            self.settings.group,
            self.settings.session_timeout_ms,
            **self.settings.kafka_overrides,
        )
        self._consumer = Consumer(config)
        self._consumer.subscribe(
            [self.kafka_topics.tasks],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._log.info("gateway_started", group=self.settings.group)

    def run(self) -> None:
        """Loop until ``stopping`` is set, then shut down cleanly."""
        try:
            while not self.stopping.is_set():
                self.step()
        finally:
            self.shutdown()

    def step(self) -> None:
        busy = self._consume()
        busy |= self._drain_mqtt()
        self._sweep()
        self._dispatch()
        self._producer.poll(0)
        self._update_gauges()
        if not busy:
            self._idle(0.005)

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

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking work, make what is done durable, commit it, and leave."""
        self._log.info("gateway_stopping", leases=len(self.leases))
        # Delivery reports fire inside flush and finish their offsets, so the commit
        # below includes every result that became durable.
        self._producer.flush(timeout)
        if self._consumer is not None:
            self._commit_all()
            self._consumer.close()  # runs on_revoke for whatever is still assigned
            self._consumer = None
        self.mqtt.stop()
        self._log.info("gateway_stopped")

    # ---------------------------------------------------------------- Kafka side

    def _consume(self) -> bool:
        assert self._consumer is not None
        records = self._consumer.consume(self.settings.batch, timeout=0)
        for record in records:
            self._on_record(record)
        return bool(records)

    def _on_record(self, record: Message) -> None:
        error = record.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                self._log.warning("kafka_consume_error", error=str(error))
            return
        topic, partition, offset = coordinates(record)
        tp: TP = (topic, partition)
        window = self.windows.get(tp)
        if window is None:  # a record of a partition revoked since it was fetched
            return
        raw = record.value() or b""
        window.add(offset)
        self.metrics.tasks.labels("consumed").inc()
        try:
            chunk = decode(raw, TaskChunk)
        except DecodeError as exc:
            self.metrics.dropped.labels("kafka_tasks", exc.reason).inc()
            self._log.warning("task_malformed", partition=tp[1], offset=offset, reason=str(exc))
            self._dead_letter(tp, offset, raw, f"decode_{exc.reason}", str(exc))
            return
        task = PendingTask(tp[0], tp[1], offset, raw, chunk)
        self.pending[tp][offset] = task
        self.ready.push(task)
        if window.full:
            self._pause(tp)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self.windows[(p.topic, p.partition)] = OffsetWindow(self.settings.window)
            self.pending[(p.topic, p.partition)] = {}
        self.is_ready = bool(self.windows) and self.mqtt.subscribed.is_set()
        self._log.info("partitions_assigned", partitions=[p.partition for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is done for these partitions, then forget them and their leases."""
        offsets = self._commit_points(partitions)
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                self._log.warning("commit_on_revoke_failed", error=str(exc))
        self._drop_partitions(partitions)
        self._log.info("partitions_revoked", partitions=[p.partition for p in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Someone else owns these now: committing would overwrite their progress."""
        self._drop_partitions(partitions)
        self._log.warning("partitions_lost", partitions=[p.partition for p in partitions])

    def _drop_partitions(self, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self.ready.remove_where(lambda t: t.tp in gone)
        for lease in self.leases.all():
            if lease.task.tp in gone:
                self.leases.end(lease.epoch)
        for tp in gone:
            self.windows.pop(tp, None)
            self.pending.pop(tp, None)
            self.paused.discard(tp)
        self.is_ready = bool(self.windows)

    def _commit_points(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        points = []
        for p in partitions:
            window = self.windows.get((p.topic, p.partition))
            point = window.commit_point if window else None
            if point is not None:
                points.append(TopicPartition(p.topic, p.partition, point))
        return points

    def _commit_all(self) -> None:
        assert self._consumer is not None
        offsets = self._commit_points([TopicPartition(t, p) for t, p in self.windows])
        if offsets:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                self._log.warning("final_commit_failed", error=str(exc))

    def _finish_offset(self, tp: TP, offset: int) -> None:
        window = self.windows.get(tp)
        pending = self.pending.get(tp)
        if window is None or pending is None:
            return  # revoked meanwhile; the new owner redoes it, the SDK drops the duplicate
        pending.pop(offset, None)
        if window.finish(offset) and window.commit_point is not None:
            assert self._consumer is not None
            try:
                self._consumer.store_offsets(offsets=[TopicPartition(*tp, window.commit_point)])
            except KafkaException as exc:
                self._log.warning("store_offsets_failed", partition=tp[1], error=str(exc))
        if tp in self.paused and not window.full:
            self._resume(tp)

    def _pause(self, tp: TP) -> None:
        assert self._consumer is not None
        self._consumer.pause([TopicPartition(*tp)])
        self.paused.add(tp)

    def _resume(self, tp: TP) -> None:
        assert self._consumer is not None
        self._consumer.resume([TopicPartition(*tp)])
        self.paused.discard(tp)

    def _produce(
        self, topic: str, value: bytes, key: str | None, done: Callable[..., None]
    ) -> None:
        produce(self._producer, topic, value, key, done)

    # ---------------------------------------------------------------- MQTT side

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
        handler(self, event)

    def _on_pull(self, event: MqttEvent) -> None:
        pull = self._decode(event, PullRequest)
        self.mqtt.ack(event)
        if pull is not None:
            self.vehicles.on_pull(pull)

    def _on_status(self, event: MqttEvent) -> None:
        status = self._decode(event, VehicleStatus)
        self.mqtt.ack(event)
        if status is None:
            return
        self.vehicles.set_state(status.vehicle_id, status.state)
        if status.state is VehicleState.OFFLINE:
            self._release_vehicle(status.vehicle_id, "vehicle_offline", status.reason)
        elif status.state is VehicleState.SUSPENDED:
            # A policy stopped the car (owner, battery, heat): not the task's fault.
            self._release_vehicle(status.vehicle_id, "vehicle_offline", status.reason, counts=False)

    def _on_result(self, event: MqttEvent) -> None:
        result = self._decode(event, Result)
        lease = self._lease_for(event, result)
        if result is None or lease is None:
            self.mqtt.ack(event)
            return
        self.leases.end(lease.epoch)
        task = lease.task
        task.state = TaskState.FINISHING
        self.vehicles.heard(event.vehicle_id)

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            self._result_delivered(err, lease, event)

        self._produce(task.task.reply_topic, event.payload, task.task.job_id, delivered)

    def _result_delivered(self, err: KafkaError | None, lease: Lease, event: MqttEvent) -> None:
        task = lease.task
        if err is not None:
            # Not durable: put the task back, then release the MQTT message. Redoing
            # the task is the way to get its result into Kafka.
            self.metrics.delivery_errors.labels("results").inc()
            self._log.error("result_not_durable", job_id=task.task.job_id, error=str(err))
            self.mqtt.ack(event)
            self._requeue(task, "delivery_failed", lease.vehicle_id, str(err), counts=False)
            return
        self.mqtt.ack(event)
        task.state = TaskState.DONE
        self.metrics.tasks.labels("completed").inc()
        self.metrics.execution.observe(time.monotonic() - lease.dispatched_at)
        self._finish_offset(task.tp, task.offset)

    def _on_nack(self, event: MqttEvent) -> None:
        nack = self._decode(event, Nack)
        lease = self._lease_for(event, nack)
        self.mqtt.ack(event)
        if nack is None or lease is None:
            return
        self.leases.end(lease.epoch)
        self.metrics.redelivered.labels("nack").inc()
        if nack.reason.counts_as_failure:
            self.metrics.tasks.labels("failed").inc()
        self._requeue(
            lease.task,
            nack.reason.value,
            lease.vehicle_id,
            nack.detail,
            counts=nack.reason.counts_as_failure,
            terminal=nack.reason.terminal,
        )

    _handlers: ClassVar[dict[str, Callable[[Gateway, MqttEvent], None]]] = {
        "pull": _on_pull,
        "status": _on_status,
        "result": _on_result,
        "nack": _on_nack,
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

    def _lease_for(self, event: MqttEvent, message: Result | Nack | None) -> Lease | None:
        """The lease a result or nack speaks for, or None when it is stale or forged."""
        if message is None:
            return None
        lease = self.leases.get(message.epoch)
        valid = (
            lease is not None
            and message.vehicle_id == event.vehicle_id == lease.vehicle_id
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
        for vehicle_id in self.vehicles.hungry():
            if not len(self.ready):
                return
            view = self.vehicles.get(vehicle_id)
            assert view is not None
            available = view.credits - self.leases.count_after(vehicle_id, view.seen_epoch)
            if available > 0 and self._send_one(vehicle_id):
                available -= 1
            self.vehicles.served(vehicle_id, available > 0)

    def _send_one(self, vehicle_id: str) -> bool:
        while (task := self.ready.pop()) is not None:
            if task.task.deadline >= time.time():
                break
            self._dead_letter_task(task, "deadline_passed", "the job's deadline passed in queue")
        if task is None:
            return False
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
        )
        self.mqtt.send_assignment(vehicle_id, encode(assignment), self.settings.lease_seconds)
        self.metrics.tasks.labels("dispatched").inc()
        return True

    def _sweep(self) -> None:
        now = time.monotonic()
        for lease in self.leases.pop_expired(now):
            self.metrics.redelivered.labels("lease_expired").inc()
            self._requeue(lease.task, "lease_expired", lease.vehicle_id, "", counts=True)
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        for vehicle_id in self.vehicles.silent_since(now - self.settings.vehicle_silence_s):
            self._release_vehicle(vehicle_id, "vehicle_offline", "no heartbeat")
            self.vehicles.forget(vehicle_id)

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
    ) -> None:
        if task.tp not in self.windows:
            return  # partition revoked: its new owner has the task
        task.history.append(AttemptRecord(vehicle_id, reason, time.time(), detail[:512]))
        task.failures += int(counts)
        if terminal or task.failures >= self.settings.max_attempts:
            self._dead_letter_task(task, reason, detail or f"failed {task.failures} times")
            return
        task.state = TaskState.QUEUED
        self.ready.push_front(task)

    # ---------------------------------------------------------------- dead letters

    def _dead_letter_task(self, task: PendingTask, reason: str, detail: str) -> None:
        task.state = TaskState.FINISHING
        self._dead_letter(task.tp, task.offset, task.raw, reason, detail, task)

    def _dead_letter(
        self,
        tp: TP,
        offset: int,
        raw: bytes,
        reason: str,
        detail: str,
        task: PendingTask | None = None,
    ) -> None:
        letter = DeadLetter(
            reason=reason,
            detail=detail[:2048],
            source_topic=tp[0],
            partition=tp[1],
            offset=offset,
            original=raw,
            dead_at=time.time(),
            gateway_id=self.settings.gateway_id,
            job_id=task.task.job_id if task else "",
            chunk_id=task.task.chunk_id if task else -1,
            attempts=tuple(task.history[-64:]) if task else (),
        )
        payload = encode(letter)

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self.metrics.delivery_errors.labels("dead_letter").inc()
                self._produce(
                    self.kafka_topics.dead_letter, payload, letter.job_id or None, delivered
                )
                return
            self.metrics.dead_lettered.labels(reason).inc()
            self.metrics.tasks.labels("dead_lettered").inc()
            self._log.warning(
                "dead_lettered",
                reason=reason,
                job_id=letter.job_id,
                chunk_id=letter.chunk_id,
                partition=tp[1],
                offset=offset,
            )
            self._finish_offset(tp, offset)

        self._produce(self.kafka_topics.dead_letter, payload, letter.job_id or None, delivered)

    # ---------------------------------------------------------------- observability

    def _update_gauges(self) -> None:
        self.metrics.leases.set(len(self.leases))
        self.metrics.queued.set(len(self.ready))
        self.metrics.paused.set(len(self.paused))
