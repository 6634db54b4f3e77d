# SPDX-License-Identifier: Apache-2.0
"""What the in-car agent checks and waits for before it takes any work.

Safe by default: without the car's signals nothing stops a kernel when the owner drives
off, and without trusted gateway keys anyone who can publish on the car's task topic can
make it compute. So ``parkpool worker`` refuses to start without both, unless told it
runs on a development bench (``--dev``), and then it says so on every start.

A car boots wherever it is parked, often before the network is up: the broker is tried
again and again, with capped exponential backoff and full jitter, and the agent never
exits because the broker cannot be reached yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from parkpool.runtime import logs
from parkpool.runtime.backoff import Backoff
from parkpool.schemas.errors import BrokerError, ConfigError
from parkpool.worker.worker import VehicleWorker

log = logs.get_logger("parkpool.worker.boot")

# A car retries within a second at first, then backs off to a minute: a fleet whose
# broker is down for long sends each broker node a trickle, not a stampede.
RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0


@dataclass(frozen=True)
class Safeguard:
    """One protection a car must have, and how to give it."""

    what: str  # what is missing, as the refusal says it
    flag: str
    env: str

    def describe(self) -> str:
        return f"{self.what} ({self.flag} or {self.env})"


OWNER_POLICY = Safeguard(
    "no owner-policy feed: work would go on while the car is driven",
    "--car-feed",
    "PARKPOOL_CAR_FEED",
)
TRUSTED_KEYS = Safeguard(
    "no trusted gateway keys: anyone on the broker could send work",
    "--trusted-keys",
    "PARKPOOL_TRUSTED_KEYS",
)


def missing_safeguards(car_feed: str, trusted_keys: str) -> list[Safeguard]:
    missing = []
    if not car_feed:
        missing.append(OWNER_POLICY)
    if not trusted_keys.strip(", "):
        missing.append(TRUSTED_KEYS)
    return missing


def check_safeguards(missing: list[Safeguard], *, dev: bool, command: str) -> None:
    """Refuse to run without every safeguard, unless on a development bench, loudly."""
    if not missing:
        return
    listed = "; ".join(guard.describe() for guard in missing)
    if not dev:
        raise ConfigError(
            f"refusing to start: {listed}. A car needs both; on a development bench, "
            "pass --dev (PARKPOOL_DEV=1) to run without them"
        )
    log.warning(
        "unsafe_development_mode",
        command=command,
        missing=[guard.flag for guard in missing],
        detail=f"running WITHOUT: {listed}; never do this on a car",
    )


def start_with_retries(
    make: Callable[[], VehicleWorker], stop: threading.Event, backoff: Backoff | None = None
) -> VehicleWorker | None:
    """Start a worker, trying again until the broker answers; None if stopped first.

    Each try gets a fresh worker: one that failed half-way (connected, then refused)
    may still hold a socket, so it is dropped whole rather than reused.
    """
    backoff = backoff or Backoff(base=RETRY_BASE_S, cap=RETRY_CAP_S)
    while not stop.is_set():
        worker = make()
        try:
            worker.start(abort=stop)  # a stop ends the wait for the broker, too
        except (BrokerError, TimeoutError, OSError) as exc:
            worker.kill()
            if stop.is_set():
                break
            delay = backoff.next_delay()
            log.warning(
                "broker_unreachable",
                error=str(exc),
                attempt=backoff.failures,
                retry_in_s=round(delay, 2),
            )
            stop.wait(delay)
        else:
            return worker
    return None
