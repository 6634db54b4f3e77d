# SPDX-License-Identifier: Apache-2.0
"""The wire messages: frozen dataclasses that validate on construction.

A message that exists is a valid message. Decoding bytes from Kafka or MQTT goes
through the same constructors (see ``schemas.codec``), so hostile input is refused by
exactly the checks that protect locally built messages.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import numpy as np

from parkpool.schemas.blobref import SEALED_OUTPUTS_BLOB, BlobRef
from parkpool.schemas.errors import ValidationError
from parkpool.schemas.reputation import CarTally, Evidence, QuarantineNotice
from parkpool.schemas.sealing import KEY_BYTES, WRAPPED_KEY_BYTES
from parkpool.schemas.validate import (
    MAX_ARRAYS,
    require_arrays,
    require_bool,
    require_bytes,
    require_enum,
    require_float,
    require_int,
    require_name,
    require_params,
    require_str,
)

MAX_CHUNKS = 1_000_000
MAX_CREDITS = 1024
MAX_BATCH = 64  # assignments in one AssignmentBatch
MAX_ATTEMPTS_RECORDED = 64
MAX_AVOIDED = 16  # cars a chunk may be kept from: the quorum's and the redo's
MAX_COUNTER = 1e15  # cumulative seconds or joules: decades of a car's life, far below float's limit
MAX_GFLOP = 1e9  # 10^18 flops: far above any one task; rejects garbage, not real values
MAX_GFLOPS_PER_S = 1e7  # 10 PFLOP/s: far above any one car's accelerator
MAX_DWELL_S = 30 * 86400.0  # a month parked is already beyond any useful prediction
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Kafka's own topic-name rule, which also forbids "." and "..": a task whose reply topic
# is one of those makes the gateway's producer raise when it writes the result.
_TOPIC = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._-]{1,249}$")
_SHA256 = re.compile(r"^(|[0-9a-f]{64})$")
_URL = re.compile(r"^https?://\S+$")  # a presigned store URL; its length is require_str's


def _vehicle(name: str, value: object) -> str:
    # Vehicle and gateway ids become MQTT topic levels: no '/', '+', '#' or spaces.
    return require_str(name, value, pattern=_ID)


def _check_lease_reference(message: Nack | LeaseHeartbeat) -> None:
    """The fields by which a vehicle's message names the lease it speaks for."""
    require_str("job_id", message.job_id, pattern=_ID)
    require_int("chunk_id", message.chunk_id, 0, MAX_CHUNKS - 1)
    _vehicle("vehicle_id", message.vehicle_id)
    _vehicle("gateway_id", message.gateway_id)
    require_int("epoch", message.epoch, 1)


def _sized(name: str, value: object, size: int) -> bytes:
    """Bytes that are either absent (empty) or exactly ``size`` long: keys, sealed keys."""
    data = require_bytes(name, value)
    if len(data) not in (0, size):
        raise _bad(f"{name} must be empty or {size} bytes, not {len(data)}")
    return data


def _check_sealed_task(task: TaskChunk) -> None:
    """A confidential task has no inputs in clear, and everything needed to open them."""
    _sized("inputs_key", task.inputs_key, WRAPPED_KEY_BYTES)
    _sized("reply_key", task.reply_key, KEY_BYTES)
    sealed = bool(require_bytes("sealed_inputs", task.sealed_inputs)) or task.sealed_ref is not None
    if not sealed:
        if task.inputs_key:
            raise _bad("inputs_key is set but there are no sealed inputs")
        return
    if task.inputs or any(ref.is_array for ref in task.refs):
        raise _bad("a task with sealed inputs carries no inputs in clear")
    if task.sealed_inputs and task.refs:
        raise _bad("sealed inputs travel inline or in the store, not both")
    if not task.inputs_key or not task.reply_key:
        raise _bad("sealed inputs need an inputs_key and a reply_key")


def _refs(name: str, value: object, most: int) -> tuple[BlobRef, ...]:
    """Claim checks: at most ``most``, each a BlobRef, no name twice."""
    if not isinstance(value, list | tuple) or len(value) > most:
        raise _wrong(f"{name} must be a list of at most {most} blob refs")
    if not all(isinstance(ref, BlobRef) for ref in value):
        raise _wrong(f"{name} must hold blob refs")
    names = [ref.name for ref in value]
    if len(set(names)) != len(names):
        raise _bad(f"{name} names one blob twice")
    return tuple(value)


def _check_task_refs(task: TaskChunk) -> None:
    refs = _refs("refs", task.refs, MAX_ARRAYS)
    object.__setattr__(task, "refs", refs)
    if any(ref.name in task.inputs for ref in refs):
        raise _bad("an input is both inline and in the store")
    opaque = [ref for ref in refs if not ref.is_array]
    if opaque and (len(refs) != 1 or opaque[0].name):
        raise _bad("an opaque blob ref is only the unnamed sealed inputs of a task")
    if any(ref.is_array and not ref.name for ref in refs):
        raise _bad("an input array in the store needs a name")


def _avoid(value: object) -> tuple[str, ...]:
    if not isinstance(value, tuple | list) or len(value) > MAX_AVOIDED:
        raise _wrong(f"avoid must be a list of at most {MAX_AVOIDED} vehicle ids")
    return tuple(_vehicle("avoid", item) for item in value)


def _url(name: str, value: object) -> str:
    return require_str(name, value, pattern=_URL)


def _frozen_map(obj: object, name: str, value: Mapping[str, Any]) -> None:
    # A frozen dataclass holding a dict could still be mutated through the dict.
    object.__setattr__(obj, name, MappingProxyType(dict(value)))


class Priority(enum.StrEnum):
    HIGH = "high"
    BATCH = "batch"


class NackReason(enum.StrEnum):
    """Why a vehicle handed a task back. The table below decides what happens next."""

    RELEASED = "released"  # the worker is stopping or was preempted by its owner
    KERNEL_ERROR = "kernel_error"  # the kernel raised: maybe this task, maybe this car
    INVALID_TASK = "invalid_task"  # the task can never run (bad params, unknown kernel)
    # The lease ran out, or was about to, before the task could start: it reached the car
    # late, or waited as a prefetched task behind a long kernel.
    EXPIRED = "expired"
    BUSY = "busy"  # the vehicle got more than it asked for
    # The store could not be reached, refused the URL or failed: another try may work.
    FETCH_FAILED = "fetch_failed"
    # What the store returned is not what the task names (hash, size), or is gone.
    BAD_DATA = "bad_data"

    @property
    def terminal(self) -> bool:
        """True when retrying elsewhere cannot help: dead-lettered once a second car says
        so (a gateway does not take one untrusted car's word for it)."""
        return self is NackReason.INVALID_TASK

    @property
    def frees_slot(self) -> bool:
        """True when the car's slot is free for another task now: it tried this one, or
        could not fetch it. After "busy" it had no slot for it; after "released" it is
        stopping or its owner took it back; after "expired" its kernel is busy with a
        long task (or its clock is off), and its next result refills the slot: another
        task now would only wait, and be handed back, in turn."""
        return self not in (NackReason.BUSY, NackReason.RELEASED, NackReason.EXPIRED)

    @property
    def counts_as_failure(self) -> bool:
        """True when the attempt counts towards the task's maximum attempts."""
        return self in (NackReason.KERNEL_ERROR, NackReason.INVALID_TASK, NackReason.BAD_DATA)


class VehicleState(enum.StrEnum):
    ONLINE = "online"  # connected and willing to take work
    SUSPENDED = "suspended"  # connected, but a policy (owner, battery, heat) forbids work
    DRAINING = "draining"  # finishing what it holds, taking nothing new
    OFFLINE = "offline"  # gone: sent as the MQTT last will or on clean shutdown


class GatewayState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True)
class TaskChunk:
    """One chunk of a job, as produced to the tasks topic (keyed ``job:chunk``)."""

    TYPE: ClassVar[str] = "task"
    job_id: str
    chunk_id: int
    n_chunks: int
    kernel: str
    params: Mapping[str, Any]
    inputs: Mapping[str, np.ndarray]
    reply_topic: str
    deadline: float  # unix seconds; after it the result is of no use to the caller
    created_at: float
    attempt: int = 0  # 0 on first submit; a DLQ replay starts again at 0
    priority: Priority = Priority.BATCH
    cost_gflop: float = 0.0  # the kernel's cost model's estimate, in 10^9 flops; 0 = unknown
    # A confidential chunk (schemas.sealing): inputs encrypted, their key sealed to the
    # gateways, and the producer's box key, to which the car seals the outputs.
    sealed_inputs: bytes = b""
    inputs_key: bytes = b""
    reply_key: bytes = b""
    # Inputs held in the object store (schemas.blobref): named arrays, or the one unnamed
    # blob of a confidential chunk's sealed inputs. ``inputs`` keeps what is small.
    refs: tuple[BlobRef, ...] = ()
    # Cars that must not run this chunk: a redo after a wrong result, or a second opinion
    # for a quorum, goes to a different car than the ones whose results it checks.
    avoid: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        require_str("job_id", self.job_id, pattern=_ID)
        require_int("n_chunks", self.n_chunks, 1, MAX_CHUNKS)
        require_int("chunk_id", self.chunk_id, 0, self.n_chunks - 1)
        require_name("kernel", self.kernel)
        object.__setattr__(self, "avoid", _avoid(self.avoid))
        _frozen_map(self, "params", require_params("params", self.params))
        _frozen_map(self, "inputs", require_arrays("inputs", self.inputs))
        require_str("reply_topic", self.reply_topic, pattern=_TOPIC)
        require_float("deadline", self.deadline)
        require_float("created_at", self.created_at)
        require_int("attempt", self.attempt, 0, 1_000_000)
        object.__setattr__(self, "priority", _enum(Priority, "priority", self.priority))
        require_float("cost_gflop", self.cost_gflop, 0.0, MAX_GFLOP)
        _check_task_refs(self)
        _check_sealed_task(self)

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.chunk_id)

    @property
    def confidential(self) -> bool:
        return bool(self.sealed_inputs) or self.sealed_ref is not None

    @property
    def sealed_ref(self) -> BlobRef | None:
        """The store object holding this chunk's sealed inputs, if they are there."""
        return self.refs[0] if self.refs and not self.refs[0].is_array else None


@dataclass(frozen=True)
class Assignment:
    """A leased task on its way from a gateway to one vehicle over MQTT.

    ``task`` is the encoded TaskChunk exactly as it was read from Kafka, so the gateway
    never re-encodes input arrays.
    """

    TYPE: ClassVar[str] = "assignment"
    gateway_id: str
    vehicle_id: str
    # Unique per lease and increasing per gateway: results must quote it (fencing), and
    # vehicles report the highest they have seen so credits in transit can be counted.
    epoch: int
    attempt: int
    lease_deadline: float
    task: bytes
    # Ed25519 over the fields above (see schemas.signing), with a fresh nonce, so a car
    # runs only what a gateway issued, and a replayed assignment is recognised.
    nonce: bytes = b""
    signature: bytes = b""
    # A confidential task's data key, sealed to this vehicle's box key (schemas.sealing).
    inputs_key: bytes = b""
    # The sending gateway's backlog (-1: not said), so the car can weight its grants
    # without any periodic announcement. A hint, not signed: it only moves the car's own
    # credits between its gateways, and never makes a gateway send more than granted.
    queued: int = -1
    # Presigned GET URLs for the task's refs, in the same order, valid until the lease
    # ends; and a presigned write-once PUT for this lease's outputs (schemas.blobref),
    # "" when the gateway has no store. Both are signed: a car fetches only what its
    # gateway chose.
    urls: tuple[str, ...] = ()
    upload_url: str = ""

    def __post_init__(self) -> None:
        _vehicle("gateway_id", self.gateway_id)
        _vehicle("vehicle_id", self.vehicle_id)
        require_int("queued", self.queued, -1)
        if not isinstance(self.urls, list | tuple) or len(self.urls) > MAX_ARRAYS:
            raise _wrong(f"urls must be a list of at most {MAX_ARRAYS} URLs")
        object.__setattr__(self, "urls", tuple(_url("url", u) for u in self.urls))
        if self.upload_url != "":
            _url("upload_url", self.upload_url)
        require_int("epoch", self.epoch, 1)
        require_int("attempt", self.attempt, 1, 1_000_000)
        require_float("lease_deadline", self.lease_deadline)
        require_bytes("task", self.task)
        for name in ("nonce", "signature"):
            if len(require_bytes(name, getattr(self, name))) > 128:
                raise _wrong(f"{name} is longer than 128 bytes")
        _sized("inputs_key", self.inputs_key, WRAPPED_KEY_BYTES)


@dataclass(frozen=True)
class AssignmentBatch:
    """Several assignments for one car in one MQTT message, when it has several credits.

    Each item is an encoded ``Assignment``, signed on its own, so the car checks each
    exactly as if it had come alone; the batch only saves the per-message cost.
    """

    TYPE: ClassVar[str] = "assignments"
    gateway_id: str
    vehicle_id: str
    assignments: tuple[bytes, ...]
    queued: int = -1  # as on Assignment

    def __post_init__(self) -> None:
        _vehicle("gateway_id", self.gateway_id)
        _vehicle("vehicle_id", self.vehicle_id)
        require_int("queued", self.queued, -1)
        items = self.assignments
        if not isinstance(items, list | tuple) or not 1 <= len(items) <= MAX_BATCH:
            raise _wrong(f"assignments must be a list of 1 to {MAX_BATCH} encoded assignments")
        for item in items:
            require_bytes("assignment", item)
        object.__setattr__(self, "assignments", tuple(items))


@dataclass(frozen=True)
class Result:
    """A finished chunk: from the vehicle to its gateway, then to the reply topic."""

    TYPE: ClassVar[str] = "result"
    job_id: str
    chunk_id: int
    n_chunks: int
    vehicle_id: str
    gateway_id: str
    epoch: int
    attempt: int
    outputs: Mapping[str, np.ndarray]
    exec_seconds: float
    finished_at: float
    task_created_at: float  # copied from the task, so callers can measure end-to-end latency
    # Ed25519 by the vehicle's own key over every other field (schemas.signing); empty when
    # the vehicle has no key. A gateway that knows the car's key drops a result without it.
    signature: bytes = b""
    # The outputs map of a confidential chunk, sealed to the task's reply_key; ``outputs``
    # is then empty.
    sealed_outputs: bytes = b""
    # The outputs map in the object store (the lease's upload_url), as one opaque blob:
    # encoded with codec.encode_arrays, or sealed like ``sealed_outputs``; then neither
    # ``outputs`` nor ``sealed_outputs`` is set.
    refs: tuple[BlobRef, ...] = ()

    def __post_init__(self) -> None:
        require_str("job_id", self.job_id, pattern=_ID)
        require_int("n_chunks", self.n_chunks, 1, MAX_CHUNKS)
        require_int("chunk_id", self.chunk_id, 0, self.n_chunks - 1)
        _vehicle("vehicle_id", self.vehicle_id)
        _vehicle("gateway_id", self.gateway_id)
        require_int("epoch", self.epoch, 1)
        require_int("attempt", self.attempt, 1, 1_000_000)
        _frozen_map(self, "outputs", require_arrays("outputs", self.outputs))
        require_float("exec_seconds", self.exec_seconds)
        require_float("finished_at", self.finished_at)
        require_float("task_created_at", self.task_created_at)
        if len(require_bytes("signature", self.signature)) > 128:
            raise _wrong("signature is longer than 128 bytes")
        if require_bytes("sealed_outputs", self.sealed_outputs) and self.outputs:
            raise _bad("a result with sealed outputs carries no outputs in clear")
        refs = _refs("refs", self.refs, 1)
        object.__setattr__(self, "refs", refs)
        if refs and (refs[0].is_array or self.outputs or self.sealed_outputs):
            raise _bad("a result's outputs are inline or one blob in the store, not both")

    @property
    def outputs_ref(self) -> BlobRef | None:
        return self.refs[0] if self.refs else None

    @property
    def sealed(self) -> bool:
        """Whether the outputs travel sealed: inline, or as the stored sealed blob."""
        ref = self.outputs_ref
        return bool(self.sealed_outputs) or (ref is not None and ref.name == SEALED_OUTPUTS_BLOB)

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.chunk_id)


@dataclass(frozen=True)
class Nack:
    """A vehicle hands a leased task back, with the reason."""

    TYPE: ClassVar[str] = "nack"
    job_id: str
    chunk_id: int
    vehicle_id: str
    gateway_id: str
    epoch: int
    reason: NackReason
    detail: str = ""

    def __post_init__(self) -> None:
        _check_lease_reference(self)
        object.__setattr__(self, "reason", _enum(NackReason, "reason", self.reason))
        require_str("detail", self.detail)


@dataclass(frozen=True)
class Capabilities:
    """What a vehicle can run; sent with every pull so a gateway needs no registry."""

    backend: str
    kernels: tuple[str, ...]
    device_memory_bytes: int = 0
    gflops_per_s: float = 0.0  # sustained rate the vehicle expects of itself; 0 = unknown
    box_key: bytes = b""  # this worker's X25519 public key: it can run confidential tasks

    def __post_init__(self) -> None:
        require_name("backend", self.backend)
        require_float("gflops_per_s", self.gflops_per_s, 0.0, MAX_GFLOPS_PER_S)
        if not isinstance(self.kernels, list | tuple) or len(self.kernels) > 256:
            raise _wrong("kernels must be a list of at most 256 names")
        # Every car names the same few kernels in every pull; one shared copy of each name
        # instead of one per car saves a gateway ~0.7 KiB per vehicle it knows.
        kernels = tuple(sys.intern(require_name("kernel", k)) for k in self.kernels)
        object.__setattr__(self, "kernels", kernels)
        require_int("device_memory_bytes", self.device_memory_bytes, 0)
        _sized("box_key", self.box_key, KEY_BYTES)


@dataclass(frozen=True)
class PullRequest:
    """A vehicle tells one of its K gateways how much work it may send.

    A pull goes to one gateway's own topic and names that gateway alone in ``grants`` and
    ``seen`` (``credits`` is its grant). Grants are absolute, not additive, so a
    duplicated pull grants nothing extra, and the car's grants to its gateways never add
    up to more than it can take. ``seen`` is a lease epoch the car fixes per gateway: the
    gateway may have the grant less its leases to this car after ``seen`` in flight, and
    so refills a slot by itself when one of those leases ends.
    """

    TYPE: ClassVar[str] = "pull"
    vehicle_id: str
    credits: int
    capabilities: Capabilities
    seen: Mapping[str, int] = field(default_factory=dict)
    grants: Mapping[str, int] = field(default_factory=dict)
    dwell_s: float = 0.0  # predicted seconds the car stays available; 0 = no prediction

    def __post_init__(self) -> None:
        _vehicle("vehicle_id", self.vehicle_id)
        require_int("credits", self.credits, 0, MAX_CREDITS)
        require_float("dwell_s", self.dwell_s, 0.0, MAX_DWELL_S)
        if not isinstance(self.capabilities, Capabilities):
            raise _wrong("capabilities must be a Capabilities record")
        if not isinstance(self.seen, Mapping) or len(self.seen) > 64:
            raise _wrong("seen must be a map of at most 64 gateway ids")
        for gateway_id, seq in self.seen.items():
            _vehicle("seen gateway id", gateway_id)
            require_int("seen epoch", seq, 0)
        _frozen_map(self, "seen", self.seen)
        if not isinstance(self.grants, Mapping) or len(self.grants) > 64:
            raise _wrong("grants must be a map of at most 64 gateway ids")
        for gateway_id, granted in self.grants.items():
            _vehicle("grant gateway id", gateway_id)
            require_int("grant", granted, 0, MAX_CREDITS)
        if sum(self.grants.values()) > self.credits:
            raise _bad(f"grants {dict(self.grants)} exceed the {self.credits} credits")
        _frozen_map(self, "grants", self.grants)


@dataclass(frozen=True)
class PreemptionRecord:
    """One owner-first stop: why, and how long until no kernel ran (a vehicle's figure)."""

    reason: str
    stop_s: float

    def __post_init__(self) -> None:
        require_name("reason", self.reason)
        require_float("stop_s", self.stop_s, 0.0, 86400.0)


@dataclass(frozen=True)
class VehicleStatus:
    """Heartbeat and state change of a vehicle; also its MQTT last will (OFFLINE).

    Vehicles cannot be scraped, so their figures travel here and the gateway turns them
    into fleet-level series: cumulative kernel time and energy since the worker started,
    and the stops since the previous status.
    """

    TYPE: ClassVar[str] = "vehicle_status"
    vehicle_id: str
    state: VehicleState
    sent_at: float
    reason: str = ""
    held: int = 0  # tasks the vehicle holds right now
    busy_s: float = 0.0
    energy_j: float = 0.0
    preemptions: tuple[PreemptionRecord, ...] = ()
    # The receiving gateway is the first of the car's K: it alone counts the car in the
    # fleet series, so that they add up across gateways (docs/OPERATIONS.md).
    primary: bool = False

    def __post_init__(self) -> None:
        _vehicle("vehicle_id", self.vehicle_id)
        object.__setattr__(self, "state", _enum(VehicleState, "state", self.state))
        require_bool("primary", self.primary)
        require_float("sent_at", self.sent_at)
        require_str("reason", self.reason)
        require_int("held", self.held, 0, MAX_CREDITS)
        require_float("busy_s", self.busy_s, 0.0, MAX_COUNTER)
        require_float("energy_j", self.energy_j, 0.0, MAX_COUNTER)
        if not isinstance(self.preemptions, list | tuple) or len(self.preemptions) > 64:
            raise _wrong("preemptions must be a list of at most 64 records")
        if not all(isinstance(p, PreemptionRecord) for p in self.preemptions):
            raise _wrong("preemptions must hold PreemptionRecord records")
        object.__setattr__(self, "preemptions", tuple(self.preemptions))


@dataclass(frozen=True)
class GatewayStatus:
    """A gateway's state, two ways: retained on its own topic, the cell's roster (online
    or offline, published on a change only); and sent to one car on that car's task
    topic, with ``queued``, when the car should move credits to or from this gateway."""

    TYPE: ClassVar[str] = "gateway_status"
    gateway_id: str
    state: GatewayState
    sent_at: float
    queued: int = 0  # tasks waiting for a vehicle: vehicles grant credits where work is

    def __post_init__(self) -> None:
        _vehicle("gateway_id", self.gateway_id)
        object.__setattr__(self, "state", _enum(GatewayState, "state", self.state))
        require_float("sent_at", self.sent_at)
        require_int("queued", self.queued, 0)


@dataclass(frozen=True)
class AttemptRecord:
    """One failed or abandoned attempt of a task, kept for the dead-letter record."""

    vehicle_id: str
    reason: str
    at: float
    detail: str = ""

    def __post_init__(self) -> None:
        require_str("vehicle_id", self.vehicle_id)
        require_name("reason", self.reason)
        require_float("at", self.at)
        require_str("detail", self.detail)


@dataclass(frozen=True)
class DeadLetter:
    """A record that could not be completed, with everything needed to replay it.

    ``original`` holds the record's bytes exactly as read, even when they did not decode;
    or nothing, when the letter would not fit in one Kafka record with them (a foreign
    record near or over the limit). Size and SHA-256 then still say what was read, and
    partition and offset where it is, for as long as the topic keeps it.
    """

    TYPE: ClassVar[str] = "dead_letter"
    reason: str
    detail: str
    source_topic: str
    partition: int
    offset: int
    original: bytes
    dead_at: float
    gateway_id: str
    job_id: str = ""
    chunk_id: int = -1
    attempts: tuple[AttemptRecord, ...] = ()
    original_size: int = -1  # bytes of the record as read; -1 on letters from before 0.2
    original_sha256: str = ""  # hex digest of those bytes; "" on letters from before 0.2
    # The task's created_at, which names the submission it came from (a job id may be
    # submitted again); 0.0 when no task was read, or on letters of an older writer.
    task_created_at: float = 0.0

    @property
    def original_kept(self) -> bool:
        """Whether ``original`` holds the record's bytes (a replay needs them)."""
        return self.original_size < 0 or len(self.original) == self.original_size

    def without_original(self) -> DeadLetter:
        """The same letter without the record's bytes, for a record too large to carry."""
        return dataclasses.replace(self, original=b"")

    def __post_init__(self) -> None:
        require_name("reason", self.reason)
        require_str("detail", self.detail)
        require_str("source_topic", self.source_topic, pattern=_TOPIC)
        require_int("partition", self.partition, 0, 1_000_000)
        require_int("offset", self.offset, 0)
        require_bytes("original", self.original)
        require_float("dead_at", self.dead_at)
        _vehicle("gateway_id", self.gateway_id)
        require_str("job_id", self.job_id)
        require_int("chunk_id", self.chunk_id, -1, MAX_CHUNKS - 1)
        if not isinstance(self.attempts, list | tuple):
            raise _wrong("attempts must be a list")
        if len(self.attempts) > MAX_ATTEMPTS_RECORDED:
            raise _wrong(f"attempts holds more than {MAX_ATTEMPTS_RECORDED} records")
        if not all(isinstance(a, AttemptRecord) for a in self.attempts):
            raise _wrong("attempts must hold AttemptRecord records")
        object.__setattr__(self, "attempts", tuple(self.attempts))
        require_float("task_created_at", self.task_created_at)
        self._check_original()

    def _check_original(self) -> None:
        require_int("original_size", self.original_size, -1)
        require_str("original_sha256", self.original_sha256, pattern=_SHA256)
        # The bytes travel whole or not at all: a cut record could be replayed as another.
        if self.original and 0 <= self.original_size != len(self.original):
            raise ValidationError(
                "bad_value",
                f"original holds {len(self.original)} bytes of a {self.original_size}-byte record",
            )


@dataclass(frozen=True)
class LeaseHeartbeat:
    """A vehicle still working on a leased task: the gateway extends the lease."""

    TYPE: ClassVar[str] = "lease_heartbeat"
    job_id: str
    chunk_id: int
    vehicle_id: str
    gateway_id: str
    epoch: int
    sent_at: float
    progress: float = 0.0  # 0..1, as far as the kernel can tell

    def __post_init__(self) -> None:
        _check_lease_reference(self)
        require_float("sent_at", self.sent_at)
        require_float("progress", self.progress, 0.0, 1.0)


@dataclass(frozen=True)
class Revoke:
    """The gateway takes a lease back (job cancelled): stop it and send nothing for it."""

    TYPE: ClassVar[str] = "revoke"
    gateway_id: str
    vehicle_id: str
    epoch: int
    reason: str

    def __post_init__(self) -> None:
        _vehicle("gateway_id", self.gateway_id)
        _vehicle("vehicle_id", self.vehicle_id)
        require_int("epoch", self.epoch, 1)
        require_name("reason", self.reason)


@dataclass(frozen=True)
class CancelJob:
    """Produced to every partition of the tasks topic: skip and stop the job's tasks.

    Keys put it after the job's own tasks in each partition, so the gateway that owns a
    partition has seen every task it cancels.
    """

    TYPE: ClassVar[str] = "cancel"
    job_id: str
    requested_at: float
    reason: str = "cancelled_by_caller"
    # The created_at of the submission it stops (every task of one submission carries the
    # same): the one clock its tasks were stamped by, so no two hosts' clocks are
    # compared, and another submission under the same id runs. 0.0 from an older writer:
    # it then stops the job's tasks created up to ``requested_at``.
    created_at: float = 0.0

    def __post_init__(self) -> None:
        require_str("job_id", self.job_id, pattern=_ID)
        require_float("requested_at", self.requested_at)
        require_name("reason", self.reason)
        require_float("created_at", self.created_at)


@dataclass(frozen=True)
class JobSubmitted:
    """What a later reader needs to follow a job by its id alone: produced by the SDK to
    the jobs topic (keyed by job id) before the job's first task.

    ``parkpool attach`` / ``client.attach`` find it from the time in the job id, then
    read the job's results from ``submitted_at`` on, not from the topics' start.
    """

    TYPE: ClassVar[str] = "job"
    job_id: str
    kernel: str
    n_chunks: int
    reply_topic: str
    submitted_at: float  # the submitting client's clock, unix seconds
    # Outputs are sealed to the submitter's reply key: a reader needs that key to open them.
    sealed: bool = False
    # Its tasks' created_at: results and letters of another submission under the same id
    # carry another. 0.0 from an older writer (a reader then takes any).
    created_at: float = 0.0

    def __post_init__(self) -> None:
        require_str("job_id", self.job_id, pattern=_ID)
        require_name("kernel", self.kernel)
        require_int("n_chunks", self.n_chunks, 1, MAX_CHUNKS)
        require_str("reply_topic", self.reply_topic, pattern=_TOPIC)
        require_float("submitted_at", self.submitted_at)
        require_bool("sealed", self.sealed)
        require_float("created_at", self.created_at)


def same_submission(mark: float, stamp: float) -> bool:
    """Whether a record stamped ``stamp`` (a result's or letter's task_created_at) is of
    the submission whose tasks' created_at is ``mark``. Either 0 (an older writer's, or
    a letter for a record that did not decode) says nothing, and counts as the same."""
    return not mark or not stamp or stamp == mark


class DlqActionKind(enum.StrEnum):
    REPLAYED = "replayed"
    PURGED = "purged"


@dataclass(frozen=True)
class DlqAction:
    """A note on the dead-letter topic that one dead letter was replayed or purged.

    Kafka cannot delete single records, so the tools fold these notes over the topic;
    they make ``replay`` safe to run twice.
    """

    TYPE: ClassVar[str] = "dlq_action"
    action: DlqActionKind
    partition: int
    offset: int
    at: float
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", _enum(DlqActionKind, "action", self.action))
        require_int("partition", self.partition, 0, 1_000_000)
        require_int("offset", self.offset, 0)
        require_float("at", self.at)
        require_str("note", self.note)


MESSAGE_TYPES: tuple[type, ...] = (
    TaskChunk,
    Assignment,
    AssignmentBatch,
    Result,
    Nack,
    PullRequest,
    VehicleStatus,
    GatewayStatus,
    DeadLetter,
    LeaseHeartbeat,
    Revoke,
    CancelJob,
    JobSubmitted,
    DlqAction,
    CarTally,
    QuarantineNotice,
)
# Records nested inside messages; they travel as maps without a type tag.
NESTED_TYPES: Mapping[str, type] = MappingProxyType(
    {
        "capabilities": Capabilities,
        "attempts": AttemptRecord,
        "preemptions": PreemptionRecord,
        "refs": BlobRef,
        "evidence": Evidence,
    }
)


E = TypeVar("E", bound=enum.StrEnum)


def _enum(kind: type[E], name: str, value: object) -> E:
    return require_enum(kind, name, value)


def _wrong(detail: str) -> ValidationError:
    return ValidationError("wrong_type", detail)


def _bad(detail: str) -> ValidationError:
    return ValidationError("bad_value", detail)
