# SPDX-License-Identifier: Apache-2.0
"""Clients that paho's own thread drives (the gateway, the tools) wait a jittered,
capped, growing delay before each reconnection (parkpool.runtime.mqtt)."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime.backoff import Backoff
from parkpool.runtime.mqtt import STABLE_AFTER_S, JitteredReconnect, connect_and_wait, new_client
from parkpool.runtime.settings import MqttConnection
from tests.helpers import wait_for


class FakeClient:
    """Records what the hook tells paho."""

    def __init__(self) -> None:
        self.delays: list[tuple[float, float]] = []

    def reconnect_delay_set(self, min_delay: float, max_delay: float) -> None:
        self.delays.append((min_delay, max_delay))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def attempt(hook: JitteredReconnect, client: FakeClient) -> float:
    hook(client, None)  # type: ignore[arg-type]
    low, high = client.delays[-1]
    assert low == high  # paho then waits exactly the draw
    return low


class TestTheHook:
    """Each attempt draws the wait after it: growing while attempts fail, reset once a
    connection has held."""

    def test_waits_grow_with_failed_attempts_up_to_the_cap(self) -> None:
        # Given many clients whose broker stays away
        clock, draws = Clock(), []
        for seed in range(200):
            hook, client = (
                JitteredReconnect(Backoff(1.0, 5.0, random.Random(seed)), clock),
                FakeClient(),
            )
            row = []
            for _ in range(5):
                row.append(attempt(hook, client))
                clock.now += row[-1] + 0.01  # the next attempt comes when the wait is over
            draws.append(row)
        # Then the n-th wait is drawn from [0, min(5, 2^(n-1))], over the whole window
        for n, ceiling in enumerate([1.0, 2.0, 4.0, 5.0, 5.0]):
            column = [row[n] for row in draws]
            assert max(column) <= ceiling and max(column) > 0.9 * ceiling
            assert min(column) < 0.1 * ceiling
        # And no two clients wait alike, so they do not come back together
        assert len({row[0] for row in draws}) == len(draws)

    def test_a_connection_that_held_starts_the_backoff_over(self) -> None:
        # Given a client that failed three times, then connected
        clock, client = Clock(), FakeClient()
        hook = JitteredReconnect(Backoff(1.0, 60.0, random.Random(7)), clock)
        for _ in range(4):
            clock.now += attempt(hook, client) + 0.01
        assert hook.backoff.failures == 4
        # When its connection lasts long, then drops
        clock.now += STABLE_AFTER_S + 1
        attempt(hook, client)
        # Then its next wait is from the first window again
        assert hook.backoff.failures == 1 and hook.last_delay <= 1.0


class TestPahoLoop:
    """A client on paho's own loop comes back after its broker restarts, by the hook."""

    def test_reconnects_after_an_outage_with_drawn_waits(self, tmp_path: Path) -> None:
        with EmbeddedBrokers(run_dir=tmp_path / "brokers") as brokers:
            conn = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
            client = new_client("jitter-loop", conn)
            hook = client.on_pre_connect
            assert isinstance(hook, JitteredReconnect)
            connected = threading.Event()
            connects: list[int] = []

            def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
                connects.append(1)
                connected.set()

            client.on_connect = on_connect
            connect_and_wait(client, conn, connected=connected, timeout=10)
            try:
                # When the broker goes away long enough for several attempts to fail
                brokers.stop_mosquitto()
                wait_for(lambda: hook.attempts >= 3, 30, "three reconnection attempts")
                brokers.start_mosquitto()
                # Then the client is back, having waited drawn (not whole-second) delays
                wait_for(lambda: len(connects) == 2 and client.is_connected(), 30, "reconnect")
                assert hook.backoff.failures >= 3
                assert hook.last_delay != int(hook.last_delay)
            finally:
                client.disconnect()
                client.loop_stop()
