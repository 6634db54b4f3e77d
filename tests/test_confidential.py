# SPDX-License-Identifier: Apache-2.0
"""Confidential jobs on the real brokers: Kafka, Mosquitto and the logs never see the
inputs or the results in clear, yet the caller gets the right answer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer
from structlog.testing import capture_logs

from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobFailed, JobHandle
from parkpool.runtime.kafka import producer_config
from parkpool.runtime.sealing import BoxKey, generate_box_key, open_task, seal_outputs
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import (
    Capabilities,
    ConfigError,
    DeadLetter,
    MqttTopics,
    PullRequest,
    Result,
    decode,
    encode,
)
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from parkpool.worker.kernels import REGISTRY
from tests.conftest import RunningGateway
from tests.helpers import RawMqtt, first_assignment, hold_lease, read_all, read_topic, wait_for

MARKER = 4321.25  # sums of it are exact in float64; its bytes are what a leak shows
CHUNK = 256


@pytest.fixture
def box_key(tmp_path: Path) -> tuple[Path, Path]:
    return generate_box_key(tmp_path / "keys", "gateway-box")


@pytest.fixture
def sealing_client(
    namespace: str, kafka_conn: KafkaConnection, box_key: tuple[Path, Path]
) -> Iterator[ParkpoolClient]:
    settings = ProducerSettings(
        kafka_conn, namespace, gateway_box_key=box_key[1], verification=Level.UNCHECKED
    )
    with ParkpoolClient(settings) as sdk:
        yield sdk


def _sniffer(mqtt_conn: MqttConnection, namespace: str) -> RawMqtt:
    """Everything that crosses Mosquitto in this namespace, as a broker operator sees it."""
    sniffer = RawMqtt(mqtt_conn, f"sniff-{namespace}")
    sniffer.subscribe(f"{namespace}/#")
    return sniffer


def _scripted_car(
    conn: MqttConnection, topics: MqttTopics, vehicle_id: str, box_key: bytes = b""
) -> tuple[RawMqtt, bytes]:
    """A car we speak for by hand, listening for its tasks, and its pull for two tasks."""
    car = RawMqtt(conn, f"{vehicle_id}-{topics.namespace}")
    car.subscribe(topics.task(vehicle_id))
    caps = Capabilities("numpy", tuple(REGISTRY), box_key=box_key)
    return car, encode(PullRequest(vehicle_id, 2, caps, {}, {"gw1": 2}))


def _leaks(blobs: list[bytes]) -> list[int]:
    """Indexes of the blobs in which the inputs' or the results' float bytes appear."""
    needles = (np.float64(MARKER).tobytes(), np.float64(MARKER * CHUNK).tobytes())
    return [i for i, blob in enumerate(blobs) if any(n in blob for n in needles)]


@pytest.mark.integration
class TestConfidentialJob:
    """A sealed job completes, and no broker topic or log line holds its data in clear."""

    @pytest.mark.parametrize("confidential", [True, False], ids=["sealed", "plain-control"])
    def test_brokers_and_logs_never_see_the_data(
        self,
        confidential: bool,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        sealing_client: ParkpoolClient,
        box_key: tuple[Path, Path],
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given gateways holding the box key, a fleet, and someone reading all of MQTT
        sniffer = _sniffer(mqtt_conn, namespace)
        gateway_factory(box_keys=(box_key[0],))
        fleet_factory(3)
        x = np.full(CHUNK * 8, MARKER)
        # When a job is submitted (the plain control shows that the check below can see)
        with capture_logs() as entries:
            handle = sealing_client.submit(
                "reduce", {"x": x, "op": "sum"}, chunk_elems=CHUNK, confidential=confidential
            )
            # Then the caller gets the right answer
            assert handle.wait(timeout=60) == MARKER * CHUNK * 8
        # And the data is in clear on Kafka and MQTT exactly when the job was not sealed
        topics = sealing_client.topics
        records = read_all(kafka_conn, topics.tasks) + read_all(kafka_conn, topics.results)
        kafka = [r.value() or b"" for r in records]
        mqtt = [bytes(msg.payload) for msg in sniffer.received]
        sniffer.close()
        assert len(kafka) == 16 and len(mqtt) > 16
        if confidential:
            assert _leaks(kafka) == [] and _leaks(mqtt) == []
        else:
            assert len(_leaks(kafka)) == 16 and _leaks(mqtt)
        # And no log line holds the data either way
        assert entries
        assert not [e for e in entries if any(str(MARKER)[:7] in str(v) for v in e.values())]


@pytest.mark.integration
class TestWhoMayOpen:
    """Sealed work goes only where it can be opened; where it never can, it is refused."""

    def test_a_gateway_without_the_key_dead_letters_as_unsealable(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        sealing_client: ParkpoolClient,
        kafka_conn: KafkaConnection,
    ) -> None:
        # Given a gateway started without --box-key, and a fleet
        gateway = gateway_factory()
        fleet_factory(2)
        # When a confidential job arrives
        handle = sealing_client.submit(
            "reduce", {"x": np.ones(512), "op": "sum"}, chunk_elems=256, confidential=True
        )
        # Then every chunk is dead-lettered as unsealable, and the caller is told
        with pytest.raises(JobFailed) as failed:
            handle.wait(timeout=60)
        assert set(failed.value.reasons.values()) == {"unsealable"}
        letters = read_topic(kafka_conn, sealing_client.topics.dead_letter, 2)
        assert {decode(r.value() or b"", DeadLetter).detail for r in letters} == {
            "this gateway holds no box key (--box-key)"
        }
        assert gateway.metric("parkpool_gateway_dead_lettered_total", reason="unsealable") == 2

    def test_a_car_with_an_unusable_box_key_costs_no_task(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        sealing_client: ParkpoolClient,
        box_key: tuple[Path, Path],
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
        kafka_conn: KafkaConnection,
    ) -> None:
        # Given a gateway with the key, and a car announcing a key nothing can be sealed
        # to (the all-zero point)
        gateway = gateway_factory(box_keys=(box_key[0],))
        handle = sealing_client.submit(
            "reduce", {"x": np.ones(512), "op": "sum"}, chunk_elems=256, confidential=True
        )
        car, pull = _scripted_car(mqtt_conn, mqtt_topics, "zerocar", box_key=bytes(32))
        # When it asks for work
        car.publish(mqtt_topics.pull("zerocar", "gw1"), pull)
        refused = {"source": "mqtt_pull", "reason": "bad_box_key"}
        wait_for(
            lambda: gateway.metric("parkpool_gateway_dropped_total", **refused) >= 1,
            30,
            "the car's key to be refused",
        )
        # Then it got nothing, no task was dead-lettered, and real cars complete the job
        fleet_factory(1)
        assert handle.wait(timeout=60) == 512.0
        assert first_assignment(car) is None  # notices ("no work here") only
        assert read_all(kafka_conn, sealing_client.topics.dead_letter) == []
        car.close()

    def test_a_car_without_a_box_key_is_never_sent_sealed_work(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        sealing_client: ParkpoolClient,
        box_key: tuple[Path, Path],
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
    ) -> None:
        # Given a gateway with the key, and one car that announces no box key
        gateway = gateway_factory(box_keys=(box_key[0],))
        car, pull = _scripted_car(mqtt_conn, mqtt_topics, "oldcar")
        wait_for(gateway.gateway.readiness, 30, "the gateway to be ready")
        # When a confidential job is queued and the car keeps asking for work
        handle = sealing_client.submit(
            "reduce", {"x": np.ones(512), "op": "sum"}, chunk_elems=256, confidential=True
        )

        def skipped() -> bool:
            car.publish(mqtt_topics.pull("oldcar", "gw1"), pull)
            skips = gateway.metric("parkpool_gateway_dispatch_skipped_total", reason="no_box_key")
            return skips > 0

        wait_for(skipped, 30, "the gateway to skip the car for want of a box key")
        # Then the car got nothing, and a car that can open the work completes the job
        assert first_assignment(car) is None  # notices ("no work here") only
        car.close()
        fleet_factory(1)
        assert handle.wait(timeout=60) == 512.0

    def test_a_car_that_may_take_nothing_is_not_looked_at_on_every_turn(
        self,
        gateway_factory: Callable[..., RunningGateway],
        sealing_client: ParkpoolClient,
        box_key: tuple[Path, Path],
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
    ) -> None:
        # Given a car without a box key, hungry, and only confidential work queued
        gateway = gateway_factory(box_keys=(box_key[0],))
        car, pull = _scripted_car(mqtt_conn, mqtt_topics, "oldcar")
        wait_for(gateway.gateway.readiness, 30, "the gateway to be ready")
        sealing_client.submit(
            "reduce", {"x": np.ones(512), "op": "sum"}, chunk_elems=256, confidential=True
        )
        car.publish(mqtt_topics.pull("oldcar", "gw1"), pull)
        skipped = "parkpool_gateway_dispatch_skipped_total"
        wait_for(lambda: gateway.metric(skipped, reason="no_box_key") > 0, 30, "a first look")
        # When two seconds pass with nothing new
        before = gateway.metric(skipped, reason="no_box_key")
        time.sleep(2.0)
        # Then the gateway looked through the queue for it about once a second, not on
        # each turn of its loop (hundreds a second), while it stays hungry
        assert gateway.metric(skipped, reason="no_box_key") - before <= 4
        assert "oldcar" in gateway.gateway.vehicles.hungry()
        car.close()


@pytest.mark.integration
class TestGatewayRefusals:
    """A car that answers a confidential task in clear is refused: Kafka never gets it."""

    def test_an_unsealed_result_is_dropped_and_the_lease_kept(
        self,
        gateway_factory: Callable[..., RunningGateway],
        sealing_client: ParkpoolClient,
        box_key: tuple[Path, Path],
        kafka_conn: KafkaConnection,
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
    ) -> None:
        # Given a scripted car holding the lease of a one-chunk confidential job
        gateway = gateway_factory(box_keys=(box_key[0],), lease_seconds=300)
        handle = sealing_client.submit(
            "reduce", {"x": np.full(4, MARKER), "op": "sum"}, chunk_elems=4, confidential=True
        )
        car_key = BoxKey.generate()
        holder = hold_lease(mqtt_conn, mqtt_topics, box_key=car_key.public)
        task = open_task(holder.task, holder.assignment.inputs_key, car_key)
        answer = {"value": np.array(task.inputs["x"].sum())}
        # When it sends the answer in clear
        topic = mqtt_topics.result("holder", "gw1")
        holder.car.publish(topic, encode(holder.result(answer)))
        dropped = {"source": "mqtt_result", "reason": "unsealed_result"}
        wait_for(
            lambda: gateway.metric("parkpool_gateway_dropped_total", **dropped) == 1,
            10,
            "the unsealed result to be refused",
        )
        # Then nothing reached the results topic, and the sealed answer still completes it
        assert read_all(kafka_conn, sealing_client.topics.results) == []
        holder.car.publish(topic, encode(seal_outputs(holder.result(answer), task.reply_key)))
        handle.wait(timeout=30)
        assert float(next(handle.chunks(timeout=1)).outputs["value"]) == 4 * MARKER
        holder.close()


@pytest.mark.integration
class TestSdkRefusals:
    """A result sealed to some other key is counted and logged, and its chunk does not
    wait for ever: the gateway passed the result on and will not redo the chunk, so the
    client redoes it (checks on) or fails it by name (checks off)."""

    @staticmethod
    def _forge(
        client: ParkpoolClient, kafka_conn: KafkaConnection, job_id: str | None = None
    ) -> JobHandle[Any]:
        """A confidential job of two chunks, with no gateway to run it (or ``job_id``'s,
        followed), and a result for chunk 0 sealed to a key that is not the client's,
        sent twice (at-least-once)."""
        if job_id is None:
            handle = client.submit(
                "reduce", {"x": np.ones(512), "op": "sum"}, chunk_elems=256, confidential=True
            )
            job_id = handle.job_id
        followed = client.handle(job_id)
        assert followed is not None
        # (stamped with the submission's created_at, as a car's result is)
        created = followed.created_at
        plain = Result(job_id, 0, 2, "car1", "gw1", 1, 1, {"v": np.ones(1)}, 0.1, created, created)
        forged = encode(seal_outputs(plain, BoxKey.generate().public))
        producer = Producer(producer_config(kafka_conn))
        for _ in range(2):
            producer.produce(client.reply_topic, forged, key=job_id)
        assert producer.flush(10) == 0
        refused = "parkpool_sdk_results_refused_total"
        wait_for(
            lambda: client.metrics.value(refused, reason="unsealable") == 2,
            30,
            "both copies to be refused as unsealable",
        )
        return followed

    def test_a_result_the_client_cannot_open_is_counted_and_its_chunk_redone(
        self, sealing_client: ParkpoolClient, kafka_conn: KafkaConnection
    ) -> None:
        # Given a client with checks, When a result it cannot open comes twice
        handle = self._forge(sealing_client, kafka_conn)
        # Then the chunk is sent again for another car, once, and nothing has failed
        redone = "parkpool_sdk_chunks_redone_total"
        wait_for(
            lambda: sealing_client.metrics.value(redone, why="unusable_outputs") == 1,
            10,
            "chunk 0 to be redone",
        )
        assert (handle.progress.done, handle.progress.dead_lettered) == (0, 0)
        assert sealing_client.metrics.value(redone, why="unusable_outputs") == 1

    def test_without_checks_the_chunk_fails_by_name(
        self, namespace: str, kafka_conn: KafkaConnection, box_key: tuple[Path, Path]
    ) -> None:
        settings = ProducerSettings(kafka_conn, namespace, gateway_box_key=box_key[1], verify=False)
        with ParkpoolClient(settings) as unchecked:
            # Given a client without checks, When a result it cannot open comes twice
            handle = self._forge(unchecked, kafka_conn)
            # Then chunk 0 fails at once, by name, rather than being waited for
            wait_for(lambda: handle.progress.dead_lettered == 1, 10, "chunk 0 to fail")
            assert handle.progress.done == 0
            # And once the other chunk fails too, the job ends with the reason
            handle.refused(1, "test: no car")
            with pytest.raises(JobFailed) as failed:
                handle.wait(timeout=10)
            assert "outputs_unreadable" in failed.value.reasons[0]
            assert "unsealable: wrong key" in failed.value.reasons[0]

    def test_a_follower_counts_a_result_it_cannot_open_and_waits_for_the_redo(
        self, namespace: str, kafka_conn: KafkaConnection, box_key: tuple[Path, Path]
    ) -> None:
        reply_key, _ = generate_box_key(box_key[0].parent, "reply")
        settings = ProducerSettings(
            kafka_conn, namespace, gateway_box_key=box_key[1], reply_box_key=reply_key
        )
        with ParkpoolClient(settings) as submitter, ParkpoolClient(settings) as follower:
            handle = submitter.submit(
                "reduce", {"x": np.ones(512), "op": "sum"}, chunk_elems=256, confidential=True
            )
            followed = follower.attach(handle.job_id, timeout=30)
            # Given a follower, When a result it cannot open comes for chunk 0
            self._forge(follower, kafka_conn, handle.job_id)
            # Then its view of chunk 0 has not failed: the submitter redoes it
            assert (followed.progress.done, followed.progress.dead_lettered) == (0, 0)
            # And the redo's result, sealed to the submitter's key, is taken when it comes
            created = handle.created_at
            plain = Result(
                handle.job_id, 0, 2, "car2", "gw1", 2, 2, {"v": np.ones(1)}, 0.1, created, created
            )
            producer = Producer(producer_config(kafka_conn))
            sealed = seal_outputs(plain, BoxKey.load(reply_key).public)
            producer.produce(submitter.reply_topic, encode(sealed), key=handle.job_id)
            assert producer.flush(10) == 0
            wait_for(lambda: followed.progress.done == 1, 30, "the redo's result")
            assert followed.progress.dead_lettered == 0


class TestSdkConfiguration:
    """A confidential job without the gateways' key is refused before anything is sent,
    and a key file that cannot be used is refused when the client starts."""

    def test_an_unusable_gateway_key_fails_the_client_start(
        self, tmp_path: Path, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        bad = tmp_path / "gateway-box.pub"
        bad.write_text(bytes(32).hex())  # the all-zero point: nothing can be sealed to it
        with pytest.raises(ConfigError, match=r"gateway-box\.pub is not usable"):
            ParkpoolClient(ProducerSettings(kafka_conn, namespace, gateway_box_key=bad))

    def test_confidential_needs_the_gateway_key(self, client: ParkpoolClient) -> None:
        with pytest.raises(ConfigError, match="gateway_box_key"):
            client.submit("reduce", {"x": np.ones(4), "op": "sum"}, confidential=True)
        assert client.metrics.value("parkpool_sdk_chunks_total", status="published") == 0
