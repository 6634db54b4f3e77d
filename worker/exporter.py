# SPDX-License-Identifier: Apache-2.0
"""A car agent's own metrics: ``process_*`` and ``parkpool_build_info``, on loopback.

Cars are never scraped over the network (docs/ARCHITECTURE.md): a fleet of millions
reports through its gateways' heartbeats. What an SRE or the car's own telemetry agent
may still want is how the agent process does (memory, CPU, open files, which build it
runs), so a car serves these on 127.0.0.1 when given a port, and nothing otherwise.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from parkpool.runtime import build_info
from parkpool.runtime.http import StatusServer
from parkpool.worker.kernel_loading import REFUSAL_REASONS, KernelLoad

LOOPBACK = "127.0.0.1"  # never another interface: the car's network is the owner's


def serve_metrics(
    port: int, backend: str, role: str, kernels: KernelLoad | None = None
) -> StatusServer:
    """Serve the agent's process series, build info and the kernel packages it refused
    at start, on ``127.0.0.1:port``."""
    registry = CollectorRegistry()
    build_info.register(registry, role=role, backend=backend)
    refused = Counter(
        "parkpool_worker_kernels_refused",
        "Installed kernel packages this agent refused to load, by reason",
        ["reason"],
        registry=registry,
    )
    for reason in REFUSAL_REASONS:
        refused.labels(reason)  # every reason shows, at 0, so an alert can rate() it
    for refusal in kernels.refused if kernels else ():
        refused.labels(refusal.reason).inc()
    server = StatusServer(LOOPBACK, port, registry, health=_alive, ready=_alive)
    return server.start()


def _alive() -> tuple[bool, dict[str, str]]:
    return True, {}
