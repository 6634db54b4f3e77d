# SPDX-License-Identifier: Apache-2.0
"""The fleet's shared network loop, against the real Mosquitto."""

from __future__ import annotations

import socket
import threading

import paho.mqtt.client as mqtt
import pytest

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime.mqtt import connect_and_wait, new_client
from parkpool.runtime.settings import MqttConnection
from parkpool.worker.netloop import NetworkLoop
from tests.helpers import wait_for


def _attached(loop: NetworkLoop, conn: MqttConnection, name: str) -> mqtt.Client:
    client = new_client(name, conn)
    connected = threading.Event()
    client.on_connect = lambda *_a: connected.set()
    loop.attach(client)
    connect_and_wait(client, conn, connected=connected, timeout=10, start_loop=False)
    return client


def test_attached_client_keeps_nagle_off(mqtt_conn: MqttConnection) -> None:
    # Nagle on a vehicle's socket put a delayed-ACK wait (about 40 ms) on every task.
    loop = NetworkLoop().start()
    try:
        client = _attached(loop, mqtt_conn, "netloop-nodelay")
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        loop.close()


def test_messages_flow_both_ways_through_the_loop(mqtt_conn: MqttConnection) -> None:
    loop = NetworkLoop().start()
    got: list[bytes] = []
    try:
        client = _attached(loop, mqtt_conn, "netloop-echo")
        subscribed = threading.Event()
        client.on_subscribe = lambda *_a: subscribed.set()
        client.on_message = lambda _c, _u, msg: got.append(bytes(msg.payload))
        client.subscribe("netloop/echo", qos=1)
        assert subscribed.wait(10)
        for i in range(20):
            client.publish("netloop/echo", str(i).encode(), qos=1)
        wait_for(lambda: len(got) == 20, timeout=10, what="20 echoes")
        assert got == [str(i).encode() for i in range(20)]
    finally:
        loop.close()


def test_lost_connection_is_reconnected(mqtt_conn: MqttConnection) -> None:
    loop = NetworkLoop().start()
    try:
        client = _attached(loop, mqtt_conn, "netloop-reconnect")
        connects: list[int] = []
        client.on_connect = lambda *_a: connects.append(1)
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # the network drops; the client did not ask to leave
        wait_for(lambda: connects and client.is_connected(), timeout=15, what="reconnect")
    finally:
        loop.close()


def test_wake_never_blocks(mqtt_conn: MqttConnection) -> None:
    # A loop that is not draining its wake socket (busy, or this very thread) must not
    # make the callers block: once the buffer is full, a wake is already pending.
    loop = NetworkLoop()  # not started: nothing drains the wake socket
    client = new_client("netloop-idle", mqtt_conn)
    caller = threading.Thread(target=lambda: [loop.kill(client) for _ in range(20_000)])
    caller.start()
    caller.join(10)
    assert not caller.is_alive(), "a wake blocked on a full socket buffer"


@pytest.mark.integration
def test_many_clients_come_back_after_broker_restart(brokers: EmbeddedBrokers) -> None:
    # Every client reconnecting at once queues hundreds of socket operations from the
    # loop's own thread; the loop must keep turning and bring all of them back.
    conn = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
    loop = NetworkLoop().start()
    try:
        clients = [_attached(loop, conn, f"netloop-storm-{i}") for i in range(300)]
        connects = {id(c): 0 for c in clients}
        for c in clients:
            c.on_connect = lambda c, *_a: connects.__setitem__(id(c), connects[id(c)] + 1)
        brokers.restart_mosquitto()
        wait_for(lambda: all(connects.values()), timeout=60, what="every client to reconnect")
        # And they still write: a round trip through the restarted broker
        got = threading.Event()
        probe = clients[-1]
        probe.on_subscribe = lambda *_a: probe.publish("netloop/storm", b"back", qos=1)
        probe.on_message = lambda *_a: got.set()
        probe.subscribe("netloop/storm", qos=1)
        assert got.wait(15)
    finally:
        loop.close()
