# SPDX-License-Identifier: Apache-2.0
"""The SDK's claim check: a job's bulk inputs go to the object store before its records
go to Kafka, and stored outputs come back from it, checked by hash.

Each distinct block of bytes is uploaded once per job (content addressing), so gemm's
shared row and column blocks are stored once however many tiles read them, and a retry,
a redispatch or a DLQ replay reads the same objects. Records keep only what is small.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Protocol

import numpy as np

from parkpool.producer.plans import row_bands
from parkpool.runtime import logs
from parkpool.runtime.blobstore import BlobStore, ObjectMissing
from parkpool.runtime.kafka import record_size
from parkpool.schemas import BlobRef, DecodeError, Result, TaskChunk, encode
from parkpool.schemas.blobref import (
    SEALED_OUTPUTS_BLOB,
    input_key,
    legacy_output_key,
    output_key,
)
from parkpool.schemas.codec import MAX_MESSAGE_BYTES, decode_arrays
from parkpool.schemas.topics import task_key

__all__ = ["BandTap", "JobUploads", "array_sha256", "fetch_outputs"]

log = logs.get_logger("parkpool.producer")

UPLOAD_THREADS = 4
# The most stored outputs the SDK reads: what the codec decodes at most, with room for a
# sealed blob's envelope. A car names the size; this bounds what its word can cost.
MAX_OUTPUTS_BYTES = MAX_MESSAGE_BYTES + (64 << 10)
# A tap's bands: small enough to be in a core's L2 still when the tap reads them.
HASH_BAND_BYTES = 256 * 1024


class BandTap(Protocol):
    """Work on a job's blocks that rides on the claim check's hashing pass, so the blocks
    are read from memory once for both."""

    def phases(self) -> Sequence[Sequence[np.ndarray]]:
        """The blocks to hand over, in order: each phase is hashed after the last."""

    def band(self, block: np.ndarray, rows: slice) -> None:
        """``block[rows]`` was just hashed. A tap that raises is logged and not called
        again for that block, which its owner must then treat as never handed over."""


class JobUploads:
    """One job's inputs on their way to the store.

    ``offload_all`` hashes and starts every upload; a task's record may go out once
    ``ready(task)`` returns, so the first cars start while later blocks still upload.
    ``close()`` when done, whatever happened: it waits for the uploads still running
    (``close(abandon=True)`` drops those not started).
    """

    def __init__(
        self, store: BlobStore, job_id: str, inline_max_bytes: int, max_record_bytes: int
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.inline_max_bytes = inline_max_bytes
        self.max_record_bytes = max_record_bytes
        self._sent: dict[str, Future[bool]] = {}  # sha256 -> its upload, once per job
        # (address, shape, dtype) of a C-contiguous array -> its hash: the planners hand
        # one block to many tiles, and hashing it again would cost a pass per tile.
        # The array rides along so its address cannot be reused while the job is built.
        self._hashed: dict[tuple[object, ...], tuple[Future[str], np.ndarray]] = {}
        self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="pp-upload")

    def offload_all(
        self, tasks: Sequence[TaskChunk], tap: BandTap | None = None
    ) -> list[TaskChunk]:
        """Every task with its large inputs replaced by refs (uploads started). The
        distinct blocks are hashed on the pool's threads at once: hashlib lets go of the
        GIL, and a 4096² gemm has 128 MiB to hash before its first record.

        ``tap`` sees each band of the blocks it names right after the band is hashed,
        phase by phase (the gemm check's products: producer.freivalds.HashTap)."""
        for phase in tap.phases() if tap is not None else ():
            wait([self._digest(a, tap) for a in phase if self._hashes_here(a)])
        for task in tasks:
            if not task.sealed_inputs:
                for array in task.inputs.values():
                    if array.nbytes >= self.inline_max_bytes:
                        self._digest(np.ascontiguousarray(array))
        return [self.offload(task) for task in tasks]

    def offload(self, task: TaskChunk) -> TaskChunk:
        """The task with large inputs replaced by refs (uploads started, not finished)."""
        if task.sealed_inputs:
            if len(task.sealed_inputs) < self.inline_max_bytes and self._fits(task):
                return task
            ref = self._blob("", task.sealed_inputs)
            return replace(task, sealed_inputs=b"", refs=(ref,))
        inline = dict(task.inputs)
        refs = [
            self._array(name, a) for name, a in inline.items() if a.nbytes >= self.inline_max_bytes
        ]
        for ref in refs:
            del inline[ref.name]
        task = replace(task, inputs=inline, refs=(*task.refs, *refs))
        while not self._fits(task) and task.inputs:  # many small arrays can still add up
            name = max(task.inputs, key=lambda n: task.inputs[n].nbytes)
            rest = {n: a for n, a in task.inputs.items() if n != name}
            extra = self._array(name, task.inputs[name])
            task = replace(task, inputs=rest, refs=(*task.refs, extra))
        return task

    def ready(self, task: TaskChunk) -> None:
        """Block until every object ``task`` names is stored. Raises BrokerError naming
        the failure: no record may point at a missing object."""
        for ref in task.refs:
            self._sent[ref.sha256].result()

    def close(self, abandon: bool = False) -> int:
        """Wait for every upload, failed or not; how many objects this job wrote.

        ``abandon`` (the submit failed or was interrupted): uploads not yet started are
        dropped, each of which could take a store's whole retry budget for nothing. The
        ones running are still waited for, so nothing adds an object once this returns
        and the job's objects can be deleted."""
        self._pool.shutdown(wait=True, cancel_futures=abandon)
        return sum(
            1
            for upload in self._sent.values()
            if not upload.cancelled() and not upload.exception() and upload.result()
        )

    @property
    def distinct(self) -> int:
        return len(self._sent)

    def _fits(self, task: TaskChunk) -> bool:
        size = record_size(encode(task), task_key(task.job_id, task.chunk_id))
        return size <= self.max_record_bytes

    def _array(self, name: str, array: np.ndarray) -> BlobRef:
        array = np.ascontiguousarray(array)
        sha = self._digest(array).result()
        self._start(sha, array)
        return BlobRef(name, sha, array.nbytes, array.dtype.str, array.shape)

    def _hashes_here(self, array: np.ndarray) -> bool:
        """Whether ``offload`` will hash ``array`` as it is (stored, not copied first)."""
        return array.nbytes >= self.inline_max_bytes and array.flags.c_contiguous

    def _digest(self, array: np.ndarray, tap: BandTap | None = None) -> Future[str]:
        where = (array.__array_interface__["data"][0], array.shape, array.dtype.str)
        known = self._hashed.get(where)
        if known is None:
            known = (self._pool.submit(array_sha256, array, tap), array)
            self._hashed[where] = known
        return known[0]

    def _blob(self, name: str, data: bytes) -> BlobRef:
        sha = hashlib.sha256(data).hexdigest()
        self._start(sha, data)
        return BlobRef(name, sha, len(data))

    def _start(self, sha: str, data: np.ndarray | bytes) -> None:
        if sha not in self._sent:
            self._sent[sha] = self._pool.submit(self._put, input_key(self.job_id, sha), data, sha)

    def _put(self, key: str, data: np.ndarray | bytes, sha: str) -> bool:
        # Sent from the array's own (C-contiguous, read-only) memory, not a copy of it.
        body = data.data.cast("B") if isinstance(data, np.ndarray) else data
        return self.store.put_if_absent(key, body, sha)


def array_sha256(array: np.ndarray, tap: BandTap | None = None) -> str:
    """The SHA-256 of a C-contiguous array's bytes; with a tap, hashed one band of rows
    at a time, each handed to the tap while it is still in cache."""
    if tap is None or array.ndim == 0:
        return hashlib.sha256(array.data).hexdigest()
    digest = hashlib.sha256()
    for rows in row_bands(array, HASH_BAND_BYTES):
        digest.update(array[rows].data)
        if tap is not None:
            try:
                tap.band(array, rows)
            except Exception:  # a bug in a check must not stop the job's uploads
                log.exception("hash_tap_failed", shape=array.shape, dtype=array.dtype.str)
                tap = None  # the tap's owner sees the block unfinished and does without
    return digest.hexdigest()


def _first_stored(store: BlobStore, keys: Sequence[str], most: int) -> bytes | None:
    """Up to ``most`` bytes of the first of ``keys`` the store holds; None: none of them.
    (One byte more than named shows a longer object, without reading all of it.)"""
    for key in keys:
        try:
            return store.get(key, most)
        except ObjectMissing:
            continue
    return None


def fetch_outputs(store: BlobStore, result: Result) -> Result:
    """The result with its stored outputs read back and checked: in clear, or sealed for
    ``open_result`` to open. DecodeError ``bad_data`` when the bytes are not the ones the
    car named, BrokerError when the store cannot give them."""
    ref = result.outputs_ref
    if ref is None:
        return result
    if ref.size > MAX_OUTPUTS_BYTES:  # the car's word: refused before a byte is read
        raise DecodeError("bad_data", f"chunk {result.chunk_id}'s outputs claim {ref.size:,} bytes")
    # The gateway id is the car's signed word, and the gateway checked it is its own.
    # A gateway not yet upgraded had the car write under the key without it.
    keys = (
        output_key(result.job_id, result.gateway_id, result.chunk_id, result.epoch),
        legacy_output_key(result.job_id, result.chunk_id, result.epoch),
    )
    data = _first_stored(store, keys, ref.size + 1)
    if data is None:  # the car named outputs it never uploaded under its lease
        detail = f"chunk {result.chunk_id}'s outputs are not in the store"
        raise DecodeError("bad_data", detail)
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise DecodeError("bad_data", f"chunk {result.chunk_id}'s stored outputs do not match")
    if ref.name == SEALED_OUTPUTS_BLOB:
        return replace(result, sealed_outputs=data, refs=())
    return replace(result, outputs=decode_arrays(data), refs=())
