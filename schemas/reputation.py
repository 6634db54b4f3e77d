# SPDX-License-Identifier: Apache-2.0
"""How a chunk was verified, and each car's record on the compacted reputation topic.

The reputation topic is keyed so that Kafka's compaction keeps exactly what a reader
needs and no write is ever lost to a concurrent one:

- ``CarTally`` records are keyed ``<vehicle>/<writer>``: each SDK client owns one slot
  per car and always writes its absolute counts, so the car's record is the sum over
  slots (a grow-only counter), whatever the order in which clients write.
- ``QuarantineNotice`` records are keyed ``<vehicle>``: the last one says whether the
  car is quarantined. A release starts a new *generation*; only tallies of the current
  generation count, so a released car starts again as a new one.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import ClassVar

from parkpool.schemas.errors import ValidationError
from parkpool.schemas.validate import (
    require_enum,
    require_float,
    require_int,
    require_name,
    require_str,
)

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_EVIDENCE = 8  # the first wrong results are proof enough; more only grow the record
MAX_COUNT = 2**53  # results a car can ever deliver, with room to spare


class Level(enum.StrEnum):
    """How a chunk handed to the caller was verified, weakest first."""

    UNCHECKED = "unchecked"  # no check ran, and the car has no clean record yet
    RINGER_TRUSTED = "ringer_trusted"  # not itself checked; its car has a clean record
    QUORUM = "quorum"  # two different cars agreed within the kernel's tolerance
    ALGEBRAIC = "algebraic"  # checked against the inputs (e.g. Freivalds for gemm)

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, other: Level) -> bool:
        return self.rank >= other.rank


_RANK = {level: i for i, level in enumerate(Level)}


class CarState(enum.StrEnum):
    QUARANTINED = "quarantined"
    RELEASED = "released"


def _vehicle(value: object) -> str:
    return require_str("vehicle_id", value, pattern=_ID)


@dataclass(frozen=True)
class CarTally:
    """One writer's counts of one car's checked results in one generation."""

    TYPE: ClassVar[str] = "car_tally"
    vehicle_id: str
    writer: str  # the SDK client that judged these results
    generation: int
    valid: int
    invalid: int
    unchecked: int  # handed over on the car's record, without a check of their own
    at: float

    def __post_init__(self) -> None:
        _vehicle(self.vehicle_id)
        require_str("writer", self.writer, pattern=_ID)
        require_int("generation", self.generation, 0, MAX_COUNT)
        for name in ("valid", "invalid", "unchecked"):
            require_int(name, getattr(self, name), 0, MAX_COUNT)
        require_float("at", self.at)

    @property
    def key(self) -> str:
        return tally_key(self.vehicle_id, self.writer)


@dataclass(frozen=True)
class Evidence:
    """One wrong result: where it was, which check caught it, by how much."""

    job_id: str
    chunk_id: int
    check: Level
    detail: str
    at: float

    def __post_init__(self) -> None:
        require_str("job_id", self.job_id, pattern=_ID)
        require_int("chunk_id", self.chunk_id, 0, MAX_COUNT)
        object.__setattr__(self, "check", require_enum(Level, "check", self.check))
        require_str("detail", self.detail)
        require_float("at", self.at)


@dataclass(frozen=True)
class QuarantineNotice:
    """A car quarantined (no more work, its results redone) or released by an operator."""

    TYPE: ClassVar[str] = "quarantine"
    vehicle_id: str
    state: CarState
    generation: int  # a release moves the car to generation + 1
    at: float
    by: str  # the SDK client that caught it, or the operator who released it
    reason: str
    evidence: tuple[Evidence, ...] = ()

    def __post_init__(self) -> None:
        _vehicle(self.vehicle_id)
        object.__setattr__(self, "state", require_enum(CarState, "state", self.state))
        require_int("generation", self.generation, 0, MAX_COUNT)
        require_float("at", self.at)
        require_str("by", self.by)
        require_name("reason", self.reason)
        if not isinstance(self.evidence, tuple) or len(self.evidence) > MAX_EVIDENCE:
            raise ValidationError("bad_value", f"evidence: a tuple of at most {MAX_EVIDENCE}")
        if not all(isinstance(item, Evidence) for item in self.evidence):
            raise ValidationError("wrong_type", "evidence holds Evidence records only")

    @property
    def key(self) -> str:
        return self.vehicle_id


def tally_key(vehicle_id: str, writer: str) -> str:
    return f"{vehicle_id}/{writer}"
