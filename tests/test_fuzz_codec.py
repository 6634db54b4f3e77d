# SPDX-License-Identifier: Apache-2.0
"""Property-based tests of the codec against hostile input.

For every message type: valid messages built field by field round-trip exactly, and any
bytes at all either decode to the type asked for or raise DecodeError with a reason slug,
quickly. Nothing else may escape: the gateway and the worker catch only DecodeError.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import time
import typing
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from parkpool.kafka import MAX_MESSAGE_BYTES as KAFKA_MAX_BYTES
from schemas import messages as m
from schemas.codec import (
    ARRAY_EXT,
    MAX_MESSAGE_BYTES,
    MAX_NDIM,
    MAX_NESTED_RECORDS,
    decode,
    encode,
    peek_type,
)
from schemas.errors import DecodeError
from schemas.validate import MAX_ARRAYS, MAX_PARAM_ITEMS
from tests.fuzz_strategies import (
    ALLOWED_DTYPES,
    ANY_MESSAGE,
    MSGPACK_VALUES,
    NASTY,
    Pairs,
    Raw,
    body_pairs,
    damaged_bytes,
    decode_outcome,
    forged_arrays,
    hostile_payloads,
    huge_values,
    messages,
    mutated_pairs,
    pack_pairs,
    same_message,
)

TYPES = st.sampled_from(m.MESSAGE_TYPES)
WIRE_INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
REASON_SLUG = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# A decode is a handful of dict operations per field; half a second is a hang.
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(milliseconds=500),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROUND_TRIP = settings(max_examples=100, deadline=timedelta(milliseconds=500))


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


class TestRoundTrip:
    """Every valid message, built field by field, decodes back to itself, byte for byte."""

    @ROUND_TRIP
    @given(ANY_MESSAGE)
    def test_decode_inverts_encode(self, message: Any) -> None:
        # Given a valid message's bytes, when they are decoded as its type
        data = encode(message)
        got = decode(data, type(message))
        # Then it is the same message, its encoding is canonical, and its tag is peekable
        assert same_message(got, message)
        assert encode(got) == data
        assert peek_type(data) == type(message).TYPE
        assert same_message(decode(bytearray(data), type(message)), message)
        assert same_message(decode(memoryview(data), type(message)), message)

    @ROUND_TRIP
    @given(ANY_MESSAGE, TYPES)
    def test_another_type_is_refused(self, message: Any, other: type) -> None:
        assume(other is not type(message))
        assert reason_of(encode(message), other) == "wrong_message_type"

    @ROUND_TRIP
    @given(ANY_MESSAGE, st.dictionaries(st.text(max_size=12), MSGPACK_VALUES, max_size=3))
    def test_unknown_fields_are_ignored(self, message: Any, extra: dict[str, Any]) -> None:
        # Given a message with fields a newer writer might add (no arrays: those are read)
        names = {f.name for f in dataclasses.fields(message)} | {"v", "type"}
        extra = {k: v for k, v in extra.items() if k not in names}
        data = pack_pairs(body_pairs(message) + list(extra.items()))
        # Then a reader that does not know them decodes the message, or refuses a forged
        # array among them: never anything else
        outcome = check_outcome(data, type(message))
        assert isinstance(outcome, DecodeError) or same_message(outcome, message)

    @ROUND_TRIP
    @given(ANY_MESSAGE, st.data())
    def test_missing_fields(self, message: Any, data: st.DataObject) -> None:
        # Given a message with some of its fields left out
        fields = dataclasses.fields(message)
        gone = data.draw(st.sets(st.sampled_from([f.name for f in fields])))
        pairs = [(k, v) for k, v in body_pairs(message) if k not in gone]
        outcome = check_outcome(pack_pairs(pairs), type(message))
        required = {f.name for f in fields if _required(f)}
        if gone & required:
            # Then a missing required field is named as missing
            assert isinstance(outcome, DecodeError) and outcome.reason == "missing_field"
        elif not isinstance(outcome, DecodeError):
            # And missing optional ones take their defaults (a chunk_id of -1, say)
            defaults = {f.name: _default(f) for f in fields if f.name in gone}
            assert same_message(outcome, dataclasses.replace(message, **defaults))


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


class TestHostileBytes:
    """Whatever the bytes, decode returns the asked type or raises DecodeError with a slug."""

    @FUZZ
    @given(st.binary(max_size=4096), TYPES)
    @example(b"", m.Result)
    @example(b"\xc1", m.Result)
    @example(b"\x91" * 100_000, m.TaskChunk)
    @example(b"\xdd\xff\xff\xff\xff", m.PullRequest)
    def test_random_bytes(self, data: bytes, cls: type) -> None:
        check_outcome(data, cls)

    @FUZZ
    @given(TYPES, st.data())
    def test_hostile_payloads(self, cls: type, data: st.DataObject) -> None:
        check_outcome(data.draw(hostile_payloads(cls)), cls)

    @FUZZ
    @given(ANY_MESSAGE, st.data())
    def test_byte_damage(self, message: Any, data: st.DataObject) -> None:
        check_outcome(data.draw(damaged_bytes(encode(message))), type(message))

    @ROUND_TRIP
    @given(ANY_MESSAGE, st.data())
    def test_truncated_is_malformed(self, message: Any, data: st.DataObject) -> None:
        raw = encode(message)
        cut = data.draw(st.integers(0, len(raw) - 1))
        assert reason_of(raw[:cut], type(message)) == "malformed"

    @ROUND_TRIP
    @given(ANY_MESSAGE, st.binary(min_size=1, max_size=64))
    def test_extended_is_malformed(self, message: Any, tail: bytes) -> None:
        assert reason_of(encode(message) + tail, type(message)) == "malformed"

    @ROUND_TRIP
    @given(TYPES, st.data())
    def test_any_buffer_type_gives_the_same_answer(self, cls: type, data: st.DataObject) -> None:
        raw = data.draw(hostile_payloads(cls))
        outcomes = [decode_outcome(b, cls) for b in (raw, bytearray(raw), memoryview(raw))]
        if isinstance(outcomes[0], DecodeError):
            assert {o.reason for o in outcomes} == {outcomes[0].reason}
        else:
            assert all(same_message(o, outcomes[0]) for o in outcomes)

    @pytest.mark.parametrize("value", ["text", None, 42, [b"x"], bytearray])
    def test_not_bytes_is_wrong_type(self, value: Any) -> None:
        assert reason_of(value, m.Result) == "wrong_type"


class TestHostileFields:
    """msgpack-level mutations decode to a valid message or are refused with the right reason."""

    @FUZZ
    @given(TYPES, st.data())
    def test_mutated_fields(self, cls: type, data: st.DataObject) -> None:
        pairs = data.draw(messages(cls).flatmap(mutated_pairs))
        check_outcome(pack_pairs(pairs), cls)

    @ROUND_TRIP
    @given(ANY_MESSAGE, NASTY | WIRE_INTS | st.text(max_size=8) | st.lists(WIRE_INTS))
    def test_wrong_version(self, message: Any, version: Any) -> None:
        assume(not (type(version) is int and version == 1))
        data = pack_pairs(replaced(body_pairs(message), "v", version))
        assert reason_of(data, type(message)) == "unknown_version"

    @ROUND_TRIP
    @given(ANY_MESSAGE, st.sampled_from([c.TYPE for c in m.MESSAGE_TYPES]) | NASTY | st.text())
    def test_wrong_tag(self, message: Any, tag: Any) -> None:
        assume(tag != type(message).TYPE)
        data = pack_pairs(replaced(body_pairs(message), "type", tag))
        assert reason_of(data, type(message)) == "wrong_message_type"

    @pytest.mark.parametrize("topic", [".", "..", "", "a/b", "t" * 250, "tasks topic"])
    @pytest.mark.parametrize(
        ("cls", "field"), [(m.TaskChunk, "reply_topic"), (m.DeadLetter, "source_topic")]
    )
    def test_topics_kafka_refuses(self, cls: type, field: str, topic: str) -> None:
        # "." and ".." pass the character rule; Kafka refuses them, and a gateway that
        # tried to write a result there crashed on the producer's exception
        data = pack_pairs(replaced(body_pairs(SMALL[cls]), field, topic))
        assert reason_of(data, cls) == "bad_value"

    @ROUND_TRIP
    @given(ANY_MESSAGE, st.data())
    def test_duplicate_keys_last_one_wins(self, message: Any, data: st.DataObject) -> None:
        # Given a map where one key appears twice, the first time with any value at all
        pairs = body_pairs(message)
        key = data.draw(st.sampled_from([k for k, _ in pairs]))
        early = data.draw(NASTY | WIRE_INTS | st.floats() | st.text(max_size=8))
        twice = [(key, early), *pairs]
        # Then it decodes exactly as the map holding only the last value: every reader of
        # parkpool's wire uses this codec, so no two of them can disagree on a message
        assert _same_outcome(decode_outcome(pack_pairs(twice), type(message)), message)
        late = [*pairs, (key, early)]
        alone = replaced(pairs, key, early)
        got = decode_outcome(pack_pairs(late), type(message))
        assert _same_outcome(got, decode_outcome(pack_pairs(alone), type(message)))

    @FUZZ
    @given(forged_arrays(), st.sampled_from([(m.Result, "outputs"), (m.TaskChunk, "inputs")]))
    @example(
        msgpack.ExtType(ARRAY_EXT, b"\x10\x02\x03<f4" + (2**63).to_bytes(8, "little") * 2),
        (m.Result, "outputs"),
    )
    def test_forged_array_headers(self, ext: msgpack.ExtType, where: tuple[type, str]) -> None:
        cls, field = where
        base = SMALL[cls]
        outcome = check_outcome(pack_pairs(replaced(body_pairs(base), field, {"x": ext})), cls)
        if isinstance(outcome, DecodeError):
            assert outcome.reason == "bad_array"
        else:
            array = getattr(outcome, field)["x"]
            assert array.dtype.str in ALLOWED_DTYPES and array.ndim <= MAX_NDIM
            assert not array.flags.writeable
            assert array.nbytes <= len(ext.data)

    @FUZZ
    @given(TYPES, huge_values(), st.data())
    def test_huge_values_anywhere(self, cls: type, value: Any, data: st.DataObject) -> None:
        pairs = body_pairs(data.draw(messages(cls)))
        key = data.draw(st.sampled_from([k for k, _ in pairs]))
        check_outcome(pack_pairs(replaced(pairs, key, value)), cls)


def _same_outcome(got: Any, want: Any) -> bool:
    if isinstance(want, DecodeError) or isinstance(got, DecodeError):
        return (
            isinstance(got, DecodeError)
            and isinstance(want, DecodeError)
            and (got.reason == want.reason)
        )
    return same_message(got, want)


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
    m.CancelJob: m.CancelJob("j", 0.0),
    m.DlqAction: m.DlqAction(m.DlqActionKind.PURGED, 0, 0, 0.0),
}


# --- every field, every wrong kind of value ------------------------------------------

NUMBER_OUT_OF_RANGE = [math.nan, math.inf, -math.inf, -1.0, -5e-324]
# (value, reason) for each kind of field: what every field of that kind must refuse.
REFUSALS: Mapping[str, list[tuple[Any, str]]] = {
    "int": [(-2, "out_of_range"), (-(2**63), "out_of_range"), (2**64 - 1, "out_of_range")]
    + [(v, "wrong_type") for v in (True, 1.5, math.nan, "1", None, [], {})],
    "float": [(v, "out_of_range") for v in NUMBER_OUT_OF_RANGE]
    + [(v, "wrong_type") for v in (True, "1", None, [], {}, b"1")],
    "str": [("x" * 5000, "too_large")] + [(v, "wrong_type") for v in (1, None, b"x", True, [])],
    "enum": [("bogus", "bad_value"), ("", "bad_value")]
    + [(v, "wrong_type") for v in (1, None, b"online", [])],
    "bytes": [(v, "wrong_type") for v in ("x", 1, None, [], True)],
    "map": [(v, "wrong_type") for v in ([], "x", 1, None, True)],
    "record": [(v, "wrong_type") for v in ([], "x", 1, None, True)],
    "records": [(v, "wrong_type") for v in ({}, "x", 1, None, [1], ["x"], [[]])],
    "names": [(v, "wrong_type") for v in ({}, "x", 1, None, [1], [None], [b"k"])],
}


def _kind(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "enum"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return "record"
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        return "names" if inner is str else "records"
    if origin is not None and issubclass(origin, Mapping):
        return "map"
    return {int: "int", float: "float", str: "str", bytes: "bytes"}[hint]


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
    current = dict(pairs)[nested]
    if dataclasses.is_dataclass(current):
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
