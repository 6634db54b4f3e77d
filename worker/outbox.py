# SPDX-License-Identifier: Apache-2.0
"""What a car publishes, on its own topics, and only what the broker will take.

Every message leaves through here: pulls, statuses, heartbeats, nacks and results.
Results are signed with the car's own key when it has one, and a result that encodes
larger than ``MqttConnection.max_message_bytes`` is not sent at all. The broker would
refuse it (Mosquitto drops it, some brokers drop the connection), the car would not
know, and the lease would only end when it expired; so the caller nacks it instead,
and the gateway dead-letters it at once.
"""

from __future__ import annotations

import paho.mqtt.client as mqtt

from parkpool.runtime.settings import MqttConnection
from parkpool.runtime.signing import ResultSigner
from parkpool.schemas import (
    LeaseHeartbeat,
    MqttTopics,
    Nack,
    PullRequest,
    Result,
    VehicleStatus,
    encode,
)


class Outbox:
    """One car's publishing side; ``too_large`` counts the results it could not send."""

    def __init__(
        self,
        client: mqtt.Client,
        topics: MqttTopics,
        vehicle_id: str,
        mqtt_settings: MqttConnection,
        signer: ResultSigner | None = None,
    ) -> None:
        self._client = client
        self._topics = topics
        self._vehicle_id = vehicle_id
        self.limit = mqtt_settings.max_message_bytes
        self._signer = signer
        self.too_large = 0

    def result(self, result: Result) -> str | None:
        """Sign and send a result; or, when it is over the size limit, say why it was not
        sent (every car's answer to the task would be as large, so no retry can help)."""
        if self._signer is not None:
            result = self._signer.sign(result)
        payload = encode(result)
        if len(payload) > self.limit:
            self.too_large += 1
            return f"result of {len(payload):,} bytes is over the MQTT limit of {self.limit:,}"
        topic = self._topics.result(self._vehicle_id, result.gateway_id)
        self._client.publish(topic, payload, qos=1)
        return None

    def nack(self, nack: Nack) -> None:
        topic = self._topics.nack(self._vehicle_id, nack.gateway_id)
        self._client.publish(topic, encode(nack), qos=1)

    def heartbeat(self, beat: LeaseHeartbeat) -> None:
        # QoS 0, as pulls: a lease lasts three beats, so a lost one costs nothing, and a
        # QoS 1 beat waits in the broker's in-flight window to the gateway behind the
        # results it has not yet acknowledged. While Kafka is out those pile up, and
        # beats stuck behind them let every running lease expire as a failed attempt.
        # It also halves the packets of the gateway's busiest inbound topic but pulls.
        topic = self._topics.heartbeat(self._vehicle_id, beat.gateway_id)
        self._client.publish(topic, encode(beat), qos=0)

    def pull(self, gateway_id: str, pull: PullRequest) -> None:
        # QoS 0: a pull is absolute and refreshed every pull_refresh_s, so a lost one only
        # delays work briefly, while QoS 1 would double the packets on the busiest topic.
        topic = self._topics.pull(self._vehicle_id, gateway_id)
        self._client.publish(topic, encode(pull), qos=0)

    def status(self, gateway_id: str, status: VehicleStatus) -> mqtt.MQTTMessageInfo:
        topic = self._topics.status(self._vehicle_id, gateway_id)
        return self._client.publish(topic, encode(status), qos=1)
