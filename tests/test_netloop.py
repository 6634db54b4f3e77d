# SPDX-License-Identifier: Apache-2.0
"""The fleet's shared network loop, against the real Mosquitto."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime.backoff import Backoff
from parkpool.runtime.mqtt import connect_and_wait, new_client
from parkpool.runtime.settings import MqttConnection
from parkpool.worker import netloop
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


class Recorded(Backoff):
    """A client's backoff that keeps every wait it drew."""

    def __init__(self, seed: int) -> None:
        super().__init__(base=1.0, cap=60.0, rng=random.Random(seed))
        self.draws: list[float] = []

    def next_delay(self) -> float:
        self.draws.append(super().next_delay())
        return self.draws[-1]


def recording(made: list[Recorded]) -> Callable[[], Backoff]:
    """A backoff factory for the loop that keeps each client's backoff in ``made``."""

    def make() -> Backoff:
        made.append(Recorded(len(made)))
        return made[-1]

    return make


def _drop(client: mqtt.Client) -> None:
    """The network drops under the client; it did not ask to leave."""
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)


class TestJitteredReconnects:
    """Each client waits its own drawn delay: a fleet that lost its broker together does
    not come back together."""

    @pytest.mark.integration
    def test_clients_draw_their_own_waits_and_all_come_back(self, brokers: EmbeddedBrokers) -> None:
        # Given fifty clients on one loop, each with its own backoff
        conn = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
        made: list[Recorded] = []
        loop = NetworkLoop(reconnect=recording(made)).start()
        try:
            clients = [_attached(loop, conn, f"netloop-jitter-{i}") for i in range(50)]
            back: set[int] = set()
            for c in clients:
                c.on_connect = lambda c, *_a: back.add(id(c))
            # When the broker restarts under them
            brokers.restart_mosquitto()
            # Then every one comes back, after a wait of its own
            wait_for(lambda: len(back) == len(clients), 60, "every client to reconnect")
            first = [backoff.draws[0] for backoff in made if backoff.draws]
            assert len(first) == len(clients) and len(set(first)) == len(clients)
            assert all(0.0 <= wait <= 1.0 for wait in first)
        finally:
            loop.close()

    def test_quick_drops_widen_the_window(self, mqtt_conn: MqttConnection) -> None:
        # Given a client whose connection drops twice in quick succession
        made: list[Recorded] = []
        loop = NetworkLoop(reconnect=recording(made)).start()
        try:
            client = _attached(loop, mqtt_conn, "netloop-flaky")
            connects: list[int] = []
            client.on_connect = lambda *_a: connects.append(1)
            for n in (1, 2):
                _drop(client)
                wait_for(lambda: len(connects) == n, 15, "reconnect")  # noqa: B023
            # Then the second wait was drawn from the doubled window: it did not hold
            (backoff,) = made
            assert backoff.failures == 2
        finally:
            loop.close()

    def test_a_connection_that_held_starts_over(
        self, mqtt_conn: MqttConnection, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given connections that count as having held from the first moment
        monkeypatch.setattr(netloop, "STABLE_AFTER_S", 0.0)
        made: list[Recorded] = []
        loop = NetworkLoop(reconnect=recording(made)).start()
        try:
            client = _attached(loop, mqtt_conn, "netloop-steady")
            connects: list[int] = []
            client.on_connect = lambda *_a: connects.append(1)
            # When it drops twice
            for n in (1, 2):
                _drop(client)
                wait_for(lambda: len(connects) == n, 15, "reconnect")  # noqa: B023
            # Then each wait came from the first window again
            (backoff,) = made
            assert backoff.failures == 1 and len(backoff.draws) == 2
            assert max(backoff.draws) <= 1.0
        finally:
            loop.close()
