# SPDX-License-Identifier: Apache-2.0
"""A gateway's settings: one frozen value every part of the gateway reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from parkpool.runtime.kafka import TASK_FETCH_WAIT_MS
from parkpool.runtime.settings import KafkaConnection, MqttConnection, StoreConnection
from parkpool.schemas import ConfigError
from parkpool.schemas.messages import MAX_BATCH


@dataclass(frozen=True)
class GatewaySettings:
    gateway_id: str
    kafka: KafkaConnection
    mqtt: MqttConnection
    namespace: str = "parkpool"
    group_id: str = ""  # empty: "<namespace>.gateways"
    lease_seconds: float = 30.0
    # Heartbeats extend a lease this long after it was granted at most: a hung kernel,
    # or a car that only heartbeats, must not hold a record (and with it the partition's
    # commit point) for ever. As long as a lease's upload URL lives.
    max_lease_seconds: float = 900.0
    max_attempts: int = 5
    # In-flight tasks per partition before it is paused. Counted in tasks, not offsets,
    # so one slow car cannot pin it; window_span (0: 64 x window) bounds how far past the
    # lowest unfinished offset the partition may read, which bounds memory and redo.
    window: int = 1024
    window_span: int = 0
    # Tasks read and not finished, over all partitions: bounds memory at this many
    # records (1 MiB each at most) however many partitions the gateway owns.
    max_in_flight: int = 4096
    session_timeout_ms: int = 6000
    vehicle_silence_s: float = 45.0
    cell: str = ""  # the MQTT cell (one broker or cluster) this gateway serves; for labels
    # Cars this gateway keeps state for at most: with K gateways per car that is about
    # K x cell cars / gateways in the cell. Bounds the per-car tables (rate limits too).
    max_vehicles: int = 200_000
    # No car heard for this long: leave the task group so that other cells take the work.
    standby_after_s: float = 30.0
    max_batch: int = 8  # tasks in one message to a car with several credits
    drain_seconds: float = 20.0  # on SIGTERM, how long leases may finish before revoking
    batch: int = 256
    # Per vehicle: far above an honest car (one pull and one result per task, tasks of
    # at least tens of milliseconds), far below a flood.
    pull_rate: float = 50.0
    result_rate: float = 50.0
    # How long the task reader's fetches wait at first; doubled, up to 5 s, while a
    # partition stalls (runtime.fetchwait). On the embedded Kafka a job's first task
    # waits up to half of it for the reader to look again.
    task_fetch_wait_ms: int = TASK_FETCH_WAIT_MS
    kafka_overrides: dict[str, object] = field(default_factory=dict)
    signing_key: Path | None = None  # Ed25519 key that signs every assignment; None: unsigned
    vehicle_keys: Path | None = None  # enrolled cars' public keys; results must be signed
    # X25519 keys that open confidential tasks' data keys (newest first); none: such tasks
    # are dead-lettered as unsealable, since no car could ever run them from here.
    box_keys: tuple[Path, ...] = ()
    # The object store holding tasks' bulk inputs (schemas.blobref): the gateway only
    # presigns URLs for cars, it never moves those bytes. Disabled: tasks with stored
    # inputs are dead-lettered as ``no_object_store``.
    store: StoreConnection = field(default_factory=StoreConnection)
    # A lease's upload URL lives this long at most (and never past the job's deadline):
    # long enough for a long kernel whose lease heartbeats extend it.
    upload_url_s: float = 900.0
    # After a start, how long to wait for cars to announce a plugin kernel before its
    # tasks count as ones no car here runs (gateway.kernel_routes).
    kernel_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= MAX_BATCH:
            # A larger batch is no message a car accepts: refused here, not on the first
            # car with that many credits, where it stopped the gateway's loop.
            detail = f"max_batch must be 1 to {MAX_BATCH} (one AssignmentBatch), not "
            raise ConfigError(detail + repr(self.max_batch))

    @property
    def group(self) -> str:
        return self.group_id or f"{self.namespace}.gateways"
