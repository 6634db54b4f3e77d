# SPDX-License-Identifier: Apache-2.0
"""Property-based tests of the gateway's MQTT handlers: pull, status, result, nack, heartbeat.

Hostile events go straight onto a running gateway's MQTT event queue (QoS 0, so there is
nothing to acknowledge), followed by a sentinel of a kind no handler knows: the loop
handles the queue in order, so once the sentinel is counted every event before it has
been handled, and the drop counter must have grown by exactly one per event, by reason.
Real vehicles and a real job run alongside, on the session's real brokers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from parkpool.gateway.gateway import Gateway, GatewaySettings
from parkpool.gateway.mqtt_link import MqttEvent
from parkpool.producer.client import ParkpoolClient
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import (
    Capabilities,
    DecodeError,
    LeaseHeartbeat,
    MqttTopics,
    Nack,
    NackReason,
    PreemptionRecord,
    PullRequest,
    Result,
    VehicleState,
    VehicleStatus,
    encode,
)
from parkpool.worker.fleet import Fleet
from parkpool.worker.kernels import REGISTRY, reference
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningGateway
from tests.fuzz_hostile import hostile_payloads
from tests.fuzz_messages import body_pairs, decode_outcome, pack_pairs
from tests.helpers import LeaseHolder, hold_lease, read_all, wait_for

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]
Drop = tuple[str, str]  # (source, reason) labels of parkpool_gateway_dropped_total
KINDS: dict[str, type] = {
    "pull": PullRequest,
    "status": VehicleStatus,
    "result": Result,
    "nack": Nack,
    "heartbeat": LeaseHeartbeat,
}
SENTINEL: Drop = ("mqtt", "unknown_topic")
MQTT_MAX_PAYLOAD = 33554432  # message_size_limit in broker_config/mosquitto.conf
LEASED = ("result", "nack", "heartbeat")  # kinds that must quote a lease of their vehicle
_serial = itertools.count()


def dropped(gateway: Gateway) -> Counter[Drop]:
    """parkpool_gateway_dropped_total by (source, reason), read from the registry."""
    counts: Counter[Drop] = Counter()
    for metric in gateway.metrics.registry.collect():
        if metric.name == "parkpool_gateway_dropped":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    counts[(sample.labels["source"], sample.labels["reason"])] = int(sample.value)
    return counts


def event(kind: str, vehicle_id: str, payload: bytes) -> MqttEvent:
    return MqttEvent(kind, vehicle_id, payload, mid=0, qos=0)


def feed(running: RunningGateway, events: list[MqttEvent]) -> Counter[Drop]:
    """Hand events to the gateway's loop; return what they added to the drop counter."""
    gateway = running.gateway
    before = dropped(gateway)
    for item in [*events, event("sentinel", "sentinel", b"")]:
        gateway.mqtt.events.put(item)
    wait_for(lambda: dropped(gateway)[SENTINEL] > before[SENTINEL], 10, "the events to be handled")
    added = dropped(gateway) - before
    added[SENTINEL] -= 1
    return +added  # only the positive counts


def expected_drop(kind: str, payload: bytes) -> Drop | None:
    """How the gateway must count a payload from a vehicle that holds no lease."""
    outcome = decode_outcome(payload, KINDS[kind])
    if isinstance(outcome, DecodeError):
        return (f"mqtt_{kind}", outcome.reason)
    if kind in LEASED:
        return (f"mqtt_{kind}", "stale_or_fenced")
    return None  # a well-formed pull or status: acted upon, not dropped


def alive(running: RunningGateway) -> None:
    assert running.error is None, f"gateway loop crashed: {running.error!r}"
    assert running.gateway.health()[0], running.gateway.health()[1]
    assert running.thread.is_alive()


HOSTILE_EVENTS = st.sampled_from(sorted(KINDS)).flatmap(
    lambda kind: hostile_payloads(KINDS[kind]).map(lambda payload: (kind, payload))
)
_CAPS = Capabilities("numpy", ("reduce",))


class TestHostileEvents:
    """Each hostile MQTT message is dropped and counted once, by reason; work goes on."""

    def test_hostile_events_alongside_a_job(
        self, gateway_factory: GatewayFactory, fleet_factory: FleetFactory, client: ParkpoolClient
    ) -> None:
        # Given a gateway, two vehicles, and a job of 20 chunks under way
        running = gateway_factory()
        fleet_factory(2)
        x = np.arange(2000, dtype=np.float64)
        handle = client.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=100)

        @settings(
            max_examples=50,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.lists(HOSTILE_EVENTS, min_size=1, max_size=6))
        @example([("result", b"\xc1"), ("pull", b""), ("status", b"\x91" * 5000)])
        @example([("heartbeat", encode(LeaseHeartbeat("j", 0, "v", "gw1", 1, 1.0)))])
        @example([("nack", encode(Nack("j", 0, "v", "gw1", 1, NackReason.INVALID_TASK)))])
        @example([("result", encode(PullRequest("v", 1, _CAPS)))])
        @example([(k, _with(PullRequest("v", 1, _CAPS), credits=-1)) for k in ("pull", "result")])
        @example(
            [("status", _with(VehicleStatus("v", VehicleState.ONLINE, 1.0), sent_at=math.nan))]
        )
        def hostile_batch(batch: list[tuple[str, bytes]]) -> None:
            # When hostile messages arrive from vehicles that hold no lease (each from its
            # own id, so no rate limit interferes); well-formed pulls and statuses are
            # left out: they are not hostile, and TestSpoofedIdentity covers the others
            events = [event(kind, f"evil{next(_serial)}", payload) for kind, payload in batch]
            expected = Counter(
                drop for e in events if (drop := expected_drop(e.kind, e.payload)) is not None
            )
            events = [e for e in events if expected_drop(e.kind, e.payload) is not None]
            # Then each is counted exactly once, under the reason decoding gave or as
            # stale_or_fenced, and the loop is alive
            assert feed(running, events) == expected
            alive(running)

        hostile_batch()
        # And the job that ran meanwhile completes, every chunk exactly once
        assert handle.wait(timeout=60) == float(x.sum())
        ids = sorted(chunk.chunk_id for chunk in handle.chunks(timeout=1))
        assert ids == list(range(handle.n_chunks))
        assert handle.progress.duplicates == 0
        alive(running)


def _with(message: Any, **fields: Any) -> bytes:
    """A message's bytes with fields set to values its constructor would refuse."""
    return pack_pairs([(k, fields.get(k, v)) for k, v in body_pairs(message)])


class TestForgedAndStaleMessages:
    """Well-formed messages quoting the wrong lease, vehicle or gateway are fenced and counted;
    the lease stays with its vehicle, whose one result completes the chunk exactly once."""

    def test_forgeries_leave_the_lease_to_its_vehicle(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given a scripted vehicle that holds the lease of a one-chunk job
        running = gateway_factory(lease_seconds=120)
        topics = MqttTopics(namespace)
        x = np.arange(8, dtype=np.float64)
        handle = client.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=8)
        holder = hold_lease(mqtt_conn, topics, "rawcar")
        car, assignment, task = holder.car, holder.assignment, holder.task
        pull = PullRequest("rawcar", 1, Capabilities("numpy", tuple(REGISTRY)), {}, {"gw1": 1})
        genuine = _genuine(holder)
        nack = Nack(task.job_id, 0, "rawcar", "gw1", assignment.epoch, NackReason.INVALID_TASK)
        beat = LeaseHeartbeat(task.job_id, 0, "rawcar", "gw1", assignment.epoch, time.time())
        # When forged, stale and malformed messages about it arrive
        stale = ("mqtt_result", "stale_or_fenced")
        forgeries = [
            (event("result", "rawcar", encode(_re(genuine, epoch=assignment.epoch + 1))), stale),
            (event("result", "rawcar", encode(_re(genuine, epoch=assignment.epoch - 1))), stale),
            (event("result", "othercar", encode(genuine)), stale),  # topic is not its vehicle
            (event("result", "othercar", encode(_re(genuine, vehicle_id="othercar"))), stale),
            (event("result", "rawcar", encode(_re(genuine, vehicle_id="othercar"))), stale),
            (event("result", "rawcar", encode(_re(genuine, gateway_id="gw2"))), stale),
            (event("result", "rawcar", encode(_re(genuine, job_id="otherjob"))), stale),
            (event("result", "rawcar", _with(genuine, v=2)), ("mqtt_result", "unknown_version")),
            (event("result", "rawcar", encode(nack)), ("mqtt_result", "wrong_message_type")),
            (
                event("result", "rawcar", _with(genuine, exec_seconds=math.nan)),
                ("mqtt_result", "out_of_range"),
            ),
            (event("result", "rawcar", _dup_key(genuine, "epoch", assignment.epoch + 7)), stale),
            (event("nack", "othercar", encode(nack)), ("mqtt_nack", "stale_or_fenced")),
            (event("nack", "rawcar", encode(_re(nack, epoch=1))), ("mqtt_nack", "stale_or_fenced")),
            (
                event("heartbeat", "rawcar", encode(_re(beat, epoch=1))),
                ("mqtt_heartbeat", "stale_or_fenced"),
            ),  # a lease that does not exist
            (event("heartbeat", "othercar", encode(beat)), ("mqtt_heartbeat", "stale_or_fenced")),
            (event("pull", "rawcar", _with(pull, credits=-1)), ("mqtt_pull", "out_of_range")),
            (event("pull", "rawcar", _with(pull, grants={"gw1": 2})), ("mqtt_pull", "bad_value")),
            (event("pull", "rawcar", _with(pull, dwell_s=math.inf)), ("mqtt_pull", "out_of_range")),
            (
                event("status", "rawcar", _with(_status(), sent_at=math.nan)),
                ("mqtt_status", "out_of_range"),
            ),
            (
                event("status", "rawcar", _with(_status(), state="exploded")),
                ("mqtt_status", "bad_value"),
            ),
        ]
        added = feed(running, [e for e, _ in forgeries])
        # Then each is counted once under its reason, and the lease is still the car's
        assert added == Counter(drop for _, drop in forgeries)
        assert running.gateway.leases.get(assignment.epoch) is not None
        # When the car's own result comes, and then the same result again
        car.publish(topics.result("rawcar", "gw1"), encode(genuine))
        assert handle.wait(timeout=30) == float(x.sum())
        assert feed(running, [event("result", "rawcar", encode(genuine))]) == Counter([stale])
        # Then the chunk reached the caller once, and Kafka holds one result for it
        assert [c.chunk_id for c in handle.chunks(timeout=1)] == [0]
        assert handle.progress.duplicates == 0
        results = read_all(kafka_conn, client.topics.results)
        assert sum(r.key() == task.job_id.encode() for r in results) == 1
        assert running.metric("parkpool_gateway_tasks_total", status="completed") == 1
        alive(running)
        car.close()


def _genuine(holder: LeaseHolder) -> Result:
    """The result the holder's car would send: the kernel's true answer."""
    task = holder.task
    return holder.result(reference(task.kernel, task.params, task.inputs))


def _re(message: Any, **fields: Any) -> Any:
    return dataclasses.replace(message, **fields)


def _dup_key(message: Any, key: str, last: Any) -> bytes:
    """The message with ``key`` twice: its own value first, ``last`` after (which wins)."""
    pairs = body_pairs(message)
    return pack_pairs([*pairs, (key, last)])


def _status() -> VehicleStatus:
    return VehicleStatus("rawcar", VehicleState.ONLINE, time.time())


class TestSpoofedIdentity:
    """A pull or status whose vehicle id is not its topic's is not acted upon, and counted."""

    @pytest.mark.parametrize("kind", ["pull", "status"])
    def test_vehicle_mismatch_is_dropped_and_counted(
        self, kind: str, gateway_factory: GatewayFactory
    ) -> None:
        # Given a gateway
        running = gateway_factory()
        # When a vehicle speaks for another one
        payload = (
            encode(PullRequest("victim", 4, _CAPS, {}, {"gw1": 4}))
            if kind == "pull"
            else encode(VehicleStatus("victim", VehicleState.OFFLINE, time.time()))
        )
        added = feed(running, [event(kind, "impostor", payload)])
        # Then the gateway believes none of it
        assert running.gateway.vehicles.get("victim") is None
        alive(running)
        # And counts it as dropped, like any other message it refuses
        assert sum(n for (source, _), n in added.items() if source == f"mqtt_{kind}") == 1


def _label_values(gateway: Gateway, metric_name: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for metric in gateway.metrics.registry.collect()
        if metric.name == metric_name
        for sample in metric.samples
        if label in sample.labels
    }


class TestVehicleStringsAreNotLabels:
    """Strings a vehicle sends cannot mint Prometheus series: label values stay a closed set."""

    def test_made_up_reasons_do_not_grow_series(self, gateway_factory: GatewayFactory) -> None:
        # Given a gateway
        running = gateway_factory()
        # When 50 cars report draining for made-up reasons, with made-up preemptions
        events = []
        for i in range(50):
            stops = tuple(PreemptionRecord(f"made-up-{i}-{j}", 0.01) for j in range(4))
            status = VehicleStatus(
                f"chatty{i}", VehicleState.DRAINING, time.time(), f"reason {i}", preemptions=stops
            )
            events.append(event("status", f"chatty{i}", encode(status)))
        feed(running, events)
        time.sleep(1.5)  # the fleet gauges are refreshed once a second
        alive(running)
        # Then the gateway's series stay few: the policies' reasons, not the cars' words
        preemptions = _label_values(running.gateway, "parkpool_fleet_preemptions", "reason")
        vehicles = _label_values(running.gateway, "parkpool_fleet_vehicles", "reason")
        counts = f"{len(preemptions)} preemption reasons, {len(vehicles)} vehicle reasons"
        assert max(len(preemptions), len(vehicles)) <= 32, counts


@pytest.fixture
def crashable_gateway(
    namespace: str, kafka_conn: KafkaConnection, mqtt_conn: MqttConnection
) -> Iterator[RunningGateway]:
    """A gateway whose crash is what the test looks for: teardown stops it without failing
    a second time on the same crash (the test has already said what happened)."""
    settings = GatewaySettings(
        "gw1",
        kafka_conn,
        mqtt_conn,
        namespace,
        lease_seconds=120,
        session_timeout_ms=TEST_SESSION_TIMEOUT_MS,
        drain_seconds=0,  # a scripted car's lease never ends: stopping need not wait for it
    )
    running = RunningGateway(settings)
    yield running
    running.gateway.stopping.set()
    running.thread.join(30)


def _result_of_size(result: Result, size: int) -> bytes:
    """The result with one byte array as output, grown until its encoding is ``size`` bytes."""
    empty = len(encode(dataclasses.replace(result, outputs={"value": np.zeros(0, np.uint8)})))
    grown = {"value": np.zeros(size - empty - 4, np.uint8)}  # msgpack's ext header grows by 4
    payload = encode(dataclasses.replace(result, outputs=grown))
    assert len(payload) == size, len(payload)
    return payload


class TestResultKafkaRefuses:
    """A result MQTT carries but Kafka refuses is dropped and counted; the gateway lives."""

    def test_result_as_large_as_mqtt_allows(
        self,
        crashable_gateway: RunningGateway,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a scripted vehicle that holds a lease
        running = crashable_gateway
        handle = client.submit("reduce", {"x": np.ones(4), "op": "sum"}, chunk_elems=4)
        holder = hold_lease(mqtt_conn, MqttTopics(namespace), "rawcar")
        # When its result is as large as Mosquitto lets through (32 MiB)
        payload = _result_of_size(_genuine(holder), MQTT_MAX_PAYLOAD)
        before = dropped(running.gateway)
        for item in (event("result", "rawcar", payload), event("sentinel", "sentinel", b"")):
            running.gateway.mqtt.events.put(item)
        wait_for(
            lambda: (
                running.error is not None or dropped(running.gateway)[SENTINEL] > before[SENTINEL]
            ),
            30,
            "the result to be handled",
        )
        # Then the gateway's loop is alive, and the job is not done with a result it lost
        alive(running)
        assert handle.progress.done == 0
        holder.close()
