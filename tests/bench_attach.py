# SPDX-License-Identifier: Apache-2.0
"""The ``attach`` bench line: following a job by id on a results topic of 1M records.

The results topic is filled with other callers' results first, as a week of a busy
namespace would be; then one job is submitted (its JobSubmitted and its results written
as the SDK and a gateway write them). ``first_result_s`` is from ``client.attach(id)``
to the job's first chunk in hand, ``all_results_s`` to its last. The baseline, in the
same run on the same topic, is the path ``parkpool status`` took before: read every
partition from offset 0 until the job's first record (``scan_first_result_s``).

Tansu runs in memory here: its S3 engine answers ListOffsets with stale offsets
(docs/DECISIONS.md, "Following a job by id"), which makes attach read from further back.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.broker_config.topics import bootstrap
from parkpool.producer.attach import high_watermarks
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobids import new_job_id
from parkpool.runtime.kafka import reader_config
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import JobSubmitted, KafkaTopics, Result, encode

NAMESPACE = "attach"
JOB_CHUNKS = 16


def _result(job_id: str, chunk_id: int, n_chunks: int) -> bytes:
    now = time.time()
    result = Result(
        job_id,
        chunk_id,
        n_chunks,
        f"car-{chunk_id % 997:05d}",
        "gw-1",
        1 + chunk_id,
        1,
        {"value": np.array(float(chunk_id))},
        0.01,
        now,
        now - 1.0,
    )
    return encode(result)


def _fill(conn: KafkaConnection, topic: str, records: int) -> float:
    """Other callers' results: 16-chunk jobs, as many as make ``records``; seconds taken."""
    producer = Producer(
        {"bootstrap.servers": conn.bootstrap, "linger.ms": 50, "batch.size": 1 << 20}
    )
    started = time.monotonic()
    job_id = ""
    for i in range(records):
        if i % JOB_CHUNKS == 0:
            job_id = new_job_id()
        while True:
            try:
                producer.produce(topic, _result(job_id, i % JOB_CHUNKS, JOB_CHUNKS), job_id)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)
    return time.monotonic() - started


def _submit(conn: KafkaConnection, topics: KafkaTopics) -> str:
    """One job as the SDK and a gateway write it: its JobSubmitted, then its results."""
    job_id = new_job_id()
    producer = Producer({"bootstrap.servers": conn.bootstrap})
    header = JobSubmitted(job_id, "reduce", JOB_CHUNKS, topics.results, time.time())
    producer.produce(topics.jobs, encode(header), job_id)
    producer.flush(30)
    time.sleep(0.05)  # the results are stamped after the submit, as a car's would be
    for chunk in range(JOB_CHUNKS):
        producer.produce(topics.results, _result(job_id, chunk, JOB_CHUNKS), job_id)
    producer.flush(30)
    return job_id


def _attach(conn: KafkaConnection, job_id: str) -> tuple[float, float]:
    settings = ProducerSettings(conn, NAMESPACE, verify=False)
    with ParkpoolClient(settings) as client:
        started = time.monotonic()
        handle = client.attach(job_id, timeout=600)
        next(iter(handle.chunks(timeout=600)))
        first = time.monotonic() - started
        handle.wait(timeout=600)
        return first, time.monotonic() - started


def _scan(conn: KafkaConnection, topic: str, job_id: str) -> float:
    """The old way: every partition from offset 0, until the job's first record."""
    consumer = Consumer(reader_config(conn, **{"fetch.wait.max.ms": 500}))
    try:
        started = time.monotonic()
        ends = high_watermarks(consumer, [topic])
        consumer.assign([TopicPartition(tp.topic, tp.partition, 0) for tp in ends])
        key = job_id.encode()
        while time.monotonic() - started < 600:
            for record in consumer.consume(1000, timeout=0.5):
                if record.error() is None and record.key() == key:
                    return time.monotonic() - started
        raise TimeoutError(f"job {job_id} not found in {topic} in 600 s")
    finally:
        consumer.close()


def attach_line(run_dir: Path, records: int) -> dict[str, Any]:
    with EmbeddedBrokers(run_dir=run_dir / "attach", durable=False) as brokers:
        conn = KafkaConnection(brokers.kafka_bootstrap)
        bootstrap(brokers.kafka_bootstrap, NAMESPACE)
        topics = KafkaTopics(NAMESPACE)
        fill_s = _fill(conn, topics.results, records)
        job_id = _submit(conn, topics)
        first, whole = _attach(conn, job_id)
        scan = _scan(conn, topics.results, job_id)
    return {
        "name": "attach",
        "records": records,
        "first_result_s": round(first, 3),
        "all_results_s": round(whole, 3),
        "scan_first_result_s": round(scan, 3),
        "speedup": round(scan / max(first, 1e-9), 1),
        "fill_records_per_s": round(records / fill_s),
        "kafka": "tansu in memory",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--records", type=int, default=1_000_000)
    args = p.parse_args()
    run_dir = Path(".run/bench")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(attach_line(run_dir, args.records)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
