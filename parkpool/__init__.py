# SPDX-License-Identifier: Apache-2.0
"""parkpool: turn idle, parked electric cars into a GPU worker pool.

The SDK a backend service needs is importable from here::

    from parkpool import Client, KafkaConnection, ProducerSettings

    with Client(ProducerSettings(KafkaConnection("kafka:9092"))) as pool:
        job = pool.submit("gemm", {"a": a, "b": b}, tile=64)
        c = job.wait(timeout=600)  # or job.future.result(), or ``await job``

Everything else lives in the layers below (docs/ARCHITECTURE.md): ``parkpool.app`` (the
command line and the demo), the roles ``parkpool.producer``, ``parkpool.gateway``,
``parkpool.worker`` and ``parkpool.broker_config``, and under them ``parkpool.runtime``
and the wire contract ``parkpool.schemas``.

The names are loaded on first use, not on ``import parkpool``: a car imports
``parkpool.worker`` and ``parkpool.schemas`` only, and must not pay for (or need) the
Kafka client the SDK is built on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parkpool.producer.client import ParkpoolClient as Client
    from parkpool.producer.client import ProducerSettings
    from parkpool.producer.futures import (
        ALL_COMPLETED,
        FIRST_COMPLETED,
        FIRST_EXCEPTION,
        as_completed,
        wait,
    )
    from parkpool.producer.jobs import ChunkResult, JobFailed, JobHandle, JobState, Progress
    from parkpool.runtime.settings import KafkaConnection, Secret, StoreConnection
    from parkpool.schemas.errors import (
        BrokerError,
        ConfigError,
        DecodeError,
        ParkpoolError,
        ValidationError,
    )
    from parkpool.schemas.messages import Priority

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "BrokerError",
    "ChunkResult",
    "Client",
    "ConfigError",
    "DecodeError",
    "JobFailed",
    "JobHandle",
    "JobState",
    "KafkaConnection",
    "ParkpoolError",
    "Priority",
    "ProducerSettings",
    "Progress",
    "Secret",
    "StoreConnection",
    "ValidationError",
    "__version__",
    "as_completed",
    "wait",
]

# Public name -> (module, attribute in it).
_EXPORTS: dict[str, tuple[str, str]] = {
    "Client": ("parkpool.producer.client", "ParkpoolClient"),
    "ProducerSettings": ("parkpool.producer.client", "ProducerSettings"),
    "as_completed": ("parkpool.producer.futures", "as_completed"),
    "wait": ("parkpool.producer.futures", "wait"),
    "ALL_COMPLETED": ("parkpool.producer.futures", "ALL_COMPLETED"),
    "FIRST_COMPLETED": ("parkpool.producer.futures", "FIRST_COMPLETED"),
    "FIRST_EXCEPTION": ("parkpool.producer.futures", "FIRST_EXCEPTION"),
    "ChunkResult": ("parkpool.producer.jobs", "ChunkResult"),
    "JobFailed": ("parkpool.producer.jobs", "JobFailed"),
    "JobHandle": ("parkpool.producer.jobs", "JobHandle"),
    "JobState": ("parkpool.producer.jobs", "JobState"),
    "Progress": ("parkpool.producer.jobs", "Progress"),
    "KafkaConnection": ("parkpool.runtime.settings", "KafkaConnection"),
    "Secret": ("parkpool.runtime.settings", "Secret"),
    "StoreConnection": ("parkpool.runtime.settings", "StoreConnection"),
    "BrokerError": ("parkpool.schemas.errors", "BrokerError"),
    "ConfigError": ("parkpool.schemas.errors", "ConfigError"),
    "DecodeError": ("parkpool.schemas.errors", "DecodeError"),
    "ParkpoolError": ("parkpool.schemas.errors", "ParkpoolError"),
    "ValidationError": ("parkpool.schemas.errors", "ValidationError"),
    "Priority": ("parkpool.schemas.messages", "Priority"),
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from parkpool.runtime.build_info import version

        return version()
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'parkpool' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
