# SPDX-License-Identifier: Apache-2.0
"""What a car hears, and what each message it hears does.

Two kinds of topic reach a car. Its own task topic carries assignments (one, or a
gateway's batch), revokes, and a gateway's notice of how much work it has for the car;
the gateways' status topics carry each gateway's announcement, which is how the car
learns its cell's roster. Tasks go on to ``worker.tasks``; what a gateway says of itself
moves the car's credits between gateways (``worker.grants``) and so asks for a pull.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import paho.mqtt.client as mqtt

from parkpool.runtime.logs import Logger
from parkpool.schemas import AssignmentBatch, DecodeError, GatewayStatus, MqttTopics, Revoke, decode
from parkpool.schemas.codec import peek_type
from parkpool.worker.grants import GatewayBook
from parkpool.worker.tasks import TaskLine

__all__ = ["Inbox"]


class Inbox:
    """One car's inbound messages. ``pull`` asks its gateways for work at once,
    ``pull_soon`` within the pull jitter; ``errors`` counts, by kind, the messages whose
    handling raised."""

    def __init__(
        self,
        topics: MqttTopics,
        vehicle_id: str,
        gateways: GatewayBook,
        tasks: TaskLine,
        *,
        pull: Callable[[], None],
        pull_soon: Callable[[], None],
        log: Logger,
    ) -> None:
        self.topics = topics
        self.vehicle_id = vehicle_id
        self.gateways = gateways
        self.tasks = tasks
        self._pull = pull
        self._pull_soon = pull_soon
        self._log = log
        self.errors: collections.Counter[str] = collections.Counter()

    def receive(self, msg: mqtt.MQTTMessage) -> None:
        """Handle one message; it is dropped, and counted in ``errors``, if that raises."""
        payload = bytes(msg.payload)
        kind = "gateway_status"
        try:
            # Read inside: paho raises here for a topic that is not UTF-8.
            if msg.topic != self.topics.task(self.vehicle_id):
                self._on_gateway_status(msg.topic, payload)
                return
            kind = peek_type(payload) or "assignment"
            if kind == Revoke.TYPE:
                self._on_revoke(payload)
            elif kind == GatewayStatus.TYPE:
                self._on_notice(payload)
            elif kind == AssignmentBatch.TYPE:
                self._on_batch(payload)
            else:
                kind = "assignment"
                self._on_assignment(payload)
        except Exception:
            # Raised into paho's network loop it would stop every car on that loop; a bug
            # met by one message is counted and the message dropped (its lease expires).
            self.errors[kind] += 1
            self._log.exception("message_handler_failed", kind=kind)

    def _on_gateway_status(self, topic: str, payload: bytes) -> None:
        try:
            status = decode(payload, GatewayStatus)
        except DecodeError:
            return
        if topic != self.topics.gateway_status(status.gateway_id):
            self._log.warning("gateway_status_misplaced", topic=topic)
            return  # one gateway (or anyone) speaking for another
        if self.gateways.announced(status):
            self._pull_soon()

    def _on_notice(self, payload: bytes) -> None:
        """One of our gateways says how much work it has: none (move our credits to the
        other one now) or some again (come back, after a jitter)."""
        try:
            notice = decode(payload, GatewayStatus)
        except DecodeError as exc:
            self._log.warning("notice_malformed", reason=str(exc))
            return
        self.gateways.answered(notice.gateway_id)
        if self.gateways.noticed(notice.gateway_id, notice.queued):
            if notice.queued == 0:
                self._pull()
            else:
                self._pull_soon()

    def _on_batch(self, payload: bytes) -> None:
        try:
            batch = decode(payload, AssignmentBatch)
        except DecodeError as exc:
            self._log.warning("assignment_batch_malformed", reason=str(exc))
            return
        for item in batch.assignments:
            self.tasks.receive(item)
        self._learn_backlog(batch.gateway_id, batch.queued)

    def _on_revoke(self, payload: bytes) -> None:
        self.tasks.revoke(payload)

    def _on_assignment(self, payload: bytes) -> None:
        assignment = self.tasks.receive(payload)
        if assignment is not None:
            self._learn_backlog(assignment.gateway_id, assignment.queued)

    def _learn_backlog(self, gateway_id: str, queued: int) -> None:
        """An assignment's backlog figure weights the car's split. Only a positive one
        counts: a queue empty at the instant of sending is often refilled by the next
        read, and "no work here" comes as a notice, when the gateway holds our credit."""
        if queued > 0 and self.gateways.noticed(gateway_id, queued):
            self._pull()
