# SPDX-License-Identifier: Apache-2.0
"""Building MQTT 5 clients the same way in the gateway, the worker and the tools."""

from __future__ import annotations

import functools
import socket
import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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
    # Short retry delays: a vehicle or gateway that lost the broker should be back at once.
    client.reconnect_delay_set(min_delay=1, max_delay=5)
    client.on_socket_open = _no_delay
    return client


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
) -> None:
    """Connect, start the network loop (unless an external one drives the client) and
    wait until ``connected`` is set by on_connect."""
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
    if not connected.wait(timeout):
        client.loop_stop()
        raise BrokerError(f"MQTT broker {conn.host}:{conn.port} did not accept us in {timeout}s")
