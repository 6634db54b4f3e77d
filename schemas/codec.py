# SPDX-License-Identifier: Apache-2.0
"""The msgpack codec for every parkpool message.

Envelope: a msgpack map ``{"v": WIRE_VERSION, "type": <tag>, ...fields}``.

NumPy arrays travel as msgpack ext type ``ARRAY_EXT`` whose payload is::

    u8  header length H (multiple of 16, so the data is aligned for any dtype)
    u8  ndim
    u8  len(dtype string)
    ... dtype string (numpy ``dtype.str``, e.g. "<f4"), shape as ndim little-endian u64
    ... zero padding up to H
    raw C-order bytes

Decoding makes the array with ``np.frombuffer`` over the ext payload: no copy beyond the
one msgpack itself makes when it slices the payload out of the message. Decoded arrays
are read-only views.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import struct
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import msgpack
import numpy as np

from parkpool.schemas.errors import DecodeError, ValidationError
from parkpool.schemas.messages import MESSAGE_TYPES, NESTED_TYPES
from parkpool.schemas.validate import (
    ALLOWED_DTYPES,
    MAX_ARRAYS,
    MAX_NDIM,
    MAX_PARAM_ITEMS,
    require_arrays,
)

WIRE_VERSION = 1
ARRAY_EXT = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# No message holds more nested records than this (attempts, preemptions: maxItems 64 in
# asyncapi.yaml). A longer list is refused before any record of it is built, so a 1 MiB
# list of records costs a length check instead of tens of thousands of constructors.
MAX_NESTED_RECORDS = 64
# What one message may make the unpacker build. A valid message holds at most MAX_ARRAYS
# arrays (one map of them) and MAX_PARAM_ITEMS param values; these bounds sit above that
# and far below what a hostile payload could cost otherwise: 32 MiB of empty maps are
# 33 million dicts (2 GiB, seconds of CPU on a gateway's only thread), and 32 MiB of tiny
# arrays a million array headers to parse. Unpacking stops at the first one too many.
MAX_CONTAINER_LEN = 2 * MAX_PARAM_ITEMS  # items of one msgpack array or map
MAX_VALUES = 4 * MAX_PARAM_ITEMS  # arrays and maps in one message, plus their items

M = TypeVar("M")
C = TypeVar("C", list[Any], dict[str, Any])
_BY_TAG: Mapping[str, type] = {cls.TYPE: cls for cls in MESSAGE_TYPES}  # type: ignore[attr-defined]
_HEADER = struct.Struct("<BBB")


def encode(message: object) -> bytes:
    """Encode one message dataclass to bytes."""
    tag = getattr(type(message), "TYPE", None)
    if tag not in _BY_TAG:
        raise TypeError(f"{type(message).__name__} is not a parkpool message")
    body = {"v": WIRE_VERSION, "type": tag, **_fields_of(message)}
    return msgpack.packb(body, default=_default, use_bin_type=True)  # type: ignore[no-any-return]


def decode(data: bytes | bytearray | memoryview, expect: type[M]) -> M:
    """Decode bytes into a message of type ``expect``; any defect raises DecodeError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("wrong_type", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError("too_large", f"{len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    body = _unpack(data)
    if not isinstance(body, dict):
        raise DecodeError("not_a_map", f"message is a msgpack {type(body).__name__}, not a map")
    version = body.pop("v", None)
    if type(version) is not int or version != WIRE_VERSION:  # True == 1 in Python
        raise DecodeError("unknown_version", f"wire version {version!r}; this build reads 1")
    tag = body.pop("type", None)
    expected_tag = getattr(expect, "TYPE", None)
    if tag != expected_tag:
        raise DecodeError("wrong_message_type", f"got {tag!r}, expected {expected_tag!r}")
    return _build(expect, body)


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A map of named arrays on its own: what a confidential message seals."""
    body = dict(require_arrays("arrays", arrays))
    return msgpack.packb(body, default=_default, use_bin_type=True)  # type: ignore[no-any-return]


def decode_arrays(data: bytes | bytearray | memoryview) -> Mapping[str, np.ndarray]:
    """The inverse of ``encode_arrays``, with the same limits as a whole message."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError("too_large", f"{len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return require_arrays("arrays", _unpack(data))


def peek_type(data: bytes) -> str | None:
    """The type tag of an encoded message, or None when it is not one."""
    try:
        body = _unpack(data)
    except DecodeError:
        return None
    tag = body.get("type") if isinstance(body, dict) else None
    return tag if isinstance(tag, str) else None


def _unpack(data: bytes | bytearray | memoryview) -> Any:
    budget = _Budget()
    try:
        return msgpack.unpackb(
            data,
            ext_hook=budget.ext,
            object_hook=budget.container,
            list_hook=budget.container,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
            raw=False,
            strict_map_key=True,
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        # msgpack raises ValueError subclasses (ExtraData, FormatError, StackError, truncated
        # input, a length past the buffer or past MAX_CONTAINER_LEN) and UnicodeDecodeError;
        # all mean the bytes are not a message.
        detail = str(exc) or "not valid msgpack"
        raise DecodeError("malformed", f"{type(exc).__name__}: {detail}") from None


class _Budget:
    """Counts what one unpack builds, and stops it where no valid message could go."""

    __slots__ = ("arrays", "values")

    def __init__(self) -> None:
        self.arrays = MAX_ARRAYS
        self.values = MAX_VALUES

    def ext(self, code: int, payload: bytes) -> np.ndarray:
        self.arrays -= 1
        if self.arrays < 0:
            raise DecodeError("too_large", f"more than {MAX_ARRAYS} arrays in one message")
        return _ext_hook(code, payload)

    def container(self, value: C) -> C:
        """Called as each array or map is complete: no more than one can be built too many."""
        self.values -= 1 + len(value)
        if self.values < 0:
            raise DecodeError("too_large", f"more than {MAX_VALUES} values in one message")
        return value


def _fields_of(message: object) -> dict[str, Any]:
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}  # type: ignore[arg-type]


def _default(obj: object) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _fields_of(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _pack_array(array: np.ndarray) -> msgpack.ExtType:
    if array.dtype.str not in ALLOWED_DTYPES:
        raise TypeError(f"dtype {array.dtype} cannot travel; use a plain numeric dtype")
    if array.ndim > MAX_NDIM:
        raise TypeError(f"arrays of more than {MAX_NDIM} dimensions cannot travel")
    dtype = array.dtype.str.encode()
    head = (
        _HEADER.pack(0, array.ndim, len(dtype))
        + dtype
        + struct.pack(f"<{array.ndim}Q", *array.shape)
    )
    size = -(-len(head) // 16) * 16
    head = bytes([size]) + head[1:] + bytes(size - len(head))
    return msgpack.ExtType(ARRAY_EXT, head + np.ascontiguousarray(array).tobytes())


def _ext_hook(code: int, payload: bytes) -> np.ndarray:
    if code != ARRAY_EXT:
        raise DecodeError("unknown_ext", f"msgpack ext type {code} is not part of the contract")
    if len(payload) < _HEADER.size:
        raise DecodeError("bad_array", "array header is truncated")
    size, ndim, dtype_len = _HEADER.unpack_from(payload)
    shape_at = _HEADER.size + dtype_len
    if ndim > MAX_NDIM or size % 16 or size < shape_at + 8 * ndim or size > len(payload):
        raise DecodeError("bad_array", "array header is inconsistent")
    dtype_str = payload[_HEADER.size : shape_at].decode("ascii", "replace")
    if dtype_str not in ALLOWED_DTYPES:
        raise DecodeError("bad_array", f"dtype {dtype_str!r} is not allowed")
    dtype = np.dtype(dtype_str)
    shape = struct.unpack_from(f"<{ndim}Q", payload, shape_at)
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != len(payload) - size:
        raise DecodeError(
            "bad_array",
            f"shape {shape} of {dtype_str} needs {count * dtype.itemsize} bytes, "
            f"message has {len(payload) - size}",
        )
    try:
        array = np.frombuffer(payload, dtype=dtype, count=count, offset=size)
        return array.reshape(shape)
    except ValueError as exc:  # e.g. shape (0, 2**63): no bytes, but numpy refuses the dims
        raise DecodeError("bad_array", f"shape {shape}: {exc}") from None


@functools.cache
def _schema(cls: type) -> tuple[tuple[str, object, bool], ...]:
    """(name, type hint, required) per field; resolving hints is slow, so once per class."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )


def _build(cls: type[M], body: dict[str, Any]) -> M:
    kwargs: dict[str, Any] = {}
    for name, hint, required in _schema(cls):  # type: ignore[arg-type]
        if name in body:
            kwargs[name] = _nested(name, hint, body[name])
        elif required:
            raise ValidationError("missing_field", f"{cls.__name__} needs field {name!r}")
    # Unknown fields are ignored on purpose: a newer minor writer may add optional fields.
    try:
        return cls(**kwargs)
    except ValidationError:
        raise
    except (TypeError, ValueError) as exc:
        raise ValidationError("bad_value", f"{cls.__name__}: {exc}") from None


def _nested(name: str, hint: object, value: Any) -> Any:
    record = NESTED_TYPES.get(name)
    if record is None:
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise ValidationError("wrong_type", f"{name} must be a list")
        if len(value) > MAX_NESTED_RECORDS:
            # The reason the message's own check gives: the answer only comes sooner.
            raise ValidationError(
                "wrong_type", f"{name} holds more than {MAX_NESTED_RECORDS} records"
            )
        return tuple(_record(record, name, item) for item in value)
    return _record(record, name, value)


def _record(record: type, name: str, value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValidationError("wrong_type", f"{name} must be a map")
    return _build(record, value)
