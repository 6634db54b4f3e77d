# SPDX-License-Identifier: Apache-2.0
"""Gateway behaviour under pressure, on real brokers: cancel, priorities, fencing,
lease heartbeats, backpressure, scale-out, graceful shutdown and the status endpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from parkpool.app.children import role_env
from parkpool.broker_config.launcher import EmbeddedBrokers, free_port
from parkpool.gateway.deadletters import MAX_ATTEMPTS_KEPT
from parkpool.producer.client import ParkpoolClient
from parkpool.producer.jobs import JobState
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.reputation import ReputationBook, ReputationWriter, release
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import (
    Assignment,
    Capabilities,
    KafkaTopics,
    LeaseHeartbeat,
    MqttTopics,
    Nack,
    NackReason,
    PullRequest,
    Result,
    VehicleState,
    VehicleStatus,
    decode,
    encode,
    peek_type,
)
from parkpool.schemas.reputation import Evidence, Level
from parkpool.worker.fleet import Fleet
from parkpool.worker.kernels import REGISTRY
from tests.conftest import TEST_SESSION_TIMEOUT_MS, RunningGateway
from tests.helpers import (
    LeaseHolder,
    RawMqtt,
    hold_lease,
    read_topic,
    wait_committed_to_end,
    wait_for,
)

pytestmark = pytest.mark.integration

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]
TASKS = "parkpool_gateway_tasks_total"
DROPPED = "parkpool_gateway_dropped_total"
REDELIVERED = "parkpool_gateway_redelivered_total"
FAILURES = "parkpool_gateway_task_failures_total"
SKIPPED = "parkpool_gateway_dispatch_skipped_total"
QUARANTINED = "parkpool_gateway_quarantined_vehicles"
# Hand-backs that cost a task no attempt (NackReason.counts_as_failure is False).
UNCOUNTED = [r for r in NackReason if not r.counts_as_failure]


def small_chunks(count: int) -> list[ChunkSpec]:
    return [ChunkSpec({"op": "sum"}, {"x": np.array([float(i)])}) for i in range(count)]


class TestCancel:
    """Cancelling skips queued chunks at dispatch time and stops running ones."""

    def test_cancel_mid_job(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        # Given two slow vehicles working through a 30-chunk job
        gateway = gateway_factory()
        fleet = fleet_factory(2, simulated_delay_s=1.0, prefetch=0)
        handle = client.publish("reduce", small_chunks(30))
        wait_for(lambda: handle.progress.done >= 2, 30, "the first chunks")
        # When the caller cancels it
        progress = handle.cancel()
        # Then the handle ends cancelled and reports what was done
        assert progress.state is JobState.CANCELLED
        assert 2 <= progress.done < 30
        # And the gateway skips the rest instead of dispatching it
        wait_for(
            lambda: gateway.metric(TASKS, status="cancelled") >= 30 - progress.done - 2,
            20,
            "queued chunks to be skipped",
        )
        assert gateway.metric(TASKS, status="dispatched") < 30
        # And the vehicles are told to stop what they hold
        wait_for(lambda: not list(fleet.busy()), 10, "vehicles to drop the revoked tasks")
        # And every task record, cancels included, is committed: nothing is left behind
        wait_committed_to_end(kafka_conn, f"{namespace}.gateways", client.topics.tasks)

    def test_a_job_submitted_again_under_a_cancelled_jobs_id_runs(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
    ) -> None:
        # Given a job cancelled while its chunks were queued at the gateway
        gateway = gateway_factory()
        first = client.publish("reduce", small_chunks(4), job_id="again")
        wait_for(lambda: gateway.metric(TASKS, status="consumed") == 4, 30, "the job queued")
        first.cancel()
        wait_for(lambda: gateway.metric(TASKS, status="cancelled") == 4, 30, "its chunks skipped")
        # When the caller submits a job again under its id (an idempotent retry, say)
        again = client.publish("reduce", small_chunks(4), job_id="again")
        fleet_factory(2)
        # Then the new job's chunks run: the cancel covers the tasks made before it
        again.wait(timeout=60)
        assert (again.state, again.progress.done) == (JobState.DONE, 4)
        assert gateway.metric(TASKS, status="cancelled") == 4


class TestPriorities:
    """High-priority work drains before batch work that was queued earlier."""

    def test_high_before_batch(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        kafka_conn: KafkaConnection,
    ) -> None:
        # Given a batch job and then a high job, both queued before any vehicle exists
        gateway = gateway_factory()
        batch = client.publish("reduce", small_chunks(12), priority="batch")
        high = client.publish("reduce", small_chunks(4), priority="high")
        wait_for(lambda: gateway.metric(TASKS, status="consumed") == 16, 30, "both jobs queued")
        # When a single one-slot vehicle starts pulling
        fleet_factory(1, prefetch=0)
        high.wait(timeout=60)
        batch.wait(timeout=60)
        # Then, on that one vehicle, every high chunk finished before any batch chunk
        records = read_topic(kafka_conn, client.reply_topic, expect=16)
        finished = [decode(r.value() or b"", Result) for r in records]
        high_last = max(r.finished_at for r in finished if r.job_id == high.job_id)
        batch_first = min(r.finished_at for r in finished if r.job_id == batch.job_id)
        assert high_last < batch_first


class TestFencing:
    """Results and heartbeats from anyone but the lease holder are dropped and counted."""

    def test_impostor_result_and_stale_heartbeat_are_fenced(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a scripted vehicle holding a lease
        gateway = gateway_factory(lease_seconds=300)
        topics = MqttTopics(namespace)
        handle = client.publish("reduce", small_chunks(1))
        holder = hold_lease(mqtt_conn, topics)
        impostor = RawMqtt(mqtt_conn, f"impostor-{namespace}")
        # When another vehicle sends a result quoting the holder's epoch
        forged = holder.result({"value": np.array(99.0)}, vehicle_id="impostor")
        impostor.publish(topics.result("impostor", "gw1"), encode(forged))
        # And a heartbeat for a lease epoch that does not exist
        epoch, job_id = holder.assignment.epoch, holder.task.job_id
        stale = LeaseHeartbeat(job_id, 0, "holder", "gw1", epoch - 1, time.time())
        holder.car.publish(topics.heartbeat("holder", "gw1"), encode(stale))
        # Then both are dropped and counted
        wait_for(
            lambda: gateway.metric(DROPPED, source="mqtt_result", reason="stale_or_fenced"),
            10,
            "the impostor's result to be fenced",
        )
        wait_for(
            lambda: gateway.metric(DROPPED, source="mqtt_heartbeat", reason="stale_or_fenced"),
            10,
            "the stale heartbeat to be fenced",
        )
        # And the real holder's result is the one the caller gets
        real = holder.result({"value": np.array(0.0)})
        holder.car.publish(topics.result("holder", "gw1"), encode(real))
        handle.wait(timeout=30)
        chunk = next(handle.chunks(timeout=1))
        assert (chunk.vehicle_id, float(chunk.outputs["value"])) == ("holder", 0.0)
        holder.close()
        impostor.close()


class TestLeaseHeartbeats:
    """A task longer than its lease survives, because the vehicle keeps the lease alive."""

    def test_long_task_is_not_redelivered(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
    ) -> None:
        # Given 2-second leases and a vehicle that needs 5 seconds per task
        gateway = gateway_factory(lease_seconds=2.0)
        fleet_factory(1, simulated_delay_s=5.0, prefetch=0)
        # When it runs one task
        handle = client.publish("reduce", small_chunks(1))
        # Then the task completes on the first dispatch, its lease extended by heartbeats
        handle.wait(timeout=30)
        assert handle.progress.done == 1
        assert gateway.metric(REDELIVERED, cause="lease_expired") == 0
        assert gateway.metric(TASKS, status="dispatched") == 1

    def test_a_cars_lease_heartbeats_are_qos_0(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a listener on the gateway's heartbeat topic, at QoS 1 as the gateway is
        topics = MqttTopics(namespace)
        listener = RawMqtt(mqtt_conn, f"listener-{namespace}")
        listener.subscribe(topics.heartbeats_for("gw1"))
        # When a car runs a task longer than a third of its lease
        gateway_factory(lease_seconds=3)
        fleet_factory(1, simulated_delay_s=3.0)
        client.publish("reduce", small_chunks(1)).wait(timeout=60)
        # Then its lease heartbeats came at QoS 0: none can wait in the broker's
        # in-flight window behind results the gateway has not yet acknowledged
        assert listener.received, "no lease heartbeat"
        assert {m.qos for m in listener.received} == {0}
        listener.close()

    def test_heartbeats_cannot_hold_a_lease_past_its_limit(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given 1-second leases that heartbeats may keep for 3 s in all
        gateway = gateway_factory(lease_seconds=1.0, max_lease_seconds=3.0)
        topics = MqttTopics(namespace)
        client.publish("reduce", small_chunks(1))
        holder = hold_lease(mqtt_conn, topics)
        granted = time.monotonic()
        # When its car heartbeats the lease every 0.2 s and never answers (a hung kernel)
        beat = heartbeat_of(holder)
        while not gateway.metric(REDELIVERED, cause="lease_expired"):
            assert time.monotonic() - granted < 15, "the lease outlived its limit"
            holder.car.publish(topics.heartbeat("holder", "gw1"), encode(beat))
            time.sleep(0.2)
        # Then the lease ends at its limit all the same, and the task goes back
        assert time.monotonic() - granted >= 3.0
        holder.close()

    def test_a_flood_of_heartbeats_is_rate_limited(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a car holding a lease
        gateway = gateway_factory(lease_seconds=300)
        topics = MqttTopics(namespace)
        client.publish("reduce", small_chunks(1))
        holder = hold_lease(mqtt_conn, topics)
        beat = heartbeat_of(holder)
        # When it sends 500 heartbeats at once
        for _ in range(500):
            holder.car.publish(topics.heartbeat("holder", "gw1"), encode(beat))
        # Then most are dropped as rate limited, and counted
        wait_for(
            lambda: gateway.metric(DROPPED, source="mqtt_heartbeat", reason="rate_limited") > 300,
            10,
            "the heartbeat flood to be rate limited",
        )
        holder.close()


def heartbeat_of(holder: LeaseHolder) -> LeaseHeartbeat:
    """A heartbeat for the lease the scripted car ("holder") holds."""
    t = holder.task
    return LeaseHeartbeat(
        t.job_id, t.chunk_id, "holder", "gw1", holder.assignment.epoch, time.time()
    )


def hand_back(holder: LeaseHolder, topics: MqttTopics, vehicle_id: str, why: NackReason) -> None:
    """The scripted car nacks the lease it holds."""
    t, epoch = holder.task, holder.assignment.epoch
    nack = Nack(t.job_id, t.chunk_id, vehicle_id, "gw1", epoch, why)
    holder.car.publish(topics.nack(vehicle_id, "gw1"), encode(nack))


def assignments(holder: LeaseHolder) -> int:
    return sum(peek_type(m.payload) == Assignment.TYPE for m in holder.car.received)


class TestSlotsFreedByANack:
    """A nack that leaves the car's slot free gets it the next task without a pull: the
    car does not pull for a slot it already granted, so otherwise it would sit idle."""

    @pytest.mark.parametrize("why", [r for r in NackReason if r.frees_slot])
    def test_the_car_is_sent_its_next_task(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
        why: NackReason,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # (a shorter pause after a failed fetch, so that the test waits less)
        monkeypatch.setattr("parkpool.gateway.vehicles.FETCH_PAUSE_S", 2.0)
        gateway_factory(drain_seconds=0.5)  # (its shutdown need not wait for the lease)
        topics = MqttTopics(namespace)
        client.publish("reduce", small_chunks(2))
        # Given a car that granted one slot and holds a lease in it
        holder = hold_lease(mqtt_conn, topics)
        # When it hands the task back for a reason that leaves its slot free
        handed_back = time.monotonic()
        hand_back(holder, topics, "holder", why)
        # Then it is sent the other chunk, without asking again; after a fetch the store
        # failed, only after a pause
        wait_for(lambda: assignments(holder) == 2, 10, "the next task")
        waited = time.monotonic() - handed_back
        if why is NackReason.FETCH_FAILED:
            assert waited >= 2.0
        holder.close()

    @pytest.mark.parametrize("why", [r for r in NackReason if not r.frees_slot])
    def test_a_car_without_a_free_slot_is_sent_nothing(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
        why: NackReason,
    ) -> None:
        gateway = gateway_factory(drain_seconds=0.5)
        topics = MqttTopics(namespace)
        client.publish("reduce", small_chunks(2))
        holder = hold_lease(mqtt_conn, topics)
        hand_back(holder, topics, "holder", why)
        wait_for(lambda: gateway.metric(REDELIVERED, cause="nack") == 1, 10, "the nack")
        time.sleep(1.0)
        assert assignments(holder) == 1
        holder.close()


class TestUntrustedNacks:
    """One car's word does not end a task; a task's record of attempts stays bounded."""

    def test_one_cars_invalid_task_does_not_end_the_task(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        gateway = gateway_factory()
        topics = MqttTopics(namespace)
        handle = client.publish("reduce", small_chunks(1))
        # When one car calls the task invalid
        holder = hold_lease(mqtt_conn, topics, vehicle_id="liar")
        hand_back(holder, topics, "liar", NackReason.INVALID_TASK)
        # Then it counts as a failed attempt, and the task is not dead-lettered
        wait_for(lambda: gateway.metric(FAILURES, reason="invalid_task") == 1, 10, "the nack")
        time.sleep(1.0)
        assert handle.state is JobState.RUNNING
        assert gateway.metric(TASKS, status="dead_lettered") == 0
        holder.close()

    def test_attempts_that_do_not_count_keep_a_bounded_history(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a car that takes a task and hands it back as "busy", again and again
        gateway = gateway_factory(pull_rate=1000.0, result_rate=1000.0)
        topics = MqttTopics(namespace)
        client.publish("reduce", small_chunks(1))
        for _ in range(MAX_ATTEMPTS_KEPT + 10):
            holder = hold_lease(mqtt_conn, topics, vehicle_id="bouncer")
            hand_back(holder, topics, "bouncer", NackReason.BUSY)
            holder.close()
        # Then the task stays queued, with only its last attempts remembered
        wait_for(
            lambda: gateway.metric(REDELIVERED, cause="nack") == MAX_ATTEMPTS_KEPT + 10,
            30,
            "every nack",
        )
        # (read while the gateway idles: no car is left to pull, so nothing moves it)
        wait_for(lambda: len(gateway.gateway.ready) == 1, 10, "the task to be queued")
        [task] = gateway.gateway.ready.tasks()
        assert task.failures == 0 and len(task.history) == MAX_ATTEMPTS_KEPT

    @pytest.mark.parametrize("how", [*UNCOUNTED, "suspended"])
    def test_a_car_that_hands_a_task_back_uncounted_is_not_handed_it_again(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
        how: NackReason | str,
    ) -> None:
        # Given a two-chunk job, one chunk held by a hostile car and the other by a
        # bystander, a car that grants this gateway work (and whose lease the gateway's
        # shutdown need not wait for)
        gateway = gateway_factory(lease_seconds=300, drain_seconds=0.5)
        topics = MqttTopics(namespace)
        client.publish("reduce", small_chunks(2))
        hostile = hold_lease(mqtt_conn, topics, vehicle_id="hostile")
        bystander = hold_lease(mqtt_conn, topics, vehicle_id="bystander")
        # When the hostile car gives its chunk back at no cost to the task (a nack that
        # does not count, or a suspension), then asks for work again at once
        if isinstance(how, NackReason):
            hand_back(hostile, topics, "hostile", how)
        else:
            status = VehicleStatus("hostile", VehicleState.SUSPENDED, time.time(), "owner")
            hostile.car.publish(topics.status("hostile", "gw1"), encode(status))
        wait_for(lambda: len(gateway.gateway.ready) == 1, 10, "the chunk back in the queue")
        again = PullRequest("hostile", 1, Capabilities("numpy", tuple(REGISTRY)), {}, {"gw1": 1})
        hostile.car.publish(topics.pull("hostile", "gw1"), encode(again))
        # Then the gateway keeps the chunk for another car rather than hand it back, so
        # the car cannot hold it to its deadline by giving it back again and again
        wait_for(lambda: gateway.metric(SKIPPED, reason="failed_here") >= 1, 10, "a skip")
        sent = [peek_type(bytes(m.payload)) for m in hostile.car.received]
        assert sent.count(Assignment.TYPE) == 1
        # And giving it back cost the task no attempt
        [task] = gateway.gateway.ready.tasks()
        assert task.failures == 0 and gateway.metric(TASKS, status="failed") == 0
        hostile.close()
        bystander.close()


class TestQuarantinedGauge:
    """The gauge of quarantined cars follows the reputation topic, each car once."""

    def test_quarantines_and_a_release_move_the_gauge(
        self, gateway_factory: GatewayFactory, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given a gateway reading the reputation topic, and two clients that judge cars
        gateway = gateway_factory()
        topic = KafkaTopics(namespace).reputation
        book = ReputationBook()
        writers = [ReputationWriter(kafka_conn, topic, "sdk-1", book)]
        writers.append(ReputationWriter(kafka_conn, topic, "sdk-2", ReputationBook()))
        evidence = (Evidence("job", 0, Level.ALGEBRAIC, "residual over bound", 1.0),)
        # When one quarantines two cars, and the other one of them again
        writers[0].quarantine("liar-1", evidence, "wrong_result")
        writers[0].quarantine("liar-2", evidence, "wrong_result")
        writers[1].quarantine("liar-1", evidence, "wrong_result")
        for writer in writers:
            writer.close()
        # Then the gauge counts each car once
        wait_for(lambda: gateway.metric(QUARANTINED) == 2, 30, "both quarantines")
        # And when an operator releases one, only the other is counted
        release(kafka_conn, topic, book, "liar-1", "ops", "checked the GPU")
        wait_for(lambda: gateway.metric(QUARANTINED) == 1, 30, "the release")


class TestBackpressure:
    """With no vehicle to take work, the gateway stops reading instead of buffering."""

    def test_partitions_pause_when_windows_fill(
        self,
        gateway_factory: GatewayFactory,
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
    ) -> None:
        # Given a gateway whose windows hold 4 records per partition, and no vehicles
        gateway = gateway_factory(window=4)
        handle = client.publish("reduce", small_chunks(60))
        # When the job is submitted
        # Then it reads at most a window per partition and pauses every partition
        wait_for(
            lambda: gateway.metric("parkpool_gateway_paused_partitions") == 3,
            30,
            "all three partitions to pause",
        )
        time.sleep(1.0)
        assert gateway.metric(TASKS, status="consumed") <= 3 * 4
        # And once vehicles arrive, everything still completes
        fleet_factory(3)
        assert handle.wait(timeout=60) is None
        assert handle.progress.done == 60


@pytest.fixture
def gateway_procs(
    brokers: EmbeddedBrokers, namespace: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], int]]]:
    """Start `parkpool gateway` processes; each gets its own status port."""
    children: list[subprocess.Popen[bytes]] = []

    def start(gateway_id: str, **env_extra: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        env = {
            **role_env(brokers, namespace),
            "PARKPOOL_GATEWAY_ID": gateway_id,
            "PARKPOOL_SESSION_TIMEOUT_MS": str(TEST_SESSION_TIMEOUT_MS),
            "PARKPOOL_METRICS_PORT": str(port),
            **env_extra,
        }
        log = (tmp_path / f"{gateway_id}-{len(children)}.log").open("wb")
        child = subprocess.Popen(
            [sys.executable, "-m", "parkpool.app.cli", "gateway"], env=env, stdout=log, stderr=log
        )
        children.append(child)
        return child, port

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return 0, {}


def scrape(port: int, sample: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample)
    )


class TestScaleOutAndShutdown:
    """Two gateways share the work; one leaving (gracefully or killed) loses nothing."""

    def test_two_gateways_share_work_and_survive_a_kill(
        self,
        gateway_procs: Callable[..., tuple[subprocess.Popen[bytes], int]],
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
    ) -> None:
        # Given two gateways in one group, both ready, and a fleet
        (first, port_a), (_second, port_b) = gateway_procs("gwa"), gateway_procs("gwb")
        for port in (port_a, port_b):
            wait_for(lambda p=port: probe(p, "/readyz")[0] == 200, 30, "both gateways ready")
        assert probe(port_a, "/healthz")[0] == 200
        fleet_factory(6, simulated_delay_s=0.1)
        # When a job runs and one gateway is SIGKILLed halfway
        handle = client.publish("reduce", small_chunks(120))
        wait_for(lambda: handle.progress.done >= 40, 60, "a third of the job")
        done_a = scrape(port_a, 'parkpool_gateway_tasks_total{status="completed"}')
        done_b = scrape(port_b, 'parkpool_gateway_tasks_total{status="completed"}')
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # Then both had taken part, and the survivor finishes every chunk exactly once
        assert done_a > 0 and done_b > 0
        handle.wait(timeout=120)
        ids = [c.chunk_id for c in handle.chunks(timeout=1)]
        assert sorted(ids) == list(range(120))

    def test_a_draining_gateway_reads_no_more_tasks(
        self,
        gateway_factory: GatewayFactory,
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        # Given a gateway whose drain waits for a lease a car holds
        running = gateway_factory(drain_seconds=4)
        client.publish("reduce", small_chunks(1))
        holder = hold_lease(mqtt_conn, MqttTopics(namespace))
        # When it starts to drain, and tasks arrive meanwhile
        running.gateway.stopping.set()
        wait_for(lambda: running.gateway.draining, 10, "the drain to start")
        client.publish("reduce", small_chunks(5))
        time.sleep(2.0)
        # Then it reads none of them: they are the next owner's
        assert running.metric(TASKS, status="consumed") == 1
        holder.close()

    def test_sigterm_drains_and_exits_in_bounded_time(
        self,
        gateway_procs: Callable[..., tuple[subprocess.Popen[bytes], int]],
        fleet_factory: FleetFactory,
        client: ParkpoolClient,
    ) -> None:
        # Given a gateway with a 3-second drain, and vehicles in the middle of tasks
        gateway, port = gateway_procs("gwdrain", PARKPOOL_DRAIN_SECONDS="3")
        wait_for(lambda: probe(port, "/readyz")[0] == 200, 30, "the gateway to be ready")
        fleet_factory(2, simulated_delay_s=0.5)
        handle = client.publish("reduce", small_chunks(20))
        wait_for(lambda: handle.progress.done >= 2, 30, "the first results")
        # When it gets SIGTERM
        started = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        # Then it exits cleanly within the bound
        assert gateway.wait(timeout=30) == 0
        assert time.monotonic() - started < 20
        # And a replacement gateway finishes the job with no chunk missing
        gateway_procs("gwdrain2")
        handle.wait(timeout=120)
        assert handle.progress.done == 20
