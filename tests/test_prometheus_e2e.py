# SPDX-License-Identifier: Apache-2.0
"""A real Prometheus scrapes a real gateway and SDK while a job runs on the real brokers.

Prometheus (``/usr/bin/prometheus`` from the Debian package, installed by ``make setup``)
runs with the shipped ``deploy/prometheus/prometheus.yml``, its targets pointed at this
test's status servers, a 1 s scrape and evaluation interval, and both rule files. A
missing binary fails the test: it must never pass as a skip.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from parkpool.broker_config.process import LOOPBACK, free_port
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.http import StatusServer, request_counter
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

PROMETHEUS = Path("/usr/bin/prometheus")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "parkpool-dashboard.json"
MONITORING = DEPLOY / "kubernetes" / "monitoring"
# Grafana's own variables, as Grafana would substitute them for a 15 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s"}
SHIPPED_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GATEWAY_JOB, SDK_JOB = "parkpool-gateway", "parkpool-sdk"
CHUNKS = 10
STARTUP_S = 30.0
STOP_GRACE_S = 10.0


def scrape_config(targets: dict[str, str]) -> dict[str, Any]:
    """The shipped config with fast intervals, absolute rule paths and static targets.

    ``targets`` maps a job name of the shipped config to ``host:port``; jobs not in it
    (Prometheus' self-scrape) are left out.
    """
    config: dict[str, Any] = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job.pop("file_sd_configs", None)
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
            jobs.append(job)
    assert sorted(j["job_name"] for j in jobs) == sorted(targets), "jobs missing from config"
    config["scrape_configs"] = jobs
    return config


def substitute_grafana_variables(expr: str) -> str:
    """The query as Grafana sends it: its own variables replaced by their values."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


class Prometheus:
    """One Prometheus server on a free loopback port, with its own config and storage."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        assert PROMETHEUS.is_file(), f"{PROMETHEUS} missing: run `make setup` (package prometheus)"
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log = workdir / "prometheus.log"
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        argv = [
            str(PROMETHEUS),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--log.level=warn",
        ]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while not self._ready():
            assert self.process.poll() is None, f"prometheus exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"prometheus not ready: {self.log.read_text()}"
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; a refused query fails with Prometheus' own error."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read())
        assert body["status"] == "success", f"{params}: {body}"
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The value of a query that yields one series; None while it yields none."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql}: {result}"
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_GRACE_S)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """Start Prometheus scraping the given targets, its config changed by ``adjust`` if
    given; stopped (and checked gone) at the end."""
    started: list[Prometheus] = []

    def start(
        targets: dict[str, str], adjust: Callable[[dict[str, Any]], None] | None = None
    ) -> Prometheus:
        config = scrape_config(targets)
        if adjust is not None:
            adjust(config)
        server = Prometheus(tmp_path, config)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
        assert server.process.poll() is not None, "prometheus still running"


def serve_status(running: RunningGateway) -> StatusServer:
    """The gateway's status server on a free port, wired as ``parkpool gateway`` does."""
    gateway = running.gateway
    registry = gateway.metrics.registry
    return StatusServer(
        LOOPBACK,
        0,
        registry,
        gateway.health,
        gateway.readiness,
        requests=request_counter(registry),
        status=gateway.status_snapshot,
    ).start()


@pytest.fixture
def gateway_status(
    gateway_factory: Callable[..., RunningGateway],
) -> Iterator[StatusServer]:
    """A gateway with its status server on a free port."""
    server = serve_status(gateway_factory())
    yield server
    server.close()


@pytest.fixture
def sdk(namespace: str, kafka_conn: KafkaConnection) -> Iterator[ParkpoolClient]:
    """An SDK client serving its metrics on a free loopback port."""
    settings = ProducerSettings(
        kafka_conn,
        namespace,
        metrics_port=0,
        metrics_addr=LOOPBACK,
        verification=Level.UNCHECKED,
    )
    with ParkpoolClient(settings) as client:
        yield client


class TestPrometheusScrapesAJob:
    """Prometheus sees a job's chunks completed at the gateway and the SDK, and no lag."""

    def test_completed_chunks_and_zero_lag_through_prometheus(
        self,
        gateway_status: StatusServer,
        sdk: ParkpoolClient,
        fleet_factory: Callable[..., Fleet],
        prometheus_factory: Callable[..., Prometheus],
    ) -> None:
        # Given a gateway, an SDK client and three cars, scraped by a real Prometheus
        fleet_factory(3)
        assert sdk.metrics_port is not None
        prometheus = prometheus_factory(
            {
                GATEWAY_JOB: f"{LOOPBACK}:{gateway_status.port}",
                SDK_JOB: f"{LOOPBACK}:{sdk.metrics_port}",
            }
        )
        targets_up = f'sum(up{{job=~"{GATEWAY_JOB}|{SDK_JOB}"}})'
        wait_for(lambda: prometheus.value(targets_up) == 2, 30, "both targets up")
        # When a job of CHUNKS chunks runs to completion
        chunks = [ChunkSpec({"op": "sum"}, {"x": np.full(4, float(i))}) for i in range(CHUNKS)]
        handle = sdk.publish("reduce", chunks)
        handle.wait(timeout=60)
        # Then Prometheus sees every chunk completed at the gateway and nothing left in Kafka
        completed = f'sum(parkpool_gateway_tasks_total{{job="{GATEWAY_JOB}",status="completed"}})'
        lag = f'sum(parkpool_gateway_kafka_lag{{job="{GATEWAY_JOB}"}})'
        wait_for(lambda: prometheus.value(completed) == CHUNKS, 30, f"{CHUNKS} completions")
        wait_for(lambda: prometheus.value(lag) == 0, 30, "zero lag")
        # And the SDK's own count agrees
        sdk_completed = f'sum(parkpool_sdk_chunks_total{{job="{SDK_JOB}",status="completed"}})'
        wait_for(lambda: prometheus.value(sdk_completed) == CHUNKS, 30, "SDK completions")
        # And the recording rules are evaluated on the scraped series
        wait_for(lambda: prometheus.value("job:parkpool_gateway_kafka_lag:sum") == 0, 30, "rule")
        # (its value may be 0: the completed series appeared with all chunks already done)
        rate = 'status:parkpool_gateway_tasks:rate5m{status="completed"}'
        wait_for(lambda: prometheus.value(rate) is not None, 30, "throughput rule")
        wait_for(
            lambda: prometheus.value("job:parkpool_fleet_vehicles_known:sum") == 3, 30, "3 cars"
        )
        # And every rule of both files loaded and evaluates without error
        self._assert_rules_healthy(prometheus)

    @staticmethod
    def _assert_rules_healthy(prometheus: Prometheus) -> None:
        shipped = [
            rule
            for path in ("recording_rules.yml", "alert_rules.yml")
            for group in yaml.safe_load((PROMETHEUS_DIR / path).read_text())["groups"]
            for rule in group["rules"]
        ]
        loaded = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        assert len(loaded) == len(shipped)
        wait_for(
            lambda: all(
                rule["health"] == "ok"
                for group in prometheus.api("rules")["groups"]
                for rule in group["rules"]
            ),
            10,
            "every rule evaluated",
        )


class TestDashboardQueries:
    """Every query of the Grafana dashboard is PromQL that a real Prometheus runs."""

    def test_every_panel_query_runs(self, prometheus_factory: Callable[..., Prometheus]) -> None:
        # Given a Prometheus with the rules loaded and nothing to scrape
        prometheus = prometheus_factory({})
        panels = json.loads(DASHBOARD.read_text())["panels"]
        exprs = [target["expr"] for panel in panels for target in panel["targets"]]
        assert exprs
        for expr in exprs:
            # When it runs each query, Then it accepts it (api() fails on a refused one)
            result = prometheus.api("query", query=substitute_grafana_variables(expr))
            assert result["resultType"] == "vector", expr


def generated(path: Path, kind: str) -> dict[str, Any]:
    """The one resource of ``kind`` in a generated manifest."""
    (resource,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == kind]
    return dict(resource)


def relabel_config(relabeling: dict[str, Any]) -> dict[str, Any]:
    """A ServiceMonitor relabeling as the Operator writes it into prometheus.yml."""
    return {re.sub("[A-Z]", lambda m: "_" + m[0].lower(), k): v for k, v in relabeling.items()}


def operator_target(address: str, namespace: str, cell: str, pod: str) -> dict[str, Any]:
    """A gateway pod's target as the Prometheus Operator's own relabelings leave it, before
    the ServiceMonitor's run: the labels it sets from Kubernetes service discovery, and
    the discovery's meta labels that the ServiceMonitor's relabelings may read."""
    service = f"{GATEWAY_JOB}-{cell}"
    labels = {
        "namespace": namespace,
        "service": service,
        "pod": pod,
        "container": "gateway",
        "endpoint": "status",
        "job": service,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_label_parkpool_io_cell": cell,
    }
    return {"targets": [address], "labels": labels}


class TestKubernetesTargetLabels:
    """On Kubernetes, the Operator labels each target with its pod, container, endpoint
    and (per cell) Service. With the generated ServiceMonitor's relabelings, the rules
    still sum over a cell's gateways, and the adapter still finds each pod's cars."""

    def test_rules_sum_a_cells_pods_and_the_adapter_sees_each_pod(
        self,
        namespace: str,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        prometheus_factory: Callable[..., Prometheus],
    ) -> None:
        # Given two gateways of cell "a" with four cars between them
        servers = [serve_status(gateway_factory(name)) for name in ("gw1", "gw2")]
        pods = [f"{GATEWAY_JOB}-a-{i}" for i in range(len(servers))]
        fleet_factory(4)
        # And a Prometheus that scrapes them as the Operator would, with the
        # ServiceMonitor's relabelings
        (endpoint,) = generated(MONITORING / "servicemonitor.yaml", "ServiceMonitor")["spec"][
            "endpoints"
        ]
        targets = [
            operator_target(f"{LOOPBACK}:{server.port}", namespace, "a", pod)
            for server, pod in zip(servers, pods, strict=True)
        ]

        def as_operator_writes_it(config: dict[str, Any]) -> None:
            (job,) = config["scrape_configs"]
            job["static_configs"] = targets
            job["relabel_configs"] = [relabel_config(r) for r in endpoint["relabelings"]]

        try:
            prometheus = prometheus_factory({GATEWAY_JOB: "unused:1"}, as_operator_writes_it)
            up = f'sum(up{{job="{GATEWAY_JOB}"}})'
            wait_for(lambda: prometheus.value(up) == 2, 30, "both pods scraped")
            # When the rules sum the cars the cell's gateways count, Then they add up
            # to one series for the cell, with no label of the pod, its container or its
            # Service left
            known = "job:parkpool_fleet_vehicles_known:sum"
            wait_for(lambda: prometheus.value(known) == 4, 30, "4 cars in one series")
            (series,) = prometheus.query(known)
            assert series["metric"] == {
                "__name__": known,
                "job": GATEWAY_JOB,
                "namespace": namespace,
                "cell": "a",
            }
            # And the adapter's query, as it runs it for the autoscaler of cell a, gives
            # each pod its own count of connected cars, together the cell's
            self._assert_adapter_sees_each_pod(prometheus, namespace, pods, cars=4)
        finally:
            for server in servers:
                server.close()

    @staticmethod
    def _assert_adapter_sees_each_pod(
        prometheus: Prometheus, namespace: str, pods: list[str], cars: int
    ) -> None:
        values = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())
        (rule,) = values["rules"]["custom"]
        by_resource = {v["resource"]: k for k, v in rule["resources"]["overrides"].items()}
        pod_label, namespace_label = by_resource["pod"], by_resource["namespace"]
        assert prometheus.query(rule["seriesQuery"]), "the adapter would find no series"
        matchers = f'{namespace_label}="{namespace}",{pod_label}=~"{"|".join(pods)}"'
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", rule["seriesQuery"].split("{")[0])
            .replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", pod_label)
        )
        result = prometheus.query(query)
        assert {r["metric"][pod_label] for r in result} == set(pods)
        assert sum(float(r["value"][1]) for r in result) == cars
