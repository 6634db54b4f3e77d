# SPDX-License-Identifier: Apache-2.0
"""A gateway's settings: one frozen value every part of the gateway reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from parkpool.runtime.settings import KafkaConnection, MqttConnection


@dataclass(frozen=True)
class GatewaySettings:
    gateway_id: str
    kafka: KafkaConnection
    mqtt: MqttConnection
    namespace: str = "parkpool"
    group_id: str = ""  # empty: "<namespace>.gateways"
    lease_seconds: float = 30.0
    max_attempts: int = 5
    window: int = 512
    session_timeout_ms: int = 6000
    vehicle_silence_s: float = 45.0
    drain_seconds: float = 20.0  # on SIGTERM, how long leases may finish before revoking
    batch: int = 256
    # Per vehicle: far above an honest car (one pull and one result per task, tasks of
    # at least tens of milliseconds), far below a flood.
    pull_rate: float = 50.0
    result_rate: float = 50.0
    kafka_overrides: dict[str, object] = field(default_factory=dict)
    signing_key: Path | None = None  # Ed25519 key that signs every assignment; None: unsigned
    vehicle_keys: Path | None = None  # enrolled cars' public keys; results must be signed
    # X25519 keys that open confidential tasks' data keys (newest first); none: such tasks
    # are dead-lettered as unsealable, since no car could ever run them from here.
    box_keys: tuple[Path, ...] = ()

    @property
    def group(self) -> str:
        return self.group_id or f"{self.namespace}.gateways"
