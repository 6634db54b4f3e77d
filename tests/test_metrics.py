# SPDX-License-Identifier: Apache-2.0
"""The gateway's /metrics and /status after a known workload: exact counts, real brokers."""

from __future__ import annotations

import json
import platform
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime import build_info
from parkpool.runtime.http import StatusServer
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas.reputation import Level
from parkpool.worker.carstate import SimulatedBus
from parkpool.worker.fleet import Fleet
from parkpool.worker.policy import PolicyConfig
from parkpool.worker.worker import WorkerSettings
from tests.conftest import RunningGateway
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Scraper:
    def __init__(self, running: RunningGateway) -> None:
        gateway = running.gateway
        self.server = StatusServer(
            "127.0.0.1",
            0,
            gateway.metrics.registry,
            gateway.health,
            gateway.readiness,
            status=gateway.status_snapshot,
        ).start()
        self.base = f"http://127.0.0.1:{self.server.port}"

    def samples(self) -> Samples:
        text = urllib.request.urlopen(f"{self.base}/metrics", timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples().get((name, tuple(sorted(labels.items()))), 0.0)

    def status(self) -> dict[str, Any]:
        return json.loads(urllib.request.urlopen(f"{self.base}/status", timeout=5).read())


@pytest.fixture
def scraped(gateway_factory: Callable[..., RunningGateway]) -> Iterator[Scraper]:
    scraper = Scraper(gateway_factory())
    yield scraper
    scraper.server.close()


class TestKnownWorkload:
    """Twelve chunks through three cars: every series counts exactly what happened."""

    def test_counts_after_a_job(
        self, scraped: Scraper, fleet_factory: Callable[..., Fleet], client: ParkpoolClient
    ) -> None:
        # Given three cars, When a 12-chunk job completes
        fleet_factory(3)
        chunks = [ChunkSpec({"op": "sum"}, {"x": np.full(4, float(i))}) for i in range(12)]
        client.publish("reduce", chunks).wait(timeout=60)
        tasks = "parkpool_gateway_tasks_total"
        wait_for(lambda: scraped.value(tasks, status="completed") == 12, 10, "12 completions")
        # Then each stage counted each chunk once, and nothing failed or was redone
        samples = scraped.samples()
        for status in ("consumed", "dispatched", "completed"):
            assert samples[(tasks, (("status", status),))] == 12
        assert samples.get((tasks, (("status", "failed"),)), 0) == 0
        assert not [k for k in samples if k[0] == "parkpool_gateway_redelivered_total"]
        for histogram in (
            "parkpool_gateway_queue_wait_seconds",
            "parkpool_gateway_dispatch_seconds",
            "parkpool_gateway_end_to_end_seconds",
            "parkpool_gateway_task_dispatch_to_result_seconds",
        ):
            assert samples[(f"{histogram}_count", ())] == 12
        kernel = ("parkpool_gateway_kernel_execution_seconds_count", (("kernel", "reduce"),))
        assert samples[kernel] == 12
        # And once the sweep has run, every partition is caught up and the gateway is ready
        wait_for(lambda: scraped.value("parkpool_gateway_ready") == 1, 10, "ready gauge")
        lags = [
            v for (name, _), v in scraped.samples().items() if name == "parkpool_gateway_kafka_lag"
        ]
        assert len(lags) == 3 and sum(lags) == 0
        sizes = [
            v
            for (name, _), v in scraped.samples().items()
            if name == "parkpool_gateway_partition_window_size"
        ]
        assert sizes == [1024.0] * 3
        # And the fleet series see the three cars and the work they reported
        wait_for(lambda: scraped.value("parkpool_fleet_vehicles_known") == 3, 10, "3 cars")
        wait_for(
            lambda: scraped.value("parkpool_fleet_gpu_busy_seconds_total") > 0, 10, "busy time"
        )
        status = scraped.status()
        assert status["ready"] is True and len(status["partitions"]) == 3
        assert status["fleet"]["known"] == 3 and status["queued"] == 0


class TestPartitionSeries:
    """Per-partition series follow ownership: a partition given up is no longer exported."""

    def test_partitions_given_up_stop_being_exported(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
    ) -> None:
        # Given a gateway that owns and exports every partition while a car is connected
        scraper = Scraper(gateway_factory("gwgiveup", standby_after_s=1.0, vehicle_silence_s=3.0))
        try:
            fleet = fleet_factory(1)

            def exported() -> set[str]:
                return {
                    dict(labels)["partition"]
                    for (name, labels) in scraper.samples()
                    if name == "parkpool_gateway_kafka_lag"
                }

            wait_for(lambda: len(exported()) == 3, 30, "all three partitions exported")
            # When its only car goes silent, so that it stands by and gives them up
            fleet.stop_all()
            wait_for(lambda: scraper.status().get("standby") is True, 30, "standby")
            # Then no partition series is left behind, though their last values were set
            wait_for(lambda: not exported(), 10, "the given-up partitions' series to go")
            wait_for(lambda: scraper.status()["partitions"] == [], 5, "/status to agree")
            names = {name for (name, _) in scraper.samples()}
            assert "parkpool_gateway_partition_window_size" not in names
            assert "parkpool_gateway_kafka_committed_offset" not in names
        finally:
            scraper.server.close()


class TestProcessSeries:
    """A gateway says which parkpool and Python it runs, and how its process fares."""

    def test_build_info_and_process_series(self, scraped: Scraper) -> None:
        # Given a running gateway, When its /metrics is read
        samples = scraped.samples()
        # Then parkpool_build_info is 1 with the installed version and this Python
        build = {"python": platform.python_version(), "version": build_info.version()}
        assert samples[("parkpool_build_info", tuple(sorted(build.items())))] == 1
        assert build["version"] != "0+unknown"  # the package is installed (make setup)
        # And the process series are this process's
        assert samples[("process_cpu_seconds_total", ())] > 0
        assert samples[("process_open_fds", ())] >= 1
        assert samples[("process_start_time_seconds", ())] > 0
        assert any(name == "python_info" for name, _ in samples)


class TestFleetFromHeartbeats:
    """A car's stop travels in its heartbeat and becomes fleet series at the gateway."""

    def test_preemption_is_counted_and_timed(
        self, scraped: Scraper, client: ParkpoolClient, namespace: str, mqtt_conn: MqttConnection
    ) -> None:
        bus = SimulatedBus()
        template = WorkerSettings(
            "t", mqtt_conn, namespace, backend="numpy", heartbeat_s=1.0, simulated_delay_s=30
        )
        fleet = Fleet(template, prefix="owned", car=lambda _id: bus, policy=PolicyConfig())
        try:
            fleet.add(1)
            car = next(iter(fleet.vehicles.values()))
            client.publish("reduce", [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})])
            wait_for(lambda: car.guard is not None and car.guard.running == 1, 30, "a kernel")
            # When the owner unlocks the car
            bus.set(locked=False)
            # Then the gateway counts one stop, times it, and sees the car suspended for it
            preemptions = ("parkpool_fleet_preemptions_total", (("reason", "owner_present"),))
            wait_for(lambda: scraped.samples().get(preemptions) == 1, 15, "the stop")
            assert scraped.value("parkpool_fleet_preemption_seconds_count") == 1
            assert scraped.value("parkpool_fleet_preemption_seconds_bucket", le="+Inf") == 1
            suspended = {"state": "suspended", "reason": "owner_present"}
            wait_for(
                lambda: scraped.value("parkpool_fleet_vehicles", **suspended) == 1, 10, "gauge"
            )
            assert scraped.status()["fleet"]["suspended_reasons"] == {"owner_present": 1}
        finally:
            fleet.stop_all()


class TestSdkMetrics:
    """The SDK counts its own jobs and serves them only when asked, on loopback."""

    def test_off_unless_asked(self, client: ParkpoolClient) -> None:
        assert client.metrics_port is None

    def test_counts_after_a_job(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        kafka_conn: KafkaConnection,
        namespace: str,
    ) -> None:
        gateway_factory()
        fleet_factory(2)
        settings = ProducerSettings(
            kafka_conn, namespace, metrics_port=0, verification=Level.UNCHECKED
        )
        with ParkpoolClient(settings) as sdk:
            assert sdk.metrics_port is not None
            chunks = [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})] * 12
            sdk.publish("reduce", chunks).wait(timeout=60)
            url = f"http://127.0.0.1:{sdk.metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            ready = urllib.request.urlopen(url.replace("/metrics", "/readyz"), timeout=5)
            assert ready.status == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("parkpool_sdk_jobs_total", (("status", "submitted"),))] == 1
        assert samples[("parkpool_sdk_jobs_total", (("status", "done"),))] == 1
        assert samples[("parkpool_sdk_chunks_total", (("status", "published"),))] == 12
        assert samples[("parkpool_sdk_chunks_total", (("status", "completed"),))] == 12
        assert samples[("parkpool_sdk_end_to_end_seconds_count", ())] == 12
        assert samples[("parkpool_sdk_jobs_running", ())] == 0

    def test_a_hosts_registry_holds_the_series_of_every_client_on_it(
        self, kafka_conn: KafkaConnection, namespace: str
    ) -> None:
        # Given a host's registry with a series of its own
        host = CollectorRegistry()
        Counter("host_requests", "The host's own", registry=host).inc()
        settings = ProducerSettings(
            kafka_conn, namespace, verification=Level.UNCHECKED, registry=host, metrics_port=0
        )
        chunks = [ChunkSpec({"op": "sum"}, {"x": np.ones(4)})] * 3
        # When two clients on it each publish a job, and a third is made after they close
        with ParkpoolClient(settings) as first, ParkpoolClient(settings) as second:
            first.publish("reduce", chunks)
            second.publish("reduce", chunks)
        with ParkpoolClient(settings) as third:
            pass
        # Then the host's registry holds the SDK's series, counting both jobs, beside its own
        assert first.metrics is second.metrics is third.metrics
        assert first.metrics.registry is host
        submitted = {"status": "submitted"}
        assert host.get_sample_value("parkpool_sdk_jobs_total", submitted) == 2
        assert host.get_sample_value("parkpool_sdk_chunks_total", {"status": "published"}) == 6
        assert host.get_sample_value("host_requests_total") == 1
        # And the registry is no setting: not in the settings' repr, not compared
        assert "registry" not in repr(settings)
        assert settings == ProducerSettings(
            kafka_conn, namespace, verification=Level.UNCHECKED, metrics_port=0
        )
