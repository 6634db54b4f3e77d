# SPDX-License-Identifier: Apache-2.0
"""What durability costs the embedded Kafka: the idempotent produce rate of Tansu in
memory and of Tansu on the embedded object store, measured in the same run.

``produce_rates()`` is what the ``bulk_data`` bench line reports; ``python -m
tests.bench_durable`` prints it as one JSON line. Each rate is ``n_records`` records of
512 bytes, keyed so that they spread over the tasks topic's partitions, through the
project's own producer settings (idempotent, acks=all), from the first produce to the
last delivery report. A benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap
from parkpool.runtime.kafka import produce, producer_config
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import KafkaTopics

NAMESPACE = "bench"
RECORD_BYTES = 512
WARM_UP = 200  # records produced and flushed first: producer id, metadata, connections


def produce_rate(durable: bool, n_records: int, run_dir: Path) -> float:
    """Records per second that one idempotent producer gets acknowledged."""
    with EmbeddedBrokers(run_dir=run_dir, durable=durable) as brokers:
        bootstrap(brokers.kafka_bootstrap, NAMESPACE)
        topic = KafkaTopics(NAMESPACE).tasks
        producer = Producer(producer_config(KafkaConnection(brokers.kafka_bootstrap)))
        failures: list[str] = []

        def report(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(err.str())

        def send(count: int, prefix: str) -> None:
            value = os.urandom(RECORD_BYTES)
            for i in range(count):
                refused = produce(producer, topic, value, f"{prefix}{i}", report)
                if refused is not None:
                    failures.append(refused.str())
            left = producer.flush(300)
            if left or failures:
                raise RuntimeError(f"{left} records not delivered; {failures[:3]}")

        send(WARM_UP, "warm-")
        started = time.perf_counter()
        send(n_records, "")
        return n_records / (time.perf_counter() - started)


def produce_rates(n_records: int = 20000) -> dict[str, float]:
    """The in-memory and the durable Tansu's produce rates (records/s), and their ratio."""
    with tempfile.TemporaryDirectory(prefix="parkpool-bench-durable-") as tmp:
        memory = produce_rate(False, n_records, Path(tmp, "memory"))
        durable = produce_rate(True, n_records, Path(tmp, "durable"))
    return {
        "produce_rate_memory": round(memory, 1),
        "produce_rate_durable": round(durable, 1),
        "durable_ratio": round(durable / memory, 3),
    }


def main() -> None:
    n_records = 20000
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    line = {
        "name": "durable_kafka",
        **produce_rates(n_records),
        "records": n_records,
        "record_bytes": RECORD_BYTES,
        "machine": machine,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
