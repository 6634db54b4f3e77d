# SPDX-License-Identifier: Apache-2.0
"""Building MQTT 5 clients the same way in the gateway, the worker and the tools.

A client that paho's own thread drives (``loop_start``: the gateway, the tools) is
reconnected by paho, after a wait this module draws afresh before every attempt: capped
exponential backoff with full jitter (``JitteredReconnect``), where paho alone would wait
the same doubling delays in every client. Vehicles are driven by the worker's own
``NetworkLoop``, which applies the same policy itself.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from parkpool.runtime.backoff import Backoff
from parkpool.runtime.settings import MqttConnection
from parkpool.schemas.errors import BrokerError


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


def new_client(
    client_id: str,
    conn: MqttConnection,
    *,
    manual_ack: bool = False,
    will: Will | None = None,
) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    if conn.username:
        client.username_pw_set(conn.username, conn.password.value or None)
    if conn.tls_ca:
        client.tls_set(
            ca_certs=conn.tls_ca, certfile=conn.tls_cert or None, keyfile=conn.tls_key or None
        )
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    client.on_pre_connect = JitteredReconnect()
    client.on_socket_open = _no_delay
    return client


# paho's loop waits between attempts; these few clients (gateways, tools) should be back
# within seconds, so the ceiling stays at the 5 s paho was given before, now jittered.
LOOP_RECONNECT_BASE_S = 1.0
LOOP_RECONNECT_CAP_S = 5.0
# A connection that lived this long was a success: the next loss starts the backoff over.
STABLE_AFTER_S = 30.0


class JitteredReconnect:
    """paho's ``on_pre_connect`` hook: before each connection attempt, draw the wait that
    follows it should it fail (or, once connected, should the connection later drop).

    paho doubles one fixed delay from ``reconnect_delay_set``; setting its minimum and
    maximum to the same fresh draw each time makes that wait the draw itself. paho tells
    no hook when a CONNACK succeeded, so an attempt counts as having held when the next
    one comes ``STABLE_AFTER_S`` later than its wait alone explains.
    """

    def __init__(
        self, backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.backoff = backoff or Backoff(base=LOOP_RECONNECT_BASE_S, cap=LOOP_RECONNECT_CAP_S)
        self.attempts = 0
        self.last_attempt_at: float | None = None  # on ``clock``: when the CONNECT went out
        self.last_delay = 0.0
        self._clock = clock

    def __call__(self, client: mqtt.Client, _userdata: Any) -> None:
        now = self._clock()
        last = self.last_attempt_at
        if last is not None and now - last >= self.last_delay + STABLE_AFTER_S:
            self.backoff.reset()
        self.attempts += 1
        self.last_delay = self.backoff.next_delay()
        self.last_attempt_at = now
        # Typed as int in paho, used as float seconds: a whole-second draw would bunch
        # the clients into one-second steps again.
        client.reconnect_delay_set(self.last_delay, self.last_delay)  # type: ignore[arg-type]


def _no_delay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    # paho leaves Nagle on: a PUBLISH written right after a PUBACK then waits for the
    # peer's delayed ACK, adding tens of milliseconds to every hop.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_properties(session_expiry_s: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry_s
    return props


@functools.lru_cache(maxsize=64)
def publish_properties(expiry_s: float | None = None) -> Properties | None:
    """PUBLISH properties with a Message Expiry; cached, as leases mostly share one length."""
    if expiry_s is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    # MQTT expiry is whole seconds; round up so a lease never expires early on the wire.
    props.MessageExpiryInterval = max(1, int(expiry_s + 0.999))
    return props


def connect_and_wait(
    client: mqtt.Client,
    conn: MqttConnection,
    *,
    connected: threading.Event,
    clean_start: bool = True,
    session_expiry_s: int = 0,
    timeout: float = 15.0,
    start_loop: bool = True,
    abort: threading.Event | None = None,
) -> None:
    """Connect, start the network loop (unless an external one drives the client) and
    wait until ``connected`` is set by on_connect; give up early when ``abort`` is set."""
    try:
        client.connect(
            conn.host,
            conn.port,
            keepalive=conn.keepalive,
            clean_start=clean_start,
            properties=connect_properties(session_expiry_s),
        )
    except OSError as exc:
        raise BrokerError(f"cannot reach MQTT broker {conn.host}:{conn.port}: {exc}") from exc
    if start_loop:
        client.loop_start()
    if not wait_until(connected, timeout, abort):
        client.loop_stop()
        if abort is not None and abort.is_set():
            raise BrokerError(f"stopped while waiting for MQTT broker {conn.host}:{conn.port}")
        raise BrokerError(f"MQTT broker {conn.host}:{conn.port} did not accept us in {timeout}s")


def wait_until(event: threading.Event, timeout: float, abort: threading.Event | None) -> bool:
    """Wait for ``event`` up to ``timeout``; False at once when ``abort`` is set first."""
    if abort is None:
        return event.wait(timeout)
    deadline = time.monotonic() + timeout
    while not event.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
        if abort.is_set() or time.monotonic() >= deadline:
            return False
    return True
