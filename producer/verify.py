# SPDX-License-Identifier: Apache-2.0
"""Deciding whether a car's result may reach the caller: checks, quorum, ringers, policy.

The checks run in the SDK because only it holds every job's inputs in clear (a
confidential job's gateway never does). Per kernel (``KernelSpec.verification``):

- **algebraic** (gemm, fft): every chunk is checked against its inputs
  (producer.freivalds, producer.fftcheck).
- **quorum** (the rest): a result is compared with a second car's, within twice the
  kernel's tolerance (each may be that far from the exact answer). Whether a second
  opinion is asked depends on the car's record (``AdaptivePolicy``); a chunk already
  settled is sometimes sent again as a *ringer*, whose answer is known.

A ``JobVerifier`` returns what to do as actions; the client carries them out. A wrong
result never becomes an ``Accept``: its chunk is redone on another car.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from parkpool.producer.fftcheck import FftCheck
from parkpool.producer.freivalds import GemmCheck, HashTap, Prepared, TileVerdict
from parkpool.producer.plans import ChunkSpec
from parkpool.runtime.reputation import TRUST_AFTER, ReputationBook
from parkpool.schemas import Result, ValidationError
from parkpool.schemas.kernels import KernelSpec, Tolerance
from parkpool.schemas.reputation import Evidence, Level


@dataclass(frozen=True)
class AdaptivePolicy:
    """When a result of a quorum kernel gets a second opinion.

    Anchored on BOINC's adaptive replication: a host is replicated until it has 10
    consecutive valid results, then with a probability that falls as its record grows.
    Here: always until ``TRUST_AFTER`` valid results with none invalid; then with
    probability ``max(spot_floor, TRUST_AFTER / valid)``, so 100 % at 10 valid, 10 % at
    100 and ``spot_floor`` (5 %) from 200 on. ``ringer_rate`` of the chunks a quorum
    settled (whose answer is then known) are sent again as ringers, to whichever car
    takes them. One proven wrong result quarantines the car.
    """

    spot_floor: float = 0.05
    ringer_rate: float = 0.2
    max_opinions: int = 4  # results of one chunk before it fails as "no_quorum"

    def second_opinion(self, valid: int, trusted: bool, draw: float) -> bool:
        if not trusted:
            return True
        return draw < max(self.spot_floor, TRUST_AFTER / max(valid, 1))


@dataclass(frozen=True)
class Accept:
    result: Result
    level: Level


@dataclass(frozen=True)
class Redo:
    chunk_id: int
    avoid: tuple[str, ...]
    why: str = ""  # for the redone counter; else told from the chunk and the cars avoided


@dataclass(frozen=True)
class Judged:
    vehicle_id: str
    valid: bool | None  # None: handed over on the car's record, not itself checked
    evidence: Evidence | None = None


@dataclass(frozen=True)
class Fail:
    chunk_id: int
    reason: str


@dataclass(frozen=True)
class Misfit:
    """Outputs that do not fit the chunk (no ``c``, a wrong shape): not checkable, and
    no answer; the verifier's ``misfit`` says what becomes of the chunk."""

    result: Result
    detail: str


Action = Accept | Redo | Judged | Fail | Misfit


class AlgebraicCheck(Protocol):
    """A kernel's check of results against their inputs (gemm: Freivalds)."""

    output: str  # the output it checks

    def shape(self, chunk_id: int) -> tuple[int, ...]: ...

    def add(self, chunk_id: int, value: np.ndarray) -> list[TileVerdict]: ...

    def release(self, chunk_id: int) -> list[TileVerdict]: ...

    def forget(self, chunk_id: int) -> None: ...


def algebraic_check(
    spec: KernelSpec,
    chunks: Sequence[ChunkSpec],
    rounds: int,
    rng: np.random.Generator,
    prepared: Prepared | None = None,
) -> AlgebraicCheck | None:
    """The kernel's algebraic check of this job's chunks, if its contract has one."""
    inputs = [chunk.inputs for chunk in chunks]
    if spec.name == "gemm":
        return GemmCheck(inputs, spec.tolerance, rounds, rng, prepared)
    if spec.name == "fft":
        return FftCheck(inputs, [chunk.params for chunk in chunks], spec.tolerance, rounds, rng)
    return None


def input_tap(kernel: str, chunks: Sequence[ChunkSpec], rounds: int) -> HashTap | None:
    """What the kernel's check computes from its inputs while the SDK hashes them for
    the claim check, if it has such a part (gemm's products over A and B)."""
    if kernel == "gemm":
        return HashTap([chunk.inputs for chunk in chunks], rounds)
    return None


@dataclass
class _Chunk:
    opinions: list[Result] = field(default_factory=list)
    settled: Result | None = None  # the answer the caller got
    ringer_out: bool = False  # sent again as a ringer; its result not yet judged
    # Cars whose results' stored outputs could not be read back or matched: avoided too.
    unusable: list[str] = field(default_factory=list)


def reachable(spec: KernelSpec, level: Level) -> None:
    """Refuse a job whose demanded level its kernel can never reach."""
    if not spec.verification.at_least(level):
        raise ValidationError(
            "verification_unreachable",
            f"{spec.name} results can be checked at most by {spec.verification}, not {level}",
        )


class JobVerifier:
    """One job's checks; thread-safe (results arrive on the reader and fetcher threads)."""

    def __init__(
        self,
        job_id: str,
        spec: KernelSpec,
        chunks: Sequence[ChunkSpec],
        book: ReputationBook,
        *,
        minimum: Level = Level.RINGER_TRUSTED,
        policy: AdaptivePolicy | None = None,
        rounds: int = 1,
        seed: int | None = None,
        prepared: Prepared | None = None,
    ) -> None:
        reachable(spec, minimum)
        self.job_id = job_id
        self.spec = spec
        self.minimum = minimum
        self.book = book
        self.policy = policy or AdaptivePolicy()
        self._random = random.Random(seed)
        self._pair = Tolerance(2 * spec.tolerance.rtol, 2 * spec.tolerance.atol)
        self._chunks = [_Chunk() for _ in chunks]
        rng = np.random.default_rng(seed)
        self._check = algebraic_check(spec, chunks, rounds, rng, prepared)
        if (self._check is None) != (spec.verification is not Level.ALGEBRAIC):
            raise ValueError(f"{spec.name}: its contract and its algebraic check disagree")
        self._lock = threading.Lock()

    def abandoned(self, chunk_id: int) -> list[Action]:
        """A chunk that failed for good (dead-lettered): tiles held for its check group
        are judged alone now rather than waiting for it."""
        with self._lock:
            if self._check is None:
                return []
            actions: list[Action] = []
            for verdict in self._check.release(chunk_id):
                actions += self._settle_tile(verdict)
            return actions

    def unusable(self, result: Result, detail: str) -> list[Action]:
        """A result whose stored outputs are missing or not the bytes its car named: no
        answer, held against the car (not proof of a wrong number, so no quarantine),
        and the chunk redone on another car; it fails after ``max_opinions`` of these."""
        with self._lock:
            return self._unusable(result, f"outputs_unreadable: {detail}", "unusable_outputs")

    def misfit(self, result: Result, detail: str) -> list[Action]:
        """Outputs that do not fit the chunk (an output missing, or of the wrong shape
        or kind), whether this verifier or the job's assembler found it: no answer, and
        dealt with as unusable outputs are. A chunk settled on them (a first opinion
        taken on its car's record, or cars agreeing on the same misfit) is unsettled
        first: the gateway has passed the chunk on, so unless it is redone here the job
        waits for it for ever."""
        with self._lock:
            chunk = self._chunks[result.chunk_id]
            agreed: list[str] = []
            if chunk.settled is result:
                chunk.settled, chunk.ringer_out = None, False
                same = [r for r in chunk.opinions if r is not result and self._same(r, result)]
                chunk.opinions = [r for r in chunk.opinions if not self._same(r, result)]
                agreed = [r.vehicle_id for r in same if r.vehicle_id not in chunk.unusable]
                chunk.unusable.extend(agreed)  # as wrong as the one accepted: avoided too
                if self._check is not None:
                    self._check.forget(result.chunk_id)
            actions = self._unusable(result, f"outputs_misfit: {detail}", "misfit_outputs")
            return [*(Judged(car, False) for car in agreed), *actions]

    def _unusable(self, result: Result, reason: str, why: str) -> list[Action]:
        chunk = self._chunks[result.chunk_id]
        if result.vehicle_id in chunk.unusable:
            return []  # the same record again (at-least-once): already held against it
        chunk.unusable.append(result.vehicle_id)
        actions: list[Action] = [Judged(result.vehicle_id, False)]
        if chunk.settled is not None:  # a ringer's: the caller's answer stands
            chunk.ringer_out = False
            return actions
        if len(chunk.unusable) >= self.policy.max_opinions:
            return [*actions, Fail(result.chunk_id, reason)]
        return [*actions, Redo(result.chunk_id, self._avoid(chunk, result), why)]

    def wants(self, chunk_id: int) -> bool:
        """Whether a result would still be used: its chunk unsettled, or a ringer's."""
        with self._lock:
            chunk = self._chunks[chunk_id]
            return chunk.settled is None or chunk.ringer_out

    def take(self, result: Result) -> list[Action]:
        with self._lock:
            chunk = self._chunks[result.chunk_id]
            if chunk.settled is not None:
                return self._ringer(chunk, result)
            if any(r.vehicle_id == result.vehicle_id for r in chunk.opinions):
                return []  # the same car twice (a redelivery) is no second opinion
            if self.book.quarantined(result.vehicle_id):
                return [Redo(result.chunk_id, self._avoid(chunk, result))]
            if self._check is not None:
                return self._algebraic(result)
            return self._quorum(chunk, result)

    # ---------------------------------------------------------------- algebraic

    def _algebraic(self, result: Result) -> list[Action]:
        assert self._check is not None
        value = result.outputs.get(self._check.output)
        want = self._check.shape(result.chunk_id)
        if value is None or value.shape != want:
            got = "none" if value is None else f"shape {value.shape}"
            return [Misfit(result, f"{self._check.output!r}: {got}, want shape {want}")]
        self._chunks[result.chunk_id].opinions.append(result)
        verdicts = self._check.add(result.chunk_id, value)
        actions: list[Action] = []
        for verdict in verdicts:
            actions += self._settle_tile(verdict)
        return actions

    def _settle_tile(self, verdict: TileVerdict) -> list[Action]:
        chunk = self._chunks[verdict.chunk_id]
        result = chunk.opinions[-1]
        if verdict.valid:
            chunk.settled = result
            return [Judged(result.vehicle_id, True), Accept(result, Level.ALGEBRAIC)]
        assert self._check is not None
        self._check.forget(verdict.chunk_id)
        evidence = self._evidence(result, Level.ALGEBRAIC, verdict.detail)
        return [
            Judged(result.vehicle_id, False, evidence),
            Redo(verdict.chunk_id, self._avoid(chunk, result)),
        ]

    # ---------------------------------------------------------------- quorum

    def _quorum(self, chunk: _Chunk, result: Result) -> list[Action]:
        chunk.opinions.append(result)
        if len(chunk.opinions) == 1:
            return self._first_opinion(chunk, result)
        agreed = self._agreeing_pair(chunk.opinions)
        if agreed is None:
            if len(chunk.opinions) >= self.policy.max_opinions:
                return [Fail(result.chunk_id, "no_quorum")]
            return [Redo(result.chunk_id, self._avoid(chunk, result))]
        chunk.settled = agreed
        actions: list[Action] = [Accept(agreed, Level.QUORUM)]
        for other in chunk.opinions:
            if self._same(other, agreed):
                actions.append(Judged(other.vehicle_id, True))
            else:
                detail = "outvoted: its result differs from two that agree"
                evidence = self._evidence(other, Level.QUORUM, detail)
                actions.append(Judged(other.vehicle_id, False, evidence))
        return actions + self._maybe_ringer(chunk, result.chunk_id)

    def _first_opinion(self, chunk: _Chunk, result: Result) -> list[Action]:
        record = self.book.record(result.vehicle_id)
        level = Level.RINGER_TRUSTED if record.trusted else Level.UNCHECKED
        opted_out = self.minimum is Level.UNCHECKED and not record.trusted
        draw = self._random.random()
        if not opted_out and (
            not level.at_least(self.minimum)
            or self.policy.second_opinion(record.valid, record.trusted, draw)
        ):
            return [Redo(result.chunk_id, self._avoid(chunk, result))]
        chunk.settled = result
        return [Judged(result.vehicle_id, None), Accept(result, level)]

    def _maybe_ringer(self, chunk: _Chunk, chunk_id: int) -> list[Action]:
        if self._random.random() >= self.policy.ringer_rate:
            return []
        chunk.ringer_out = True  # whichever car runs it; checked against the known answer
        return [Redo(chunk_id, tuple(r.vehicle_id for r in chunk.opinions))]

    def _ringer(self, chunk: _Chunk, result: Result) -> list[Action]:
        known = chunk.settled
        if not chunk.ringer_out or known is None:
            return []
        if any(r.vehicle_id == result.vehicle_id for r in chunk.opinions):
            return []
        chunk.ringer_out = False
        chunk.opinions.append(result)
        if self._same(result, known):
            return [Judged(result.vehicle_id, True)]
        evidence = self._evidence(result, Level.RINGER_TRUSTED, "ringer: known answer differs")
        return [Judged(result.vehicle_id, False, evidence)]

    def _agreeing_pair(self, opinions: list[Result]) -> Result | None:
        newest = opinions[-1]
        for earlier in opinions[:-1]:
            if self._same(earlier, newest):
                return earlier
        return None

    def _same(self, first: Result, second: Result) -> bool:
        if first is second:
            return True
        if set(first.outputs) != set(second.outputs):
            return False
        return all(self._pair.allclose(first.outputs[k], second.outputs[k]) for k in first.outputs)

    # ---------------------------------------------------------------- helpers

    def _avoid(self, chunk: _Chunk, result: Result) -> tuple[str, ...]:
        cars = [r.vehicle_id for r in chunk.opinions] + chunk.unusable + [result.vehicle_id]
        return tuple(dict.fromkeys(cars))

    def _evidence(self, result: Result, check: Level, detail: str) -> Evidence:
        return Evidence(self.job_id, result.chunk_id, check, detail, time.time())
