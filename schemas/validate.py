# SPDX-License-Identifier: Apache-2.0
"""Field checks used by the message dataclasses' ``__post_init__``.

Every check raises ``ValidationError`` with a stable reason slug, so that a hostile or
buggy peer gets a readable answer and metrics can count rejections by reason.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from parkpool.schemas.errors import ValidationError

E = TypeVar("E", bound=enum.StrEnum)

NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_TEXT = 4096
MAX_PARAM_DEPTH = 4
MAX_PARAM_ITEMS = 4096
MAX_ARRAYS = 64
MAX_NDIM = 8
# Only plain numeric dtypes: object, string and structured dtypes could smuggle pickles or
# make a reader interpret bytes in surprising ways.
ALLOWED_DTYPES = frozenset(
    np.dtype(name).newbyteorder(order).str
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
    for order in ("<", ">")
)


def require_str(name: str, value: object, *, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str):
        raise ValidationError("wrong_type", f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise ValidationError("too_large", f"{name} is longer than {MAX_TEXT} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise ValidationError("bad_value", f"{name} {value[:80]!r} must match {pattern.pattern}")
    return value


def require_name(name: str, value: object) -> str:
    return require_str(name, value, pattern=NAME_RE)


def require_int(name: str, value: object, lo: int = 0, hi: int = 2**63 - 1) -> int:
    # bool is an int subclass; a True where a count belongs is a bug on the sender's side.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(
            "wrong_type", f"{name} must be an integer, got {type(value).__name__}"
        )
    if not lo <= value <= hi:
        raise ValidationError("out_of_range", f"{name}={value} is outside [{lo}, {hi}]")
    return value


def require_float(name: str, value: object, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError("wrong_type", f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValidationError("out_of_range", f"{name}={value} is outside [{lo}, {hi}]")
    return float(value)


def require_enum(kind: type[E], name: str, value: object) -> E:
    """A member of the string enum ``kind``: wrong_type unless a string, else bad_value."""
    if not isinstance(value, str):
        raise ValidationError("wrong_type", f"{name} must be a string, got {type(value).__name__}")
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise ValidationError("bad_value", f"{name} {value!r} is not one of: {allowed}") from None


def require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValidationError("wrong_type", f"{name} must be a boolean, got {type(value).__name__}")
    return value


def require_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes):
        raise ValidationError("wrong_type", f"{name} must be bytes, got {type(value).__name__}")
    return value


def require_arrays(name: str, value: object) -> Mapping[str, np.ndarray]:
    if not isinstance(value, Mapping):
        raise ValidationError("wrong_type", f"{name} must be a map of name to array")
    if len(value) > MAX_ARRAYS:
        raise ValidationError("too_large", f"{name} has more than {MAX_ARRAYS} arrays")
    for key, array in value.items():
        require_name(f"{name} key", key)
        if not isinstance(array, np.ndarray):
            raise ValidationError("wrong_type", f"{name}[{key!r}] must be an ndarray")
    return value


def require_params(name: str, value: object) -> Mapping[str, Any]:
    """Kernel params: a map of msgpack-native scalars, lists and maps, bounded in size."""
    if not isinstance(value, Mapping):
        raise ValidationError("wrong_type", f"{name} must be a map")
    _check_param_value(name, value, 0, [0])
    return value


def _check_param_value(path: str, value: object, depth: int, count: list[int]) -> None:
    count[0] += 1
    if depth > MAX_PARAM_DEPTH or count[0] > MAX_PARAM_ITEMS:
        raise ValidationError("too_large", f"{path} is nested too deeply or has too many items")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError("bad_value", f"{path} must be finite")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_param_value(f"{path}[{i}]", item, depth + 1, count)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError("wrong_type", f"{path} keys must be strings")
            _check_param_value(f"{path}.{key}", item, depth + 1, count)
        return
    raise ValidationError("wrong_type", f"{path} has unsupported type {type(value).__name__}")
