# SPDX-License-Identifier: Apache-2.0
"""The gateway's Prometheus series, on one explicit registry per process.

No per-vehicle or per-task labels: a fleet of millions would explode cardinality. Labels
are closed sets (statuses, reasons, partitions, kernel names); docs/OPERATIONS.md lists
every series. The fleet's series, aggregated from vehicle heartbeats, are in
``gateway.fleet_stats``.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from parkpool.runtime import build_info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# The gateway's own hand-off is sub-millisecond when idle; finer buckets show it.
DISPATCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        build_info.register(r)  # process_*, python_info, parkpool_build_info
        self.tasks = Counter(
            "parkpool_gateway_tasks_total",
            "Task lifecycle events at the gateway",
            ["status"],  # consumed, dispatched, completed, failed, dead_lettered, cancelled
            registry=r,
        )
        self.failures = Counter(
            "parkpool_gateway_task_failures_total",
            "Failed attempts that count towards a task's limit, by reason",
            ["reason"],  # kernel_error, invalid_task, lease_expired, vehicle_offline, ...
            registry=r,
        )
        self.redelivered = Counter(
            "parkpool_gateway_redelivered_total",
            "Tasks put back for another vehicle",
            ["cause"],  # lease_expired, nack, vehicle_offline
            registry=r,
        )
        self.dead_lettered = Counter(
            "parkpool_gateway_dead_lettered_total",
            "Records sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "parkpool_gateway_dropped_total",
            "Messages dropped after being read, by reason (stale, fenced, malformed)",
            ["source", "reason"],
            registry=r,
        )
        self.offset_holes = Counter(
            "parkpool_gateway_offset_holes_total",
            "Task offsets a fetch passed over, by outcome once read again",
            ["outcome"],  # filled (read on a second look) or lost (not there in time)
            registry=r,
        )
        self.handler_errors = Counter(
            "parkpool_gateway_handler_errors_total",
            "Messages and records whose handling raised unexpectedly; each is still "
            "acknowledged (or dead-lettered) so that it cannot stop the loop or come back",
            ["source"],  # mqtt_pull, mqtt_status, mqtt_result, ..., kafka_tasks, kafka_delivery
            registry=r,
        )
        self.dead_letter_bytes_dropped = Counter(
            "parkpool_gateway_dead_letter_bytes_dropped_total",
            "Dead letters written without the record's bytes, too large for one Kafka record",
            registry=r,
        )
        self.delivery_errors = Counter(
            "parkpool_gateway_kafka_delivery_errors_total",
            "Kafka delivery reports that failed",
            ["topic_kind"],
            registry=r,
        )
        self.task_fetch_wait_raised = Counter(
            "parkpool_gateway_task_fetch_wait_raised_total",
            "Times the task reader doubled its fetch wait (a new consumer, so a rebalance): "
            "a partition stayed behind while nothing at all was read",
            registry=r,
        )
        self.producer_recreated = Counter(
            "parkpool_gateway_kafka_producer_recreated_total",
            "Kafka producers replaced because the broker fenced them or lost their id; "
            "what they had not delivered is produced again by the new one",
            registry=r,
        )
        self.writes_repeated = Counter(
            "parkpool_gateway_kafka_writes_repeated_total",
            "Kafka writes acknowledged at an offset that cannot be theirs (a retry the broker "
            "called a duplicate, which Tansu killed mid-write never stored); written again",
            registry=r,
        )
        self.rebalances = Counter(
            "parkpool_gateway_rebalances_total",
            "Consumer-group rebalance events",
            ["event"],  # assigned, revoked, lost
            registry=r,
        )
        self.ratelimit_evictions = Counter(
            "parkpool_gateway_ratelimit_evictions_total",
            "Per-car rate-limit buckets dropped to stay within the table's size; lossy=true: "
            "the bucket was not full, so that car's limit restarts from a whole burst",
            ["kind", "lossy"],  # kind: pull, result; lossy: true, false
            registry=r,
        )
        self.mqtt_reconnects = Counter(
            "parkpool_gateway_mqtt_reconnects_total", "MQTT connections after the first", registry=r
        )
        # What scale is made of: per-gateway message rates must stay flat as cells are
        # added (docs/SCALE.md); kinds are the topic's, so the label set is fixed.
        self.mqtt_messages = Counter(
            "parkpool_gateway_mqtt_messages_total",
            "MQTT messages this gateway received from cars (in) or sent to them (out), by kind",
            ["direction", "kind"],
            registry=r,
        )
        self.ready = Gauge(
            "parkpool_gateway_ready",
            "1 when MQTT is subscribed and partitions assigned",
            registry=r,
        )
        self.leases = Gauge("parkpool_gateway_leases", "Leases in flight", registry=r)
        self.quarantined = Gauge(
            "parkpool_gateway_quarantined_vehicles",
            "Cars the reputation topic says are quarantined: none gets work here",
            registry=r,
        )
        self.queued = Gauge(
            "parkpool_gateway_queued_tasks", "Tasks waiting for a vehicle", registry=r
        )
        self.paused = Gauge(
            "parkpool_gateway_paused_partitions", "Partitions paused by backpressure", registry=r
        )
        self.dispatch_skipped = Counter(
            "parkpool_gateway_dispatch_skipped_total",
            "Times a hungry vehicle got no task although tasks were ready",
            # dwell: none would finish before the car is due to leave; no_box_key: all
            # were confidential, and the car announced no key to open them with;
            # no_kernel: a plugin kernel the car did not announce (its manifest);
            # quarantined: the car was caught returning wrong results
            # failed_here: this car last failed or handed back each, lately, and another
            # car grants work here; avoided: each checks or redoes this car's own result;
            # presign_failed: the store's credentials could not sign the task's URLs (a
            # failed refresh), so it went back uncounted and dispatch paused for 5 s
            ["reason"],
            registry=r,
        )
        self.store_credential_refreshes = Counter(
            "parkpool_gateway_store_credential_refreshes_total",
            "Refreshes of the store's rotating credentials, on their own thread",
            # renewed: new keys; kept: due, but the source gave the same keys again;
            # failed: the source raised (presigns are refused until one succeeds)
            ["outcome"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "parkpool_gateway_queue_wait_seconds",
            "From a task becoming ready at the gateway to its assignment being sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dispatch = Histogram(
            "parkpool_gateway_dispatch_seconds",
            "From the moment a ready task and a vehicle's credit are both at hand to the "
            "assignment being sent: the gateway's own dispatch delay",
            buckets=DISPATCH_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "parkpool_gateway_end_to_end_seconds",
            "From the task's creation by the SDK to its result being durable in Kafka",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kernel_execution = Histogram(
            "parkpool_gateway_kernel_execution_seconds",
            "Kernel time reported by the vehicle with each result, by kernel",
            ["kernel"],  # the built-in kernels, or "other"
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.execution = Histogram(
            "parkpool_gateway_task_dispatch_to_result_seconds",
            "From dispatch to a durable result",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.window_used = Gauge(
            "parkpool_gateway_partition_window_used",
            "Unfinished records in a partition's in-flight window",
            ["partition"],
            registry=r,
        )
        self.window_size = Gauge(
            "parkpool_gateway_partition_window_size",
            "Capacity of a partition's in-flight window",
            ["partition"],
            registry=r,
        )
        self.window_span = Gauge(
            "parkpool_gateway_partition_window_span",
            "Offsets from a partition's commit point to the next to read: what a restart "
            "reads again (a slow record holds the commit point while later ones finish)",
            ["partition"],
            registry=r,
        )
        self.window_max_span = Gauge(
            "parkpool_gateway_partition_window_max_span",
            "How far past its commit point a partition may read before it is paused",
            ["partition"],
            registry=r,
        )
        self.lag = Gauge(
            "parkpool_gateway_kafka_lag",
            "Records between a partition's committed offset and its end",
            ["partition"],
            registry=r,
        )
        self.committed = Gauge(
            "parkpool_gateway_kafka_committed_offset",
            "Offset committed for a partition (the next record to process)",
            ["partition"],
            registry=r,
        )
        self.end_offset = Gauge(
            "parkpool_gateway_kafka_end_offset",
            "A partition's end (high watermark) as last reported by the broker",
            ["partition"],
            registry=r,
        )

    def forget_partitions(self, partitions: Iterable[str]) -> None:
        """Drop the series of partitions this gateway no longer owns: a revoked
        partition's last lag would otherwise be exported for ever, and the recording
        rule's max over owners would keep it."""
        per_partition = (
            self.window_used,
            self.window_size,
            self.window_span,
            self.window_max_span,
            self.committed,
            self.lag,
            self.end_offset,
        )
        for partition in partitions:
            for gauge in per_partition:
                with suppress(KeyError):  # end_offset is set only once the end is known
                    gauge.remove(partition)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (0 when absent); for summaries and tests."""
        return self.registry.get_sample_value(name, labels) or 0.0
