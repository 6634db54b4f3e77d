# SPDX-License-Identifier: Apache-2.0
"""The ``bulk_data`` bench line: a 4096² float32 gemm (tile 512) through the object store
(the claim check) and, in the same run, inline through the brokers as before.

Per path it reports what crossed each plane for the one job:
- ``kafka_bytes``: task and result records produced, and the largest one;
- ``mqtt_bytes``: every MQTT payload published in the job's namespace, and the largest;
- ``store_bytes_fetched`` and ``cache_hit_rate``: what the cars fetched from the store,
  and how often a block was already in a car's cache;
- ``input_mib_per_s``: the input bytes the cars' tasks received (fetched or cached, or
  inline) divided by the job's wall time, submit to last result;
- ``wall_s``.

Each job runs on a gateway that already holds its partitions, after one small job
through the same client and cars: a service's SDK client and a cell's gateways live for
many jobs, and a consumer group's first join or a producer's first id is not the data
plane. The store path runs ``STORE_RUNS`` times and the run with the median wall time is
reported (all walls in ``wall_s_runs``): this machine is noisy.

``bare_get_mib_per_s`` is the same store serving objects of the job's block size to as
many concurrent readers as there are cars, with the cars' own HTTP client and hash check,
measured in the same run: the best of three tries of 1 GiB each;
``throughput_ratio`` divides the store path's input rate by it. ``cached`` is the same job
run again right after each store run, on the same cars, whose caches then hold most of
its blocks (the median of the three), and ``throughput_ratio_cached`` its ratio: what the
submit, the gemm, the results' way back and the control plane leave the ratio on this
machine with almost nothing to fetch. The durable Tansu's
produce rate is measured beside the in-memory one (``tests.bench_durable``).

Run alone: ``python -m tests.bench_bulk``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from parkpool.app.children import store_connection
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap, load_specs
from parkpool.gateway.settings import GatewaySettings
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime import logs
from parkpool.runtime.blobstore import BlobStore, sha256_hex
from parkpool.runtime.settings import KafkaConnection, MqttConnection, StoreConnection
from parkpool.schemas import BlobRef
from parkpool.worker.dataplane import fetch
from parkpool.worker.fleet import Fleet
from parkpool.worker.held import WorkerSettings
from tests.conftest import RunningGateway
from tests.helpers import RawMqtt, read_all

MIB = 1 << 20
GIB = 1 << 30
INLINE_LIMIT = 32 * MIB  # what the inline path needs: a 16 MiB tile in one record
STORE_RUNS = 3


class Sniffer:
    """Counts every MQTT payload published under the namespace, as the broker sees it."""

    def __init__(self, conn: MqttConnection, namespace: str) -> None:
        self.bytes = self.count = self.largest = 0
        self._lock = threading.Lock()
        self._raw = RawMqtt(conn, f"sniff-{namespace}")
        self._raw.client.on_message = self._seen
        self._raw.subscribe(f"{namespace}/#")

    def reset(self) -> None:
        """Start counting afresh: what came before (the warm-up job) is not the job's."""
        with self._lock:
            self.bytes = self.count = self.largest = 0

    def _seen(self, _client: object, _userdata: object, message: Any) -> None:
        size = len(message.payload)
        with self._lock:
            self.bytes += size
            self.count += 1
            self.largest = max(self.largest, size)

    def close(self) -> None:
        self._raw.close()


def run_job(
    brokers: EmbeddedBrokers,
    namespace: str,
    a: np.ndarray,
    b: np.ndarray,
    *,
    stored: bool,
    cars: int,
    tile: int,
    again: bool = False,
) -> dict[str, Any]:
    """One gemm job, start to end, on the store path or the inline one; ``again``: then
    the same job once more on the same cars, whose caches hold its blocks by then."""
    limit = INLINE_LIMIT if not stored else 1 * MIB
    # The inline path needs topics that take 16 MiB records; Apache Kafka's default is 1 MiB.
    specs = [
        replace(s, config={**s.config, "max.message.bytes": str(limit + MIB)}) for s in load_specs()
    ]
    bootstrap(brokers.kafka_bootstrap, namespace, specs=specs, max_record_bytes=limit)
    kafka = KafkaConnection(brokers.kafka_bootstrap, max_record_bytes=limit)
    mqtt = MqttConnection(brokers.mqtt_host, brokers.mqtt_port, max_message_bytes=limit + MIB)
    store = store_connection(brokers) if stored else StoreConnection()
    sniffer = Sniffer(mqtt, namespace)
    gateway = RunningGateway(GatewaySettings("bulk-gw", kafka, mqtt, namespace, store=store))
    template = WorkerSettings("template", mqtt, namespace, backend="numpy", heartbeat_s=2.0)
    fleet = Fleet(template, prefix=f"{namespace}-car")
    try:
        fleet.add(cars)
        serving(gateway)
        with ParkpoolClient(ProducerSettings(kafka, namespace, store=store)) as sdk:
            warm_up(sdk)
            time.sleep(0.5)  # the warm-up's last acks and statuses, before the count starts
            sniffer.reset()
            cpu_before = cpu_seconds(brokers)
            started = time.monotonic()
            handle = sdk.submit("gemm", {"a": a, "b": b}, tile=tile)
            submitted = time.monotonic() - started
            answer = handle.wait(timeout=900)
            wall = time.monotonic() - started
            cpu = {k: round(v - cpu_before.get(k, 0.0), 2) for k, v in cpu_seconds(brokers).items()}
            # 16 MiB inline records can take seconds per fetch from the durable Kafka: a
            # short idle time would stop reading early and under-count the inline bytes.
            records = [
                r
                for t in (sdk.topics.tasks, sdk.topics.results)
                for r in read_all(kafka, t, idle=10.0)
                if (r.key() or b"").startswith(handle.job_id.encode())  # not the warm-up's
            ]
            stats = [w.data.cache.stats() for w in fleet.vehicles.values()]
            mqtt_seen = (sniffer.bytes, sniffer.count, sniffer.largest)
            repeated = rerun(sdk, fleet, a, b, tile) if again else None
        correct = bool(np.allclose(answer, a @ b, rtol=1e-3, atol=1e-3 * np.sqrt(a.shape[1])))
    finally:
        fleet.stop_all()
        gateway.stop()
        sniffer.close()
    sizes = [len(r.value() or b"") + len(r.key() or b"") for r in records]
    if len(sizes) != 2 * handle.n_chunks:  # every task and one result each, or say so
        raise RuntimeError(f"read {len(sizes)} records back, expected {2 * handle.n_chunks}")
    hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
    tiles = handle.n_chunks
    inline_input = tiles * 2 * tile * a.shape[1] * a.itemsize
    delivered = sum(s.bytes_served for s in stats) if stored else inline_input
    return {
        "correct": correct,
        "chunks": tiles,
        "kafka_bytes": sum(sizes),
        "kafka_records": len(sizes),
        "max_record_bytes": max(sizes),
        "mqtt_bytes": mqtt_seen[0],
        "mqtt_messages": mqtt_seen[1],
        "max_mqtt_message_bytes": mqtt_seen[2],
        "store_bytes_fetched": sum(s.bytes_fetched for s in stats),
        "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else 0.0,
        "input_mib_delivered": round(delivered / MIB, 1),
        "input_mib_per_s": round(delivered / MIB / wall, 1),
        "submit_s": round(submitted, 2),
        "cpu_s": cpu,
        "wall_s": round(wall, 2),
        **({"again": repeated} if repeated is not None else {}),
    }


def rerun(
    sdk: ParkpoolClient, fleet: Fleet, a: np.ndarray, b: np.ndarray, tile: int
) -> dict[str, Any]:
    """The same job again, on cars whose caches already hold most of its blocks: what
    the submit, the gemm, the results' way back and the control plane cost with almost
    nothing left to fetch, the ceiling they leave the ratio on this machine."""
    time.sleep(0.5)  # the first job's last acks and statuses
    before = [w.data.cache.stats() for w in fleet.vehicles.values()]
    started = time.monotonic()
    sdk.submit("gemm", {"a": a, "b": b}, tile=tile).wait(timeout=900)
    wall = time.monotonic() - started
    after = [w.data.cache.stats() for w in fleet.vehicles.values()]
    hits = sum(s.hits for s in after) - sum(s.hits for s in before)
    misses = sum(s.misses for s in after) - sum(s.misses for s in before)
    served = sum(s.bytes_served for s in after) - sum(s.bytes_served for s in before)
    return {
        "wall_s": round(wall, 2),
        "cache_hit_rate": round(hits / (hits + misses), 3) if hits + misses else 0.0,
        "input_mib_per_s": round(served / MIB / wall, 1),
    }


def serving(gateway: RunningGateway, timeout: float = 60.0) -> None:
    """Wait until the gateway holds its task partitions: a production gateway is up before
    a job comes, and its consumer group's first join (seconds) is not the data plane."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, details = gateway.gateway.readiness()
        if ready and details["partitions"]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"gateway not serving after {timeout} s: {details}")


def warm_up(sdk: ParkpoolClient) -> None:
    """One small job first, through the same client, gateway and cars: a service's SDK
    client lives for many jobs, and its first record waits for the idempotent producer's
    id and the reader's first fetch, which are not the data plane."""
    small = np.ones((64, 64), np.float32)
    sdk.submit("gemm", {"a": small, "b": small}, tile=64).wait(timeout=120)


def cpu_seconds(brokers: EmbeddedBrokers) -> dict[str, float]:
    """CPU seconds used so far by this process (SDK, gateway and cars) and each broker:
    on a small machine they share the cores, which bounds every rate measured here."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = {"bench_process": usage.ru_utime + usage.ru_stime}
    tick = os.sysconf("SC_CLK_TCK")
    for name, pid in brokers.pids.items():
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            spent[name] = (int(fields[11]) + int(fields[12])) / tick
    return spent


def bare_get_rate(
    brokers: EmbeddedBrokers, readers: int, block_bytes: int, blocks: int, repeats: int = 3
) -> float:
    """MiB/s of presigned GETs of ``blocks`` objects by ``readers`` concurrent readers,
    with the cars' own fetch (and hash check): the store's ceiling for the data plane.
    Each try reads 1 GiB or more, and the best of ``repeats`` tries is the ceiling (a
    short or unlucky try would flatter the ratio measured against it)."""
    store = BlobStore(store_connection(brokers))
    rng = np.random.default_rng(1)
    refs = []
    for _ in range(blocks):
        data = rng.bytes(block_bytes)
        sha = sha256_hex(data)
        store.put_if_absent(f"jobs/bare/in/{sha}", data, sha)
        refs.append((store.presign_get(f"jobs/bare/in/{sha}", 600), BlobRef("", sha, len(data))))
    rounds = max(1, -(-GIB // (blocks * block_bytes)))
    work = [item for _ in range(rounds) for item in refs]
    rates = []
    for _ in range(repeats):
        started = time.monotonic()
        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(lambda item: fetch(item[0], item[1], 60), work))
        rates.append(len(work) * block_bytes / MIB / (time.monotonic() - started))
    store.delete_prefix("jobs/bare/")
    return max(rates)


def bulk_data_line(
    run_dir: Path, size: int = 4096, tile: int = 512, cars: int = 8
) -> dict[str, Any]:
    rng = np.random.default_rng(42)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    with EmbeddedBrokers(run_dir=run_dir / "bulk") as brokers:  # durable, the default
        bare = bare_get_rate(brokers, cars, tile * size * 4, 2 * (size // tile))
        runs = [
            run_job(brokers, f"bulkstore{i}", a, b, stored=True, cars=cars, tile=tile, again=True)
            for i in range(STORE_RUNS)
        ]
        stored = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        stored["wall_s_runs"] = [r["wall_s"] for r in runs]
        cached = sorted((r["again"] for r in runs), key=lambda r: r["wall_s"])[len(runs) // 2]
        cached["wall_s_runs"] = [r["again"]["wall_s"] for r in runs]
        inline = run_job(brokers, "bulkinline", a, b, stored=False, cars=cars, tile=tile)
    line: dict[str, Any] = {
        "name": "bulk_data",
        "job": f"gemm {size}x{size} float32, tile {tile}, {cars} cars",
        "store": stored,
        "inline": inline,
        "bare_get_mib_per_s": round(bare, 1),
        "kafka_bytes_reduction": round(inline["kafka_bytes"] / stored["kafka_bytes"], 1),
        "mqtt_bytes_reduction": round(inline["mqtt_bytes"] / stored["mqtt_bytes"], 1),
        "throughput_ratio": round(stored["input_mib_per_s"] / bare, 3),
        "cached": cached,
        "throughput_ratio_cached": round(cached["input_mib_per_s"] / bare, 3),
        "max_record_bytes": stored["max_record_bytes"],
        "max_mqtt_message_bytes": stored["max_mqtt_message_bytes"],
        "cache_hit_rate": stored["cache_hit_rate"],
        "wall_s": stored["wall_s"],
        "inline_wall_s": inline["wall_s"],
    }
    line.update(_durable_rates())
    return line


def _durable_rates() -> dict[str, Any]:
    try:
        from tests.bench_durable import produce_rates
    except ImportError:  # measured by its own module once it exists
        return {}
    return dict(produce_rates())


def machine() -> str:
    """What ran the line. The VM differs between sessions (a 4096² float32 gemm took
    0.40 s on one, 0.68 s on the AMD EPYC of 2026-12-06), so its CPU is named."""
    return (
        f"{platform.machine()} {_cpu_model()}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}"
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "(CPU model unknown)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--cars", type=int, default=8)
    args = parser.parse_args()
    logs.configure(level="warning")
    run_dir = Path(tempfile.mkdtemp(prefix="parkpool-bulk-"))
    try:
        line = bulk_data_line(run_dir, args.size, args.tile, args.cars)
        print(json.dumps({**line, "machine": machine()}), flush=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
