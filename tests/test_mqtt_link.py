# SPDX-License-Identifier: Apache-2.0
"""The gateway's MQTT link ends cleanly, and says how its connection ended at the level
that connection's end deserves."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from structlog.testing import capture_logs

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.gateway.mqtt_link import MqttLink
from parkpool.runtime.settings import MqttConnection
from parkpool.schemas.topics import MqttTopics


def disconnects(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [entry for entry in logs if entry["event"] == "mqtt_disconnected"]


def wait_for(condition: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_own_stop_is_info_not_a_warning(namespace: str, mqtt_conn: MqttConnection) -> None:
    # Given a gateway link on the real broker
    link = MqttLink("gw-stop", mqtt_conn, MqttTopics(namespace))
    link.start()
    # When the gateway stops it
    with capture_logs() as logs:
        link.stop()
    # Then the disconnection is logged once, as the expected end it is
    [entry] = disconnects(logs)
    assert entry["log_level"] == "info" and entry["gateway_id"] == "gw-stop"


def test_lost_broker_warns_and_stop_still_succeeds(tmp_path: Path) -> None:
    with EmbeddedBrokers(run_dir=tmp_path / "brokers", durable=False) as brokers:
        # Given a gateway link on a broker of its own
        conn = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
        link = MqttLink("gw-lost", conn, MqttTopics("lost"))
        link.start()
        with capture_logs() as logs:
            # When the broker goes away
            brokers.stop_mosquitto()
            wait_for(lambda: disconnects(logs))
            # Then the gateway warns
            [entry] = disconnects(logs)
            assert entry["log_level"] == "warning" and entry["gateway_id"] == "gw-lost"
            # And a shutdown during the outage neither raises nor warns again
            link.stop()
        assert not link.connected
        assert [e["log_level"] for e in logs if e["log_level"] in ("warning", "error")] == [
            "warning"
        ]
