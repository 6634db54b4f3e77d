# SPDX-License-Identifier: Apache-2.0
"""The SDK's claim check: a job's bulk inputs go to the object store before its records
go to Kafka, and stored outputs come back from it, checked by hash.

Each distinct block of bytes is uploaded once per job (content addressing), so gemm's
shared row and column blocks are stored once however many tiles read them, and a retry,
a redispatch or a DLQ replay reads the same objects. Records keep only what is small.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.kafka import record_size
from parkpool.schemas import BlobRef, DecodeError, Result, TaskChunk, encode
from parkpool.schemas.blobref import input_key, output_key
from parkpool.schemas.codec import decode_arrays
from parkpool.schemas.topics import task_key

__all__ = ["JobUploads", "fetch_outputs"]

UPLOAD_THREADS = 4


class JobUploads:
    """One job's inputs on their way to the store; ``wait()`` before publishing."""

    def __init__(
        self, store: BlobStore, job_id: str, inline_max_bytes: int, max_record_bytes: int
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.inline_max_bytes = inline_max_bytes
        self.max_record_bytes = max_record_bytes
        self._sent: dict[str, Future[bool]] = {}  # sha256 -> its upload, once per job
        # (address, shape, dtype) of a C-contiguous array -> sha256: the planners hand one
        # block to many tiles, and hashing it again would cost a pass per tile.
        # The array rides along so its address cannot be reused while the job is built.
        self._hashed: dict[tuple[object, ...], tuple[str, np.ndarray]] = {}
        self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="pp-upload")

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

    def wait(self) -> int:
        """Block until every upload is done; how many objects this job wrote. Raises
        BrokerError naming the first failure: no record may point at a missing object."""
        try:
            return sum(1 for upload in self._sent.values() if upload.result())
        finally:
            self._pool.shutdown(wait=True)

    @property
    def distinct(self) -> int:
        return len(self._sent)

    def _fits(self, task: TaskChunk) -> bool:
        size = record_size(encode(task), task_key(task.job_id, task.chunk_id))
        return size <= self.max_record_bytes

    def _array(self, name: str, array: np.ndarray) -> BlobRef:
        array = np.ascontiguousarray(array)
        where = (array.__array_interface__["data"][0], array.shape, array.dtype.str)
        known = self._hashed.get(where)
        sha = known[0] if known else hashlib.sha256(array.data).hexdigest()
        self._hashed[where] = (sha, array)
        self._start(sha, array)
        return BlobRef(name, sha, array.nbytes, array.dtype.str, array.shape)

    def _blob(self, name: str, data: bytes) -> BlobRef:
        sha = hashlib.sha256(data).hexdigest()
        self._start(sha, data)
        return BlobRef(name, sha, len(data))

    def _start(self, sha: str, data: np.ndarray | bytes) -> None:
        if sha not in self._sent:
            key = input_key(self.job_id, sha)
            body = data.tobytes() if isinstance(data, np.ndarray) else data
            self._sent[sha] = self._pool.submit(self.store.put_if_absent, key, body, sha)


def fetch_outputs(store: BlobStore, result: Result) -> Result:
    """The result with its stored outputs read back and checked: in clear, or sealed for
    ``open_result`` to open. DecodeError ``bad_data`` when the bytes are not the ones the
    car named, BrokerError when the store cannot give them."""
    ref = result.outputs_ref
    if ref is None:
        return result
    data = store.get(output_key(result.job_id, result.chunk_id, result.epoch))
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise DecodeError("bad_data", f"chunk {result.chunk_id}'s stored outputs do not match")
    if ref.name == "sealed_outputs":
        return replace(result, sealed_outputs=data, refs=())
    return replace(result, outputs=decode_arrays(data), refs=())
