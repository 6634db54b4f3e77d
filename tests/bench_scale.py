# SPDX-License-Identifier: Apache-2.0
"""The scale lines of ``make bench``: a large fleet on one gateway, and a huge backlog.

- ``fleet_scale``: grows a simulated fleet (each vehicle a real MQTT client, all in this
  process on one shared network loop) towards each target size, as far as the machine
  allows, then runs a job of small tasks through one gateway process. It reports the
  vehicles connected, the gateway's resident memory, the gateway's dispatch delay p99
  (``parkpool_gateway_dispatch_seconds``, interpolated from its buckets the way
  Prometheus' ``histogram_quantile`` does) while the fleet pulls, and the throughput.
- ``fleet_vanish``: then 1,000 of those vehicles (at most half) drop off the network at
  once, without a clean disconnect, while a job runs; it reports whether the job still
  completed, what was redelivered, and the gateway's memory before and after.
- ``backlog_memory``: fills the task topic with a large backlog and no vehicles, starts
  a gateway, and reports its resident memory once it has paused every partition.
"""

from __future__ import annotations

import resource
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from parkpool.app.children import role, role_env
from parkpool.app.top.rates import bucket_window, quantile
from parkpool.broker_config.launcher import EmbeddedBrokers, free_port
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.settings import KafkaConnection, MqttConnection
from parkpool.schemas import ParkpoolError
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from parkpool.worker.worker import WorkerSettings

GROW_STEP = 500  # vehicles connected per batch; a failed batch ends the growth


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: each vehicle is a socket here and
    in Mosquitto, which inherits this limit when the bench starts it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_mb(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of a process, in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )

    def mib(key: str) -> float:
        return round(int(fields[key].split()[0]) / 1024, 1)

    return mib("VmRSS"), mib("VmHWM")


def scrape(port: int) -> dict[str, Any]:
    """Samples of a gateway's /metrics by name and labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def buckets(samples: dict[str, Any], histogram: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) pairs of a histogram, by bound."""
    name = f"{histogram}_bucket"
    found = [
        (float(dict(labels)["le"]), value) for (n, labels), value in samples.items() if n == name
    ]
    return sorted(found)


def gauge(samples: dict[str, Any], name: str) -> float:
    return float(samples.get((name, ()), 0.0))


def small_chunks(count: int) -> list[ChunkSpec]:
    x = np.arange(16, dtype=np.float64)
    return [ChunkSpec({"op": "sum"}, {"x": x}) for _ in range(count)]


def grow(fleet: Fleet, target: int) -> str:
    """Connect vehicles until the fleet has ``target``; why it stopped short, if it did."""
    while len(fleet) < target:
        try:
            fleet.add(min(GROW_STEP, target - len(fleet)), parallel=32)
        except (TimeoutError, OSError, ParkpoolError) as exc:
            return f"{type(exc).__name__}: {exc}"
    return ""


def fleet_scale(
    brokers: EmbeddedBrokers, run_dir: Path, targets: list[int], tasks: int
) -> Iterator[dict[str, Any]]:
    namespace = "benchscale"
    bootstrap(brokers.kafka_bootstrap, namespace)
    port = free_port()
    env = {
        **role_env(brokers, namespace),
        "PARKPOOL_GATEWAY_ID": "scale-gw",
        "PARKPOOL_METRICS_PORT": str(port),
        "PARKPOOL_LOG_LEVEL": "warning",
    }
    mqtt = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
    template = WorkerSettings("template", mqtt, namespace, backend="numpy")
    settings = ProducerSettings(
        KafkaConnection(brokers.kafka_bootstrap), namespace, verification=Level.UNCHECKED
    )
    with role("scale-gateway", ["gateway"], env, run_dir) as gateway:
        _wait_ready(port)
        fleet = Fleet(template, prefix="scale")
        try:
            with ParkpoolClient(settings) as client:
                for i, target in enumerate(targets):
                    started = time.perf_counter()
                    short = grow(fleet, target)
                    connect_s = time.perf_counter() - started
                    if i == 0:  # the gateway's group join and first pulls happen here
                        client.publish("reduce", small_chunks(20)).wait(timeout=120)
                    yield _measure(client, fleet, gateway.pid, port, tasks, connect_s, short)
                    if short:
                        break
                yield _vanish(client, fleet, gateway.pid, port, tasks)
        finally:
            fleet.stop_all()


def _wait_ready(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
        except OSError:
            time.sleep(0.2)
        else:
            return
    raise TimeoutError(f"gateway on :{port} not ready within {timeout} s")


def _measure(
    client: ParkpoolClient,
    fleet: Fleet,
    pid: int,
    port: int,
    tasks: int,
    connect_s: float,
    short: str,
) -> dict[str, Any]:
    time.sleep(2.0)  # let every new vehicle's first pull and status reach the gateway
    before = scrape(port)
    started = time.perf_counter()
    handle = client.publish("reduce", small_chunks(tasks))
    handle.wait(timeout=600)
    elapsed = time.perf_counter() - started
    after = scrape(port)
    dispatch = "parkpool_gateway_dispatch_seconds"
    window = bucket_window(tuple(buckets(before, dispatch)), tuple(buckets(after, dispatch)))
    p99 = quantile(0.99, window)
    if p99 is None:
        p99 = float("nan")
    rss, peak = rss_mb(pid)
    return {
        "name": "fleet_scale",
        "vehicles_connected": len(fleet),
        "vehicles_known_to_gateway": int(gauge(after, "parkpool_fleet_vehicles_known")),
        "connect_s": round(connect_s, 1),
        "stopped_short": short,
        "tasks": tasks,
        "tasks_per_s": round(tasks / elapsed, 1),
        "dispatch_p99_ms": round(p99 * 1000, 2),
        "gateway_rss_mb": rss,
        "gateway_peak_rss_mb": peak,
    }


def _vanish(
    client: ParkpoolClient, fleet: Fleet, pid: int, port: int, tasks: int
) -> dict[str, Any]:
    count = min(1000, len(fleet) // 2)
    rss_before, _ = rss_mb(pid)
    before = scrape(port)
    handle = client.publish("reduce", small_chunks(tasks))
    deadline = time.monotonic() + 120
    while handle.progress.done < tasks // 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    victims = fleet.kill_random(count / len(fleet))
    handle.wait(timeout=600)
    time.sleep(2.0)  # let the last wills arrive and the gauges refresh
    after = scrape(port)
    rss, peak = rss_mb(pid)
    offline = ("parkpool_gateway_redelivered_total", (("cause", "vehicle_offline"),))
    return {
        "name": "fleet_vanish",
        "vehicles_before": len(fleet) + len(victims),
        "vanished": len(victims),
        "tasks": tasks,
        "completed": handle.progress.done,
        "duplicates_dropped_by_sdk": handle.progress.duplicates,
        "redelivered_vehicle_offline": int(after.get(offline, 0) - before.get(offline, 0)),
        "vehicles_offline_at_gateway": int(
            after.get(("parkpool_fleet_vehicles", (("reason", ""), ("state", "offline"))), 0)
        ),
        "gateway_rss_mb_before": rss_before,
        "gateway_rss_mb": rss,
        "gateway_peak_rss_mb": peak,
    }


def backlog_memory(
    brokers: EmbeddedBrokers, run_dir: Path, records: int
) -> Iterator[dict[str, Any]]:
    """Gateway memory with ``records`` tasks waiting in Kafka: first with no vehicle at
    all (the gateway stops reading: nobody asks), then with 2,000 slow vehicles asking
    for more than the windows hold (it reads until every partition's window is full)."""
    namespace = "benchbacklog"
    bootstrap(brokers.kafka_bootstrap, namespace)
    settings = ProducerSettings(
        KafkaConnection(brokers.kafka_bootstrap), namespace, verification=Level.UNCHECKED
    )
    started = time.perf_counter()
    with ParkpoolClient(settings) as client:
        for first in range(0, records, 100_000):
            client.publish("reduce", small_chunks(min(100_000, records - first)))
    produce_s = time.perf_counter() - started
    port = free_port()
    env = {
        **role_env(brokers, namespace),
        "PARKPOOL_GATEWAY_ID": "backlog-gw",
        "PARKPOOL_METRICS_PORT": str(port),
    }
    mqtt = MqttConnection(brokers.mqtt_host, brokers.mqtt_port)
    slow = WorkerSettings("template", mqtt, namespace, backend="numpy", simulated_delay_s=60)
    with role("backlog-gateway", ["gateway"], env, run_dir) as gateway:
        _wait_ready(port)
        yield _backlog_line("no_vehicles", records, produce_s, _settle(port), gateway.pid)
        fleet = Fleet(slow, prefix="slow")
        try:
            fleet.add(2000, parallel=32)
            yield _backlog_line("slow_fleet_2000", records, produce_s, _settle(port), gateway.pid)
        finally:
            fleet.stop_all()


def _backlog_line(
    phase: str, records: int, produce_s: float, samples: dict[str, Any], pid: int
) -> dict[str, Any]:
    rss, peak = rss_mb(pid)
    return {
        "name": "backlog_memory",
        "phase": phase,
        "records": records,
        "produce_s": round(produce_s, 1),
        "gateway_consumed": int(
            samples.get(("parkpool_gateway_tasks_total", (("status", "consumed"),)), 0)
        ),
        "gateway_leases": int(gauge(samples, "parkpool_gateway_leases")),
        "gateway_queued": int(gauge(samples, "parkpool_gateway_queued_tasks")),
        "paused_partitions": int(gauge(samples, "parkpool_gateway_paused_partitions")),
        "gateway_rss_mb": rss,
        "gateway_peak_rss_mb": peak,
    }


def _settle(port: int, quiet_s: float = 5.0, timeout: float = 120.0) -> dict[str, Any]:
    """Scrape until the gateway's consumed count stops moving for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    key = ("parkpool_gateway_tasks_total", (("status", "consumed"),))
    last, since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        samples = scrape(port)
        if samples.get(key, 0.0) != last:
            last, since = samples.get(key, 0.0), time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return samples
        time.sleep(0.5)
    return scrape(port)
