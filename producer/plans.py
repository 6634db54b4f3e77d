# SPDX-License-Identifier: Apache-2.0
"""What every planner shares: a chunk, a plan, the assembler protocol, and helpers.

A planner turns a whole job into a ``JobPlan``: the kernel to run, one ``ChunkSpec``
per task, and a factory for the ``Assembler`` that merges results. A chunk's id is its
index in ``JobPlan.chunks``. Chunks are independent, so they may finish in any order on
any car; every assembler's answer is the same whatever the order.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from parkpool.producer import kernel_catalog
from parkpool.schemas.errors import ValidationError

Array = npt.NDArray[Any]
R = TypeVar("R")  # a job's answer: an array, a float, a KMeansStep, ...
R_co = TypeVar("R_co", covariant=True)
# Below this many bytes in all, one thread copies: starting threads would cost more.
PARALLEL_COPY_BYTES = 16 << 20
COPY_THREADS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class ChunkSpec:
    """The params and input arrays of one task (arrays are C-contiguous and read-only)."""

    params: Mapping[str, Any]
    inputs: Mapping[str, Array]


class Assembler(Protocol[R_co]):
    """Merges chunk results into the job's answer, of type ``R_co``."""

    def add(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        """Merge one chunk's outputs; ValidationError for an unknown id or a wrong shape."""

    def result(self) -> R_co:
        """The job's answer; ValidationError while any chunk is missing."""


@dataclass(frozen=True)
class JobPlan(Generic[R]):
    """A job split into tasks for one kernel, with a way to assemble their results into
    its answer, of type ``R`` (so a handle's ``wait()`` is typed by its plan)."""

    kernel: str
    chunks: tuple[ChunkSpec, ...]
    make_assembler: Callable[[], Assembler[R]]


# --- shared helpers -----------------------------------------------------------------


def wire_copy(array: Array) -> Array:
    """A C-contiguous, read-only snapshot: it goes on the wire, and the plan is frozen."""
    copy = np.array(array, order="C", copy=True)
    copy.flags.writeable = False
    return copy


def wire_copies(arrays: Sequence[Array]) -> list[Array]:
    """``wire_copy`` of each, in order, on a few threads when there is much to copy.

    NumPy lets go of the GIL while it copies, and a large job's snapshot is the first
    thing its submit waits for: a 4096² gemm's sixteen 8 MiB blocks took 0.24-0.26 s
    on one thread on a 2-core VM whose fresh pages are slow, 0.13-0.19 s on two
    (docs/BENCHMARKS.md).
    """
    if COPY_THREADS < 2 or len(arrays) < 2 or sum(a.nbytes for a in arrays) < PARALLEL_COPY_BYTES:
        return [wire_copy(a) for a in arrays]
    with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="pp-plan") as pool:
        return list(pool.map(wire_copy, arrays))


def row_bands(array: Array, band_bytes: int) -> Iterator[slice]:
    """Consecutive spans of ``array``'s rows, each about ``band_bytes`` (at least one
    row): work done a band at a time while the band is still in cache."""
    row_bytes = array.itemsize * math.prod(array.shape[1:])
    if len(array):  # span_slices gives an empty array one empty span; bands, none
        yield from span_slices(len(array), max(1, band_bytes // max(1, row_bytes)))


def span_slices(length: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering ``range(length)``; never none."""
    return [slice(i, min(i + size, length)) for i in range(0, length, size)] or [slice(0, 0)]


def positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValidationError("bad_param", f"{name} must be a positive integer, got {value!r}")
    return int(value)


def seed_of(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValidationError("bad_param", f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def real_param(name: str, value: Any) -> float:
    """A number as a plain float for the wire; the kernel's contract checks its range."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValidationError("bad_param", f"{name} must be a real number, got {value!r}")
    return float(value)


def validated(kernel: str, chunks: tuple[ChunkSpec, ...]) -> tuple[ChunkSpec, ...]:
    """The chunks, once each meets the kernel's contract (the reason names what is wrong)."""
    contract = kernel_catalog.contract(kernel)
    for chunk in chunks:
        contract.validate(chunk.params, chunk.inputs)
    return chunks


def output(
    outputs: Mapping[str, Array], key: str, shape: tuple[int, ...], kinds: str = "biuf"
) -> Array:
    """Fetch one output of the expected shape and dtype kinds, or raise ValidationError."""
    if key not in outputs:
        raise ValidationError("missing_output", f"chunk result has no {key!r}")
    value = outputs[key]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
        raise ValidationError("bad_output", f"{key!r} is not an ndarray of kind {kinds!r}")
    if value.shape != shape:
        raise ValidationError("bad_shape", f"{key!r} has shape {value.shape}, want {shape}")
    return value


class ChunkAssembler(abc.ABC, Generic[R]):
    """Bookkeeping shared by assemblers: expected ids, arrivals, completeness."""

    def __init__(self, n_chunks: int) -> None:
        self._n_chunks = n_chunks
        self._seen: set[int] = set()

    def add(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        """Merge one chunk; a rejected chunk leaves the assembler unchanged."""
        if isinstance(chunk_id, bool) or not isinstance(chunk_id, int | np.integer):
            raise ValidationError("unknown_chunk", f"chunk id {chunk_id!r} is not an integer")
        if not 0 <= chunk_id < self._n_chunks:
            raise ValidationError("unknown_chunk", f"no chunk {chunk_id} of {self._n_chunks}")
        if chunk_id in self._seen:
            # Adding twice would double-count a sum; the caller is meant to dedup first.
            raise ValidationError("duplicate_chunk", f"chunk {chunk_id} was already added")
        self._merge(int(chunk_id), outputs)
        self._seen.add(int(chunk_id))

    def result(self) -> R:
        """The job's answer once every chunk has been added."""
        missing = self._n_chunks - len(self._seen)
        if missing:
            raise ValidationError("incomplete", f"{missing} of {self._n_chunks} chunks missing")
        return self._finish()

    @abc.abstractmethod
    def _merge(self, chunk_id: int, outputs: Mapping[str, Array]) -> None:
        """Validate, then fold one chunk's outputs in (validate before any mutation)."""

    @abc.abstractmethod
    def _finish(self) -> R:
        """The assembled answer; called once every chunk is in."""


def chunk_seed(seed: int, index: int) -> int:
    """The 63-bit seed of chunk ``index`` of a job seeded ``seed``.

    SeedSequence hashes (seed, index), so neighbouring chunks get unrelated generator
    streams, unlike seed + index which would put them one step apart in splitmix64.
    """
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)
    return int(state[0]) >> 1
