# SPDX-License-Identifier: Apache-2.0
"""The kernel contract: one validator for producer and worker, cost models, bounded slices."""

from __future__ import annotations

import math
import subprocess
import sys
import types
import weakref
from typing import Any, ClassVar

import numpy as np
import pytest

from parkpool.schemas import kernels as contract
from parkpool.schemas.errors import Preempted, ValidationError
from parkpool.worker import kernels_slicing as slicing
from parkpool.worker.backend import Backend, numpy_backend
from parkpool.worker.kernels import BUILTIN, REGISTRY, execute
from parkpool.worker.kernels_slicing import Pacer, SliceSizes

NUMPY = numpy_backend()
F32 = np.zeros((4, 4), np.float32)
HEAT = [[0.05, 0.2, 0.05], [0.2, 0.0, 0.2], [0.05, 0.2, 0.05]]
OPTION = {
    "seed": 1,
    "paths": 100,
    "s0": 100.0,
    "strike": 100.0,
    "rate": 0.0,
    "sigma": 0.2,
    "maturity": 1.0,
    "kind": "call",
}
MLP = {"x": F32, "w0": F32, "b0": F32[0]}
KMEANS = {"points": F32, "centroids": F32[:2]}
BAD_TASKS: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("mlp", {}, {"x": F32}, "missing_input"),
    ("mlp", {}, {**MLP, "w1": F32}, "missing_input"),
    ("mlp", {}, {**MLP, "w9": F32}, "unexpected_input"),
    ("mlp", {}, {**MLP, "w0": np.zeros((5, 4), np.float32)}, "shape_mismatch"),
    ("mlp", {}, {**MLP, "b0": np.zeros(3, np.float32)}, "shape_mismatch"),
    ("mlp", {}, {**MLP, "w0": F32.astype(np.float64)}, "dtype_mismatch"),
    ("mlp", {}, {**MLP, "w0": np.zeros((4, 16385), np.float32)}, "too_large"),
    ("mlp", {"relu": True}, MLP, "unexpected_param"),
    ("kmeans_step", {}, {**KMEANS, "centroids": np.zeros((2, 3), np.float32)}, "shape_mismatch"),
    ("kmeans_step", {}, {**KMEANS, "centroids": np.zeros((1025, 4), np.float32)}, "too_large"),
    ("kmeans_step", {}, {**KMEANS, "centroids": np.full((2, 4), np.nan, np.float32)}, "bad_input"),
    ("kmeans_step", {}, {**KMEANS, "points": F32.astype(np.int64)}, "bad_dtype"),
    ("kmeans_step", {}, {"points": F32}, "missing_input"),
    ("fft", {}, {"x": F32.astype(np.int16)}, "bad_dtype"),
    ("fft", {}, {"x": np.zeros((2, 2, 2, 2), np.float32)}, "bad_ndim"),
    ("fft", {}, {"x": np.zeros((3, 0), np.float32)}, "bad_shape"),
    ("fft", {}, {"x": np.zeros(2**20 + 1, np.float32)}, "too_large"),
    ("fft", {"inverse": 1}, {"x": F32}, "bad_param"),
    ("stencil2d", {"weights": HEAT, "iterations": 0}, {"u": F32}, "bad_param"),
    ("stencil2d", {"weights": HEAT, "iterations": 1025}, {"u": F32}, "bad_param"),
    ("stencil2d", {"weights": [[1.0, 0.0], [0.0, 0.0]], "iterations": 1}, {"u": F32}, "bad_param"),
    ("stencil2d", {"weights": [[0.5] * 3] * 3, "iterations": 1}, {"u": F32}, "bad_param"),
    ("stencil2d", {"weights": HEAT, "iterations": 1}, {"u": F32[:2]}, "bad_shape"),
    ("stencil2d", {"weights": HEAT, "iterations": 1}, {"u": F32[0]}, "bad_ndim"),
    ("stencil2d", {"iterations": 1}, {"u": F32}, "missing_param"),
    ("option_mc", {**OPTION, "sigma": 0.0}, {}, "bad_param"),
    ("option_mc", {**OPTION, "maturity": -1.0}, {}, "bad_param"),
    ("option_mc", {**OPTION, "strike": float("inf")}, {}, "bad_param"),
    ("option_mc", {**OPTION, "kind": "asian"}, {}, "bad_param"),
    ("option_mc", {**OPTION, "paths": 0}, {}, "bad_param"),
    ("option_mc", {**OPTION, "s0": True}, {}, "bad_param"),
    ("option_mc", {**OPTION, "barrier": 1.0}, {}, "unexpected_param"),
    ("option_mc", OPTION, {"x": F32}, "unexpected_input"),
    (
        "gemm",
        {},
        {"a": np.zeros((20000, 1), np.float32), "b": np.zeros((1, 20000), np.float32)},
        "too_large",
    ),
    ("poly", {"coeffs": [1.0]}, {"x": np.zeros(2**28 + 1, np.float32)}, "too_large"),
]


class TestContract:
    """schemas.kernels names every built-in kernel and refuses bad tasks like the worker does."""

    def test_same_kernels_as_the_worker(self) -> None:
        # Given / When / Then the contract and the worker list the same built-ins, in order
        assert contract.BUILTIN == BUILTIN and set(BUILTIN) <= set(REGISTRY)
        for name in BUILTIN:
            assert REGISTRY[name].tolerance == contract.spec(name).tolerance

    def test_unknown_kernel(self) -> None:
        # Given / When / Then a name that is no built-in is refused by every entry point
        for call in (
            lambda: contract.spec("nope"),
            lambda: contract.validate_task("nope", {}, {}),
            lambda: contract.cost_gflop("nope", {}, {}),
            lambda: contract.spec(["not", "hashable"]),  # type: ignore[arg-type]
        ):
            with pytest.raises(ValidationError) as caught:
                call()
            assert caught.value.reason == "unknown_kernel"

    @pytest.mark.parametrize(("name", "params", "inputs", "reason"), BAD_TASKS)
    def test_producer_and_worker_refuse_alike(
        self, name: str, params: dict[str, Any], inputs: dict[str, Any], reason: str
    ) -> None:
        # Given a bad task / When the SDK's check and the worker's execute see it
        with pytest.raises(ValidationError) as by_contract:
            contract.validate_task(name, params, inputs)
        with pytest.raises(ValidationError) as by_worker:
            execute(name, params, inputs, NUMPY)
        # Then both refuse it for the same, named reason
        assert by_contract.value.reason == by_worker.value.reason == reason

    def test_contract_imports_only_numpy_and_schemas(self) -> None:
        # Given a fresh interpreter / When parkpool.schemas.kernels is imported
        code = (
            "import sys, parkpool.schemas.kernels\n"
            "loaded = {'.'.join(m.split('.')[:2]) for m in sys.modules} | set(sys.modules)\n"
            "roles = {'parkpool.worker', 'parkpool.producer', 'parkpool.gateway', "
            "'parkpool.runtime', 'parkpool.app', 'cupy', 'confluent_kafka', 'paho'}\n"
            "print(sorted(loaded & roles))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        # Then nothing of the roles, the runtime, the clients or CuPy came with it
        assert out.stdout.strip() == "[]"


class TestCostModel:
    """Cost models count each task's floating-point work in 10^9 operations."""

    def test_gemm_is_exact(self) -> None:
        # Given a 300x200 @ 200x100 product / Then it costs 2*m*n*k flops
        a, b = np.zeros((300, 200), np.float32), np.zeros((200, 100), np.float32)
        assert contract.cost_gflop("gemm", {}, {"a": a, "b": b}) == 2 * 300 * 100 * 200 / 1e9

    @pytest.mark.parametrize(
        ("name", "params", "inputs", "flops"),
        [
            ("fft", {}, {"x": np.zeros((3, 1024), np.complex64)}, 5 * 3 * 1024 * 10),
            ("fft", {}, {"x": np.zeros(1, np.float32)}, 0),
            (
                "mlp",
                {},
                {**MLP, "w0": np.zeros((4, 6), np.float32), "b0": F32[0, :1].repeat(6)},
                4 * 6 * (2 * 4 + 2),
            ),
            ("kmeans_step", {}, KMEANS, 3 * 4 * 2 * 4 + 4 * 4),
            ("stencil2d", {"weights": HEAT, "iterations": 5}, {"u": F32}, 17 * 2 * 2 * 5),
            ("monte_carlo_pi", {"seed": 0, "samples": 1000}, {}, 6 * 1000),
            ("option_mc", OPTION, {}, 18 * 100),
            ("poly", {"coeffs": [1.0, 2.0, 3.0]}, {"x": F32}, 2 * 3 * 16),
            ("reduce", {"op": "sumsq"}, {"x": F32}, 2 * 16),
            ("reduce", {"op": "max"}, {"x": F32}, 16),
        ],
    )
    def test_formulas(
        self, name: str, params: dict[str, Any], inputs: dict[str, Any], flops: int
    ) -> None:
        # Given a task / When costed / Then the model's count, in GFLOP
        assert contract.cost_gflop(name, params, inputs) == pytest.approx(flops / 1e9)

    def test_cost_validates_first(self) -> None:
        # Given a task no car could run / When costed / Then it is refused, not guessed at
        with pytest.raises(ValidationError):
            contract.cost_gflop("gemm", {}, {"a": F32, "b": F32[:3]})


def _task(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A task of ``name`` that spans several slices once slices are tiny."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 16))
    tasks: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "gemm": ({}, {"a": x, "b": x.T}),
        "mlp": ({}, {"x": x, "w0": x[:16], "b0": x[0], "w1": x[:16, :3], "b1": x[1, :3]}),
        "kmeans_step": ({}, {"points": x, "centroids": x[:3]}),
        "fft": ({}, {"x": x}),
        "stencil2d": ({"weights": HEAT, "iterations": 6}, {"u": x}),
        "monte_carlo_pi": ({"seed": 3, "samples": 100}, {}),
        "option_mc": ({**OPTION, "paths": 100}, {}),
        "poly": ({"coeffs": [1.0, -1.0]}, {"x": x}),
        "reduce": ({"op": "sum"}, {"x": x}),
    }
    return tasks[name]


TINY = SliceSizes(
    gemm_tile=16,
    gemm_k_tile=8,
    mlp_flops=2 * 16 * 16 * 8,
    kmeans_pairs=30,
    fft_elems=128,
    stencil_cells=500,
    mc_batch=30,
    option_batch=30,
    map_elems=200,
)


class _Checkpoints:
    """Counts checkpoint calls; raises Preempted at call ``stop_at`` when given."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls = 0
        self.stop_at = stop_at
        self.raised: Preempted | None = None

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.stop_at:
            self.raised = Preempted("owner is back")
            raise self.raised


@pytest.mark.parametrize("name", BUILTIN)
class TestSlicesAndPreemption:
    """Every kernel calls the checkpoint between slices, and Preempted stops it there."""

    def test_checkpoint_between_slices(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        # Given tiny slices and a task spanning several
        monkeypatch.setattr(slicing, "SLICES", TINY)
        monkeypatch.setattr(slicing, "CPU_SLICES", TINY)
        params, inputs = _task(name)
        checkpoints = _Checkpoints()
        # When it runs with a checkpoint
        out = execute(name, params, inputs, NUMPY, checkpoint=checkpoints)
        # Then the checkpoint ran more than once, and the answer is still the right one
        assert checkpoints.calls > 1
        assert REGISTRY[name].matches(out, REGISTRY[name].reference_fn(params, inputs))

    def test_preempted_mid_kernel(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        # Given tiny slices and a checkpoint that raises Preempted on its second call
        monkeypatch.setattr(slicing, "SLICES", TINY)
        monkeypatch.setattr(slicing, "CPU_SLICES", TINY)
        params, inputs = _task(name)
        checkpoints = _Checkpoints(stop_at=2)
        # When the kernel runs
        with pytest.raises(Preempted) as caught:
            execute(name, params, inputs, NUMPY, checkpoint=checkpoints)
        # Then the very same Preempted reaches the caller, and no slice ran after it
        assert caught.value is checkpoints.raised and caught.value.reason == "owner is back"
        assert checkpoints.calls == 2


class _CopyingBackend(Backend):
    """NumPy, but to_device copies (as a GPU would) and remembers weak references."""

    copies: ClassVar[list[weakref.ref[np.ndarray]]] = []

    def to_device(self, array: np.ndarray) -> Any:
        copy = np.array(array, copy=True)
        self.copies.append(weakref.ref(copy))
        return copy


class TestPreemptionFreesMemory:
    """After Preempted, no device array of the task is still referenced."""

    def test_device_inputs_are_released(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given a backend whose device arrays can be watched, and a preempting checkpoint
        monkeypatch.setattr(slicing, "SLICES", TINY)
        monkeypatch.setattr(slicing, "CPU_SLICES", TINY)
        backend = _CopyingBackend("numpy", np)
        backend.copies.clear()
        params, inputs = _task("gemm")
        # When the kernel is preempted, and the caller still holds the exception
        with pytest.raises(Preempted) as caught:
            execute("gemm", params, inputs, backend, checkpoint=_Checkpoints(stop_at=2))
        # Then the inputs' device copies are gone: the traceback kept no kernel frame
        assert caught.value is not None and len(backend.copies) == 2
        assert all(ref() is None for ref in backend.copies)


def _fake_cuda() -> tuple[types.ModuleType, list[str]]:
    """A stand-in cupy whose events log record/synchronize, to watch the pacing."""
    log: list[str] = []

    class Event:
        def __init__(self, **_flags: bool) -> None:
            self.n = sum(1 for entry in log if entry.startswith("record")) + 1

        def record(self, _stream: object) -> None:
            log.append(f"record {self.n}")

        def synchronize(self) -> None:
            log.append(f"sync {self.n}")

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(Event=Event, get_current_stream=lambda: "stream")  # type: ignore[attr-defined]
    return module, log


class TestPacer:
    """On a GPU the pacer keeps at most DEPTH slices queued ahead of the device."""

    def test_waits_for_the_slice_depth_back(self) -> None:
        # Given a pacer over a (stand-in) CUDA module
        cupy, log = _fake_cuda()
        pacer = Pacer(cupy, None)
        # When six slices are queued
        for _ in range(6):
            pacer.tick()
        # Then nothing waits before the first slice, and from then on the host waits for
        # the event DEPTH slices back before queueing more
        assert slicing.DEPTH == 2 and pacer.slices == 6
        assert log == [
            "record 1",
            "record 2",
            "record 3",
            "sync 1",
            "record 4",
            "sync 2",
            "record 5",
            "sync 3",
        ]

    def test_numpy_never_waits(self) -> None:
        # Given a NumPy pacer with a counting checkpoint / When ticked 4 times
        checkpoints = _Checkpoints()
        pacer = Pacer(np, checkpoints)
        for _ in range(4):
            pacer.tick()
        # Then the checkpoint ran between slices only: 3 times
        assert checkpoints.calls == 3 and math.isclose(pacer.slices, 4)
