# SPDX-License-Identifier: Apache-2.0
"""The embedded brokers and topic bootstrap, exercised against the real processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, no __all__
    AdminClient,
    ConfigResource,
    ResourceType,
)
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from parkpool.app.cli import build_parser, main
from parkpool.broker_config.certs import make_certs
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.process import (
    PIDS_FILE,
    BrokerProcess,
    free_port,
    is_running,
    kill_stray,
)
from parkpool.broker_config.topics import bootstrap, load_specs, with_task_partitions
from parkpool.runtime import logs
from parkpool.schemas.errors import BrokerError
from parkpool.schemas.topics import KafkaTopics, MqttTopics

TIMEOUT = 10.0


def fresh_namespace() -> str:
    """A namespace whose topics do not exist yet (the namespace fixture creates them)."""
    return "b" + uuid.uuid4().hex[:12]


def partition_counts(brokers: EmbeddedBrokers, topics: KafkaTopics) -> dict[str, int]:
    metadata = AdminClient({"bootstrap.servers": brokers.kafka_bootstrap}).list_topics(
        timeout=TIMEOUT
    )
    return {t: len(metadata.topics[t].partitions) for t in topics.all()}


class MqttProbe:
    """A connected MQTT 5 client that queues every message it receives."""

    def __init__(
        self, brokers: EmbeddedBrokers, client_id: str, *, session_expiry: int = 0
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.session_present: bool | None = None
        self.connect_reason: ReasonCode | None = None
        self._acks: dict[int, threading.Event] = {}
        self._connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda _c, _u, mid, *_: self._ack(mid).set()
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry
        # clean_start=False: resume the session this client id left behind, if any.
        self.client.connect(
            brokers.mqtt_host, brokers.mqtt_port, clean_start=False, properties=properties
        )
        self.client.loop_start()
        assert self._connected.wait(TIMEOUT), "no CONNACK"
        reason = self.connect_reason
        assert reason is not None and not reason.is_failure, f"CONNACK refused: {reason}"

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None and self._ack(mid).wait(TIMEOUT), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), "no PUBACK"

    def receive(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: ReasonCode, _p: Any) -> None:
        # No assert here: it would be raised in paho's network thread, not the test.
        self.connect_reason = reason
        self.session_present = flags.session_present
        self._connected.set()

    def _ack(self, mid: int) -> threading.Event:
        return self._acks.setdefault(mid, threading.Event())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children_named(name: str) -> set[int]:
    """Pids of this process's children running ``name`` (zombies count: not reaped)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue
        comm, fields = rest.rsplit(") ", 1)
        if comm == name and int(fields.split()[1]) == os.getpid():
            found.add(int(pid))
    return found


def python_process(tmp_path: Path, code: str, port: int = 0) -> BrokerProcess:
    """A stand-in broker: a Python interpreter running ``code``."""
    return BrokerProcess("stand-in", [sys.executable, "-c", code], port, (tmp_path / "out.log",))


def spawn_exec_done(process: BrokerProcess) -> int:
    """Spawn ``process`` and return its pid once /proc shows its command line.

    Popen returns when exec closes the child's close-on-exec pipe, which the kernel does
    before it lays out the new argv: a /proc/PID/cmdline read in that window is empty.
    """
    process.spawn()
    assert process.popen is not None
    deadline = time.monotonic() + TIMEOUT
    while not is_running(process.popen.pid, process.argv):
        assert time.monotonic() < deadline, "the stand-in never showed its command line"
        time.sleep(0.01)
    return process.popen.pid


@pytest.mark.integration
class TestTopicBootstrap:
    """bootstrap() creates each namespace's topics once, as specified, and never shrinks them."""

    def test_second_run_changes_nothing(self, brokers: EmbeddedBrokers) -> None:
        # Given a namespace without topics
        namespace = fresh_namespace()
        topics = KafkaTopics(namespace)
        # When bootstrap runs twice
        first = bootstrap(brokers.kafka_bootstrap, namespace)
        second = bootstrap(brokers.kafka_bootstrap, namespace)
        # Then the first run created all topics, the second nothing
        assert sorted(first) == sorted(topics.all())
        assert second == []
        # And the partition counts are those of kafka_topics.toml
        expected = {
            topics.tasks: 24,
            topics.results: 24,
            topics.dead_letter: 3,
            topics.reputation: 6,
            topics.jobs: 6,
        }
        assert partition_counts(brokers, topics) == expected

    def test_topic_config_is_applied(self, brokers: EmbeddedBrokers) -> None:
        # Given a freshly bootstrapped namespace
        namespace = fresh_namespace()
        bootstrap(brokers.kafka_bootstrap, namespace)
        admin = AdminClient({"bootstrap.servers": brokers.kafka_bootstrap})
        for spec in load_specs():
            # When its topic config is described
            resource = ConfigResource(ResourceType.TOPIC, spec.topic_name(namespace))
            configs = admin.describe_configs([resource])[resource].result(timeout=TIMEOUT)
            # Then cleanup.policy, and retention.ms where it is set, are those of the spec
            assert configs["cleanup.policy"].value == spec.config["cleanup.policy"]
            if "retention.ms" in spec.config:  # a compacted topic keeps each key's last
                assert configs["retention.ms"].value == spec.config["retention.ms"]

    def test_smaller_spec_does_not_shrink(self, brokers: EmbeddedBrokers) -> None:
        # Given a namespace bootstrapped with the packaged specs
        namespace = fresh_namespace()
        bootstrap(brokers.kafka_bootstrap, namespace)
        before = partition_counts(brokers, KafkaTopics(namespace))
        # When bootstrap runs again with one partition per topic
        smaller = [spec.with_partitions(1) for spec in load_specs()]
        changed = bootstrap(brokers.kafka_bootstrap, namespace, specs=smaller)
        # Then nothing changed
        assert changed == []
        assert partition_counts(brokers, KafkaTopics(namespace)) == before

    def test_growing_on_tansu_fails_loudly(self, brokers: EmbeddedBrokers) -> None:
        # Given topics created with one partition each
        namespace = fresh_namespace()
        smaller = [spec.with_partitions(1) for spec in load_specs()]
        bootstrap(brokers.kafka_bootstrap, namespace, specs=smaller)
        # When bootstrap asks for more, on Tansu 0.6 which lacks CreatePartitions
        # Then it is a BrokerError, not a silently under-partitioned topic
        with pytest.raises(BrokerError, match="cannot grow"):
            bootstrap(brokers.kafka_bootstrap, namespace)


class TestTaskPartitions:
    """--task-partitions sizes the tasks and results topics, and nothing else."""

    def test_tasks_and_results_follow_the_setting(self) -> None:
        specs = {s.name: s.partitions for s in with_task_partitions(load_specs(), 12)}
        assert specs == {
            "tasks": 12,
            "results": 12,
            "dead_letter": 3,
            "reputation": 6,
            "jobs": 6,
        }

    def test_unset_keeps_the_topics_file(self) -> None:
        assert with_task_partitions(load_specs(), None) == load_specs()

    def test_flag_and_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        flag = ["brokers", "bootstrap", "--task-partitions", "12"]
        assert build_parser().parse_args(flag).task_partitions == 12
        # The variable is read when the parser is built
        monkeypatch.setenv("PARKPOOL_TASK_PARTITIONS", "8")
        assert build_parser().parse_args(["brokers", "bootstrap"]).task_partitions == 8
        assert build_parser().parse_args(["brokers", "up"]).task_partitions == 8

    @pytest.mark.parametrize("value", ["0", "-3", "many"])
    def test_nonsense_is_refused(self, value: str, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["brokers", "bootstrap", "--task-partitions", value])
        assert "--task-partitions" in capsys.readouterr().err

    @pytest.mark.integration
    def test_bootstrap_creates_that_many(self, brokers: EmbeddedBrokers) -> None:
        # Given a namespace without topics
        namespace = fresh_namespace()
        # When `parkpool brokers bootstrap --task-partitions 4` runs
        argv = ["brokers", "bootstrap", "--task-partitions", "4", "--namespace", namespace]
        assert main([*argv, "--kafka-bootstrap", brokers.kafka_bootstrap]) == 0
        # Then tasks and results have 4 partitions, dead letters those of the file
        topics = KafkaTopics(namespace)
        expected = {
            topics.tasks: 4,
            topics.results: 4,
            topics.dead_letter: 3,
            topics.reputation: 6,
            topics.jobs: 6,
        }
        assert partition_counts(brokers, topics) == expected


class TestDurableOption:
    """`brokers up` keeps Kafka in the object store unless told --memory or
    PARKPOOL_DURABLE=0."""

    @pytest.mark.parametrize(
        ("variable", "argv", "durable"),
        [
            (None, [], True),
            (None, ["--memory"], False),
            (None, ["--durable", "no"], False),
            ("0", [], False),
            ("0", ["--durable", "yes"], True),
            ("1", ["--memory"], False),
        ],
    )
    def test_durable_unless_opted_out(
        self,
        monkeypatch: pytest.MonkeyPatch,
        variable: str | None,
        argv: list[str],
        durable: bool,
    ) -> None:
        if variable is None:
            monkeypatch.delenv("PARKPOOL_DURABLE", raising=False)
        else:
            monkeypatch.setenv("PARKPOOL_DURABLE", variable)
        assert build_parser().parse_args(["brokers", "up", *argv]).durable is durable

    def test_a_bad_variable_is_named(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("PARKPOOL_DURABLE", "perhaps")
        with pytest.raises(SystemExit):
            build_parser().parse_args(["brokers", "up"])
        assert "PARKPOOL_DURABLE='perhaps'" in capsys.readouterr().err


@pytest.mark.integration
class TestKafkaRoundTrip:
    """A record produced idempotently with acks=all is consumed back unchanged."""

    def test_idempotent_produce_then_assigned_consume(
        self, brokers: EmbeddedBrokers, kafka_topics: KafkaTopics
    ) -> None:
        # Given an idempotent producer
        producer = Producer(
            {
                "bootstrap.servers": brokers.kafka_bootstrap,
                "acks": "all",
                "enable.idempotence": True,
            }
        )
        reports: list[tuple[KafkaError | None, Message]] = []
        # When it produces one record and flushes
        producer.produce(
            kafka_topics.tasks,
            b"payload",
            key=b"job-1",
            headers=[("v", b"1")],
            on_delivery=lambda err, msg: reports.append((err, msg)),
        )
        assert producer.flush(TIMEOUT) == 0
        # Then the delivery report is clean
        [(error, delivered)] = reports
        partition = delivered.partition()
        assert error is None and partition is not None
        # And a consumer assigned to that partition (no slow group join) reads it back
        consumer = Consumer(
            {
                "bootstrap.servers": brokers.kafka_bootstrap,
                "group.id": f"{kafka_topics.namespace}-reader",
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.assign([TopicPartition(kafka_topics.tasks, partition, OFFSET_BEGINNING)])
            message = consumer.poll(TIMEOUT)
        finally:
            consumer.close()
        assert message is not None and message.error() is None
        assert (message.key(), message.value()) == (b"job-1", b"payload")
        assert message.headers() == [("v", b"1")]


@pytest.mark.integration
class TestMqttRoundTrip:
    """QoS 1 messages pass through our Mosquitto, including task-sized ones."""

    @pytest.mark.parametrize("size", [1536 * 1024, 16 * 1024 * 1024], ids=["1.5MiB", "16MiB"])
    def test_large_qos1_message_arrives(
        self, brokers: EmbeddedBrokers, mqtt_topics: MqttTopics, size: int
    ) -> None:
        # Given a subscriber on a vehicle's task topic
        topic = mqtt_topics.task("car-1")
        subscriber = MqttProbe(brokers, f"{mqtt_topics.namespace}-sub")
        publisher = MqttProbe(brokers, f"{mqtt_topics.namespace}-pub")
        try:
            subscriber.subscribe(topic)
            payload = os.urandom(size)
            # When a payload bigger than 1 MiB is published with QoS 1
            publisher.publish(topic, payload)
            # Then it arrives intact, at QoS 1
            message = subscriber.receive()
        finally:
            subscriber.close()
            publisher.close()
        assert (message.topic, message.qos, message.payload) == (topic, 1, payload)


@pytest.mark.integration
class TestMosquittoRestart:
    """restart_mosquitto() keeps the port and the queued messages of persistent sessions."""

    def test_queued_message_survives_restart(
        self, brokers: EmbeddedBrokers, mqtt_topics: MqttTopics
    ) -> None:
        # Given a persistent session that subscribed and went offline
        topic, client_id = mqtt_topics.task("car-2"), f"{mqtt_topics.namespace}-car-2"
        vehicle = MqttProbe(brokers, client_id, session_expiry=300)
        vehicle.subscribe(topic)
        vehicle.close()
        # And a QoS 1 message queued for it by the broker
        gateway = MqttProbe(brokers, f"{mqtt_topics.namespace}-gw")
        gateway.publish(topic, b"task while parked")
        gateway.close()
        port, pid = brokers.mqtt_port, brokers.pids["mosquitto"]
        # When Mosquitto restarts
        brokers.restart_mosquitto()
        # Then it is a new process on the same port
        assert (brokers.mqtt_port, pid_alive(pid)) == (port, False)
        # And the vehicle resumes its session and gets the message without resubscribing
        vehicle = MqttProbe(brokers, client_id, session_expiry=300)
        try:
            assert vehicle.session_present is True
            assert vehicle.receive().payload == b"task while parked"
        finally:
            vehicle.close()


@pytest.mark.integration
class TestLifecycle:
    """Stopping, or failing to start, leaves no broker process behind."""

    def test_stop_leaves_no_process(self, tmp_path: Path) -> None:
        # Given brokers that started
        brokers = EmbeddedBrokers(run_dir=tmp_path).start()
        pids = brokers.pids
        assert set(pids) == {"store", "tansu", "mosquitto"}
        # When they stop
        brokers.stop()
        # Then every process is gone and the pid record is empty
        assert not [pid for pid in pids.values() if pid_alive(pid)]
        assert (tmp_path / "pids.json").read_text() == "{}"

    def test_failed_start_leaves_no_process(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given a Mosquitto "binary" that exits at once
        monkeypatch.setenv("PARKPOOL_MOSQUITTO_BIN", "/bin/false")
        tansus_before = children_named("tansu")
        # When the brokers start
        with pytest.raises(BrokerError, match=r"mosquitto .* exited with status 1"):
            EmbeddedBrokers(run_dir=tmp_path).start()
        # Then the Tansu that did start has been stopped again
        assert children_named("tansu") == tansus_before

    @pytest.mark.parametrize(
        "record",
        [
            "[1, 2]",
            '{"store": 7}',
            '{"store": {"pid": "1"}}',
            '{"store": {"pid": 0, "argv": ["x"]}}',
            '{"store": {"pid": 1, "argv": "tansu"}}',
            '{"store": {"argv": [3]}}',
        ],
    )
    def test_a_pid_record_of_another_shape_is_passed_over(
        self, tmp_path: Path, record: str
    ) -> None:
        # Given a pid record someone edited, or another tool's file
        (tmp_path / PIDS_FILE).write_text(record)
        # When a run starts there, Then nothing is signalled and nothing raises
        assert kill_stray(tmp_path, grace=0.1) == []

    def test_a_run_dir_that_cannot_be_made_is_named(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(logs, "configure", lambda *_a, **_k: None)  # (see test_dlq.py)
        # Given a run dir path under a plain file
        blocker = tmp_path / "file"
        blocker.write_text("")
        # When `parkpool brokers up` is pointed at it, Then it says why and exits 1
        assert main(["brokers", "up", "--run-dir", str(blocker / "run")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("parkpool brokers up:") and "Traceback" not in err

    def test_a_broker_not_ready_in_time_is_stopped_too(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given brokers with no time to get ready, and a note of every process started
        started: list[BrokerProcess] = []
        spawn = BrokerProcess.spawn

        def noted(child: BrokerProcess) -> None:
            spawn(child)
            started.append(child)

        monkeypatch.setattr(BrokerProcess, "spawn", noted)
        try:
            # When they start, and the first is not ready in time
            with pytest.raises(BrokerError, match="not ready in time"):
                EmbeddedBrokers(run_dir=tmp_path, start_timeout=0.0).start()
            # Then the brokers stopped it: no process they started is left
            assert [c.name for c in started] == ["store"]
            assert [c.name for c in started if c.popen is not None] == []
        finally:
            for child in started:
                child.stop(5.0)

    def test_sigterm_to_a_harness_stops_its_brokers(self, tmp_path: Path) -> None:
        # Given a harness process (as make bench or make chaos) running embedded brokers
        code = (
            "import sys, time\n"
            "from pathlib import Path\n"
            "from parkpool.broker_config.launcher import EmbeddedBrokers\n"
            "from parkpool.runtime.signals import exit_on_sigterm\n"
            "exit_on_sigterm()\n"
            f"with EmbeddedBrokers(run_dir=Path({str(tmp_path)!r})):\n"
            "    print('up', flush=True)\n"
            "    time.sleep(120)\n"
        )
        harness = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert harness.stdout is not None
        assert harness.stdout.readline() == b"up\n"
        pids = [entry["pid"] for entry in json.loads((tmp_path / "pids.json").read_text()).values()]
        assert len(pids) == 3
        # When it is sent SIGTERM
        harness.send_signal(signal.SIGTERM)
        # Then it exits through its finally blocks, and no broker outlives it
        assert harness.wait(30) == 128 + signal.SIGTERM
        assert not [pid for pid in pids if pid_alive(pid)]


class TestBrokerProcess:
    """Broker processes are stopped even when they resist, and strays are found by pid file."""

    def test_process_ignoring_sigterm_is_killed(self, tmp_path: Path) -> None:
        # Given a listening process that ignores SIGTERM
        port = free_port()
        code = (
            "import signal, socket, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"s = socket.create_server(('127.0.0.1', {port})); time.sleep(60)"
        )
        process = python_process(tmp_path, code, port)
        process.spawn()
        assert process.popen is not None
        popen = process.popen
        process.wait_ready(deadline=time.monotonic() + TIMEOUT)
        # When it is stopped with a short grace period
        process.stop(grace=0.2)
        # Then it was killed and reaped
        assert popen.returncode == -signal.SIGKILL

    def test_kill_stray_kills_recorded_process(self, tmp_path: Path) -> None:
        # Given a process recorded in a run dir's pid file, as a crashed run leaves it
        process = python_process(tmp_path, "import time; time.sleep(60)")
        pid = spawn_exec_done(process)
        record = {"stand-in": {"pid": pid, "argv": process.argv}}
        (tmp_path / PIDS_FILE).write_text(json.dumps(record))
        # When the run dir is cleaned up
        killed = kill_stray(tmp_path)
        # Then that process was terminated
        assert killed == [pid]
        assert process.popen is not None
        assert process.popen.wait(TIMEOUT) == -signal.SIGTERM

    def test_kill_stray_spares_another_process_of_the_same_binary(self, tmp_path: Path) -> None:
        # Given a pid file whose pid now belongs to another program of the same
        # interpreter (the store runs on the venv's Python, as gateways and tests do)
        process = python_process(tmp_path, "import time; time.sleep(60)")
        pid = spawn_exec_done(process)
        recorded = [sys.executable, "-m", "parkpool.broker_config.objectstore", "--port", "1"]
        (tmp_path / PIDS_FILE).write_text(json.dumps({"store": {"pid": pid, "argv": recorded}}))
        try:
            # When the run dir is cleaned up, Then it is left alone
            assert kill_stray(tmp_path) == []
            assert process.popen is not None and process.popen.poll() is None
        finally:
            process.stop(grace=TIMEOUT)

    def test_kill_stray_spares_recycled_pid(self, tmp_path: Path) -> None:
        # Given a pid file whose pid now belongs to a different program
        process = python_process(tmp_path, "import time; time.sleep(60)")
        pid = spawn_exec_done(process)
        record = {"tansu": {"pid": pid, "argv": ["/opt/not/tansu"]}}
        (tmp_path / PIDS_FILE).write_text(json.dumps(record))
        try:
            # When the run dir is cleaned up
            killed = kill_stray(tmp_path)
            # Then the unrelated process is left alone
            assert killed == []
            assert process.popen.poll() is None
        finally:
            process.stop(grace=TIMEOUT)

    def test_ready_waits_for_every_listener(self, tmp_path: Path) -> None:
        # Given a process that opens its first port at once and its second a second later
        first, second = free_port(), free_port()
        while second == first:  # two asks may name the same free port
            second = free_port()
        code = (
            "import socket, time; "
            f"a = socket.create_server(('127.0.0.1', {first})); time.sleep(1.0); "
            f"b = socket.create_server(('127.0.0.1', {second})); time.sleep(60)"
        )
        process = BrokerProcess(
            "stand-in",
            [sys.executable, "-c", code],
            first,
            (tmp_path / "out.log",),
            more_ports=(second,),
        )
        process.spawn()
        try:
            # When it is waited for
            process.wait_ready(deadline=time.monotonic() + TIMEOUT)
            # Then the second port accepts too
            socket.create_connection(("127.0.0.1", second), timeout=1.0).close()
        finally:
            process.stop(grace=TIMEOUT)

    def test_ready_waits_until_the_reload_signal_is_handled(self, tmp_path: Path) -> None:
        # Given a process that listens first and installs its SIGHUP handler a second
        # later, as Mosquitto does (a SIGHUP in between kills it)
        port = free_port()
        code = (
            "import signal, socket, time; "
            f"s = socket.create_server(('127.0.0.1', {port})); time.sleep(1.0); "
            "signal.signal(signal.SIGHUP, lambda *_: None); time.sleep(60)"
        )
        process = BrokerProcess(
            "stand-in",
            [sys.executable, "-c", code],
            port,
            (tmp_path / "out.log",),
            handles=signal.SIGHUP,
        )
        process.spawn()
        assert process.popen is not None
        try:
            # When it is waited for and then sent SIGHUP at once
            process.wait_ready(deadline=time.monotonic() + TIMEOUT)
            process.popen.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            # Then it survives the signal
            assert process.popen.poll() is None
        finally:
            process.stop(grace=TIMEOUT)


@pytest.mark.integration
def test_mosquitto_with_tls_survives_a_reload_right_after_start(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Given embedded brokers with a TLS listener (its certificates load after the plain
    # listener opens, so a too-early "ready" used to let SIGHUP kill Mosquitto under load)
    certs = make_certs(tmp_path_factory.mktemp("certs"), ["car-a"])
    with EmbeddedBrokers(run_dir=tmp_path / "brokers", auth=True, tls_dir=certs) as brokers:
        # When they are reloaded as soon as start() returns
        brokers.reload_mosquitto()
        time.sleep(0.3)
        # Then Mosquitto still runs and its TLS listener accepts
        assert brokers.exited() == {}
        socket.create_connection(("127.0.0.1", brokers.mqtt_tls_port), timeout=2.0).close()
