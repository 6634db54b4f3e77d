# SPDX-License-Identifier: Apache-2.0
"""Property-based tests of the vehicle worker's handlers: assignments, revokes, gateway statuses.

A real vehicle of a real fleet is connected to the session's brokers. Hostile payloads go
to its message handler exactly as its network loop would call it, so an exception that
escaped would fail the example; then more go through the broker, and a real job must
still complete. Nacks are read from the broker, as a gateway would see them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from parkpool.producer.client import ParkpoolClient
from parkpool.runtime.sealing import BoxKey, GatewayBox, seal_task
from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import (
    Assignment,
    AssignmentBatch,
    DecodeError,
    GatewayState,
    GatewayStatus,
    MqttTopics,
    Nack,
    PullRequest,
    Revoke,
    TaskChunk,
    decode,
    encode,
)
from parkpool.schemas.codec import peek_type
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import VehicleWorker
from tests.conftest import RunningGateway
from tests.fuzz_hostile import hostile_payloads
from tests.fuzz_messages import decode_outcome, messages
from tests.helpers import RawMqtt, wait_for

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]
Nacked = tuple[str, int, str]  # (gateway id, epoch, reason)
MALFORMED = (
    "assignment_malformed",
    "assignment_batch_malformed",
    "notice_malformed",
    "revoke_malformed",
)
OTHER_GATEWAYS = ("gwa", "gwb", "gwc")  # not the running gateway's id: its leases stay clean
_epochs = itertools.count(10**12)  # every assignment a lease of its own: none is a replay


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[BaseException]]:
    """Exceptions that ended any thread (the fleet's network loop, its ticker) meanwhile."""
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    yield errors


def deliver(worker: VehicleWorker, topic: str, payload: bytes) -> None:
    """Hand a message to the worker's handler, as its network loop does."""
    message = mqtt.MQTTMessage(topic=topic.encode())
    message.payload = payload
    worker._on_message(worker._client, None, message)


def expected_log(payload: bytes) -> list[str]:
    """The events a malformed message on the task topic must be logged with, in order
    (empty: it is valid, or holds something valid, and is not sent here)."""
    kind = peek_type(payload)
    if kind == Revoke.TYPE:
        return ["revoke_malformed"] if _fails(payload, Revoke) else []
    if kind == GatewayStatus.TYPE:
        return ["notice_malformed"] if _fails(payload, GatewayStatus) else []
    if kind == AssignmentBatch.TYPE:
        batch = decode_outcome(payload, AssignmentBatch)
        if isinstance(batch, DecodeError):
            return ["assignment_batch_malformed"]
        events = [expected_log(item) for item in batch.assignments]
        return [e for found in events for e in found] if all(events) else []
    return ["assignment_malformed"] if _fails(payload, Assignment) else []


def _fails(payload: bytes, cls: type) -> bool:
    return isinstance(decode_outcome(payload, cls), DecodeError)


@st.composite
def addressed_assignments(draw: st.DrawFn, vehicle_id: str) -> tuple[Assignment, Nacked]:
    """A well-formed assignment the worker must refuse, and the nack it must answer with.

    Addressed to another vehicle (invalid_task), past its lease (expired), or carrying a
    task no car can read (invalid_task); never one the worker would hold and run.
    """
    to_me = draw(st.booleans())
    expired = draw(st.booleans())
    if to_me and not expired:
        task = draw(st.binary(max_size=32).filter(lambda b: _fails(b, TaskChunk)))
        reason = "invalid_task"
    else:
        task = draw(messages(TaskChunk).map(encode) | st.binary(max_size=32))
        reason = "expired" if to_me else "invalid_task"
    now = time.time()
    assignment = Assignment(
        gateway_id=draw(st.sampled_from(OTHER_GATEWAYS)),
        vehicle_id=vehicle_id
        if to_me
        else draw(st.sampled_from(["car-else", "x", vehicle_id + "x"])),
        epoch=next(_epochs),
        attempt=draw(st.integers(1, 1_000_000)),
        lease_deadline=now - draw(st.floats(1, 1e6)) if expired else now + 3600,
        task=task,
    )
    return assignment, (assignment.gateway_id, assignment.epoch, reason)


class TestHostileTaskTopic:
    """Malformed assignments and revokes are logged with a reason, refused ones are nacked
    with the right reason, nothing escapes the handler, and the car still works."""

    def test_hostile_messages_then_a_job(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
        thread_errors: list[BaseException],
    ) -> None:
        # Given a gateway, one vehicle, and a peer listening to the vehicle's nacks
        gateway_factory()
        fleet = fleet_factory(1, prefix="fz")
        car = next(iter(fleet.vehicles.values()))
        topics = MqttTopics(namespace)
        listener = RawMqtt(mqtt_conn, f"nacks-{namespace}")
        listener.subscribe(f"{namespace}/v/{car.vehicle_id}/nack/+")
        task_topic = topics.task(car.vehicle_id)
        status_topic = topics.gateway_status("evil")
        nacks: list[Nacked] = []

        hostile = st.one_of(
            hostile_payloads(Assignment).map(lambda p: (task_topic, p)),
            hostile_payloads(Revoke).map(lambda p: (task_topic, p)),
            hostile_payloads(GatewayStatus).map(lambda p: (status_topic, p)),
        )
        refused = addressed_assignments(car.vehicle_id).map(lambda a: (task_topic, a))

        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(hostile | refused, min_size=1, max_size=6))
        @example([(task_topic, b"\x81\xa4type\xa6revoke"), (task_topic, _assignment_v2())])
        @example([(status_topic, b"\xc1"), (task_topic, b""), (task_topic, b"\x91" * 5000)])
        def batch(items: list[tuple[str, Any]]) -> None:
            # When hostile payloads and well-formed but refusable assignments arrive
            # (payloads that decode to a valid assignment or gateway status are left out:
            # they are not malformed, and the tests below cover the harmful ones)
            logs: list[str] = []
            with capture_logs() as entries:
                for topic, item in items:
                    if isinstance(item, tuple):
                        deliver(car, topic, encode(item[0]))
                        nacks.append(item[1])
                    elif topic == status_topic:
                        if _fails(item, GatewayStatus):
                            deliver(car, topic, item)
                    elif events := expected_log(item):
                        deliver(car, topic, item)
                        logs.extend(events)
            # Then nothing escaped (it would have failed here), each malformed one was
            # logged once, in order, with the reason it was refused
            logged = [e for e in entries if e["event"] in MALFORMED]
            assert [e["event"] for e in logged] == logs
            assert all(isinstance(e["reason"], str) and e["reason"] for e in logged)
            assert car.held == 0

        batch()
        # And every refused assignment was nacked once, to its gateway, with its reason
        wait_for(lambda: len(listener.received) >= len(nacks), 30, f"{len(nacks)} nacks")
        time.sleep(0.5)  # room for a nack too many to arrive
        got = [decode(msg.payload, Nack) for msg in listener.received]
        assert Counter((n.gateway_id, n.epoch, n.reason.value) for n in got) == Counter(nacks)
        # And the vehicle still completes a real job, every chunk once
        _job_completes(client)
        assert thread_errors == []
        listener.close()

    def test_hostile_messages_through_the_broker(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
        thread_errors: list[BaseException],
    ) -> None:
        # Given a gateway and one vehicle
        gateway_factory()
        fleet = fleet_factory(1, prefix="fb")
        car = next(iter(fleet.vehicles.values()))
        topics = MqttTopics(namespace)
        peer = RawMqtt(mqtt_conn, f"peer-{namespace}")
        # When malformed messages reach it over MQTT, on its task and gateway-status topics
        bad = [b"", b"\xc1", b"\x91" * 10_000, b"\x81\xa4type\xa6revoke", _assignment_v2()]
        bad += [bytes(range(256)) * 4096, encode(Revoke("gw1", car.vehicle_id, 1, "x"))[:-1]]
        with capture_logs() as entries:
            for payload in bad:
                peer.publish(topics.task(car.vehicle_id), payload)
                peer.publish(topics.gateway_status("evil"), payload)
            wait_for(
                lambda: sum(e["event"] in MALFORMED for e in entries) >= len(bad),
                10,
                "every malformed message to be logged",
            )
        # Then each one on the task topic was logged, and the vehicle still works
        assert sum(e["event"] in MALFORMED for e in entries) == len(bad)
        _job_completes(client)
        assert thread_errors == []
        peer.close()


def _assignment_v2() -> bytes:
    raw = encode(Assignment("gw1", "someone", 1, 1, time.time() + 60, b""))
    return raw.replace(b"\xa1v\x01", b"\xa1v\x02", 1)


def _job_completes(client: ParkpoolClient) -> None:
    x = np.arange(1000, dtype=np.float64)
    handle = client.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=100)
    assert handle.wait(timeout=60) == float(x.sum())
    ids = sorted(chunk.chunk_id for chunk in handle.chunks(timeout=1))
    assert ids == list(range(handle.n_chunks))
    assert handle.progress.duplicates == 0


def _probe_pull(peer: RawMqtt, topics: MqttTopics, probe: str = "probe") -> PullRequest:
    """Announce a made-up gateway with no backlog: the vehicle pulls at once, granting it a
    credit. That pull (``peer`` listens to the vehicle's pulls) shows what the vehicle
    believes: which gateways are online, and the epochs it has seen."""
    start = len(peer.received)
    status = GatewayStatus(probe, GatewayState.ONLINE, time.time(), 0)
    peer.publish(topics.gateway_status(probe), encode(status))

    def found() -> PullRequest | None:
        pulls = [decode(msg.payload, PullRequest) for msg in peer.received[start:]]
        return next((p for p in pulls if probe in p.grants), None)

    return wait_for(found, 10, "a pull granting the new gateway a credit")  # type: ignore[no-any-return]


def _nacks_to(peer: RawMqtt, count: int) -> None:
    wait_for(lambda: len(peer.received) >= count, 10, f"{count} nacks")


class TestWellFormedButHarmful:
    """Well-formed messages a car must not believe: another vehicle's assignment is nacked
    invalid_task and changes nothing; a gateway speaks only for itself."""

    @pytest.fixture
    def car(self, gateway_factory: GatewayFactory, fleet_factory: FleetFactory) -> VehicleWorker:
        gateway_factory()
        return next(iter(fleet_factory(1, prefix="wf").vehicles.values()))

    @pytest.fixture
    def peers(
        self, car: VehicleWorker, mqtt_conn: MqttConnection, namespace: str
    ) -> Iterator[tuple[RawMqtt, RawMqtt]]:
        """One peer listening to the car's pulls, one to its nacks."""
        pulls, nacks = RawMqtt(mqtt_conn, f"p-{namespace}"), RawMqtt(mqtt_conn, f"n-{namespace}")
        pulls.subscribe(f"{namespace}/v/{car.vehicle_id}/pull/+")
        nacks.subscribe(f"{namespace}/v/{car.vehicle_id}/nack/+")
        yield pulls, nacks
        pulls.close()
        nacks.close()

    def test_assignment_for_another_vehicle_is_nacked_invalid_task(
        self,
        car: VehicleWorker,
        peers: tuple[RawMqtt, RawMqtt],
        client: ParkpoolClient,
        namespace: str,
    ) -> None:
        # Given a valid task in an assignment addressed to another vehicle
        pulls, nacks = peers
        task = TaskChunk("job-x", 0, 1, "reduce", {"op": "sum"}, {"x": np.ones(3)}, "t", 9e9, 1.0)
        assignment = Assignment("gwz", "someone-else", 77, 1, time.time() + 60, encode(task))
        # When it reaches this car
        pulls.publish(MqttTopics(namespace).task(car.vehicle_id), encode(assignment))
        # Then the car nacks it invalid_task, naming the task, and holds nothing
        _nacks_to(nacks, 1)
        nack = decode(nacks.received[0].payload, Nack)
        assert (nack.gateway_id, nack.epoch, nack.reason.value) == ("gwz", 77, "invalid_task")
        assert (nack.job_id, nack.chunk_id, nack.vehicle_id) == ("job-x", 0, car.vehicle_id)
        assert car.held == 0 and car.completed == 0
        _job_completes(client)

    def test_sealed_task_the_car_cannot_open_is_nacked_and_not_run(
        self,
        car: VehicleWorker,
        peers: tuple[RawMqtt, RawMqtt],
        client: ParkpoolClient,
        namespace: str,
    ) -> None:
        # Given a confidential task whose data key is sealed to some other car
        pulls, nacks = peers
        plain = TaskChunk("job-s", 0, 1, "reduce", {"op": "sum"}, {"x": np.ones(3)}, "t", 9e9, 1.0)
        gateway, stranger = BoxKey.generate(), BoxKey.generate()
        task = seal_task(plain, gateway.public, BoxKey.generate().public)
        key = GatewayBox((gateway,)).rewrap(task, stranger.public)
        assignment = Assignment(
            "gwz", car.vehicle_id, 78, 1, time.time() + 60, encode(task), inputs_key=key
        )
        # When it reaches this car
        pulls.publish(MqttTopics(namespace).task(car.vehicle_id), encode(assignment))
        # Then the car nacks it as a failed attempt, saying why, and runs nothing
        _nacks_to(nacks, 1)
        nack = decode(nacks.received[0].payload, Nack)
        assert (nack.gateway_id, nack.epoch, nack.reason.value) == ("gwz", 78, "kernel_error")
        assert nack.detail.startswith("sealed inputs: unsealable")
        assert car.held == 0 and car.completed == 0
        _job_completes(client)

    def test_misaddressed_assignment_leaves_seen_epochs_alone(
        self, car: VehicleWorker, peers: tuple[RawMqtt, RawMqtt], namespace: str
    ) -> None:
        # Given a car working for gw1
        pulls, nacks = peers
        topics = MqttTopics(namespace)
        # When an assignment from "gw1" addressed to another vehicle quotes a huge epoch
        forged = Assignment("gw1", "someone-else", 2**62, 1, time.time() + 60, b"")
        pulls.publish(topics.task(car.vehicle_id), encode(forged))
        _nacks_to(nacks, 1)
        # Then the epoch the car reports to gw1 as seen does not move
        _probe_pull(pulls, topics)
        assert car.gateways.seen_epoch("gw1") < 2**62

    def test_sixty_five_gateway_ids_do_not_stop_pulls(
        self,
        car: VehicleWorker,
        peers: tuple[RawMqtt, RawMqtt],
        client: ParkpoolClient,
        namespace: str,
        thread_errors: list[BaseException],
    ) -> None:
        # Given a car, and 65 expired assignments from as many gateway ids (a year of
        # gateway restarts with fresh ids would do the same)
        pulls, nacks = peers
        topics = MqttTopics(namespace)
        for i in range(65):
            old = Assignment(f"gone{i}", car.vehicle_id, 1000 + i, 1, time.time() - 10, b"")
            pulls.publish(topics.task(car.vehicle_id), encode(old))
        # When they have been refused (nacked expired)
        _nacks_to(nacks, 65)
        # Then the car still pulls, naming only the gateway it pulls from, no thread
        # died, and it still completes a job
        assert set(_probe_pull(pulls, topics).seen) <= {"probe"}
        assert thread_errors == []
        _job_completes(client)

    def test_status_counts_only_on_its_own_gateways_topic(
        self, car: VehicleWorker, peers: tuple[RawMqtt, RawMqtt], namespace: str
    ) -> None:
        # Given a car that knows gw1 is online
        pulls, _ = peers
        topics = MqttTopics(namespace)
        # When another gateway's topic says gw1 is offline
        spoof = GatewayStatus("gw1", GatewayState.OFFLINE, time.time())
        pulls.publish(topics.gateway_status("evil"), encode(spoof))
        # Then gw1 is still one of the car's gateways
        _probe_pull(pulls, topics)
        assert "gw1" in car.gateways.mine()
