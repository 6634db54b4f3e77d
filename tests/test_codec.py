# SPDX-License-Identifier: Apache-2.0
"""The msgpack codec: arrays and messages round-trip exactly; hostile bytes raise DecodeError."""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from parkpool.schemas import codec
from parkpool.schemas import messages as m
from parkpool.schemas.codec import ALLOWED_DTYPES, ARRAY_EXT, MAX_NDIM, decode, encode, peek_type
from parkpool.schemas.errors import DecodeError
from parkpool.schemas.reputation import CarState, Evidence, Level

DTYPES = sorted(ALLOWED_DTYPES)
FAST = settings(max_examples=40, deadline=None)


def example_messages() -> dict[type, Any]:
    """One valid, non-trivial instance of every message type."""
    task = m.TaskChunk(
        job_id="job-1",
        chunk_id=2,
        n_chunks=4,
        kernel="matmul",
        params={"alpha": 0.5, "steps": [1, 2, 3], "opts": {"fast": True, "tag": None}},
        inputs={"a": np.arange(6, dtype="<f4").reshape(2, 3), "b": np.ones(3, dtype=">i8")},
        reply_topic="parkpool.results",
        deadline=1_700_000_100.0,
        created_at=1_700_000_000.5,
        attempt=1,
        priority=m.Priority.HIGH,
    )
    caps = m.Capabilities(backend="cuda", kernels=("matmul", "saxpy"), device_memory_bytes=2**33)
    assignment = m.Assignment(
        gateway_id="gw-1",
        vehicle_id="car-7",
        epoch=9,
        attempt=2,
        lease_deadline=1_700_000_060.0,
        task=encode(task),
        queued=12,
    )
    return {
        m.TaskChunk: task,
        m.Assignment: assignment,
        m.AssignmentBatch: m.AssignmentBatch(
            gateway_id="gw-1",
            vehicle_id="car-7",
            assignments=(encode(assignment), encode(dataclasses.replace(assignment, epoch=10))),
            queued=11,
        ),
        m.Result: m.Result(
            job_id="job-1",
            chunk_id=2,
            n_chunks=4,
            vehicle_id="car-7",
            gateway_id="gw-1",
            epoch=9,
            attempt=2,
            outputs={"c": np.eye(3, dtype="<c16")},
            exec_seconds=0.25,
            finished_at=1_700_000_010.0,
            task_created_at=1_700_000_000.5,
        ),
        m.Nack: m.Nack(
            job_id="job-1",
            chunk_id=2,
            vehicle_id="car-7",
            gateway_id="gw-1",
            epoch=9,
            reason=m.NackReason.KERNEL_ERROR,
            detail="CUDA error: out of memory",
        ),
        m.PullRequest: m.PullRequest(
            vehicle_id="car-7",
            credits=3,
            capabilities=caps,
            seen={"gw-1": 3, "gw-2": 0},
            grants={"gw-1": 2, "gw-2": 1},
        ),
        m.VehicleStatus: m.VehicleStatus(
            vehicle_id="car-7",
            state=m.VehicleState.DRAINING,
            sent_at=1.5,
            reason="owner",
            held=1,
            primary=True,
        ),
        m.GatewayStatus: m.GatewayStatus(
            gateway_id="gw-1", state=m.GatewayState.ONLINE, sent_at=2.0, queued=17
        ),
        m.DeadLetter: m.DeadLetter(
            reason="max_attempts",
            detail="failed 3 times",
            source_topic="parkpool.tasks",
            partition=1,
            offset=42,
            original=encode(task),
            dead_at=3.0,
            gateway_id="gw-1",
            job_id="job-1",
            chunk_id=2,
            attempts=(m.AttemptRecord(vehicle_id="car-7", reason="kernel_error", at=2.5),),
        ),
        m.LeaseHeartbeat: m.LeaseHeartbeat(
            job_id="job-1",
            chunk_id=2,
            vehicle_id="car-7",
            gateway_id="gw-1",
            epoch=9,
            sent_at=1_700_000_005.0,
            progress=0.75,
        ),
        m.Revoke: m.Revoke(gateway_id="gw-1", vehicle_id="car-7", epoch=9, reason="job_cancelled"),
        m.CancelJob: m.CancelJob(job_id="job-1", requested_at=1_700_000_004.0, reason="timeout"),
        m.JobSubmitted: m.JobSubmitted(
            job_id="job-1",
            kernel="gemm",
            n_chunks=16,
            reply_topic="acme.results",
            submitted_at=1_700_000_004.0,
            sealed=True,
        ),
        m.DlqAction: m.DlqAction(
            action=m.DlqActionKind.PURGED, partition=1, offset=42, at=4.0, note="bad input"
        ),
        m.CarTally: m.CarTally("car-7", "sdk-1", 2, 40, 1, 7, 1_700_000_006.0),
        m.QuarantineNotice: m.QuarantineNotice(
            "car-7",
            CarState.QUARANTINED,
            2,
            1_700_000_007.0,
            "sdk-1",
            "wrong_result",
            (Evidence("job-1", 2, Level.ALGEBRAIC, "Freivalds residual 9.1 over 0.4", 6.5),),
        ),
    }


EXAMPLES = example_messages()
RESULT = EXAMPLES[m.Result]


def body_of(message: Any) -> dict[str, Any]:
    """The wire map of a message, ready to be tampered with and packed again."""
    return {"v": codec.WIRE_VERSION, "type": type(message).TYPE, **codec._fields_of(message)}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=codec._default, use_bin_type=True)  # type: ignore[no-any-return]


def reason_of(data: bytes | bytearray | memoryview, expect: type = m.Result) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, expect)
    return info.value.reason


def roundtrip_array(array: np.ndarray) -> np.ndarray:
    message = dataclasses.replace(RESULT, outputs={"x": array})
    return decode(encode(message), m.Result).outputs["x"]


def assert_same_array(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype.str == want.dtype.str
    assert got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=want.dtype.kind in "fc")
    assert got.tobytes() == want.tobytes()  # bit for bit: NaN payloads, -0.0


def assert_same_message(got: Any, want: Any) -> None:
    assert type(got) is type(want)
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, Mapping):
            assert isinstance(a, MappingProxyType)
            assert a.keys() == b.keys()
            for key, value in b.items():
                if isinstance(value, np.ndarray):
                    assert_same_array(a[key], value)
                else:
                    assert a[key] == value
        else:
            assert a == b, f.name


def array_payload(
    dtype: str = "<f4", shape: tuple[int, ...] = (2,), data: bytes | None = None, **override: int
) -> bytes:
    """An ARRAY_EXT payload laid out as codec.py documents; ``override`` bends the header."""
    raw = dtype.encode()
    ndim = override.get("ndim", len(shape))
    head = struct.pack("<BBB", 0, ndim, len(raw)) + raw + struct.pack(f"<{len(shape)}Q", *shape)
    size = override.get("size", -(-len(head) // 16) * 16)
    head = bytes([size]) + head[1:] + bytes(max(0, size - len(head)))
    if data is None:
        data = bytes(math.prod(shape) * np.dtype(dtype).itemsize)
    return head + data


def with_output(payload: bytes, code: int = ARRAY_EXT) -> bytes:
    body = body_of(RESULT)
    body["outputs"] = {"x": msgpack.ExtType(code, payload)}
    return pack(body)


class TestArrayRoundTrip:
    """Every allowed dtype and shape comes back exactly, as a read-only aligned view."""

    @FAST
    @given(
        hnp.arrays(
            dtype=st.sampled_from(DTYPES).map(np.dtype),
            shape=hnp.array_shapes(min_dims=0, max_dims=MAX_NDIM, min_side=0, max_side=3),
        )
    )
    def test_any_dtype_and_shape(self, array: np.ndarray) -> None:
        assert_same_array(roundtrip_array(array), array)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3), (1,) * MAX_NDIM])
    def test_every_dtype(self, dtype: str, shape: tuple[int, ...]) -> None:
        # Given an array of this dtype with distinct values, when it round-trips,
        array = (np.arange(math.prod(shape)) % 7).astype(dtype).reshape(shape)
        got = roundtrip_array(array)
        # then it is equal, and a read-only, aligned view over the message bytes.
        assert_same_array(got, array)
        assert not got.flags.writeable
        assert got.flags.aligned
        assert not got.flags.owndata
        assert isinstance(self.buffer_under(got), bytes)

    @pytest.mark.parametrize(
        "view",
        [
            lambda a: a.T,
            lambda a: a[::2, ::-1, 1:],
            lambda a: a[:, 1],
            np.asfortranarray,
            lambda a: a.astype(a.dtype.newbyteorder()).T,
        ],
        ids=["transposed", "strided", "sliced", "fortran", "byteswapped"],
    )
    @pytest.mark.parametrize("dtype", ["<f8", "<i4", ">u2", "<c8", "|b1"])
    def test_non_contiguous_input(self, view: Callable[..., np.ndarray], dtype: str) -> None:
        array = view(np.arange(60).reshape(3, 4, 5).astype(dtype))
        got = roundtrip_array(array)
        assert_same_array(got, array)
        assert got.flags.c_contiguous

    def test_special_floats(self) -> None:
        array = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 5e-324, 1e308], dtype=">f8")
        assert_same_array(roundtrip_array(array), array)

    def test_large_array(self) -> None:
        array = np.random.default_rng(1).standard_normal((1024, 2048), dtype=np.float32)
        got = roundtrip_array(array)
        assert_same_array(got, array)
        assert not got.flags.owndata

    def test_writing_to_a_decoded_array_fails(self) -> None:
        got = roundtrip_array(np.zeros(4, dtype="<f4"))
        with pytest.raises(ValueError, match="read-only"):
            got[0] = 1.0

    @staticmethod
    def buffer_under(array: np.ndarray) -> object:
        base: object = array
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        return base


class TestEncodeRefuses:
    """Arrays that cannot travel are refused when encoding, with TypeError."""

    @pytest.mark.parametrize(
        "array",
        [
            np.array([{}, None], dtype=object),
            np.array(["abcd"], dtype="<U4"),
            np.zeros(2, dtype="|V8"),
            np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]),
            np.zeros(2, dtype="<M8[ns]"),
            np.zeros((1,) * (MAX_NDIM + 1), dtype="<f4"),
        ],
        ids=["object", "unicode", "void", "structured", "datetime", "9-d"],
    )
    def test_bad_array(self, array: np.ndarray) -> None:
        with pytest.raises(TypeError):
            encode(dataclasses.replace(RESULT, outputs={"x": array}))

    def test_not_a_message(self) -> None:
        with pytest.raises(TypeError):
            encode(m.Capabilities(backend="cpu", kernels=()))


class TestMessageRoundTrip:
    """Every message type decodes to an equal message and re-encodes to the same bytes."""

    def test_examples_cover_every_type(self) -> None:
        assert set(EXAMPLES) == set(m.MESSAGE_TYPES)

    @pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.__name__)
    def test_round_trip(self, cls: type) -> None:
        data = encode(EXAMPLES[cls])
        got = decode(data, cls)
        assert_same_message(got, EXAMPLES[cls])
        assert encode(got) == data
        assert peek_type(data) == cls.TYPE  # type: ignore[attr-defined]

    @pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
    def test_any_bytes_like(self, wrap: Callable[[bytes], Any]) -> None:
        assert_same_message(decode(wrap(encode(RESULT)), m.Result), RESULT)

    def test_assignment_carries_the_task_bytes_untouched(self) -> None:
        assignment = decode(encode(EXAMPLES[m.Assignment]), m.Assignment)
        assert_same_message(decode(assignment.task, m.TaskChunk), EXAMPLES[m.TaskChunk])

    def test_unknown_fields_are_ignored(self) -> None:
        body = body_of(RESULT) | {"added_in_a_minor_version": [1, 2]}
        assert_same_message(decode(pack(body), m.Result), RESULT)

    @pytest.mark.parametrize(
        ("cls", "field", "default"),
        [(m.PullRequest, "grants", {}), (m.GatewayStatus, "queued", 0)],
    )
    def test_fields_added_later_are_optional(self, cls: type, field: str, default: Any) -> None:
        # Given a message from a writer that predates the field, when it is decoded,
        body = body_of(EXAMPLES[cls])
        del body[field]
        # then the field holds its default.
        assert getattr(decode(pack(body), cls), field) == default


class TestSharedTopics:
    """Topics that carry two message types are told apart by the type tag alone."""

    @pytest.mark.parametrize(
        ("first", "second"),
        [(m.TaskChunk, m.CancelJob), (m.Assignment, m.Revoke), (m.DeadLetter, m.DlqAction)],
        ids=["tasks", "vehicle-task", "deadletter"],
    )
    def test_peek_then_decode(self, first: type, second: type) -> None:
        for cls, other in ((first, second), (second, first)):
            # Given a record of one type on the shared topic,
            data = encode(EXAMPLES[cls])
            # then its tag names its type, it decodes as that type,
            assert peek_type(data) == cls.TYPE  # type: ignore[attr-defined]
            assert_same_message(decode(data, cls), EXAMPLES[cls])
            # and a reader expecting the other type refuses it.
            assert reason_of(data, other) == "wrong_message_type"


class TestEnvelopeErrors:
    """A defective envelope raises DecodeError with a stable reason."""

    def test_empty(self) -> None:
        assert reason_of(b"") == "malformed"

    def test_not_bytes(self) -> None:
        assert reason_of("text") == "wrong_type"  # type: ignore[arg-type]

    def test_too_large(self) -> None:
        assert reason_of(bytes(codec.MAX_MESSAGE_BYTES + 1)) == "too_large"

    @pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.__name__)
    def test_every_truncation(self, cls: type) -> None:
        data = encode(EXAMPLES[cls])
        for n in range(len(data)):
            assert reason_of(data[:n], cls) == "malformed", n

    def test_trailing_bytes(self) -> None:
        assert reason_of(encode(RESULT) + b"\xc0") == "malformed"

    @pytest.mark.parametrize("value", [[1, 2], "result", 7, None, b"\x01"])
    def test_not_a_map(self, value: object) -> None:
        assert reason_of(pack(value)) == "not_a_map"

    @pytest.mark.parametrize("version", [0, 2, "1", 1.0, True, None])
    def test_unknown_version(self, version: object) -> None:
        assert reason_of(pack(body_of(RESULT) | {"v": version})) == "unknown_version"

    def test_missing_version(self) -> None:
        body = body_of(RESULT)
        del body["v"]
        assert reason_of(pack(body)) == "unknown_version"

    def test_wrong_type_tag(self) -> None:
        assert reason_of(encode(EXAMPLES[m.Nack]), m.Result) == "wrong_message_type"
        assert reason_of(pack(body_of(RESULT) | {"type": None})) == "wrong_message_type"

    def test_non_string_map_key(self) -> None:
        assert reason_of(pack({1: 2, "v": 1})) == "malformed"

    @pytest.mark.parametrize("raw", [b"\xc1", b"\xff" * 3, b"\x81\xa1v\xc1"])
    def test_invalid_msgpack(self, raw: bytes) -> None:
        assert reason_of(raw) == "malformed"

    def test_deep_msgpack_nesting(self) -> None:
        assert reason_of(b"\x91" * 100_000 + b"\xc0") == "malformed"

    @pytest.mark.parametrize(
        "raw",
        [
            b"\x81\xa1v\xdb\xff\xff\xff\xff",  # str 32 of 4 GiB
            b"\x81\xa1v\xc6\xff\xff\xff\xff",  # bin 32
            b"\x81\xa1v\xdd\xff\xff\xff\xff",  # array 32 of 4G items
            b"\xdf\xff\xff\xff\xff",  # map 32
            b"\x81\xa1v\xc9\xff\xff\xff\xff\x01",  # ext 32
        ],
        ids=["str", "bin", "array", "map", "ext"],
    )
    def test_declared_length_beyond_buffer(self, raw: bytes) -> None:
        assert reason_of(raw) == "malformed"


class TestFieldErrors:
    """Fields of the wrong kind or value are refused through the constructors."""

    @pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.__name__)
    def test_missing_required_field(self, cls: type) -> None:
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                body = body_of(EXAMPLES[cls])
                del body[f.name]
                assert reason_of(pack(body), cls) == "missing_field", f.name

    @pytest.mark.parametrize(
        ("field", "value", "reason"),
        [
            ("chunk_id", "1", "wrong_type"),
            ("chunk_id", True, "wrong_type"),
            ("epoch", 1.0, "wrong_type"),
            ("epoch", 0, "out_of_range"),
            ("n_chunks", -1, "out_of_range"),
            ("chunk_id", 4, "out_of_range"),  # not below n_chunks
            ("finished_at", math.nan, "out_of_range"),
            ("finished_at", math.inf, "out_of_range"),
            ("exec_seconds", -math.inf, "out_of_range"),
            ("task_created_at", "yesterday", "wrong_type"),
            ("task_created_at", False, "wrong_type"),
            ("job_id", "job/1", "bad_value"),
            ("job_id", "job\n", "bad_value"),
            ("job_id", b"job-1", "wrong_type"),
            ("vehicle_id", "car+7", "bad_value"),
            ("outputs", [1, 2], "wrong_type"),
            ("outputs", {"x": [1.0, 2.0]}, "wrong_type"),
            ("outputs", {"bad name": np.zeros(1)}, "bad_value"),
            ("outputs", {f"a{i}": np.zeros(1) for i in range(65)}, "too_large"),
        ],
    )
    def test_result_field(self, field: str, value: object, reason: str) -> None:
        assert reason_of(pack(body_of(RESULT) | {field: value})) == reason

    @pytest.mark.parametrize(
        ("cls", "field", "value", "reason"),
        [
            (m.TaskChunk, "params", [1], "wrong_type"),
            (m.TaskChunk, "params", {"a": [[[[[1]]]]]}, "too_large"),
            (m.TaskChunk, "params", {"a": list(range(5000))}, "too_large"),
            (m.TaskChunk, "params", {"a": math.nan}, "bad_value"),
            (m.TaskChunk, "params", {"a": b"\x00"}, "wrong_type"),
            (m.TaskChunk, "params", {"a": {b"k": 1}}, "wrong_type"),
            (m.TaskChunk, "priority", "urgent", "bad_value"),
            (m.TaskChunk, "reply_topic", "a topic", "bad_value"),
            (m.Assignment, "task", "not bytes", "wrong_type"),
            (m.Nack, "reason", "bored", "bad_value"),
            (m.Nack, "reason", 1, "wrong_type"),
            (m.PullRequest, "credits", 10_000, "out_of_range"),
            (m.PullRequest, "capabilities", "cuda", "wrong_type"),
            (m.PullRequest, "capabilities", {"kernels": []}, "missing_field"),
            (m.PullRequest, "capabilities", {"backend": "x", "kernels": "abc"}, "wrong_type"),
            (m.PullRequest, "seen", [1], "wrong_type"),
            (m.PullRequest, "seen", {"gw-1": -1}, "out_of_range"),
            (m.PullRequest, "grants", {"gw-1": 3, "gw-2": 1}, "bad_value"),  # 4 > 3 credits
            (m.PullRequest, "credits", 2, "bad_value"),  # below the grants' sum of 3
            (m.PullRequest, "grants", [1], "wrong_type"),
            (m.PullRequest, "grants", {"gw/1": 1}, "bad_value"),
            (m.PullRequest, "grants", {"gw-1": -1}, "out_of_range"),
            (m.PullRequest, "grants", {"gw-1": 1.0}, "wrong_type"),
            (m.PullRequest, "grants", {"gw-1": True}, "wrong_type"),
            (m.VehicleStatus, "state", "asleep", "bad_value"),
            (m.VehicleStatus, "reason", "x" * 5000, "too_large"),
            (m.GatewayStatus, "sent_at", None, "wrong_type"),
            (m.GatewayStatus, "queued", -1, "out_of_range"),
            (m.GatewayStatus, "queued", "many", "wrong_type"),
            (m.LeaseHeartbeat, "progress", 1.5, "out_of_range"),
            (m.LeaseHeartbeat, "progress", -0.01, "out_of_range"),
            (m.LeaseHeartbeat, "progress", math.nan, "out_of_range"),
            (m.LeaseHeartbeat, "progress", "half", "wrong_type"),
            (m.LeaseHeartbeat, "epoch", 0, "out_of_range"),
            (m.LeaseHeartbeat, "gateway_id", "gw+1", "bad_value"),
            (m.Revoke, "epoch", 0, "out_of_range"),
            (m.Revoke, "reason", "job cancelled", "bad_value"),
            (m.Revoke, "vehicle_id", None, "wrong_type"),
            (m.CancelJob, "job_id", "job/1", "bad_value"),
            (m.CancelJob, "requested_at", math.inf, "out_of_range"),
            (m.CancelJob, "reason", "", "bad_value"),
            (m.JobSubmitted, "n_chunks", 0, "out_of_range"),
            (m.JobSubmitted, "reply_topic", "..", "bad_value"),
            (m.JobSubmitted, "sealed", "yes", "wrong_type"),
            (m.DlqAction, "action", "deleted", "bad_value"),
            (m.DlqAction, "action", 1, "wrong_type"),
            (m.DlqAction, "partition", -1, "out_of_range"),
            (m.DlqAction, "offset", 1.5, "wrong_type"),
            (m.DlqAction, "note", None, "wrong_type"),
            (m.DeadLetter, "attempts", {"a": 1}, "wrong_type"),
            (m.DeadLetter, "attempts", [1], "wrong_type"),
            (m.DeadLetter, "attempts", [{"vehicle_id": "v", "reason": "r"}], "missing_field"),
            (m.DeadLetter, "chunk_id", -2, "out_of_range"),
        ],
    )
    def test_field(self, cls: type, field: str, value: object, reason: str) -> None:
        assert reason_of(pack(body_of(EXAMPLES[cls]) | {field: value}), cls) == reason

    def test_timestamp_ext_is_not_a_number(self) -> None:
        # msgpack decodes ext -1 itself (a Timestamp), so validation is what refuses it.
        body = body_of(RESULT) | {"finished_at": msgpack.Timestamp(1, 0)}
        assert reason_of(pack(body)) == "wrong_type"


class TestArrayErrors:
    """A defective array ext is refused with reason bad_array or unknown_ext."""

    def test_valid_payload_decodes(self) -> None:
        # The hand-built layout matches the codec, so the failures below are the defects.
        got = decode(with_output(array_payload("<f4", (2, 3))), m.Result).outputs["x"]
        assert got.shape == (2, 3)

    @pytest.mark.parametrize("code", [0, 2, 5, 127])
    def test_unknown_ext_code(self, code: int) -> None:
        assert reason_of(with_output(array_payload(), code)) == "unknown_ext"

    @pytest.mark.parametrize("dtype", ["|O", "<U4", "|V8", "<M8[ns]", "<f", "f4", "<f4\x00"])
    def test_disallowed_dtype(self, dtype: str) -> None:
        assert reason_of(with_output(array_payload(dtype, (2,), data=bytes(16)))) == "bad_array"

    @pytest.mark.parametrize(
        ("payload", "why"),
        [
            (b"", "empty"),
            (b"\x10\x01", "shorter than the fixed header"),
            (array_payload(shape=(1,) * 9), "ndim above 8"),
            (array_payload(size=24), "header length not a multiple of 16"),
            (array_payload(shape=(1,) * 8, size=16), "header length cuts into the shape"),
            (array_payload(size=0), "header length zero"),
            (array_payload(size=240)[:100], "header length beyond the payload"),
            (array_payload(ndim=3), "ndim larger than the shape written"),
            (array_payload(shape=(2**40,), data=b""), "huge shape, no data"),
            (array_payload(shape=(2**32, 2**32), data=b""), "shape whose size overflows int64"),
            (array_payload(shape=(0, 2**63), data=b""), "empty, but a dimension numpy refuses"),
            (array_payload(shape=(0, 2**62, 4), data=b""), "empty, but too big for numpy"),
            (array_payload(shape=(3,), data=bytes(11)), "one byte short"),
            (array_payload(shape=(3,), data=bytes(13)), "one byte extra"),
        ],
        ids=lambda v: v if isinstance(v, str) else "",
    )
    def test_bad_header(self, payload: bytes, why: str) -> None:
        assert reason_of(with_output(payload)) == "bad_array", why


MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


class TestFuzz:
    """Whatever the bytes, decoding either succeeds or raises DecodeError; it never hangs."""

    @FAST
    @given(st.binary(max_size=512), st.sampled_from(m.MESSAGE_TYPES))
    def test_random_bytes(self, data: bytes, cls: type) -> None:
        self.decode_or_decode_error(data, cls)
        assert peek_type(data) is None or isinstance(peek_type(data), str)

    @FAST
    @given(st.sampled_from(m.MESSAGE_TYPES), st.data())
    def test_flipped_bytes(self, cls: type, data: st.DataObject) -> None:
        raw = bytearray(encode(EXAMPLES[cls]))
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        self.decode_or_decode_error(bytes(raw), cls)

    @FAST
    @given(st.sampled_from(m.MESSAGE_TYPES), st.data())
    def test_any_value_in_any_field(self, cls: type, data: st.DataObject) -> None:
        body = body_of(EXAMPLES[cls])
        body[data.draw(st.sampled_from(sorted(body)))] = data.draw(MSGPACK_VALUES)
        self.decode_or_decode_error(pack(body), cls)

    @staticmethod
    def decode_or_decode_error(data: bytes, cls: type) -> None:
        try:
            message = decode(data, cls)
        except DecodeError as exc:
            assert exc.reason and isinstance(exc.reason, str)
        else:
            assert isinstance(message, cls)
