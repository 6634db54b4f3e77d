# SPDX-License-Identifier: Apache-2.0
"""The gateway's MQTT side: one persistent session, events handed to the main loop.

paho calls back on its network thread; the gateway's state lives on the main thread.
So callbacks only enqueue, and nothing is acknowledged here: with ``manual_ack`` the
broker keeps each message until the main loop says it is safely handled, and redelivers
it to this session after a crash.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from parkpool.runtime import logs
from parkpool.runtime.mqtt import Will, connect_and_wait, new_client, publish_properties
from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import (
    AssignmentBatch,
    GatewayState,
    GatewayStatus,
    MqttTopics,
    Revoke,
    encode,
)

log = logs.get_logger("parkpool.gateway.mqtt")
SESSION_EXPIRY_S = 600


@dataclass(frozen=True)
class MqttEvent:
    kind: str  # pull, status, will, result, nack, heartbeat (the topic's kind level)
    vehicle_id: str
    payload: bytes
    mid: int
    qos: int


class MqttLink:
    def __init__(self, gateway_id: str, conn: MqttConnection, topics: MqttTopics) -> None:
        self.gateway_id = gateway_id
        self.topics = topics
        self.conn = conn
        self.events: queue.SimpleQueue[MqttEvent] = queue.SimpleQueue()
        self.subscribed = threading.Event()
        self.bad_topics = 0
        self.reconnects = 0
        self._announced: GatewayState | None = None
        self.sent: dict[str, int] = dict.fromkeys(("assignment", "batch", "notice", "revoke"), 0)
        self._connected = threading.Event()
        self._stopping = False  # our own DISCONNECT: expected, not a fault to warn about
        offline = GatewayStatus(gateway_id, GatewayState.OFFLINE, time.time())
        self.client = new_client(
            f"gw-{topics.namespace}-{gateway_id}",
            conn,
            manual_ack=True,
            will=Will(topics.gateway_status(gateway_id), encode(offline), retain=True),
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def start(self, timeout: float = 15.0) -> None:
        """Connect, subscribe, and return only once every subscription is acknowledged."""
        connect_and_wait(
            self.client,
            self.conn,
            connected=self._connected,
            clean_start=False,
            session_expiry_s=SESSION_EXPIRY_S,
            timeout=timeout,
        )
        if not self.subscribed.wait(timeout):
            raise TimeoutError("MQTT subscriptions were not acknowledged")
        self.announce(GatewayState.ONLINE)

    def announce(self, state: GatewayState) -> None:
        """Publish the retained roster entry, on a change of state only.

        Every car of the cell receives it, so it carries no backlog and is never
        rebroadcast: a backlog reaches only the cars it concerns (``send_notice``).
        """
        if state == self._announced:
            return
        self._announced = state
        status = GatewayStatus(self.gateway_id, state, time.time())
        topic = self.topics.gateway_status(self.gateway_id)
        self.client.publish(topic, encode(status), qos=1, retain=True)

    def send_notice(self, vehicle_id: str, queued: int) -> None:
        """Tell one car how much work this gateway has: none, so it grants its credits
        elsewhere, or some again, so it comes back."""
        notice = GatewayStatus(self.gateway_id, GatewayState.ONLINE, time.time(), queued)
        self.client.publish(self.topics.task(vehicle_id), encode(notice), qos=1)
        self.sent["notice"] += 1

    def send_revoke(self, vehicle_id: str, epoch: int, reason: str) -> None:
        revoke = Revoke(self.gateway_id, vehicle_id, epoch, reason)
        self.client.publish(self.topics.task(vehicle_id), encode(revoke), qos=1)
        self.sent["revoke"] += 1

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def send_assignment(self, vehicle_id: str, payload: bytes, expiry_s: float) -> None:
        self.client.publish(
            self.topics.task(vehicle_id), payload, qos=1, properties=publish_properties(expiry_s)
        )
        self.sent["assignment"] += 1

    def send_batch(self, batch: AssignmentBatch, expiry_s: float) -> None:
        """Several assignments in one message; it expires with the shortest lease."""
        topic, properties = self.topics.task(batch.vehicle_id), publish_properties(expiry_s)
        self.client.publish(topic, encode(batch), qos=1, properties=properties)
        self.sent["batch"] += 1

    def ack(self, event: MqttEvent) -> None:
        if event.qos > 0:
            self.client.ack(event.mid, event.qos)

    def stop(self) -> None:
        """Say OFFLINE (retained) and disconnect. A link that is down at that moment (the
        broker restarting, say) cannot say it, and leaves it to its will; a gateway's
        shutdown must not fail on a broker it cannot reach."""
        self._stopping = True
        if self.client.is_connected():
            status = GatewayStatus(self.gateway_id, GatewayState.OFFLINE, time.time())
            topic = self.topics.gateway_status(self.gateway_id)
            info = self.client.publish(topic, encode(status), qos=1, retain=True)
            with contextlib.suppress(RuntimeError):  # the link dropped meanwhile
                info.wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.error("mqtt_connect_refused", reason=str(rc))
            return
        if self._connected.is_set():
            self.reconnects += 1
        self._connected.set()
        self._announced = None  # a restarted broker may have lost the retained status
        t = self.topics
        me = self.gateway_id
        # Only what concerns this gateway: its own cars' pulls and statuses, results for
        # its leases, and the cell's last wills (the one thing a car cannot address).
        subs = [
            (t.pulls_for(me), 1),
            (t.statuses_for(me), 1),
            (t.all_wills, 1),
            (t.results_for(me), 1),
            (t.nacks_for(me), 1),
            (t.heartbeats_for(me), 1),
        ]
        client.subscribe(subs)
        log.info("mqtt_connected", gateway_id=self.gateway_id)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if any(code.is_failure for code in codes):
            log.error("mqtt_subscribe_refused", codes=[str(c) for c in codes])
            return
        self.subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        # Every gateway stop ends this way; a warning there would train SREs to ignore
        # the warning that matters, a connection lost while serving.
        if self._stopping:
            log.info("mqtt_disconnected", gateway_id=self.gateway_id, reason=str(rc))
        else:
            log.warning("mqtt_disconnected", gateway_id=self.gateway_id, reason=str(rc))

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        vehicle_id = self.topics.vehicle_of(msg.topic)
        kind = self.topics.kind_of(msg.topic)
        if vehicle_id is None or kind is None:
            # Not ours to interpret; acknowledge so that it cannot block the session.
            self.bad_topics += 1
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)
            return
        self.events.put(MqttEvent(kind, vehicle_id, bytes(msg.payload), msg.mid, msg.qos))
