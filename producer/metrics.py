# SPDX-License-Identifier: Apache-2.0
"""The SDK's Prometheus series: what a backend service sees of its own jobs.

A registry of the client's own, unless the host hands in its registry
(``ProducerSettings.registry``): then one set of series per registry, shared by every
client given it, as a process's series are (a client made again counts on from where
the last one stopped). Served only when asked (``ProducerSettings.metrics_port``), on
127.0.0.1 by default, because a library must never open a port its host did not choose.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from parkpool.producer.jobs import JobState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

# Hosts' registries and their series, for the life of the process (the series hold on to
# nothing else, and a host has one registry, or a few).
_SHARED: dict[CollectorRegistry, SdkMetrics] = {}
_SHARED_LOCK = threading.Lock()


class SdkMetrics:
    """Counts jobs and chunks; a ``JobHandle`` reports to it as results arrive."""

    @classmethod
    def on(cls, registry: CollectorRegistry | None) -> SdkMetrics:
        """The series on a host's ``registry``, made on first use; None: a new registry."""
        if registry is None:
            return cls()
        with _SHARED_LOCK:
            found = _SHARED.get(registry)
            if found is None:
                found = _SHARED[registry] = cls(registry)
            return found

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Registers the series on ``registry`` (None: a new one); ``on`` shares them."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "parkpool_sdk_jobs",
            "Jobs by what happened to them",
            ["status"],  # submitted, done, failed, cancelled
            registry=r,
        )
        self.chunks = Counter(
            "parkpool_sdk_chunks",
            "Chunks by what happened to them",
            ["status"],  # published, completed, duplicate, dead_lettered
            registry=r,
        )
        self.delivery_errors = Counter(
            "parkpool_sdk_delivery_errors", "Chunks Kafka did not confirm", registry=r
        )
        self.producer_recreated = Counter(
            "parkpool_sdk_kafka_producer_recreated",
            "Idempotent producers replaced after a fatal error or a publish that stalled",
            registry=r,
        )
        self.jobs_refused = Counter(
            "parkpool_sdk_jobs_refused",
            "Jobs refused at submit, before anything was sent",
            ["reason"],  # the ValidationError reason: record_too_large, unknown_kernel, ...
            registry=r,
        )
        self.results_refused = Counter(
            "parkpool_sdk_results_refused",
            "Records on the reply or dead-letter topic of our jobs that could not be read",
            ["reason"],  # the DecodeError reason: malformed, unsealable, ...
            registry=r,
        )
        self.offset_holes = Counter(
            "parkpool_sdk_offset_holes",
            "Reply-topic offsets a fetch passed over, by outcome once read again",
            ["outcome"],  # filled (read on a second look) or lost (not there in time)
            registry=r,
        )
        self.result_fetch_wait_raised = Counter(
            "parkpool_sdk_result_fetch_wait_raised",
            "Times the result reader doubled its fetch wait: a partition stayed behind",
            registry=r,
        )
        self.blobs_uploaded = Counter(
            "parkpool_sdk_blobs_uploaded",
            "Objects written to the store: each distinct input block once per job",
            registry=r,
        )
        self.blobs_deleted = Counter(
            "parkpool_sdk_blobs_deleted",
            "Objects deleted from the store as their jobs ended",
            registry=r,
        )
        self.end_to_end = Histogram(
            "parkpool_sdk_end_to_end_seconds",
            "From a chunk's creation to its result reaching the caller",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("parkpool_sdk_jobs_running", "Jobs not yet ended", registry=r)
        self.verdicts = Counter(
            "parkpool_sdk_verdicts",
            "Car results judged by this client's checks",
            ["outcome"],  # valid, invalid, unchecked (handed over on the car's record)
            registry=r,
        )
        self.chunks_verified = Counter(
            "parkpool_sdk_chunks_verified",
            "Chunks handed to the caller, by how they were verified",
            ["level"],  # algebraic, quorum, ringer_trusted, unchecked
            registry=r,
        )
        self.redone = Counter(
            "parkpool_sdk_chunks_redone",
            "Chunks sent again for verification",
            ["why"],  # second_opinion, wrong_result, quarantined_car, ringer, unusable_outputs
            registry=r,
        )
        self.quarantines = Counter(
            "parkpool_sdk_quarantines",
            "Cars this client quarantined for a proven wrong result",
            registry=r,
        )

    # JobObserver: called by JobHandle, under its lock, so each must be quick.

    def chunk_completed(self, latency_s: float) -> None:
        self.chunks.labels("completed").inc()
        self.end_to_end.observe(latency_s)

    def chunk_duplicate(self) -> None:
        self.chunks.labels("duplicate").inc()

    def chunk_dead_lettered(self) -> None:
        self.chunks.labels("dead_lettered").inc()

    def job_ended(self, state: JobState) -> None:
        self.jobs.labels(state.value).inc()
        self.running.dec()

    # The client's side.

    def job_submitted(self, chunks: int) -> None:
        self.jobs.labels("submitted").inc()
        self.chunks.labels("published").inc(chunks)
        self.running.inc()

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0
