# SPDX-License-Identifier: Apache-2.0
"""The codec's limits under hostile input: every field refuses every wrong kind of value
with the right reason, and no input a broker carries costs more than a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
import typing
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parkpool.runtime.kafka import MAX_FETCH_RECORD_BYTES as KAFKA_MAX_BYTES
from parkpool.schemas import messages as m
from parkpool.schemas.codec import (
    ARRAY_EXT,
    MAX_MESSAGE_BYTES,
    MAX_NESTED_RECORDS,
    decode,
    encode,
)
from parkpool.schemas.validate import MAX_ARRAYS, MAX_PARAM_ITEMS
from tests.fuzz_messages import (
    SMALL,
    Pairs,
    Raw,
    body_pairs,
    check_outcome,
    messages,
    pack_pairs,
    reason_of,
    replaced,
    same_message,
)

# --- every field, every wrong kind of value ------------------------------------------


def _all(reason: str, *values: Any) -> list[tuple[Any, str]]:
    return [(value, reason) for value in values]


# (value, reason) for each kind of field: what every field of that kind must refuse.
REFUSALS: Mapping[str, list[tuple[Any, str]]] = {
    "int": _all("out_of_range", -2, -(2**63), 2**64 - 1)
    + _all("wrong_type", True, 1.5, math.nan, "1", None, [], {}),
    "float": _all("out_of_range", math.nan, math.inf, -math.inf, -1.0, -5e-324)
    + _all("wrong_type", True, "1", None, [], {}, b"1"),
    "str": _all("too_large", "x" * 5000) + _all("wrong_type", 1, None, b"x", True, []),
    "enum": _all("bad_value", "bogus", "") + _all("wrong_type", 1, None, b"online", []),
    "bytes": _all("wrong_type", "x", 1, None, [], True),
    "bool": _all("wrong_type", 1, 0, "true", None, [], {}, b"1"),
    "map": _all("wrong_type", [], "x", 1, None, True),
    "record": _all("wrong_type", [], "x", 1, None, True),
    "records": _all("wrong_type", {}, "x", 1, None, [1], ["x"], [[]]),
    "names": _all("wrong_type", {}, "x", 1, None, [1], [None], [b"k"]),
    "ints": _all("wrong_type", {}, "x", 1, None, [None], ["x"], [1.5], [True]),
}


def _kind(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "enum"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return "record"
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        return {str: "names", int: "ints"}.get(inner, "records")
    if origin is not None and issubclass(origin, Mapping):
        return "map"
    return {int: "int", float: "float", str: "str", bytes: "bytes", bool: "bool"}[hint]


def _leaf_fields() -> list[tuple[type, str | None, str, str]]:
    """(message, nested record field or None, field, kind) for every field on the wire."""
    out: list[tuple[type, str | None, str, str]] = []
    for cls in m.MESSAGE_TYPES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append((cls, None, f.name, _kind(hints[f.name])))
            record = m.NESTED_TYPES.get(f.name)
            if record is not None:
                inner = typing.get_type_hints(record)
                out += [
                    (cls, f.name, g.name, _kind(inner[g.name])) for g in dataclasses.fields(record)
                ]
    return out


LEAF_FIELDS = _leaf_fields()


class TestEveryFieldRefusesWrongValues:
    """Every field, nested ones too, refuses NaN, infinities, negatives and mistyped values."""

    @pytest.mark.parametrize(
        ("cls", "nested", "name", "kind"),
        LEAF_FIELDS,
        ids=[f"{c.__name__}.{n + '.' if n else ''}{f}" for c, n, f, _ in LEAF_FIELDS],
    )
    @settings(max_examples=15, deadline=timedelta(milliseconds=500))
    @given(data=st.data())
    def test_field(
        self, cls: type, nested: str | None, name: str, kind: str, data: st.DataObject
    ) -> None:
        # Given a valid message, and a value no field of this kind may hold
        message = data.draw(messages(cls))
        value, reason = data.draw(st.sampled_from(REFUSALS[kind]))
        # When that value is put in the field (inside a nested record where it lives)
        pairs = _with_value(body_pairs(message), nested, name, value, data)
        # Then the message is refused, and the reason says what kind of wrong it is
        assert reason_of(pack_pairs(pairs), cls) == reason


def _with_value(
    pairs: Pairs, nested: str | None, name: str, value: Any, data: st.DataObject
) -> Pairs:
    if nested is None:
        return replaced(pairs, name, value)
    record = m.NESTED_TYPES[nested]
    current: Any = dict(pairs)[nested]
    if not isinstance(current, tuple):  # one record
        body: Any = {**dataclasses.asdict(current), name: value}
    else:  # a list of records: damage the first, making one if there is none
        first = current[0] if current else data.draw(messages(record))
        body = [{**dataclasses.asdict(first), name: value}]
    return replaced(pairs, nested, body)


_ATTEMPT = {"vehicle_id": "v", "reason": "r", "at": 1.0}
_STOP = {"reason": "r", "stop_s": 1.0}
_ATTEMPT_REC = m.AttemptRecord(**_ATTEMPT)  # type: ignore[arg-type]
_STOP_REC = m.PreemptionRecord(**_STOP)  # type: ignore[arg-type]
_TINY_ARRAY = msgpack.packb(msgpack.ExtType(ARRAY_EXT, b"\x10\x01\x03<f4" + bytes(13) + bytes(4)))


def _field(cls: type, name: str, value: Any) -> bytes:
    """A small valid message with one field set (or added, when it has no such field)."""
    pairs = body_pairs(SMALL[cls])
    if name not in dict(pairs):
        return pack_pairs([*pairs, (name, value)])
    return pack_pairs(replaced(pairs, name, value))


def _items(item: bytes, n: int) -> Raw:
    """A msgpack array of ``item`` (packed), repeated to about ``n`` bytes, built as bytes."""
    count = max(1, n // len(item))
    return Raw(b"\xdd" + count.to_bytes(4, "big") + item * count)


def _pairs(key: str, value: bytes, n: int) -> Raw:
    """A msgpack map of one key repeated, to about ``n`` bytes: duplicates are legal."""
    pair = msgpack.packb(key) + value
    count = max(1, n // len(pair))
    return Raw(b"\xdf" + count.to_bytes(4, "big") + pair * count)


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


_NILS = b"\xdd" + (8192).to_bytes(4, "big") + b"\xc0" * 8192
# (message, bytes of about n) shaped to make a decoder work hard, or to hold a lot of memory
HEAVY: Mapping[str, tuple[type, Callable[[int], bytes]]] = {
    "random": (m.Result, lambda n: bytes(range(256)) * (n // 256)),
    "nested-arrays": (m.TaskChunk, lambda n: b"\x91" * n),
    "nested-maps": (m.TaskChunk, lambda n: b"\x81\xa1k" * (n // 3)),
    "attempts": (
        m.DeadLetter,
        lambda n: _field(m.DeadLetter, "attempts", _items(msgpack.packb(_ATTEMPT), n)),
    ),
    "preemptions": (
        m.VehicleStatus,
        lambda n: _field(m.VehicleStatus, "preemptions", _items(msgpack.packb(_STOP), n)),
    ),
    "seen": (m.PullRequest, lambda n: _field(m.PullRequest, "seen", _pairs("g", b"\x01", n))),
    "grants": (m.PullRequest, lambda n: _field(m.PullRequest, "grants", _pairs("g", b"\x00", n))),
    "kernels": (
        m.PullRequest,
        lambda n: _field(
            m.PullRequest, "capabilities", {"backend": "b", "kernels": _items(b"\xa1k", n)}
        ),
    ),
    "param-list": (m.TaskChunk, lambda n: _field(m.TaskChunk, "params", {"a": _items(b"\x01", n)})),
    "param-maps": (m.TaskChunk, lambda n: _field(m.TaskChunk, "params", _pairs("k", b"\x80", n))),
    "empty-maps": (m.Result, lambda n: _field(m.Result, "extra", _items(b"\x80", n))),
    "lists-of-nils": (m.Result, lambda n: _field(m.Result, "extra", _items(_NILS, n))),
    "many-arrays": (
        m.TaskChunk,
        lambda n: _field(m.TaskChunk, "inputs", _pairs("a", _TINY_ARRAY, n)),
    ),
    "arrays-anywhere": (m.Result, lambda n: _field(m.Result, "extra", _items(_TINY_ARRAY, n))),
    "one-big-array": (
        m.TaskChunk,
        lambda n: _field(m.TaskChunk, "inputs", {"a": np.zeros(n // 8)}),
    ),
    "long-id": (m.Result, lambda n: _field(m.Result, "job_id", "j" * n)),
    "task-bytes": (m.Assignment, lambda n: _field(m.Assignment, "task", b"\x91" * n)),
}


class TestBoundedWork:
    """Any input up to the largest payload a broker carries is decoded or refused fast."""

    @pytest.mark.parametrize("size", [1 << 20, KAFKA_MAX_BYTES], ids=["1MiB", "32MiB"])
    @pytest.mark.parametrize("shape", sorted(HEAVY))
    def test_heavy_input(self, shape: str, size: int) -> None:
        # Given about 1 MiB (or the most Kafka and Mosquitto carry), shaped to cost a lot
        cls, make = HEAVY[shape]
        data = make(size)
        assert size * 0.7 <= len(data) <= size * 1.6
        # When it is decoded (best of three, so a busy machine does not fail the test)
        seconds = min(_timed(lambda: check_outcome(data, cls)) for _ in range(3))
        # Then the answer comes well under a second: the work is bounded by the checks,
        # not by what the bytes ask to be built
        assert seconds < 0.5, f"{seconds:.3f}s"

    @pytest.mark.parametrize(
        ("cls", "field", "record"),
        [(m.DeadLetter, "attempts", _ATTEMPT_REC), (m.VehicleStatus, "preemptions", _STOP_REC)],
    )
    def test_records_up_to_the_limit(self, cls: type, field: str, record: Any) -> None:
        # Given a message with as many nested records as it may hold, and one with more
        full = dataclasses.replace(SMALL[cls], **{field: (record,) * MAX_NESTED_RECORDS})
        over = _field(cls, field, [dataclasses.asdict(record)] * (MAX_NESTED_RECORDS + 1))
        # Then the first round-trips and the second is refused before its records are built
        assert same_message(decode(encode(full), cls), full)
        assert reason_of(over, cls) == "wrong_type"

    @pytest.mark.parametrize(
        "message",
        [
            dataclasses.replace(
                SMALL[m.TaskChunk],
                params={"a": [{"b": [1.5, None]}] * ((MAX_PARAM_ITEMS - 2) // 4), "c": 1},
                inputs={f"a{i}": np.ones((2, 2)) for i in range(MAX_ARRAYS)},
            ),
            dataclasses.replace(SMALL[m.TaskChunk], params={"a": [0] * (MAX_PARAM_ITEMS - 2)}),
            dataclasses.replace(
                SMALL[m.TaskChunk], params={f"k{i}": {} for i in range(MAX_PARAM_ITEMS - 1)}
            ),
            dataclasses.replace(
                SMALL[m.Result], outputs={f"o{i}": np.zeros(3) for i in range(MAX_ARRAYS)}
            ),
            m.PullRequest(
                "v",
                m.MAX_CREDITS,
                m.Capabilities("b", tuple(f"k{i}" for i in range(256))),
                {f"g{i}": i for i in range(64)},
                {f"g{i}": 16 for i in range(64)},
            ),
        ],
        ids=["nested-params-and-inputs", "param-list", "param-maps", "outputs", "pull"],
    )
    def test_largest_valid_messages_still_decode(self, message: Any) -> None:
        # Given messages at their limits (params items, arrays, kernels, gateways)
        data = encode(message)
        # Then the unpacker's bounds leave room for them
        assert same_message(decode(data, type(message)), message)

    def test_oversize_is_refused_unread(self) -> None:
        data = b"\x91" * (MAX_MESSAGE_BYTES + 1)
        seconds = _timed(lambda: reason_of(data, m.Result) == "too_large")
        assert reason_of(data, m.Result) == "too_large"
        assert seconds < 0.05
