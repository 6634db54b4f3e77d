# SPDX-License-Identifier: Apache-2.0
"""Key log events carry the context an SRE greps by, checked with structlog's capture."""

from __future__ import annotations

import ast
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from parkpool.producer.client import ParkpoolClient
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime import logs
from parkpool.runtime.http import StatusServer
from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import MqttTopics
from parkpool.worker.carstate import SimulatedBus
from parkpool.worker.fleet import Fleet
from parkpool.worker.policy import PolicyConfig
from parkpool.worker.worker import WorkerSettings
from tests.conftest import RunningGateway
from tests.helpers import hold_lease, wait_for

TASK_KEYS = {"job_id", "task_id", "attempt"}
PRODUCER = Path(__file__).resolve().parent.parent / "producer"
# The SDK's command-line modules: the only ones in producer/ that may print.
CLI_MODULES = {"cli.py", "dlq_cli.py"}


def _event(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    wait_for(lambda: any(e["event"] == name for e in entries), 30, f"a {name} event")
    return next(e for e in entries if e["event"] == name)


@pytest.mark.integration
class TestGatewayEvents:
    """A lease that runs out is logged with the task's job, partition, offset and epoch."""

    def test_lease_expiry_and_requeue_carry_task_context(
        self,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        with capture_logs() as entries:
            # Given a scripted vehicle that takes a task and never answers
            gateway_factory(lease_seconds=1)
            client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})])
            silent = hold_lease(mqtt_conn, MqttTopics(namespace), "silent")
            assignment = silent.assignment
            # When its lease runs out
            expired = _event(entries, "lease_expired")
            requeued = _event(entries, "task_requeued")
            silent.close()
        # Then both events say which task, where it is in Kafka, and whose lease it was
        for event in (expired, requeued):
            assert TASK_KEYS | {"partition", "offset", "vehicle_id", "gateway_id"} <= set(event)
            assert event["vehicle_id"] == "silent" and event["gateway_id"] == "gw1"
            assert event["attempt"] == 1
        assert expired["epoch"] == assignment.epoch and expired["log_level"] == "info"
        assert requeued["reason"] == "lease_expired"


@pytest.mark.integration
class TestWorkerEvents:
    """A task handed back to its owner's policy is logged with its lease and the reason."""

    def test_release_carries_lease_context(
        self,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        gateway_factory(lease_seconds=300)
        bus = SimulatedBus()
        template = WorkerSettings("t", mqtt_conn, namespace, backend="numpy", simulated_delay_s=30)
        fleet = Fleet(template, prefix="owned", car=lambda _id: bus, policy=PolicyConfig())
        try:
            with capture_logs() as entries:
                fleet.add(1)
                car = next(iter(fleet.vehicles.values()))
                client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})])
                wait_for(lambda: car.held == 1, 30, "the task on the car")
                bus.set(locked=False)
                released = _event(entries, "task_released")
        finally:
            fleet.stop_all()
        assert TASK_KEYS | {"vehicle_id", "gateway_id", "epoch"} <= set(released)
        assert (released["vehicle_id"], released["reason"]) == (car.vehicle_id, "owner_present")


class TestRendering:
    """JSON off a terminal, a console renderer on one, the level from the environment."""

    def test_json_and_level_from_environment(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("PARKPOOL_LOG_LEVEL", "warning")
        monkeypatch.setenv("PARKPOOL_LOG_JSON", "1")
        try:
            logs.configure()
            log = structlog.get_logger("parkpool.test")
            log.info("quiet_event")
            log.warning("loud_event", job_id="j1", at=time.time())
            err = capsys.readouterr().err
        finally:
            structlog.reset_defaults()
        assert "quiet_event" not in err
        assert '"event": "loud_event"' in err and '"job_id": "j1"' in err


@pytest.mark.integration
class TestNoPayloadsInLogs:
    """Nothing a job carries, and no secret, ends up in a log event."""

    def test_job_leaves_no_inputs_results_or_secrets_in_logs(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        client: ParkpoolClient,
    ) -> None:
        marker = 98765.4321  # appears in every input, and in every result as a sum
        with capture_logs() as entries:
            gateway_factory()
            fleet_factory(2)
            chunks = [ChunkSpec({"op": "sum"}, {"x": np.full(3, marker)}) for _ in range(6)]
            client.publish("reduce", chunks).wait(timeout=60)
        assert entries  # the run did log: the check below is not vacuous
        for entry in entries:
            for value in entry.values():
                assert not isinstance(value, bytes | bytearray | np.ndarray), entry
                assert "98765" not in str(value) and "296296" not in str(value), entry


class _Records(logging.Handler):
    """Keeps every record it is handed, as a host's own handler would see them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def host_logging() -> Iterator[_Records]:
    """A host that never set structlog up and keeps a handler on ``parkpool``."""
    structlog.reset_defaults()  # capture_logs and configure elsewhere leave it set up
    handler, parkpool_logger = _Records(), logging.getLogger("parkpool")
    parkpool_logger.addHandler(handler)
    try:
        yield handler
    finally:
        parkpool_logger.removeHandler(handler)
        parkpool_logger.setLevel(logging.NOTSET)
        structlog.reset_defaults()


def _raises() -> tuple[bool, Mapping[str, Any]]:
    raise RuntimeError("probe broke")


class TestAsALibrary:
    """In a host that did not set structlog up, parkpool logs through stdlib logging only."""

    def test_a_status_server_event_is_a_stdlib_record_and_nothing_prints(
        self, host_logging: _Records, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # Given the status server the SDK serves its metrics from, with a probe that raises
        server = StatusServer("127.0.0.1", 0, CollectorRegistry(), _raises, _raises).start()
        try:
            # When /healthz is asked
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
        finally:
            server.close()
        assert answer.value.code == 503
        # Then the event is a warning record of parkpool.http, its fields on the record
        [record] = [r for r in host_logging.records if r.name == "parkpool.http"]
        assert record.levelno == logging.WARNING
        assert record.getMessage() == "probe_raised probe=healthz error=RuntimeError"
        assert record.parkpool == {"probe": "healthz", "error": "RuntimeError"}
        assert record.exc_info is not None and record.exc_info[0] is RuntimeError
        # And nothing was printed
        assert capsys.readouterr() == ("", "")

    def test_the_hosts_levels_decide_and_the_record_points_at_the_caller(
        self, host_logging: _Records, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # Given a host that wants warnings and worse from parkpool
        logging.getLogger("parkpool").setLevel(logging.WARNING)
        log = logs.get_logger("parkpool.producer").bind(job_id="j1")
        # When the SDK logs an info and a warning
        log.info("job_submitted", chunks=3)
        log.warning("job_objects_not_deleted", reason="store down")
        # Then only the warning reaches the host, from this function, with its context
        [record] = host_logging.records
        assert record.name == "parkpool.producer"
        assert record.getMessage() == "job_objects_not_deleted job_id=j1 reason='store down'"
        assert (record.funcName, Path(record.pathname).name) == (
            "test_the_hosts_levels_decide_and_the_record_points_at_the_caller",
            "test_logging.py",
        )
        assert capsys.readouterr() == ("", "")

    @pytest.mark.integration
    def test_a_published_job_is_a_stdlib_record_and_nothing_prints(
        self,
        host_logging: _Records,
        client: ParkpoolClient,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        # Given a host that wants parkpool's info events, and an SDK client in it
        logging.getLogger("parkpool").setLevel(logging.INFO)
        # When a job is published
        job = client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})])
        # Then job_submitted is an info record of parkpool.producer, with the job's fields
        [record] = [r for r in host_logging.records if r.getMessage().startswith("job_submitted")]
        assert (record.name, record.levelno) == ("parkpool.producer", logging.INFO)
        assert record.parkpool == {"job_id": job.job_id, "kernel": "reduce", "chunks": 1}
        # And nothing was printed
        assert capsys.readouterr() == ("", "")

    def test_parkpool_adds_only_a_null_handler(self) -> None:
        # Given the parkpool logger once parkpool's logging is imported
        handlers = logging.getLogger("parkpool").handlers
        # Then its only handler is the library convention's NullHandler (no output of its own)
        assert [type(h) for h in handlers] == [logging.NullHandler]

    def test_a_process_that_set_structlog_up_gets_the_events_through_it(
        self, host_logging: _Records
    ) -> None:
        # Given structlog set up (capture_logs does it, as configure or a host would)
        with capture_logs() as entries:
            # When parkpool logs
            logs.get_logger("parkpool.producer").bind(job_id="j2").info("job_submitted")
        # Then structlog has the event, and stdlib logging never saw it
        assert entries == [{"job_id": "j2", "event": "job_submitted", "log_level": "info"}]
        assert host_logging.records == []

    def test_sdk_modules_never_print(self) -> None:
        # Given every module of the SDK that a host imports (not its command lines)
        modules = sorted(p for p in PRODUCER.glob("*.py") if p.name not in CLI_MODULES)
        assert len(modules) > 10
        # Then none calls print
        printing = [
            f"{path.name}:{node.lineno}"
            for path in modules
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "print"
        ]
        assert printing == []
