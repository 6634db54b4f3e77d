# SPDX-License-Identifier: Apache-2.0
"""Reading a gateway's status server: ``/metrics``, ``/readyz`` and ``/status``.

Never raises for a gateway's sake: an unreachable gateway or a malformed page becomes a
``Sample`` with ``error`` set to the exception's type name (never its message, which may
carry an address the SRE did not ask to see). Gateways are read in parallel, so one slow
gateway costs one timeout per refresh, not one per gateway.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from parkpool.app.top.series import Series, parse_metrics

__all__ = ["Sample", "error_name", "fetch", "fetch_all"]

# Loopback and in-cluster addresses must never go through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Bounds a page (a gateway's /metrics is tens of kilobytes).
_MAX_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Sample:
    """What one gateway said at one moment; ``series`` is ``None`` when it was down."""

    url: str
    at: float  # time.monotonic() of the scrape, for rates
    wall: float  # time.time() of the scrape, to age the gateway's own timestamps
    series: Series | None
    error: str | None = None
    readiness: Mapping[str, Any] | None = None  # the /readyz body, ready or not
    status: Mapping[str, Any] | None = None  # the /status body; None on an older gateway


def error_name(exc: BaseException) -> str:
    """The type name of what went wrong, looking through urllib's ``URLError`` wrapper."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    reason = getattr(exc, "reason", None)
    if isinstance(exc, urllib.error.URLError) and isinstance(reason, BaseException):
        return type(reason).__name__
    return type(exc).__name__


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """Status and body of a GET; an HTTP error status is an answer, not an exception."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return int(response.status), response.read(_MAX_BYTES)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(_MAX_BYTES)


def _json(url: str, timeout: float, accept: tuple[int, ...]) -> Mapping[str, Any] | None:
    """A JSON object from *url*, or ``None`` when absent, unreachable or not an object."""
    try:
        code, body = _get(url, timeout)
        payload = json.loads(body) if code in accept else None
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def fetch(url: str, timeout: float) -> Sample:
    """Scrape one gateway; ``url`` is its status server, e.g. ``http://127.0.0.1:9464``."""
    base = url.rstrip("/")
    at, wall = time.monotonic(), time.time()
    try:
        code, body = _get(f"{base}/metrics", timeout)
        if code != 200:
            return Sample(url, at, wall, None, f"HTTP {code}")
        series = parse_metrics(body.decode("utf-8", errors="replace"))
    except Exception as exc:  # whatever happens, it is one gateway's problem, shown as DOWN
        return Sample(url, at, wall, None, error_name(exc))
    readiness = _json(f"{base}/readyz", timeout, accept=(200, 503))
    status = _json(f"{base}/status", timeout, accept=(200,))
    return Sample(url, at, wall, series, None, readiness, status)


def fetch_all(urls: Sequence[str], timeout: float) -> list[Sample]:
    """Scrape every gateway at once; the samples come back in the order of *urls*."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(urls), 16))) as pool:
        return list(pool.map(lambda url: fetch(url, timeout), urls))
