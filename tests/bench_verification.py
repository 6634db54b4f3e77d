# SPDX-License-Identifier: Apache-2.0
"""The ``verification`` bench line: what checking cars' results costs, and what it catches.

- ``freivalds_overhead_pct``: the Freivalds check of a 4096² float32 gemm's 64 tiles
  against the gemm itself on the same backend (NumPy here), both measured in this run,
  as compute against compute (CPU seconds; ``freivalds_overhead_wall_pct`` compares
  the 1-thread check's wall time with the 2-core gemm's): what the check's products
  add to the claim check's hashing of the stored blocks (``freivalds_prepare_ms``:
  hashing through the check's tap minus hashing alone, medians), plus checking each
  tile as it arrives (``freivalds_arrival_ms``).
- The rest comes from a fleet of 16 simulated cars driven through the SDK's own
  verifier (producer.verify) and reputation fold (runtime.reputation), without brokers:
  the brokers' part is covered by tests/test_verification_e2e.py, and thousands of
  chunks through them would measure the brokers, not the policy. Half the cars compute
  like a CPU (float32 BLAS, Horner), half like a GPU (another summation order), so
  honest results differ by real rounding. A liar adds noise of 1 % of the largest
  value to every element of 10 % of its results.
  - ``replication_overhead_pct``: extra executions per chunk of a quorum kernel (poly)
    with an all-honest fleet, in steady state (after every car earned trust).
  - ``tasks_to_quarantine``, ``wrong_chunks_to_caller``: one liar among 16 on gemm,
    the kernel every job of the demo runs, where every tile is checked.
    ``quorum_*``: the same liar on poly, where trusted cars are only spot-checked,
    over ``liar_trials`` seeds (mean and worst). ``patient_liar_*``: a liar that runs
    500 tasks honestly to earn trust first, then lies; its tasks counted from then.
  - ``false_quarantines``: all-honest fleet over ``chunks`` gemm tiles and as many poly
    chunks.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import random
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from parkpool.producer.claimcheck import array_sha256
from parkpool.producer.freivalds import GemmCheck, HashTap, Prepared
from parkpool.producer.splitters import PLANNERS, ChunkSpec, plan_gemm
from parkpool.producer.verify import Accept, AdaptivePolicy, Fail, JobVerifier, Judged, Redo
from parkpool.runtime.reputation import TRUST_AFTER, ReputationBook
from parkpool.schemas import Result
from parkpool.schemas.kernels import spec
from parkpool.schemas.reputation import CarState, CarTally, QuarantineNotice
from parkpool.worker.kernels import REGISTRY

CARS = 16
LIE_RATE = 0.10
LIE_SCALE = 1e-2
Outputs = dict[str, np.ndarray]


# ---------------------------------------------------------------- Freivalds overhead


def freivalds_overhead(size: int = 4096, tile: int = 512, runs: int = 9) -> dict[str, float]:
    """The check's whole cost as the SDK runs it on the claim-check path: what its
    products add to hashing the job's stored blocks (every block hashed as the claim
    check hashes it, through the check's tap, minus the same hashing without it;
    medians of ``runs``, alternated so both see the same machine), plus checking each
    tile as it arrives (best of ``runs``). ``freivalds_inline_path_ms`` is the check
    where nothing is stored or hashed: every product made as the tiles arrive.

    ``freivalds_overhead_pct`` compares compute with compute: the check's CPU time
    against the gemm's CPU time on the same NumPy (the gemm on every core, the check on
    one thread). The wall ratio is reported too (``freivalds_overhead_wall_pct``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    gemm = [_timed(lambda: a @ b) for _ in range(3)]
    c = a @ b
    plan = plan_gemm(a, b, tile=tile)
    inputs = [chunk.inputs for chunk in plan.chunks]
    plain, tapped = [], []
    for _ in range(runs):
        plain.append(_hashed(HashTap(inputs), tapped=False)[0])
        spent, tap = _hashed(HashTap(inputs), tapped=True)
        tapped.append(spent)
    prepared = tap.prepared()
    assert prepared is not None, "every block went through the tap"
    spans = [(r, k) for r in range(0, size, tile) for k in range(0, size, tile)]
    arrival = [_check_time(inputs, prepared, c, spans, tile) for _ in range(runs)]
    # Inline (nothing stored, so nothing hashed) the products come as the tiles do.
    unprepared = min(_check_time(inputs, None, c, spans, tile)[1] for _ in range(runs))
    # Noise can make the difference negative; the check is never counted as free.
    prepare_wall = max(0.0, _median(tapped, 0) - _median(plain, 0))
    prepare_cpu = max(0.0, _median(tapped, 1) - _median(plain, 1))
    arrival_wall, arrival_cpu = min(w for w, _ in arrival), min(t for _, t in arrival)
    gemm_wall, gemm_cpu = min(w for w, _ in gemm), min(t for _, t in gemm)
    return {
        "freivalds_overhead_pct": round(100 * (prepare_cpu + arrival_cpu) / gemm_cpu, 3),
        "freivalds_overhead_wall_pct": round(100 * (prepare_wall + arrival_wall) / gemm_wall, 3),
        "freivalds_cpu_ms": round((prepare_cpu + arrival_cpu) * 1e3, 2),
        "freivalds_prepare_ms": round(prepare_cpu * 1e3, 2),
        "freivalds_arrival_ms": round(arrival_cpu * 1e3, 2),
        "freivalds_inline_path_ms": round(unprepared * 1e3, 2),
        "hashing_median_ms": round(_median(plain, 1) * 1e3, 1),
        "gemm_4096_ms": round(gemm_wall * 1e3, 1),
        "gemm_4096_cpu_ms": round(gemm_cpu * 1e3, 1),
    }


def _hashed(tap: HashTap, tapped: bool) -> tuple[tuple[float, float], HashTap]:
    """Wall and this thread's CPU time of hashing every block as the claim check does,
    phase by phase, through ``tap`` or not."""
    started, cpu = time.perf_counter(), time.thread_time()
    for phase in tap.phases():
        for block in phase:
            array_sha256(block, tap if tapped else None)
    return (time.perf_counter() - started, time.thread_time() - cpu), tap


def _median(pairs: list[tuple[float, float]], index: int) -> float:
    return statistics.median(pair[index] for pair in pairs)


def _timed(work: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of ``work`` (CPU of the whole process: BLAS's threads too)."""
    started, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - started, time.process_time() - cpu


def _check_time(
    inputs: list[Mapping[str, np.ndarray]],
    prepared: Prepared | None,
    c: np.ndarray,
    spans: list[tuple[int, int]],
    tile: int,
) -> tuple[float, float]:
    """Each tile arrives as the SDK receives a stored result: bytes whose SHA-256 it
    checks against the car's claim (producer.claimcheck.fetch_outputs), then decoded.
    Only the Freivalds check is timed: wall, and this thread's CPU."""
    wall, cpu = time.perf_counter(), time.thread_time()
    check = GemmCheck(inputs, spec("gemm").tolerance, prepared=prepared)
    spent, spent_cpu = time.perf_counter() - wall, time.thread_time() - cpu
    judged = 0
    for i, (row, col) in enumerate(spans):
        raw = c[row : row + tile, col : col + tile].tobytes()
        hashlib.sha256(raw).hexdigest()
        arrived = np.frombuffer(raw, np.float32).reshape(tile, tile)
        wall, cpu = time.perf_counter(), time.thread_time()
        judged += sum(v.valid for v in check.add(i, arrived))
        spent, spent_cpu = spent + time.perf_counter() - wall, spent_cpu + time.thread_time() - cpu
    assert judged == len(inputs), "an honest tile was judged wrong"
    return spent, spent_cpu


# ---------------------------------------------------------------- the simulated fleet


@dataclasses.dataclass
class Car:
    vehicle_id: str
    gpu_like: bool
    lie_rate: float = 0.0
    honest_for: int = 0  # tasks it runs honestly first, to earn trust
    tasks: int = 0


class Fleet:
    """Cars that take chunks, a verifier per job, and a reputation book they all share."""

    def __init__(self, cars: list[Car], rng: random.Random) -> None:
        self.cars = cars
        self.rng = rng
        self.np_rng = np.random.default_rng(rng.randrange(2**32))
        self.book = ReputationBook()
        self.counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        self.executions = 0
        self.chunks = 0
        self.wrong_to_caller = 0
        self.failed = 0
        self.quarantined_after: dict[str, int] = {}  # car -> its tasks when quarantined

    def run_job(self, kernel: str, chunks: tuple[ChunkSpec, ...]) -> None:
        verifier = JobVerifier("bench", spec(kernel), chunks, self.book)
        exact = [_exact(kernel, c) for c in chunks]
        queue = collections.deque((i, ()) for i in range(len(chunks)))
        while queue:
            chunk_id, avoid = queue.popleft()
            car = self._pick(avoid)
            if car is None:
                self.failed += 1
                continue
            outputs = self._execute(car, kernel, chunks[chunk_id])
            result = Result(
                "bench", chunk_id, len(chunks), car.vehicle_id, "gw", 1, 1, outputs, 0, 0, 0
            )
            for action in verifier.take(result):
                if isinstance(action, Accept):
                    self.chunks += 1
                    self.wrong_to_caller += not _close(
                        kernel, action.result.outputs, exact[action.result.chunk_id]
                    )
                elif isinstance(action, Redo):
                    queue.append((action.chunk_id, action.avoid))
                elif isinstance(action, Judged):
                    self._judge(action)
                elif isinstance(action, Fail):
                    self.failed += 1

    def _pick(self, avoid: tuple[str, ...]) -> Car | None:
        fit = [
            c
            for c in self.cars
            if c.vehicle_id not in avoid and not self.book.quarantined(c.vehicle_id)
        ]
        return self.rng.choice(fit) if fit else None

    def _execute(self, car: Car, kernel: str, chunk: ChunkSpec) -> Outputs:
        car.tasks += 1
        self.executions += 1
        outputs = _compute(kernel, chunk, car.gpu_like)
        lying = car.lie_rate and car.tasks > car.honest_for
        if lying and self.rng.random() < car.lie_rate:
            outputs = {k: _noisy(v, self.np_rng) for k, v in outputs.items()}
        return outputs

    def _judge(self, verdict: Judged) -> None:
        counts = self.counts[verdict.vehicle_id]
        counts[{True: 0, False: 1, None: 2}[verdict.valid]] += 1
        generation = self.book.record(verdict.vehicle_id).generation
        self.book.apply(CarTally(verdict.vehicle_id, "bench", generation, *counts, time.time()))
        if verdict.valid is False and not self.book.quarantined(verdict.vehicle_id):
            evidence = (verdict.evidence,) if verdict.evidence else ()
            notice = QuarantineNotice(
                verdict.vehicle_id,
                CarState.QUARANTINED,
                generation,
                0.0,
                "bench",
                "wrong_result",
                evidence,
            )
            self.book.apply(notice)
            car = next(c for c in self.cars if c.vehicle_id == verdict.vehicle_id)
            self.quarantined_after[car.vehicle_id] = car.tasks


def _compute(kernel: str, chunk: ChunkSpec, gpu_like: bool) -> Outputs:
    if kernel == "gemm":
        a, b = chunk.inputs["a"], chunk.inputs["b"]
        if not gpu_like:
            return {"c": a @ b}
        # Split-K, as GPU libraries add: another order of the same float32 sums.
        parts = [a[:, k : k + 32] @ b[k : k + 32] for k in range(0, a.shape[1], 32)]
        return {"c": np.sum(parts, axis=0, dtype=np.float32)}
    kernel_fn = REGISTRY[kernel]
    if gpu_like:
        return dict(kernel_fn.reference_fn(chunk.params, chunk.inputs))
    return dict(kernel_fn.fn(np, chunk.params, chunk.inputs, lambda: None))


def _exact(kernel: str, chunk: ChunkSpec) -> Outputs:
    if kernel == "gemm":
        return {"c": chunk.inputs["a"].astype(np.float64) @ chunk.inputs["b"].astype(np.float64)}
    return dict(REGISTRY[kernel].reference_fn(chunk.params, chunk.inputs))


def _close(kernel: str, actual: Mapping[str, np.ndarray], exact: Outputs) -> bool:
    tolerance = spec(kernel).tolerance
    return all(tolerance.allclose(actual[k], exact[k]) for k in exact)


def _noisy(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    scale = float(np.max(np.abs(value))) or 1.0
    noise = rng.standard_normal(value.shape) * (LIE_SCALE * scale)
    return (value + noise).astype(value.dtype)


def _fleet(seed: int, liar: bool, honest_for: int = 0) -> Fleet:
    cars = [Car(f"car-{i:02d}", gpu_like=i % 2 == 1) for i in range(CARS)]
    if liar:
        cars[7].lie_rate = LIE_RATE
        cars[7].honest_for = honest_for
    return Fleet(cars, random.Random(seed))


def _gemm_jobs(rng: np.random.Generator) -> tuple[ChunkSpec, ...]:
    a = rng.standard_normal((512, 256)).astype(np.float32)
    b = rng.standard_normal((256, 512)).astype(np.float32)
    return plan_gemm(a, b, tile=128).chunks  # 16 tiles


def _poly_jobs(rng: np.random.Generator) -> tuple[ChunkSpec, ...]:
    x = rng.uniform(-1, 1, 16 * 1024).astype(np.float32)
    return PLANNERS["poly"](x, [0.5, -1.0, 2.0, 3.0], chunk_elems=1024).chunks  # 16 chunks


def _run(fleet: Fleet, kernel: str, chunks: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    make = _gemm_jobs if kernel == "gemm" else _poly_jobs
    target = fleet.chunks + chunks
    while fleet.chunks < target:
        fleet.run_job(kernel, make(rng))


# ---------------------------------------------------------------- the line


def replication_overhead(chunks: int, seed: int = 1) -> tuple[float, int]:
    """Extra executions per chunk once every car's record is long enough that the policy
    checks it at its floor rate; also how many chunks that warm-up took."""
    fleet = _fleet(seed, liar=False)
    policy = AdaptivePolicy()
    floor = TRUST_AFTER / policy.spot_floor
    while any(fleet.book.record(c.vehicle_id).valid < floor for c in fleet.cars):
        _run(fleet, "poly", 1000, seed)
        seed += 1
    warm_up = fleet.chunks
    executions, settled = fleet.executions, fleet.chunks
    _run(fleet, "poly", chunks, seed + 1)
    extra = (fleet.executions - executions) - (fleet.chunks - settled)
    return 100 * extra / (fleet.chunks - settled), warm_up


def detection(kernel: str, chunks: int, seed: int, honest_for: int = 0) -> tuple[int | None, int]:
    fleet = _fleet(seed, liar=True, honest_for=honest_for)
    _run(fleet, kernel, chunks, seed)
    return fleet.quarantined_after.get("car-07"), fleet.wrong_to_caller


def false_quarantines(chunks: int, seed: int = 3) -> int:
    found = 0
    for kernel in ("gemm", "poly"):
        fleet = _fleet(seed, liar=False)
        _run(fleet, kernel, chunks, seed)
        found += len(fleet.quarantined_after)
    return found


def verification_line(chunks: int = 5000, liar_trials: int = 10) -> dict[str, Any]:
    line: dict[str, Any] = {"name": "verification", **freivalds_overhead()}
    overhead, warm_up = replication_overhead(chunks)
    line["replication_overhead_pct"] = round(overhead, 2)
    line["replication_warm_up_chunks"] = warm_up
    tasks, wrong = detection("gemm", 2000, seed=11)
    line["tasks_to_quarantine"] = tasks
    line["wrong_chunks_to_caller"] = wrong
    trials = [detection("poly", 3000, seed=100 + i) for i in range(liar_trials)]
    caught = [t for t, _ in trials if t is not None]
    line["quorum_liars_caught"] = f"{len(caught)}/{liar_trials}"
    line["quorum_tasks_to_quarantine_mean"] = round(statistics.mean(caught), 1) if caught else None
    line["quorum_tasks_to_quarantine_max"] = max(caught) if caught else None
    line["quorum_wrong_chunks_to_caller_mean"] = round(statistics.mean(w for _, w in trials), 2)
    line["quorum_wrong_chunks_to_caller_max"] = max(w for _, w in trials)
    # The liar that first earns trust (500 honest tasks), then lies: on poly it is only
    # spot-checked, so some of its lies reach the caller before one is caught.
    patient = [detection("poly", 12000, seed=200 + i, honest_for=500) for i in range(liar_trials)]
    caught = [t - 500 for t, _ in patient if t is not None]
    line["patient_liar_caught"] = f"{len(caught)}/{liar_trials}"
    line["patient_liar_tasks_to_quarantine_mean"] = (
        round(statistics.mean(caught), 1) if caught else None
    )
    line["patient_liar_wrong_chunks_to_caller_mean"] = round(
        statistics.mean(w for _, w in patient), 2
    )
    line["patient_liar_wrong_chunks_to_caller_max"] = max(w for _, w in patient)
    line["false_quarantines"] = false_quarantines(chunks)
    line["honest_chunks_per_kernel"] = chunks
    return line


if __name__ == "__main__":
    import json

    print(json.dumps(verification_line()), flush=True)
