# SPDX-License-Identifier: Apache-2.0
"""What a parkpool process that serves metrics says about itself: the standard
``process_*`` and ``python_info`` series, and ``parkpool_build_info``.

Only on a registry the process owns (a gateway's): the SDK's host has process series of
its own, and registering them twice on one registry is an error.
"""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector

__all__ = ["register", "version"]


@cache
def version() -> str:
    """The installed parkpool's version; ``0+unknown`` in a source tree never installed."""
    try:
        return dist_version("parkpool")
    except PackageNotFoundError:
        return "0+unknown"


def register(registry: CollectorRegistry, **labels: str) -> None:
    """Add the process's series, and ``parkpool_build_info`` (always 1) labelled with the
    parkpool and Python versions and ``labels``, to ``registry``."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    values = {"version": version(), "python": platform.python_version(), **labels}
    Gauge(
        "parkpool_build_info",
        "Always 1; its labels say which parkpool and Python the process runs",
        list(values),
        registry=registry,
    ).labels(**values).set(1)
