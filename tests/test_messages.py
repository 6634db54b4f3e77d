# SPDX-License-Identifier: Apache-2.0
"""Message dataclasses validate on construction and stay immutable; topic names are fixed."""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest

from parkpool.schemas import messages as m
from parkpool.schemas.errors import DecodeError, ValidationError
from parkpool.schemas.topics import DEFAULT_NAMESPACE, KafkaTopics, MqttTopics

CAPS = m.Capabilities(backend="cuda", kernels=("matmul",))
VALID: dict[type, dict[str, Any]] = {
    m.TaskChunk: {
        "job_id": "job-1",
        "chunk_id": 0,
        "n_chunks": 2,
        "kernel": "matmul",
        "params": {"alpha": 1.0},
        "inputs": {"a": np.zeros(2)},
        "reply_topic": "parkpool.results",
        "deadline": 100.0,
        "created_at": 1.0,
    },
    m.Assignment: {
        "gateway_id": "gw-1",
        "vehicle_id": "car-1",
        "epoch": 1,
        "attempt": 1,
        "lease_deadline": 10.0,
        "task": b"\x80",
    },
    m.Result: {
        "job_id": "job-1",
        "chunk_id": 1,
        "n_chunks": 2,
        "vehicle_id": "car-1",
        "gateway_id": "gw-1",
        "epoch": 1,
        "attempt": 1,
        "outputs": {"c": np.ones(2)},
        "exec_seconds": 0.5,
        "finished_at": 2.0,
        "task_created_at": 1.0,
    },
    m.Nack: {
        "job_id": "job-1",
        "chunk_id": 0,
        "vehicle_id": "car-1",
        "gateway_id": "gw-1",
        "epoch": 1,
        "reason": "expired",
    },
    m.PullRequest: {"vehicle_id": "car-1", "credits": 2, "capabilities": CAPS},
    m.VehicleStatus: {"vehicle_id": "car-1", "state": "online", "sent_at": 1.0},
    m.GatewayStatus: {"gateway_id": "gw-1", "state": "online", "sent_at": 1.0},
    m.DeadLetter: {
        "reason": "invalid_task",
        "detail": "unknown kernel",
        "source_topic": "parkpool.tasks",
        "partition": 0,
        "offset": 7,
        "original": b"\x00",
        "dead_at": 3.0,
        "gateway_id": "gw-1",
    },
    m.LeaseHeartbeat: {
        "job_id": "job-1",
        "chunk_id": 0,
        "vehicle_id": "car-1",
        "gateway_id": "gw-1",
        "epoch": 1,
        "sent_at": 5.0,
    },
    m.Revoke: {"gateway_id": "gw-1", "vehicle_id": "car-1", "epoch": 1, "reason": "job_cancelled"},
    m.AssignmentBatch: {
        "gateway_id": "gw-1",
        "vehicle_id": "car-1",
        "assignments": [b"\x80", b"\x81"],
        "queued": 3,
    },
    m.CancelJob: {"job_id": "job-1", "requested_at": 4.0},
    m.JobSubmitted: {
        "job_id": "job-1",
        "kernel": "gemm",
        "n_chunks": 4,
        "reply_topic": "acme.results",
        "submitted_at": 4.0,
    },
    m.DlqAction: {"action": "replayed", "partition": 0, "offset": 3, "at": 6.0},
    m.CarTally: {
        "vehicle_id": "car-1",
        "writer": "sdk-1",
        "generation": 0,
        "valid": 3,
        "invalid": 0,
        "unchecked": 1,
        "at": 7.0,
    },
    m.QuarantineNotice: {
        "vehicle_id": "car-1",
        "state": "released",
        "generation": 1,
        "at": 8.0,
        "by": "operator",
        "reason": "released",
    },
    m.Capabilities: {"backend": "cuda", "kernels": ["matmul", "saxpy"]},
    m.AttemptRecord: {"vehicle_id": "car-1", "reason": "kernel_error", "at": 2.0},
}
MAPPING_FIELDS = [
    (m.TaskChunk, "params"),
    (m.TaskChunk, "inputs"),
    (m.Result, "outputs"),
    (m.PullRequest, "seen"),
    (m.PullRequest, "grants"),
]

# One level per vehicle, no gateway id: its tasks, and its last will (on ".../status").
VEHICLE_KINDS = {"will": "status", "task": "task"}
# Topics to one gateway only: the car's K gateways (pull, status) or the lease holder.
TO_GATEWAY_KINDS = ["pull", "status", "result", "nack", "heartbeat"]

NACK_TABLE = {  # reason: (terminal, counts_as_failure)
    m.NackReason.RELEASED: (False, False),
    m.NackReason.KERNEL_ERROR: (False, True),
    m.NackReason.INVALID_TASK: (True, True),
    m.NackReason.EXPIRED: (False, False),
    m.NackReason.BUSY: (False, False),
    m.NackReason.FETCH_FAILED: (False, False),  # the store may be back for the next car
    m.NackReason.BAD_DATA: (False, True),  # a bad object fails every car: it must end
}


def make(cls: type, **override: Any) -> Any:
    return cls(**(VALID[cls] | override))


def reason_of(cls: type, **override: Any) -> str:
    with pytest.raises(ValidationError) as info:
        make(cls, **override)
    return info.value.reason


class TestConstruction:
    """Valid values build a message; each bad value raises ValidationError with its reason."""

    def test_validation_error_is_a_decode_error(self) -> None:
        assert issubclass(ValidationError, DecodeError)

    @pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
    def test_valid(self, cls: type) -> None:
        assert isinstance(make(cls), cls)

    def test_every_message_type_has_a_valid_example(self) -> None:
        assert set(m.MESSAGE_TYPES) <= set(VALID)

    @pytest.mark.parametrize(
        "grants", [{}, {"gw-1": 2}, {"gw-1": 1, "gw-2": 1}, {"gw-1": 0, "gw-2": 1}]
    )
    def test_grants_up_to_the_credits(self, grants: dict[str, int]) -> None:
        # Given 2 credits, any split that adds up to at most 2 is a valid pull.
        assert make(m.PullRequest, grants=grants).grants == grants

    def test_defaults_of_new_fields(self) -> None:
        assert make(m.PullRequest).grants == {}
        assert make(m.GatewayStatus).queued == 0
        assert make(m.LeaseHeartbeat).progress == 0.0
        assert make(m.CancelJob).reason == "cancelled_by_caller"
        assert make(m.DlqAction).note == ""

    def test_enums_and_sequences_are_normalised(self) -> None:
        # Given plain strings and lists, when the messages are built, then they hold
        # enum members and tuples.
        assert make(m.TaskChunk, priority="high").priority is m.Priority.HIGH
        assert make(m.Nack).reason is m.NackReason.EXPIRED
        assert make(m.VehicleStatus).state is m.VehicleState.ONLINE
        assert make(m.DlqAction).action is m.DlqActionKind.REPLAYED
        assert make(m.Capabilities).kernels == ("matmul", "saxpy")
        record = make(m.AttemptRecord)
        assert make(m.DeadLetter, attempts=[record]).attempts == (record,)

    def test_a_dead_letter_keeps_the_record_whole_or_not_at_all(self) -> None:
        # Given a letter that says how large the record was
        digest = "ab" * 32
        whole = make(m.DeadLetter, original=b"abc", original_size=3, original_sha256=digest)
        # Then its bytes are kept, and a copy without them still says what was read
        assert whole.original_kept
        bare = whole.without_original()
        assert not bare.original_kept
        assert (bare.original, bare.original_size, bare.original_sha256) == (b"", 3, digest)
        # And a letter holding part of a record is refused, since it would replay as another
        assert reason_of(m.DeadLetter, original=b"ab", original_size=3) == "bad_value"
        # And letters from before the size was recorded count as whole
        assert make(m.DeadLetter).original_kept

    def test_keys(self) -> None:
        assert make(m.TaskChunk).key == ("job-1", 0)
        assert make(m.Result).key == ("job-1", 1)

    @pytest.mark.parametrize(
        ("cls", "field", "value", "reason"),
        [
            (m.TaskChunk, "job_id", "", "bad_value"),
            (m.TaskChunk, "job_id", "a" * 65, "bad_value"),
            (m.TaskChunk, "job_id", "job-1\n", "bad_value"),
            (m.TaskChunk, "job_id", 1, "wrong_type"),
            (m.TaskChunk, "n_chunks", 0, "out_of_range"),
            (m.TaskChunk, "n_chunks", m.MAX_CHUNKS + 1, "out_of_range"),
            (m.TaskChunk, "chunk_id", 2, "out_of_range"),
            (m.TaskChunk, "chunk_id", True, "wrong_type"),
            (m.TaskChunk, "kernel", "mat mul", "bad_value"),
            (m.TaskChunk, "params", {"a": {"b": {"c": {"d": {"e": 1}}}}}, "too_large"),
            (m.TaskChunk, "params", {"a": math.inf}, "bad_value"),
            (m.TaskChunk, "params", {"a": object()}, "wrong_type"),
            (m.TaskChunk, "params", {1: "a"}, "wrong_type"),
            (m.TaskChunk, "inputs", {"a": [1.0]}, "wrong_type"),
            (m.TaskChunk, "reply_topic", "a/b", "bad_value"),
            (m.TaskChunk, "deadline", math.nan, "out_of_range"),
            (m.TaskChunk, "created_at", -1.0, "out_of_range"),
            (m.TaskChunk, "attempt", -1, "out_of_range"),
            (m.TaskChunk, "priority", "urgent", "bad_value"),
            (m.Assignment, "vehicle_id", "car/1", "bad_value"),
            (m.Assignment, "epoch", 0, "out_of_range"),
            (m.Assignment, "attempt", 0, "out_of_range"),
            (m.Assignment, "lease_deadline", math.inf, "out_of_range"),
            (m.Assignment, "task", bytearray(b"\x80"), "wrong_type"),
            (m.Result, "gateway_id", "gw#1", "bad_value"),
            (m.Result, "outputs", {"": np.zeros(1)}, "bad_value"),
            (m.Result, "exec_seconds", "0.5", "wrong_type"),
            (m.Nack, "reason", "bored", "bad_value"),
            (m.Nack, "chunk_id", m.MAX_CHUNKS, "out_of_range"),
            (m.Nack, "detail", None, "wrong_type"),
            (m.PullRequest, "credits", m.MAX_CREDITS + 1, "out_of_range"),
            (m.PullRequest, "capabilities", {"backend": "cuda", "kernels": []}, "wrong_type"),
            (m.PullRequest, "seen", {"gw 1": 1}, "bad_value"),
            (m.PullRequest, "seen", {f"gw{i}": 0 for i in range(65)}, "wrong_type"),
            (m.VehicleStatus, "state", "asleep", "bad_value"),
            (m.VehicleStatus, "held", -1, "out_of_range"),
            (m.PullRequest, "grants", {"gw-1": 2, "gw-2": 1}, "bad_value"),  # 3 > 2 credits
            (m.PullRequest, "grants", {"gw-1": m.MAX_CREDITS + 1}, "out_of_range"),
            (m.PullRequest, "grants", {"gw-1": -1}, "out_of_range"),
            (m.PullRequest, "grants", {"gw#1": 1}, "bad_value"),
            (m.PullRequest, "grants", {f"gw{i}": 0 for i in range(65)}, "wrong_type"),
            (m.PullRequest, "grants", [("gw-1", 1)], "wrong_type"),
            (m.GatewayStatus, "state", "draining", "bad_value"),
            (m.GatewayStatus, "queued", -1, "out_of_range"),
            (m.GatewayStatus, "queued", 2.0, "wrong_type"),
            (m.LeaseHeartbeat, "progress", 1.01, "out_of_range"),
            (m.LeaseHeartbeat, "progress", -0.01, "out_of_range"),
            (m.LeaseHeartbeat, "progress", math.inf, "out_of_range"),
            (m.LeaseHeartbeat, "progress", True, "wrong_type"),
            (m.LeaseHeartbeat, "chunk_id", m.MAX_CHUNKS, "out_of_range"),
            (m.LeaseHeartbeat, "vehicle_id", "car 1", "bad_value"),
            (m.LeaseHeartbeat, "epoch", 0, "out_of_range"),
            (m.Revoke, "gateway_id", "gw/1", "bad_value"),
            (m.Revoke, "epoch", 0, "out_of_range"),
            (m.Revoke, "reason", "", "bad_value"),
            (m.CancelJob, "job_id", "", "bad_value"),
            (m.CancelJob, "requested_at", -1.0, "out_of_range"),
            (m.CancelJob, "reason", "not a name", "bad_value"),
            (m.JobSubmitted, "kernel", "not a name", "bad_value"),
            (m.JobSubmitted, "n_chunks", 1_000_001, "out_of_range"),
            (m.JobSubmitted, "submitted_at", -1.0, "out_of_range"),
            (m.DlqAction, "action", "deleted", "bad_value"),
            (m.DlqAction, "action", None, "wrong_type"),
            (m.DlqAction, "partition", 1_000_001, "out_of_range"),
            (m.DlqAction, "offset", -1, "out_of_range"),
            (m.DlqAction, "at", math.nan, "out_of_range"),
            (m.DeadLetter, "reason", "no spaces allowed", "bad_value"),
            (m.DeadLetter, "partition", -1, "out_of_range"),
            (m.DeadLetter, "chunk_id", -2, "out_of_range"),
            (m.DeadLetter, "attempts", ({"vehicle_id": "v"},), "wrong_type"),
            (m.DeadLetter, "attempts", (m.AttemptRecord("v", "r", 1.0),) * 65, "wrong_type"),
            (m.DeadLetter, "original_size", -2, "out_of_range"),
            (m.DeadLetter, "original_sha256", "ABC", "bad_value"),
            (m.Capabilities, "kernels", "matmul", "wrong_type"),
            (m.Capabilities, "kernels", ["x"] * 257, "wrong_type"),
            (m.Capabilities, "kernels", ["bad kernel"], "bad_value"),
            (m.Capabilities, "device_memory_bytes", -1, "out_of_range"),
            (m.AttemptRecord, "at", math.nan, "out_of_range"),
        ],
    )
    def test_bad_value(self, cls: type, field: str, value: object, reason: str) -> None:
        assert reason_of(cls, **{field: value}) == reason


class TestImmutability:
    """Messages are frozen and their mapping fields cannot be changed afterwards."""

    @pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
    def test_frozen(self, cls: type) -> None:
        message = make(cls)
        for f in dataclasses.fields(cls):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(message, f.name, getattr(message, f.name))

    @pytest.mark.parametrize(("cls", "field"), MAPPING_FIELDS)
    def test_mapping_fields_are_read_only_copies(self, cls: type, field: str) -> None:
        # Given a message built from a dict the caller keeps,
        source = dict(VALID[cls].get(field, {"gw-1": 1}))
        message = make(cls, **{field: source})
        # when the caller changes that dict, then the message does not change,
        source["added"] = 0
        mapping = getattr(message, field)
        assert isinstance(mapping, MappingProxyType)
        assert "added" not in mapping
        # and the mapping itself refuses changes.
        with pytest.raises(TypeError):
            mapping["added"] = 0  # type: ignore[index]


class TestNackReason:
    """The NackReason table decides whether a nack dead-letters and whether it counts."""

    def test_table_covers_every_reason(self) -> None:
        assert set(NACK_TABLE) == set(m.NackReason)

    @pytest.mark.parametrize("reason", list(m.NackReason))
    def test_reason(self, reason: m.NackReason) -> None:
        assert (reason.terminal, reason.counts_as_failure) == NACK_TABLE[reason]

    def test_values_are_the_wire_strings(self) -> None:
        assert m.NackReason("kernel_error") is m.NackReason.KERNEL_ERROR
        assert m.NackReason.BUSY == "busy"


class TestTopics:
    """Topic names follow the namespace; bad namespaces and ids are refused with ValueError."""

    def test_kafka_names(self) -> None:
        topics = KafkaTopics("acme")
        assert (topics.tasks, topics.results, topics.dead_letter) == (
            "acme.tasks",
            "acme.results",
            "acme.deadletter",
        )
        assert (topics.reputation, topics.jobs) == ("acme.reputation", "acme.jobs")
        assert topics.all() == (
            "acme.tasks",
            "acme.results",
            "acme.deadletter",
            "acme.reputation",
            "acme.jobs",
        )
        assert KafkaTopics().tasks == f"{DEFAULT_NAMESPACE}.tasks"

    def test_mqtt_names(self) -> None:
        topics = MqttTopics("acme")
        # Vehicle-level topics, seen by every gateway,
        for kind, level in VEHICLE_KINDS.items():
            assert getattr(topics, kind)("car-1") == f"acme/v/car-1/{level}"
        # and topics to the one gateway that holds the lease.
        for kind in TO_GATEWAY_KINDS:
            assert getattr(topics, kind)("car-1", "gw-1") == f"acme/v/car-1/{kind}/gw-1"
        assert topics.gateway_status("gw_1") == "acme/gw/gw_1/status"
        assert topics.pulls_for("gw_1") == "acme/v/+/pull/gw_1"
        assert topics.statuses_for("gw_1") == "acme/v/+/status/gw_1"
        assert topics.all_wills == "acme/v/+/status"
        assert topics.results_for("gw-1") == "acme/v/+/result/gw-1"
        assert topics.nacks_for("gw-1") == "acme/v/+/nack/gw-1"
        assert topics.heartbeats_for("gw-1") == "acme/v/+/heartbeat/gw-1"
        assert topics.all_gateway_statuses == "acme/gw/+/status"

    @pytest.mark.parametrize("kind", VEHICLE_KINDS)
    def test_parse_vehicle_topic(self, kind: str) -> None:
        topics = MqttTopics("acme")
        topic = getattr(topics, kind)("car-1")
        assert topics.vehicle_of(topic) == "car-1"
        assert topics.kind_of(topic) == kind

    @pytest.mark.parametrize("kind", TO_GATEWAY_KINDS)
    def test_parse_topic_to_a_gateway(self, kind: str) -> None:
        # Given a topic with the gateway's id as its last level, then the vehicle and the
        # kind come out, not the gateway id.
        topics = MqttTopics("acme")
        topic = getattr(topics, kind)("car-1", "gw-1")
        assert topics.vehicle_of(topic) == "car-1"
        assert topics.kind_of(topic) == kind

    @pytest.mark.parametrize(
        "topic",
        [
            "other/v/car-1/pull",
            "acme/gw/gw-1/status",
            "acme/v/car-1",
            "acme/v/car-1/pull/gw-1/extra",
            "acme/v/car-1/task/gw-1",
            "acme/v/car-1/result/",
            "acme/v/car-1/result/+",
            "acme/v/car-1/nack/gw 1",
            "acme/v/car-1/heartbeat/gw-1/extra",
            "acme/v/+/result/gw-1",
            "acme/v/+/pull",
            "acme/v//pull",
            "acme/v/car\n/pull",
            "",
        ],
    )
    def test_parse_other_topic(self, topic: str) -> None:
        topics = MqttTopics("acme")
        assert topics.vehicle_of(topic) is None
        assert topics.kind_of(topic) is None

    @pytest.mark.parametrize(
        "namespace", ["", "Acme", "1acme", "ac.me", "ac/me", "a" * 64, "acme\n", None]
    )
    def test_bad_namespace(self, namespace: Any) -> None:
        with pytest.raises(ValueError, match="namespace"):
            KafkaTopics(namespace)
        with pytest.raises(ValueError, match="namespace"):
            MqttTopics(namespace)

    @pytest.mark.parametrize("vehicle_id", ["", "a/b", "+", "#", "a b", "x" * 65, "car\n", 7])
    def test_bad_id(self, vehicle_id: Any) -> None:
        topics = MqttTopics("acme")
        with pytest.raises(ValueError, match="vehicle id"):
            topics.will(vehicle_id)
        with pytest.raises(ValueError, match="gateway id"):
            topics.gateway_status(vehicle_id)
        for kind in TO_GATEWAY_KINDS:
            with pytest.raises(ValueError, match="vehicle id"):
                getattr(topics, kind)(vehicle_id, "gw-1")
            with pytest.raises(ValueError, match="gateway id"):
                getattr(topics, kind)("car-1", vehicle_id)
        with pytest.raises(ValueError, match="gateway id"):
            topics.results_for(vehicle_id)
