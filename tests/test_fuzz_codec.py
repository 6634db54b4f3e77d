# SPDX-License-Identifier: Apache-2.0
"""Property-based tests of the codec against hostile input.

For every message type: valid messages built field by field round-trip exactly, and any
bytes at all either decode to the type asked for or raise DecodeError with a reason slug,
quickly. Nothing else may escape: the gateway and the worker catch only DecodeError.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from parkpool.schemas import messages as m
from parkpool.schemas.codec import (
    ALLOWED_DTYPES,
    ARRAY_EXT,
    MAX_NDIM,
    decode,
    encode,
    peek_type,
)
from parkpool.schemas.errors import DecodeError
from tests.fuzz_hostile import (
    MSGPACK_VALUES,
    NASTY,
    damaged_bytes,
    forged_arrays,
    hostile_payloads,
    huge_values,
    mutated_pairs,
)
from tests.fuzz_messages import (
    ANY_MESSAGE,
    SMALL,
    TAGS,
    body_pairs,
    check_outcome,
    decode_outcome,
    messages,
    pack_pairs,
    reason_of,
    replaced,
    same_message,
)

TYPES = st.sampled_from(m.MESSAGE_TYPES)
WIRE_INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
# A decode is a handful of dict operations per field; half a second is a hang.
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(milliseconds=500),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROUND_TRIP = settings(max_examples=100, deadline=timedelta(milliseconds=500))


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
    if f.default is not dataclasses.MISSING:
        return f.default
    return typing.cast(Callable[[], Any], f.default_factory)()


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
    @given(ANY_MESSAGE, st.sampled_from(TAGS) | NASTY | st.text())
    def test_wrong_tag(self, message: Any, tag: Any) -> None:
        assume(tag != message.TYPE)
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
