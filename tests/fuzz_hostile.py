# SPDX-License-Identifier: Apache-2.0
"""Hypothesis strategies for hostile wire input: nasty values, forged arrays, msgpack that
lies about its lengths, field-level mutations of valid messages, and byte-level damage.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st

from parkpool.schemas import codec
from parkpool.schemas.codec import ARRAY_EXT, MAX_NDIM, encode
from tests.fuzz_messages import (
    ANY_MESSAGE,
    DTYPES,
    TAGS,
    Pairs,
    Raw,
    body_pairs,
    messages,
    pack_pairs,
)

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
