# SPDX-License-Identifier: Apache-2.0
"""The ``reconnect_spread`` line of ``make bench``: a fleet coming back after its broker
restarts.

Many MQTT clients on one ``NetworkLoop`` (the loop every car runs on, and that the
simulated fleet shares) connect to the embedded Mosquitto, which is then stopped, kept
down for a few seconds, and started again on the same port. Each client's reconnection
(its CONNACK) is timed from the moment the broker was back. It runs twice in the same
process: with the shipped reconnect policy (capped exponential backoff, full jitter),
and with jitter off (1 s, then every 2 s, as before), the baseline. ``peak_per_100ms`` is
the most reconnections in any 100 ms: what the broker has to absorb at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.runtime.backoff import Backoff
from parkpool.runtime.mqtt import connect_and_wait, new_client
from parkpool.runtime.settings import MqttConnection
from parkpool.worker.netloop import NetworkLoop, jittered_reconnects


def fixed_retries() -> Backoff:
    return Backoff(base=1.0, cap=2.0, jitter=False)


def reconnect_spread(brokers: EmbeddedBrokers, clients: int, down_s: float) -> dict[str, Any]:
    jittered = _one_restart(brokers, clients, down_s, jittered_reconnects)
    baseline = _one_restart(brokers, clients, down_s, fixed_retries)
    return {
        "name": "reconnect_spread",
        "clients": clients,
        "broker_down_s": down_s,
        **{f"jittered_{key}": value for key, value in jittered.items()},
        **{f"baseline_{key}": value for key, value in baseline.items()},
        "peak_ratio": round(baseline["peak_per_100ms"] / max(1, jittered["peak_per_100ms"]), 2),
    }


def _one_restart(
    brokers: EmbeddedBrokers, count: int, down_s: float, policy: Callable[[], Backoff]
) -> dict[str, Any]:
    conn = MqttConnection(brokers.mqtt_host, brokers.mqtt_port, keepalive=60)
    loop = NetworkLoop(reconnect=policy).start()
    back: list[float] = []
    lock = threading.Lock()
    try:
        clients = [_connected(loop, conn, f"spread-{n}", back, lock) for n in range(count)]
        with lock:
            back.clear()  # the first connections are not what is measured
        brokers.stop_mosquitto()
        time.sleep(down_s)
        brokers.start_mosquitto()
        up = time.monotonic()
        deadline = up + 180
        while len(back) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        with lock:
            delays = sorted(at - up for at in back)
        for client in clients:
            loop.detach(client)
            client.disconnect()
        time.sleep(1.0)
        return _summary(delays, count)
    finally:
        loop.close()


def _connected(
    loop: NetworkLoop, conn: MqttConnection, name: str, back: list[float], lock: threading.Lock
) -> mqtt.Client:
    ready = threading.Event()
    client = new_client(name, conn)

    def on_connect(*_args: Any) -> None:
        with lock:
            back.append(time.monotonic())
        ready.set()

    client.on_connect = on_connect
    loop.attach(client)
    connect_and_wait(client, conn, connected=ready, start_loop=False)
    return client


def _summary(delays: list[float], count: int) -> dict[str, Any]:
    if not delays:
        return {"reconnected": 0, "p50_s": None, "p90_s": None, "max_s": None, "peak_per_100ms": 0}
    # Bucketed from the first reconnection: a client may be accepted a moment before
    # the launcher sees the broker ready, which is where the delays are counted from.
    buckets = Counter(int((delay - delays[0]) * 10) for delay in delays)
    return {
        "reconnected": len(delays),
        "missing": count - len(delays),
        "p50_s": round(max(0.0, delays[len(delays) // 2]), 3),
        "p90_s": round(max(0.0, delays[int(len(delays) * 0.9)]), 3),
        "max_s": round(max(0.0, delays[-1]), 3),
        "peak_per_100ms": max(buckets.values()),
        "first_second": sum(1 for delay in delays if delay - delays[0] < 1.0),
    }
