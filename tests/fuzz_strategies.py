# SPDX-License-Identifier: Apache-2.0
"""Hypothesis strategies for the wire: valid messages built from their fields, and hostile
bytes made from them (byte-level damage, msgpack-level field mutations, forged arrays).

Shared by the fuzz tests of the codec, the gateway, the worker and the Kafka task path.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import struct
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from schemas import codec
from schemas import messages as m
from schemas.codec import ALLOWED_DTYPES, ARRAY_EXT, MAX_NDIM, WIRE_VERSION, encode
from schemas.errors import DecodeError

Pairs = list[tuple[Any, Any]]
DTYPES = sorted(ALLOWED_DTYPES)
TAGS = tuple(cls.TYPE for cls in m.MESSAGE_TYPES)  # type: ignore[attr-defined]

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
}
# ... and by (message, field) where one name means different things in different messages.
BY_CLASS_FIELD: Mapping[tuple[str, str], st.SearchStrategy[Any]] = {
    ("TaskChunk", "attempt"): st.integers(0, 1_000_000),
    ("VehicleStatus", "reason"): TEXT,
    ("DeadLetter", "job_id"): TEXT,
    ("DeadLetter", "chunk_id"): st.integers(-1, m.MAX_CHUNKS - 1),
    ("AttemptRecord", "vehicle_id"): TEXT,
}


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
    """Valid instances of a message or nested record, built field by field."""
    return _instance(cls)


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


# --- hostile values ------------------------------------------------------------------

NASTY = st.sampled_from(
    [
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        -1e-300,
        5e-324,
        1.7976931348623157e308,
        -1,
        -2,
        -(2**63),
        2**63,
        2**64 - 1,
        True,
        False,
        None,
        "",
        "1",
        "NaN",
        "\x00",
        "a/b",
        "+",
        "#",
        "x" * 5000,
        b"",
        b"\x00",
        [],
        {},
        [1],
        {"": 1},
        {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}},
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=40))
    | st.builds(msgpack.Timestamp, st.integers(-(2**33), 2**33), st.integers(0, 999_999_999))
)


@st.composite
def forged_arrays(draw: st.DrawFn) -> msgpack.ExtType:
    """An ARRAY_EXT whose header may lie about anything: size, ndim, dtype, shape, data."""
    dtype = draw(
        st.sampled_from(DTYPES).map(str.encode)
        | st.sampled_from([b"|O", b"<U4", b"|V8", b"<M8", b"O", b"", b"\xff\xfe", b"<f4" * 40])
        | st.binary(max_size=12)
    )
    ndim = draw(st.integers(0, MAX_NDIM + 2) | st.integers(0, 255))
    dims = st.sampled_from([0, 1, 2, 3, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1])
    shape = draw(st.lists(dims | st.integers(0, 2**64 - 1), max_size=min(ndim, 12)))
    dtype_len = draw(st.just(len(dtype) % 256) | st.integers(0, 255))
    head = struct.pack("<BBB", 0, ndim, dtype_len) + dtype + struct.pack(f"<{len(shape)}Q", *shape)
    aligned = -(-len(head) // 16) * 16
    size = draw(st.just(aligned % 256) | st.integers(0, 255))
    head = bytes([size]) + head[1:] + bytes(max(0, size - len(head)))
    data_len = draw(st.sampled_from([0, 1, 2, 4, 8, 16, 24]) | st.integers(0, 64))
    return msgpack.ExtType(ARRAY_EXT, head + draw(st.binary(min_size=data_len, max_size=data_len)))


MSGPACK_VALUES = st.recursive(
    SCALARS | NASTY | forged_arrays(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=5)
    ),
    max_leaves=16,
)

# Values that msgpack-python would refuse to pack, or that lie about what follows.
RAW_VALUES = st.one_of(
    st.integers(1, 3000).map(lambda d: Raw(b"\x91" * d + b"\xc0")),  # nested arrays
    st.integers(1, 3000).map(lambda d: Raw(b"\x81\xa1k" * d + b"\xc0")),  # nested maps
    st.sampled_from(
        [
            Raw(b"\xdd\xff\xff\xff\xff"),  # array32 of 4G items, none present
            Raw(b"\xdf\xff\xff\xff\xff"),  # map32 of 4G pairs
            Raw(b"\xdb\xff\xff\xff\xff"),  # str32 of 4 GiB
            Raw(b"\xc6\xff\xff\xff\xff"),  # bin32 of 4 GiB
            Raw(b"\xc9\xff\xff\xff\xff\x01"),  # ext32 of 4 GiB
            Raw(b"\xc1"),  # the one reserved byte
            Raw(b"\xa2\xff\xfe"),  # a str that is not UTF-8
            Raw(b"\x81\xc0\x01"),  # a map keyed by nil
            Raw(b"\x81\x01\x01"),  # ... by an int
            Raw(b"\x81\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\x01"),  # ... by NaN
            Raw(b"\x81\x90\x01"),  # ... by an array
            Raw(b"\x81\xd6\xff\x00\x00\x00\x01\x01"),  # ... by a timestamp
            Raw(b"\xd6\xff\x00\x00\x00\x01"),  # a valid timestamp
            Raw(b"\xd7\xff" + b"\xff" * 8),  # a timestamp with 2^30 - 1 nanoseconds too many
            Raw(b"\xc7\x05\xff" + bytes(5)),  # a timestamp of an impossible length
            Raw(b"\xc7\x0c\xff" + b"\xff" * 12),  # a 96-bit one with bad nanoseconds
        ]
    ),
)
HOSTILE_VALUES = NASTY | MSGPACK_VALUES | RAW_VALUES


@st.composite
def huge_values(draw: st.DrawFn) -> Any:
    """Big lists, maps, strings and bytes: far past every limit, cheap to make."""
    n = draw(st.sampled_from([65, 257, 4097, 70_000]) | st.integers(0, 100_000))
    kind = draw(st.sampled_from(["ints", "maps", "strs", "dict", "str", "bin", "arrays"]))
    small = msgpack.ExtType(ARRAY_EXT, _array_payload("<f4", (1,)))
    make: dict[str, Callable[[], Any]] = {
        "ints": lambda: [0] * n,
        "maps": lambda: [{"reason": "r", "stop_s": 1.0, "vehicle_id": "v", "at": 1.0}] * n,
        "strs": lambda: ["k"] * n,
        "dict": lambda: {f"k{i}": i for i in range(n)},
        "str": lambda: "s" * n,
        "bin": lambda: b"b" * n,
        "arrays": lambda: {f"a{i}": small for i in range(n)},
    }
    return make[kind]()


def _array_payload(dtype: str, shape: tuple[int, ...]) -> bytes:
    head = struct.pack("<BBB", 0, len(shape), len(dtype)) + dtype.encode()
    head += struct.pack(f"<{len(shape)}Q", *shape)
    size = -(-len(head) // 16) * 16
    head = bytes([size]) + head[1:] + bytes(size - len(head))
    return head + bytes(math.prod(shape) * np.dtype(dtype).itemsize)


# --- mutations -----------------------------------------------------------------------


@st.composite
def mutated_pairs(draw: st.DrawFn, message: Any) -> Pairs:
    """The message's map after one to three msgpack-level mutations."""
    pairs = body_pairs(message)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(
            st.sampled_from(
                ["set", "set", "delete", "extra", "duplicate", "huge", "version", "tag", "nested"]
            )
        )
        keys = [k for k, _ in pairs]
        if op == "set" and keys:
            i = draw(st.integers(0, len(pairs) - 1))
            pairs[i] = (pairs[i][0], draw(HOSTILE_VALUES))
        elif op == "delete" and pairs:
            del pairs[draw(st.integers(0, len(pairs) - 1))]
        elif op == "extra":
            key = draw(st.text(max_size=12) | st.sampled_from(["TYPE", "__class__", "V", ""]))
            pairs.append((key, draw(HOSTILE_VALUES)))
        elif op == "duplicate" and keys:
            key = draw(st.sampled_from(keys))
            pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(HOSTILE_VALUES)))
        elif op == "huge" and keys:
            i = draw(st.integers(0, len(pairs) - 1))
            pairs[i] = (pairs[i][0], draw(huge_values()))
        elif op == "version":
            pairs.append(("v", draw(HOSTILE_VALUES | st.integers(-5, 5))))
        elif op == "tag":
            pairs.append(("type", draw(HOSTILE_VALUES | st.sampled_from(TAGS))))
        elif op == "nested":
            pairs = _mutate_nested(draw, pairs)
    return pairs


def _mutate_nested(draw: st.DrawFn, pairs: Pairs) -> Pairs:
    """Damage one field inside a nested record (capabilities, attempts, preemptions)."""
    out = list(pairs)
    for i, (key, value) in enumerate(out):
        records = [value] if dataclasses.is_dataclass(value) else None
        if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            records = list(value)
        if not records:
            continue
        maps = [codec._fields_of(r) for r in records]
        target = maps[draw(st.integers(0, len(maps) - 1))]
        field = draw(st.sampled_from(sorted(target)))
        target[field] = draw(NASTY | MSGPACK_VALUES)
        out[i] = (key, maps[0] if dataclasses.is_dataclass(value) else maps)
        return out
    return out


@st.composite
def damaged_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """Byte-level damage: bit flips, overwrites, truncation, extension, splices, cuts."""
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "extend", "insert", "cut"]))
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del raw[at:]
        elif op == "extend":
            raw += draw(st.binary(min_size=1, max_size=16))
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "cut" and raw:
            del raw[at : at + draw(st.integers(1, 16))]
    return bytes(raw)


def hostile_payloads(cls: type) -> st.SearchStrategy[bytes]:
    """Bytes a hostile or broken peer could send where a ``cls`` is expected."""
    own = messages(cls)
    other = ANY_MESSAGE
    return st.one_of(
        st.binary(max_size=512),
        own.map(encode).flatmap(damaged_bytes),
        own.flatmap(mutated_pairs).map(pack_pairs),
        own.flatmap(mutated_pairs).map(pack_pairs).flatmap(damaged_bytes),
        other.map(encode),  # well-formed, but another message type
        other.flatmap(mutated_pairs).map(pack_pairs),
    )


def decode_outcome(data: bytes, cls: type) -> Any:
    """What decoding gives: the message, or the DecodeError; anything else propagates."""
    try:
        return codec.decode(data, cls)
    except DecodeError as exc:
        return exc
