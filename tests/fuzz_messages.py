# SPDX-License-Identifier: Apache-2.0
"""Hypothesis strategies for valid wire messages, built field by field, and the helpers the
fuzz tests share: comparing decoded messages, packing maps by hand, the decode oracle.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import re
import struct
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from parkpool.runtime.sealing import BoxKey, seal_outputs, seal_task
from parkpool.schemas import BlobRef, codec
from parkpool.schemas import messages as m
from parkpool.schemas.codec import ALLOWED_DTYPES, MAX_NDIM, WIRE_VERSION, decode, encode, peek_type
from parkpool.schemas.errors import DecodeError

Pairs = list[tuple[Any, Any]]
DTYPES = sorted(ALLOWED_DTYPES)
TAGS = tuple(cls.TYPE for cls in m.MESSAGE_TYPES)  # type: ignore[attr-defined]
REASON_SLUG = re.compile(r"^[a-z][a-z0-9_]{0,47}$")  # reasons are metric labels

# --- valid field values --------------------------------------------------------------

IDS = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
NAMES = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)
TOPICS = st.from_regex(r"[A-Za-z0-9._-]{1,249}", fullmatch=True).filter(
    lambda t: t not in (".", "..")  # Kafka forbids these two
)
TEXT = st.text(max_size=64)
TIMES = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False) | st.integers(0, 2**53)
EPOCHS = st.integers(1, 2**63 - 1)


def reals(high: float) -> st.SearchStrategy[float]:
    """Finite, non-negative numbers up to ``high``: every float field's valid range."""
    return st.floats(0.0, high, allow_nan=False, allow_infinity=False)


def _param_values(depth: int) -> st.SearchStrategy[Any]:
    leaf = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=16)
    )
    if depth == 0:
        return leaf
    inner = _param_values(depth - 1)
    # Lists, never tuples: msgpack has one array type, and it decodes as a list.
    return (
        leaf | st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    )


PARAMS = st.dictionaries(st.text(max_size=8), _param_values(3), max_size=4)
ARRAYS = hnp.arrays(
    dtype=st.sampled_from(DTYPES).map(np.dtype),
    shape=hnp.array_shapes(min_dims=0, max_dims=MAX_NDIM, min_side=0, max_side=3),
)
ARRAY_MAPS = st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), ARRAYS, max_size=3)

URLS = st.from_regex(r"https?://[a-z0-9.:-]{1,40}/[A-Za-z0-9/%&=._-]{0,200}", fullmatch=True)


@st.composite
def _array_ref(draw: st.DrawFn) -> BlobRef:
    """A claim check for an array: its size agrees with its dtype and shape."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 256), max_size=3)))  # far under 5 GiB
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    name = draw(st.from_regex(r"R[0-9]{1,3}", fullmatch=True))  # never an inline name
    return BlobRef(name, draw(HEX64), size, dtype.str, shape)


HEX64 = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
BLOB_REFS = st.lists(_array_ref(), max_size=3, unique_by=lambda ref: ref.name).map(tuple)
OPAQUE_REFS = st.builds(
    lambda sha, size: (BlobRef("outputs", sha, size),), HEX64, st.integers(0, 1 << 30)
)

# Fields whose valid values are narrower than their type says, by name (any message) ...
BY_FIELD: Mapping[str, st.SearchStrategy[Any]] = {
    "job_id": IDS,
    "vehicle_id": IDS,
    "gateway_id": IDS,
    "kernel": NAMES,
    "backend": NAMES,
    "reason": NAMES,
    "reply_topic": TOPICS,
    "source_topic": TOPICS,
    "detail": TEXT,
    "note": TEXT,
    "n_chunks": st.integers(1, m.MAX_CHUNKS),
    "epoch": EPOCHS,
    "attempt": st.integers(1, 1_000_000),
    "credits": st.integers(0, m.MAX_CREDITS),
    "held": st.integers(0, m.MAX_CREDITS),
    "queued": st.integers(0, 2**63 - 1),
    "partition": st.integers(0, 1_000_000),
    "offset": st.integers(0, 2**63 - 1),
    "device_memory_bytes": st.integers(0, 2**63 - 1),
    "cost_gflop": reals(m.MAX_GFLOP),
    "gflops_per_s": reals(m.MAX_GFLOPS_PER_S),
    "dwell_s": reals(m.MAX_DWELL_S),
    "busy_s": reals(m.MAX_COUNTER),
    "energy_j": reals(m.MAX_COUNTER),
    "progress": reals(1.0),
    "stop_s": reals(86400.0),
    "params": PARAMS,
    "inputs": ARRAY_MAPS,
    "outputs": ARRAY_MAPS,
    "original": st.binary(max_size=256),
    "kernels": st.lists(NAMES, max_size=6).map(tuple),
    "seen": st.dictionaries(IDS, st.integers(0, 2**63 - 1), max_size=4),
    "nonce": st.binary(max_size=128),
    "signature": st.binary(max_size=128),
    "box_key": st.just(b"") | st.binary(min_size=32, max_size=32),
    "reply_key": st.just(b"") | st.binary(min_size=32, max_size=32),
    "inputs_key": st.just(b"") | st.binary(min_size=80, max_size=80),
    # Sealed parts come whole, from real sealing, in messages() below: a field drawn on
    # its own would break the rules that tie it to the others.
    "sealed_inputs": st.just(b""),
    "sealed_outputs": st.just(b""),
    "urls": st.lists(URLS, max_size=3).map(tuple),
    "upload_url": st.just("") | URLS,
    "refs": BLOB_REFS,
}
# ... and by (message, field) where one name means different things in different messages.
BY_CLASS_FIELD: Mapping[tuple[str, str], st.SearchStrategy[Any]] = {
    ("TaskChunk", "attempt"): st.integers(0, 1_000_000),
    ("VehicleStatus", "reason"): TEXT,
    ("DeadLetter", "job_id"): TEXT,
    ("DeadLetter", "chunk_id"): st.integers(-1, m.MAX_CHUNKS - 1),
    # Set together with the bytes, in messages() below: they must agree with original.
    ("DeadLetter", "original_size"): st.just(-1),
    ("DeadLetter", "original_sha256"): st.just(""),
    ("AttemptRecord", "vehicle_id"): TEXT,
    ("TaskChunk", "inputs_key"): st.just(b""),  # set only with sealed inputs
    ("AssignmentBatch", "assignments"): st.lists(
        st.binary(max_size=64), min_size=1, max_size=4
    ).map(tuple),
    ("Assignment", "queued"): st.integers(-1, 10**6),
    # Stored outputs replace the inline ones: drawn whole in messages() below.
    ("Result", "refs"): st.just(()),
    ("AssignmentBatch", "queued"): st.integers(-1, 10**6),
}
GATEWAY_BOX = BoxKey.generate()
REPLY_BOX = BoxKey.generate()


def _by_hint(hint: Any) -> st.SearchStrategy[Any]:
    """A conservative strategy from a type hint alone, for fields not in the tables.

    Values fit every range the messages use today; a new field with a tighter one makes
    the message's constructor refuse them, and the round-trip tests fail until the field
    gets an entry above.
    """
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.sampled_from(list(hint))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return messages(hint)
    if origin is tuple:
        return st.lists(_by_hint(typing.get_args(hint)[0]), max_size=3).map(tuple)
    if origin in (Mapping, dict):
        return st.dictionaries(IDS, _by_hint(typing.get_args(hint)[1]), max_size=3)
    simple: dict[Any, st.SearchStrategy[Any]] = {
        str: IDS,
        int: st.integers(1, 64),
        float: reals(1.0),
        bytes: st.binary(max_size=128),
        bool: st.booleans(),
    }
    return simple[hint]


def field_strategy(cls: type, name: str, hint: Any) -> st.SearchStrategy[Any]:
    """Valid values of one field of ``cls``."""
    if (cls.__name__, name) in BY_CLASS_FIELD:
        return BY_CLASS_FIELD[(cls.__name__, name)]
    if name in BY_FIELD and not (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return BY_FIELD[name]
    if name == "task":  # an Assignment carries an encoded task, or bytes it cannot read
        return messages(m.TaskChunk).map(encode) | st.binary(max_size=64)
    return _by_hint(hint)


@st.composite
def _grants(draw: st.DrawFn, credits: int) -> dict[str, int]:
    """A split of at most ``credits`` between gateways (grants never exceed credits)."""
    grants: dict[str, int] = {}
    for gateway_id in draw(st.lists(IDS, max_size=4, unique=True)):
        grants[gateway_id] = draw(st.integers(0, credits - sum(grants.values())))
    return grants


_hints = functools.cache(typing.get_type_hints)


@st.composite
def _instance(draw: st.DrawFn, cls: type) -> Any:
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        optional = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        if f.name in ("chunk_id", "grants") or (optional and draw(st.booleans())):
            continue  # drawn below, or left at its default
        values[f.name] = draw(field_strategy(cls, f.name, hints[f.name]))
    names = {f.name for f in dataclasses.fields(cls)}
    if "chunk_id" in names:  # below n_chunks where there is one
        n_chunks = values.get("n_chunks")
        upper = n_chunks - 1 if n_chunks else m.MAX_CHUNKS - 1
        chunk = BY_CLASS_FIELD.get((cls.__name__, "chunk_id"), st.integers(0, upper))
        values["chunk_id"] = draw(chunk)
    if "grants" in names:
        values["grants"] = draw(_grants(values["credits"]))
    return cls(**values)


def messages(cls: type) -> st.SearchStrategy[Any]:
    """Valid instances of a message or nested record, built field by field; tasks and
    results are sometimes confidential ones, sealed for real."""
    if cls is BlobRef:  # its size must agree with its dtype and shape
        return _array_ref()
    plain = _instance(cls)
    if cls is m.TaskChunk:
        unstored = plain.map(lambda t: dataclasses.replace(t, refs=()))
        return plain | unstored.map(lambda t: seal_task(t, GATEWAY_BOX.public, REPLY_BOX.public))
    if cls is m.Result:
        stored = st.builds(
            lambda r, refs: dataclasses.replace(r, outputs={}, sealed_outputs=b"", refs=refs),
            plain,
            OPAQUE_REFS,
        )
        return plain | plain.map(lambda r: seal_outputs(r, REPLY_BOX.public)) | stored
    if cls is m.DeadLetter:
        return plain | plain.flatmap(_measured)
    return plain


def _measured(letter: m.DeadLetter) -> st.SearchStrategy[m.DeadLetter]:
    """The letter with its original's size and hash, and sometimes without its bytes."""
    digest = hashlib.sha256(letter.original).hexdigest()
    whole = dataclasses.replace(letter, original_size=len(letter.original), original_sha256=digest)
    return st.sampled_from([whole, whole.without_original()])


ANY_MESSAGE = st.sampled_from(m.MESSAGE_TYPES).flatmap(messages)


# --- comparing decoded messages ------------------------------------------------------


def same_array(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal bit for bit: dtype with byte order, shape, and every byte (NaN payloads too)."""
    return (
        got.dtype.str == want.dtype.str
        and got.shape == want.shape
        and (got.tobytes() == want.tobytes())
    )


def same_message(got: Any, want: Any) -> bool:
    """Field-by-field equality that compares arrays by their bytes (``==`` cannot)."""
    if type(got) is not type(want):
        return False
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name in ("inputs", "outputs"):
            if a.keys() != b.keys() or not all(same_array(a[k], b[k]) for k in b):
                return False
        elif a != b:
            return False
    return True


# --- packing by hand -----------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """Bytes spliced into a map as a value, exactly: what msgpack itself would not pack."""

    data: bytes


def pack_value(value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.data
    return msgpack.packb(value, default=codec._default, use_bin_type=True)  # type: ignore[no-any-return]


def pack_pairs(pairs: Sequence[tuple[Any, Any]]) -> bytes:
    """A msgpack map written pair by pair: duplicate keys and raw values are allowed."""
    n = len(pairs)
    if n < 16:
        head = bytes([0x80 | n])
    elif n < 2**16:
        head = b"\xde" + struct.pack(">H", n)
    else:
        head = b"\xdf" + struct.pack(">I", n)
    return head + b"".join(pack_value(k) + pack_value(v) for k, v in pairs)


def body_pairs(message: Any) -> Pairs:
    """The wire map of a message as (key, value) pairs, ready to be tampered with."""
    return [("v", WIRE_VERSION), ("type", type(message).TYPE), *codec._fields_of(message).items()]


# --- the decode oracle ---------------------------------------------------------------


def decode_outcome(data: bytes | bytearray | memoryview, cls: type) -> Any:
    """What decoding gives: the message, or the DecodeError; anything else propagates."""
    try:
        return codec.decode(data, cls)
    except DecodeError as exc:
        return exc


def check_outcome(data: bytes, cls: type) -> Any:
    """The fuzz oracle: a ``cls`` that re-encodes to itself, or DecodeError with a slug."""
    outcome = decode_outcome(data, cls)  # any other exception fails the test here
    if isinstance(outcome, DecodeError):
        assert REASON_SLUG.fullmatch(outcome.reason), outcome.reason
        assert isinstance(outcome.detail, str)
    else:
        assert isinstance(outcome, cls)
        assert same_message(decode(encode(outcome), cls), outcome)
        assert peek_type(data) == cls.TYPE  # type: ignore[attr-defined]
    tag = peek_type(data)
    assert tag is None or isinstance(tag, str)
    return outcome


def reason_of(data: bytes, cls: type) -> str:
    outcome = decode_outcome(data, cls)
    assert isinstance(outcome, DecodeError), f"accepted: {outcome!r}"
    return outcome.reason


def replaced(pairs: Pairs, key: str, value: Any) -> Pairs:
    return [(k, value if k == key else v) for k, v in pairs]


# One small valid instance of every message: the base that the size tests blow up.
_CAPS = m.Capabilities("numpy", ("reduce",))
SMALL: Mapping[type, Any] = {
    m.TaskChunk: m.TaskChunk("j", 0, 1, "k", {}, {}, "t", 0.0, 0.0),
    m.Assignment: m.Assignment("g", "v", 1, 1, 0.0, b""),
    m.Result: m.Result("j", 0, 1, "v", "g", 1, 1, {}, 0.0, 0.0, 0.0),
    m.Nack: m.Nack("j", 0, "v", "g", 1, m.NackReason.BUSY),
    m.PullRequest: m.PullRequest("v", 1, _CAPS),
    m.VehicleStatus: m.VehicleStatus("v", m.VehicleState.ONLINE, 0.0),
    m.GatewayStatus: m.GatewayStatus("g", m.GatewayState.ONLINE, 0.0),
    m.DeadLetter: m.DeadLetter("r", "", "t", 0, 0, b"", 0.0, "g"),
    m.LeaseHeartbeat: m.LeaseHeartbeat("j", 0, "v", "g", 1, 0.0),
    m.Revoke: m.Revoke("g", "v", 1, "r"),
    m.AssignmentBatch: m.AssignmentBatch("g", "v", (b"",)),
    m.CancelJob: m.CancelJob("j", 0.0),
    m.DlqAction: m.DlqAction(m.DlqActionKind.PURGED, 0, 0, 0.0),
}
