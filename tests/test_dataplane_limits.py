# SPDX-License-Identifier: Apache-2.0
"""The car's data plane refuses, before any transfer, what would be wasted: stored inputs
the kernel would refuse once they arrived, and outputs the SDK would not read back. A
URL the car cannot request, or a store that answers with a redirect, is a store error
(another car may do better), never a fault of the car's own."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import pytest

from parkpool.app.children import store_connection
from parkpool.broker_config.launcher import EmbeddedBrokers
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.producer.jobs import JobFailed
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas import (
    Assignment,
    BlobRef,
    BrokerError,
    Result,
    TaskChunk,
    ValidationError,
    decode,
    encode,
)
from parkpool.schemas.kernels import MAX_ELEMS, MAX_LAYER_ELEMS, MAX_LAYERS, MAX_WIDTH
from parkpool.schemas.reputation import Level
from parkpool.worker.blobcache import BlobCache
from parkpool.worker.dataplane import (
    MAX_OUTPUTS_BYTES,
    MAX_SEALED_OUTPUTS_BYTES,
    MAX_TASK_INPUT_BYTES,
    CarData,
    check_refs,
    fetch,
    upload,
)
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway

BODY = np.arange(16, dtype=np.float32).tobytes()


class _Store(http.server.BaseHTTPRequestHandler):
    """A store that answers every GET with ``BODY`` and takes every PUT, and remembers
    each request: the tests count what reached it."""

    requests: ClassVar[list[str]] = []

    def log_message(self, *_args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(f"GET {self.path}")
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.requests.append(f"PUT {self.path}")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def store() -> Iterator[str]:
    """The store on a free loopback port: its base URL."""
    _Store.requests.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def array_ref(name: str, dtype: str, shape: tuple[int, ...], sha: str = "0" * 64) -> BlobRef:
    return BlobRef(name, sha, int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype, shape)


def lease(store: str, kernel: str, params: dict[str, object], *refs: BlobRef) -> Assignment:
    task = TaskChunk("lim", 0, 1, kernel, params, {}, "r", 1e10, 0.0, refs=refs)
    urls = tuple(f"{store}/{ref.name}" for ref in refs)
    return Assignment("gw1", "car", 1, 1, 1e10, encode(task), urls=urls, upload_url=f"{store}/out")


def task_of(assignment: Assignment) -> TaskChunk:
    return decode(assignment.task, TaskChunk)


class TestInputsRefusedBeforeAnyFetch:
    """A task the car would refuse anyway costs it no download."""

    def test_more_stored_inputs_in_all_than_any_task_needs(self, store: str) -> None:
        # Given a task naming four inputs of 2 GiB each, every one within the per-input
        # limit, 8 GiB in all
        refs = [array_ref(f"x{i}", "<f8", (MAX_ELEMS,)) for i in range(4)]
        assignment = lease(store, "reduce", {"op": "sum"}, *refs)
        # When the car hydrates it
        # Then it refuses the total as too large, and nothing was fetched
        with pytest.raises(ValidationError, match=r"too_large: stored inputs of .* in all"):
            CarData(BlobCache(1 << 20)).hydrate(assignment, task_of(assignment))
        assert _Store.requests == []

    def test_the_largest_task_a_kernel_takes_is_within_the_total(self) -> None:
        # Given an mlp at every limit, all float64: the largest built-in task
        side = int(np.sqrt(MAX_ELEMS))
        narrow = MAX_LAYER_ELEMS // side
        refs = [array_ref("x", "<f8", (side, side))]
        for i in range(MAX_LAYERS):
            fan_in, fan_out = (side, narrow) if i % 2 == 0 else (narrow, side)
            refs += [array_ref(f"w{i}", "<f8", (fan_in, fan_out))]
            refs += [array_ref(f"b{i}", "<f8", (fan_out,))]
        task = TaskChunk("lim", 0, 1, "mlp", {}, {}, "r", 1e10, 0.0, refs=tuple(refs))
        # Then the car takes it (no check refuses it), and the bound is not much above it
        check_refs(task)
        total = sum(ref.size for ref in refs)
        assert total <= MAX_TASK_INPUT_BYTES < total + 8 * MAX_LAYERS * MAX_WIDTH

    @pytest.mark.parametrize(
        ("kernel", "params", "shapes", "reason"),
        [
            ("no_such_kernel", {}, {"x": (4,)}, "unknown_kernel"),
            ("reduce", {"op": "sum"}, {"x": (4,), "y": (4,)}, "unexpected_input"),
            ("gemm", {}, {"a": (4, 3), "b": (4, 3)}, "shape_mismatch"),
            ("poly", {"coeffs": [1.0]}, {"x": (4,)}, "bad_dtype"),  # int64 below
        ],
        ids=["unknown kernel", "unexpected input", "wrong shapes", "wrong dtype"],
    )
    def test_inputs_the_kernel_would_refuse(
        self,
        store: str,
        kernel: str,
        params: dict[str, object],
        shapes: dict[str, tuple[int, ...]],
        reason: str,
    ) -> None:
        # Given a task whose stored inputs its kernel would refuse once they arrived
        dtype = "<i8" if kernel == "poly" else "<f4"
        refs = [array_ref(name, dtype, shape) for name, shape in shapes.items()]
        assignment = lease(store, kernel, params, *refs)
        # When the car hydrates it
        # Then it is refused as the kernel would refuse it, and nothing was fetched
        with pytest.raises(ValidationError, match=reason):
            CarData(BlobCache(1 << 20)).hydrate(assignment, task_of(assignment))
        assert _Store.requests == []

    def test_inputs_the_kernel_takes_are_fetched(self, store: str) -> None:
        # Given a task whose one stored input its kernel takes
        ref = array_ref("x", "<f4", (16,), hashlib.sha256(BODY).hexdigest())
        assignment = lease(store, "reduce", {"op": "max"}, ref)
        # When the car hydrates it
        task = CarData(BlobCache(1 << 20)).hydrate(assignment, task_of(assignment))
        # Then the input was fetched and is in hand
        assert _Store.requests == ["GET /x"]
        np.testing.assert_array_equal(task.inputs["x"], np.frombuffer(BODY, np.float32))


def result_with(outputs: dict[str, np.ndarray], sealed: bytes = b"") -> Result:
    return Result("lim", 0, 1, "car", "gw1", 1, 1, outputs, 0.1, 0.0, 0.0, sealed_outputs=sealed)


class TestOutputsTheSdkCannotRead:
    """Outputs larger than the SDK reads back are refused before they are uploaded."""

    def test_clear_outputs_over_the_limit(self, store: str) -> None:
        # Given a result whose encoded outputs are just over what the SDK decodes
        big = np.zeros(MAX_OUTPUTS_BYTES // 4 + 1, dtype=np.float32)
        assignment = lease(store, "poly", {"coeffs": [1.0]})
        # When the car offloads it
        # Then it is refused as too large, and nothing was uploaded
        with pytest.raises(ValidationError, match="too_large: outputs of"):
            CarData(BlobCache(0)).offload(result_with({"y": big}), assignment)
        assert _Store.requests == []

    def test_sealed_outputs_over_the_limit(self, store: str) -> None:
        # Given a confidential result whose sealed outputs are a byte over the SDK's limit
        sealed = bytes(MAX_SEALED_OUTPUTS_BYTES + 1)
        assignment = lease(store, "poly", {"coeffs": [1.0]})
        # Then it is refused before any upload
        with pytest.raises(ValidationError, match="too_large"):
            CarData(BlobCache(0)).offload(result_with({}, sealed), assignment)
        assert _Store.requests == []

    def test_sealed_outputs_at_the_limit_are_uploaded(self, store: str) -> None:
        # Given sealed outputs exactly as large as the SDK reads (its envelope's room used)
        sealed = bytes(MAX_SEALED_OUTPUTS_BYTES)
        assignment = lease(store, "poly", {"coeffs": [1.0]})
        # Then they go to the store, and the result names them
        result = CarData(BlobCache(0)).offload(result_with({}, sealed), assignment)
        assert _Store.requests == ["PUT /out"]
        assert result.outputs_ref is not None and result.outputs_ref.size == len(sealed)


class TestUrlsTheCarCannotRequest:
    """A URL urllib cannot even request is refused as a store error."""

    @pytest.mark.parametrize(
        "url",
        [
            "http://[::1/x",
            "http://[zz::1]/x",
            "http://" + "a" * 64 + ".example/x",
            "http://127.0.0.1:port/x",
            "http://127.0.0.1:99999999999999999999/x",
        ],
        ids=["unclosed IPv6 host", "bad IPv6 host", "bad host label", "bad port", "huge port"],
    )
    def test_a_fetch(self, url: str) -> None:
        # When the car fetches from a URL with a bad host or port
        # Then it is a store error that names the URL as bad
        with pytest.raises(BrokerError, match=r"cannot fetch input x@0{12}: bad URL"):
            fetch(url, array_ref("x", "<f4", (4,)), 2)

    def test_an_upload(self) -> None:
        # When the car uploads its outputs to a URL with a bad host
        # Then it is a store error that names the URL as bad
        with pytest.raises(BrokerError, match="cannot upload the result: bad URL"):
            upload("http://[::1/out", b"outputs", 2)


@pytest.mark.integration
def test_a_job_whose_outputs_the_sdk_cannot_read_fails_by_name(
    brokers: EmbeddedBrokers,
    gateway_factory: Callable[..., RunningGateway],
    fleet_factory: Callable[..., Fleet],
    namespace: str,
    kafka_conn: KafkaConnection,
) -> None:
    # Given a gateway and a car that share the store, and a poly job of one chunk whose
    # outputs encode to just over what the SDK reads back
    store = store_connection(brokers)
    gateway_factory(store=store, max_attempts=2)
    (car,) = fleet_factory(1).vehicles.values()
    x = np.ones(MAX_OUTPUTS_BYTES // 4 + 1, dtype=np.float32)
    settings = ProducerSettings(kafka_conn, namespace, store=store, verification=Level.UNCHECKED)
    with ParkpoolClient(settings) as sdk:
        # When it runs
        handle = sdk.submit("poly", {"x": x, "coeffs": [1.0]}, chunk_elems=x.size)
        # Then the car refuses its outputs as the task's fault, and the job fails by
        # name instead of waiting out leases or failing in the SDK
        with pytest.raises(JobFailed, match="invalid_task"):
            handle.wait(timeout=120)
    # And the car counted each try with the results it could not send
    assert (car.results_too_large, car.completed) == (2, 0)
