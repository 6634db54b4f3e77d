# SPDX-License-Identifier: Apache-2.0
"""The one error tree shared by every parkpool package.

ParkpoolError
├── ConfigError        a setting is missing or invalid
├── BrokerError        Kafka or MQTT refused or failed an operation
├── DecodeError        bytes from the wire are not a valid message (carries ``reason``)
├── ValidationError    a message or job is well-formed bytes but breaks the contract
├── KernelError        a kernel failed while running a task
└── PolicyError        an action is refused by a policy (limits, eligibility)

Retry and Reject are control flow, not failures of parkpool itself: a kernel or
handler raises them to say what should happen to the task.
"""

from __future__ import annotations


class ParkpoolError(Exception):
    """Base of every error parkpool raises on purpose."""


class ConfigError(ParkpoolError):
    """A setting is missing or invalid."""


class BrokerError(ParkpoolError):
    """Kafka or MQTT refused or failed an operation."""


class DecodeError(ParkpoolError):
    """Bytes from the wire could not be decoded into a message.

    ``reason`` is a short, stable, machine-friendly slug (used as a metric label);
    ``detail`` is the human-readable explanation.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ValidationError(DecodeError):
    """A message decoded, but its fields break the contract.

    It is a DecodeError so that readers of the wire handle both with one except clause.
    """


class KernelError(ParkpoolError):
    """A kernel failed while running a task."""


class PolicyError(ParkpoolError):
    """An action was refused by a policy."""


class Preempted(ParkpoolError):  # noqa: N818 - control flow, named for what happened
    """The car's owner (or its policy) took it back: stop the kernel between launches.

    Raised by a kernel's checkpoint; the worker hands the task back as ``released``. Also
    raised by an input download, or a wait for one, of a task the car let go: whoever let
    it go said what there was to say, and it is no fault of the car's.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Retry(ParkpoolError):  # noqa: N818 - control flow, named for what it asks for
    """Ask for the task to be tried again, optionally after ``delay`` seconds."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        self.reason = reason
        self.delay = delay
        super().__init__(reason)


class Reject(ParkpoolError):  # noqa: N818 - control flow, named for what it asks for
    """Refuse the task for good: it goes to the dead-letter topic with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
