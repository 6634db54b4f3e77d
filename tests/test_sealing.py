# SPDX-License-Identifier: Apache-2.0
"""Sealing of confidential jobs, with the real primitives: what opens, and what does not."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parkpool.runtime.sealing import (
    BoxKey,
    GatewayBox,
    generate_box_key,
    open_result,
    open_task,
    seal,
    seal_outputs,
    seal_task,
)
from parkpool.runtime.signing import TaskSigner, TaskVerifier, generate
from parkpool.schemas import (
    Assignment,
    Capabilities,
    DecodeError,
    Result,
    TaskChunk,
    ValidationError,
    decode,
    encode,
)
from parkpool.schemas.codec import decode_arrays, encode_arrays
from parkpool.schemas.sealing import WRAPPED_KEY_BYTES, inputs_key_context, outputs_context

GATEWAY, CAR, REPLY = BoxKey.generate(), BoxKey.generate(), BoxKey.generate()


def _task(chunk_id: int = 0, x: np.ndarray | None = None) -> TaskChunk:
    x = np.arange(8.0) if x is None else x
    now = time.time()
    return TaskChunk("job1", chunk_id, 4, "reduce", {"op": "sum"}, {"x": x}, "res", now + 60, now)


def _result(chunk_id: int = 0) -> Result:
    now = time.time()
    return Result("job1", chunk_id, 4, "car1", "gw1", 7, 1, {"y": np.ones(3)}, 0.1, now, now)


def _sealed(chunk_id: int = 0) -> TaskChunk:
    return seal_task(_task(chunk_id), GATEWAY.public, REPLY.public)


class TestRoundTrip:
    """A sealed chunk opens for the car it was sent to, and its result for the producer."""

    def test_inputs_travel_sealed_and_open_on_the_car(self) -> None:
        # Given a task sealed by the producer and read back from the wire
        task = decode(encode(_sealed()), TaskChunk)
        assert task.confidential and not task.inputs
        assert len(task.inputs_key) == WRAPPED_KEY_BYTES
        # When the gateway seals its data key to a car, and the car opens it
        opened = open_task(task, GatewayBox((GATEWAY,)).rewrap(task, CAR.public), CAR)
        # Then the car has the producer's inputs, and nothing sealed is left on the task
        assert np.array_equal(opened.inputs["x"], np.arange(8.0))
        assert (opened.sealed_inputs, opened.inputs_key) == (b"", b"")
        assert opened.reply_key == REPLY.public

    def test_outputs_sealed_by_the_car_open_for_the_producer(self) -> None:
        sealed = decode(encode(seal_outputs(_result(), REPLY.public)), Result)
        assert not sealed.outputs and sealed.sealed_outputs
        opened = open_result(sealed, REPLY)
        assert np.array_equal(opened.outputs["y"], np.ones(3)) and not opened.sealed_outputs

    def test_plain_messages_pass_unchanged(self) -> None:
        task, result = _task(), _result()
        assert open_task(task, b"", CAR) is task
        assert open_result(result, REPLY) is result

    def test_a_rotated_gateway_key_still_opens_older_tasks(self) -> None:
        # Given gateways that hold a new key first and the old one after it
        box = GatewayBox((BoxKey.generate(), GATEWAY))
        # Then a task sealed to the old key still reaches a car
        task = _sealed()
        assert open_task(task, box.rewrap(task, CAR.public), CAR).inputs["x"].sum() == 28.0


class TestRefusals:
    """Anything that does not open is refused as ``unsealable``, never with another error."""

    def test_the_wrong_car_cannot_open(self) -> None:
        task = _sealed()
        key = GatewayBox((GATEWAY,)).rewrap(task, CAR.public)
        with pytest.raises(DecodeError, match=r"^unsealable"):
            open_task(task, key, BoxKey.generate())

    def test_a_gateway_without_the_key_cannot_rewrap(self) -> None:
        with pytest.raises(DecodeError, match=r"^unsealable"):
            GatewayBox((BoxKey.generate(),)).rewrap(_sealed(), CAR.public)
        with pytest.raises(DecodeError, match="holds no box key"):
            GatewayBox(()).rewrap(_sealed(), CAR.public)

    def test_whose_fault_a_failed_rewrap_is(self) -> None:
        # A car that announced a key nothing can be sealed to is at fault, not the task
        with pytest.raises(DecodeError, match=r"^bad_box_key"):
            GatewayBox((GATEWAY,)).rewrap(_sealed(), bytes(32))
        # A task sealed to keys we do not hold is at fault, whatever the car
        foreign = seal_task(_task(), BoxKey.generate().public, REPLY.public)
        with pytest.raises(DecodeError, match=r"^unsealable"):
            GatewayBox((GATEWAY,)).rewrap(foreign, bytes(32))

    def test_sealed_inputs_cannot_move_to_another_chunk(self) -> None:
        # Given chunk 1's sealed inputs and key, pasted onto chunk 0
        one = _sealed(1)
        moved = dataclasses.replace(
            _sealed(0), sealed_inputs=one.sealed_inputs, inputs_key=one.inputs_key
        )
        # Then the gateway cannot open the key: it is bound to chunk 1
        with pytest.raises(DecodeError, match=r"^unsealable"):
            GatewayBox((GATEWAY,)).rewrap(moved, CAR.public)

    def test_altered_inputs_do_not_open(self) -> None:
        task = _sealed()
        flipped = bytes([task.sealed_inputs[0] ^ 1]) + task.sealed_inputs[1:]
        altered = dataclasses.replace(task, sealed_inputs=flipped)
        key = GatewayBox((GATEWAY,)).rewrap(altered, CAR.public)
        with pytest.raises(DecodeError, match=r"^unsealable"):
            open_task(altered, key, CAR)

    def test_outputs_cannot_pass_as_another_chunks(self) -> None:
        sealed = seal_outputs(_result(0), REPLY.public)
        with pytest.raises(DecodeError, match=r"^unsealable"):
            REPLY.open(sealed.sealed_outputs, outputs_context("job1", 1))

    def test_a_low_order_sender_key_is_refused(self) -> None:
        # The all-zero point gives an all-zero shared secret, which X25519 refuses.
        with pytest.raises(DecodeError, match="not a usable point"):
            CAR.open(bytes(32) + bytes(48), inputs_key_context("job1", 0))
        with pytest.raises(DecodeError, match="not a usable point"):
            seal(bytes(32), b"key", b"")

    @settings(max_examples=200, deadline=None)
    @given(blob=st.binary(max_size=200))
    def test_random_bytes_never_open(self, blob: bytes) -> None:
        with pytest.raises(DecodeError, match=r"^unsealable"):
            CAR.open(blob, inputs_key_context("job1", 0))


class TestContract:
    """The messages refuse confidential fields that do not fit together."""

    def test_a_sealed_task_carries_no_inputs_in_clear(self) -> None:
        with pytest.raises(ValidationError, match="no inputs in clear"):
            dataclasses.replace(_sealed(), inputs={"x": np.ones(2)})

    def test_sealed_inputs_need_their_keys(self) -> None:
        with pytest.raises(ValidationError, match="need an inputs_key and a reply_key"):
            dataclasses.replace(_sealed(), reply_key=b"")
        with pytest.raises(ValidationError, match="no sealed inputs"):
            dataclasses.replace(_task(), inputs_key=bytes(WRAPPED_KEY_BYTES))

    def test_keys_have_their_exact_sizes(self) -> None:
        with pytest.raises(ValidationError, match="reply_key must be empty or 32 bytes"):
            dataclasses.replace(_task(), reply_key=b"short")
        with pytest.raises(ValidationError, match="box_key must be empty or 32 bytes"):
            Capabilities("numpy", ("reduce",), box_key=bytes(33))

    def test_a_sealed_result_carries_no_outputs_in_clear(self) -> None:
        with pytest.raises(ValidationError, match="no outputs in clear"):
            dataclasses.replace(_result(), sealed_outputs=b"x" * 64)

    def test_arrays_alone_round_trip_and_refuse_garbage(self) -> None:
        arrays = {"a": np.arange(6, dtype=np.int32).reshape(2, 3)}
        assert np.array_equal(decode_arrays(encode_arrays(arrays))["a"], arrays["a"])
        with pytest.raises(DecodeError):
            decode_arrays(b"\x93\x01\x02\x03")

    def test_the_signature_covers_the_cars_copy_of_the_key(self, tmp_path: Path) -> None:
        # Given an assignment of a confidential task, signed by the gateway
        private, public = generate(tmp_path)
        task = _sealed()
        key = GatewayBox((GATEWAY,)).rewrap(task, CAR.public)
        plain = Assignment("gw1", "car1", 3, 1, time.time() + 30, encode(task), inputs_key=key)
        signed = TaskSigner.load(private).sign(plain)
        verifier = TaskVerifier.load([public])
        assert verifier.verify(signed)
        # When the key is swapped for one sealed to another car, the signature breaks
        other = GatewayBox((GATEWAY,)).rewrap(task, BoxKey.generate().public)
        assert not verifier.verify(dataclasses.replace(signed, inputs_key=other))


class TestKeyFiles:
    """Box keys live in files like signing keys, and never show in a repr."""

    def test_generated_keys_load_and_match(self, tmp_path: Path) -> None:
        private, public = generate_box_key(tmp_path, "gateway-box")
        assert private.stat().st_mode & 0o777 == 0o600
        key = BoxKey.load(private)
        assert key.public == bytes.fromhex(public.read_text())
        assert repr(key) == "BoxKey(<secret>)"
        assert private.read_text().strip() not in repr(GatewayBox((key,)))
