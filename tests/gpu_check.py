# SPDX-License-Identifier: Apache-2.0
"""GPU acceptance check of the kernel library: ``make gpu-check`` or ``python -m tests.gpu_check``.

Prints one JSON object per line:

* ``parity``: every built-in kernel on CuPy against its NumPy reference, with the default
  slices and with tiny ones (so tiling, batching and pacing run on the GPU too);
* ``twin``: each hand-written CUDA kernel against its NumPy twin run on the GPU;
* ``throughput``: each kernel's GFLOP/s (from the cost model) against a library baseline
  on the same GPU (cupy.matmul, cupy.fft, cupyx.scipy.ndimage, cupy.random, ...);
* ``prefetch``: the GPU's busy fraction (CUDA events over wall time) when a stream of
  tasks is fed to a worker-like loop, copying the next task's inputs while the current
  one runs (prefetch 1) or not (prefetch 0).

It needs only Python, NumPy and CuPy: no brokers, no pytest. ``schemas`` imports msgpack,
so ``make gpu-bundle`` unpacks the few wheels it needs into ``.gpu-bundle/site``, which
this script puts first on sys.path. Exit status: 0 when every parity and twin check
passes, 1 when any fails, 2 when there is no usable GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / ".gpu-bundle" / "site"


def use_bundle(site: Path = BUNDLE) -> bool:
    """Put the unpacked wheels first on sys.path, when they are there."""
    if site.is_dir() and str(site) not in sys.path:
        sys.path.insert(0, str(site))
    return site.is_dir()


if __name__ == "__main__":  # as a script; an importing test keeps its own sys.path
    use_bundle()

# The imports below need the bundle on a machine without the project's dependencies.
import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from parkpool.schemas.errors import ConfigError  # noqa: E402
from parkpool.schemas.kernels import cost_gflop  # noqa: E402
from parkpool.worker import kernels_cuda, kernels_signal, kernels_sim  # noqa: E402
from parkpool.worker import kernels_slicing as slicing  # noqa: E402
from parkpool.worker.backend import Backend, select_backend  # noqa: E402
from parkpool.worker.kernels import execute, get_kernel, reference  # noqa: E402
from parkpool.worker.kernels_prefetch import Stager  # noqa: E402
from parkpool.worker.kernels_slicing import Pacer, SliceSizes, is_cupy  # noqa: E402

Record = dict[str, Any]
TINY_SLICES = SliceSizes(
    gemm_tile=192,
    gemm_k_tile=160,
    mlp_flops=2**20,
    kmeans_pairs=4096,
    fft_elems=4096,
    stencil_cells=4096,
    mc_batch=10_000,
    option_batch=10_000,
    map_elems=10_000,
)
_HEAT = [[0.05, 0.2, 0.05], [0.2, 0.0, 0.2], [0.05, 0.2, 0.05]]
_OPTION = {"s0": 100.0, "strike": 110.0, "rate": 0.01, "sigma": 0.4, "maturity": 1.5}


@dataclass(frozen=True)
class Case:
    """One task of one kernel."""

    kernel: str
    params: dict[str, Any]
    inputs: dict[str, Any]
    label: str


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _mlp_inputs(rows: int, width: int, depth: int, dtype: Any) -> dict[str, Any]:
    rng = _rng(5)
    inputs = {"x": rng.standard_normal((rows, width)).astype(dtype)}
    for i in range(depth):
        out = width if i < depth - 1 else 16
        inputs[f"w{i}"] = (rng.standard_normal((width, out)) / np.sqrt(width / 2)).astype(dtype)
        inputs[f"b{i}"] = (0.1 * rng.standard_normal(out)).astype(dtype)
    return inputs


def cases(scale: int) -> list[Case]:
    """A task per kernel and dtype; sizes grow with ``scale`` (1 for tests, 8 on a GPU)."""
    n = 64 * scale
    rng = _rng(scale)
    a, b = rng.standard_normal((3 * n, 5 * n)), rng.standard_normal((5 * n, 2 * n))
    blobs = np.concatenate([c + rng.standard_normal((200 * scale, 8)) for c in (0.0, 4.0, -3.0)])
    signal = rng.standard_normal((4 * scale, 2 * n)) + 1j * rng.standard_normal((4 * scale, 2 * n))
    grid = rng.uniform(-1, 1, (2 * n + 3, 3 * n + 1))
    x = rng.uniform(-2, 2, 20_000 * scale)
    out = [Case("gemm", {}, {"a": a.astype(d), "b": b.astype(d)}, str(np.dtype(d))) for d in _F]
    out += [Case("mlp", {}, _mlp_inputs(8 * n, n, 3, d), str(np.dtype(d))) for d in _F]
    out += [
        Case("kmeans_step", {}, {"points": blobs.astype(d), "centroids": blobs[:6].astype(d)}, "")
        for d in _F
    ]
    out += [
        Case("fft", {}, {"x": signal.real.astype(np.float32)}, "float32"),
        Case("fft", {"inverse": True}, {"x": signal}, "complex128-inverse"),
        Case("fft", {}, {"x": signal.reshape(-1)[: 1 << 11].astype(np.complex64)}, "1-D"),
    ]
    out += [
        Case("stencil2d", {"weights": _HEAT, "iterations": 25}, {"u": grid.astype(d)}, "")
        for d in _F
    ]
    out += [
        Case("monte_carlo_pi", {"seed": 7, "samples": 30_000 * scale}, {}, ""),
        Case("option_mc", {**_OPTION, "seed": 9, "paths": 30_000 * scale, "kind": "call"}, {}, ""),
        Case("option_mc", {**_OPTION, "seed": 2**62, "paths": 777, "kind": "put"}, {}, "put"),
        Case("poly", {"coeffs": [0.5, -1.0, 2.0, 0.25]}, {"x": x.astype(np.float32)}, ""),
    ]
    out += [Case("reduce", {"op": op}, {"x": x}, op) for op in ("sum", "sumsq", "min", "max")]
    return out


_F = (np.float32, np.float64)


def _max_error(actual: dict[str, Any], expected: dict[str, Any]) -> float:
    """The largest |actual - expected| over the outputs, relative to the output's scale."""
    worst = 0.0
    for key, ref in expected.items():
        e = np.asarray(ref).astype(np.complex128)
        d = np.abs(np.asarray(actual[key]).astype(np.complex128) - e)
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        worst = max(worst, float(np.max(d)) / (scale or 1.0) if d.size else 0.0)
    return worst


def check_parity(backend: Backend, tasks: list[Case], label: str = "default") -> list[Record]:
    """Each task on ``backend`` against the NumPy reference, within the kernel's tolerance."""
    records = []
    for case in tasks:
        kernel = get_kernel(case.kernel)
        out = execute(case.kernel, case.params, case.inputs, backend)
        expected = reference(case.kernel, case.params, case.inputs)
        records.append(
            {
                "check": "parity",
                "slices": label,
                "kernel": case.kernel,
                "case": case.label,
                "backend": backend.name,
                "ok": kernel.matches(out, expected),
                "max_rel_err": _max_error(out, expected),
                "rtol": kernel.tolerance.rtol,
            }
        )
    return records


def check_twins(backend: Backend) -> list[Record]:
    """Hand-written CUDA kernels against their NumPy twins run on the same device.

    On NumPy there is no CUDA kernel: the twin itself is checked against the reference.
    """
    xp = backend.xp
    grid = _rng(3).uniform(-1, 1, (515, 777))
    records = []
    for dtype in _F:
        u = grid.astype(dtype)
        weights = kernels_signal.stencil_weights({"weights": _HEAT}, np.dtype(dtype))
        src = xp.array(u, order="C")
        ours, twin = src.copy(), src.copy()
        if is_cupy(xp):
            kernels_cuda.stencil_step(xp, src, ours, xp.asarray(weights, dtype=dtype))
        else:
            ours = reference("stencil2d", {"weights": _HEAT, "iterations": 1}, {"u": u})["u"]
        kernels_signal.stencil_step_twin(src, twin, weights)
        records.append(_twin_record(backend, "stencil2d", str(np.dtype(dtype)), ours, twin))
    params = {**_OPTION, "seed": 5, "paths": 1 << 16, "kind": "call"}
    terms = kernels_sim.option_terms(params)
    twin = kernels_sim.option_payoffs_twin(xp, 5, 1 << 40, 1 << 16, terms)
    if is_cupy(xp):
        ours = xp.empty(1 << 16, dtype=xp.float64)
        kernels_cuda.option_payoffs(xp, ours, 5, 1 << 40, terms)
    else:
        ours = _scalar_payoffs(5, 1 << 40, 64, terms)
        twin = twin[:64]
    records.append(_twin_record(backend, "option_mc", "payoffs", ours, twin))
    return records


def _scalar_payoffs(seed: int, first: int, count: int, terms: tuple[float, ...]) -> Any:
    """The option payoffs one path at a time with Python's math module: an oracle."""
    s0, strike, drift, vol, discount, put = terms
    counters = np.arange(2 * first, 2 * (first + count), dtype=np.uint64)
    bits = [int(v) >> 11 for v in kernels_sim.splitmix64(np, seed, counters)]
    out = []
    for first_bits, second_bits in zip(bits[0::2], bits[1::2], strict=True):
        u1, u2 = (first_bits + 1) * 2.0**-53, second_bits * 2.0**-53
        normal = math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2)
        price = s0 * math.exp(drift + vol * normal)
        out.append(discount * max(strike - price if put else price - strike, 0.0))
    return np.array(out)


def _twin_record(backend: Backend, kernel: str, case: str, ours: Any, twin: Any) -> Record:
    ours_host, twin_host = backend.to_host(ours), backend.to_host(twin)
    return {
        "check": "twin",
        "kernel": kernel,
        "case": case,
        "backend": backend.name,
        "hand_written": is_cupy(backend.xp),
        "ok": get_kernel(kernel).tolerance.allclose(ours_host, twin_host),
        "max_abs_diff": float(np.max(np.abs(ours_host - twin_host))),
    }


# --- throughput ---------------------------------------------------------------------


def _timed(backend: Backend, fn: Callable[[], Any], repeats: int) -> float:
    """The best of ``repeats`` runs in seconds, after one warm-up (compiles, plans)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if is_cupy(backend.xp):
            cuda = backend.xp.cuda
            start, end = cuda.Event(), cuda.Event()
            start.record(cuda.get_current_stream())
            fn()
            end.record(cuda.get_current_stream())
            end.synchronize()
            best = min(best, cuda.get_elapsed_time(start, end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - began)
    return best


def _ours(backend: Backend, case: Case, device: dict[str, Any]) -> Callable[[], Any]:
    kernel = get_kernel(case.kernel)
    return lambda: kernel.fn(backend.xp, case.params, device, Pacer(backend.xp, None).tick)


def _baseline(
    backend: Backend, case: Case, device: dict[str, Any]
) -> tuple[str, Callable[[], Any]]:
    """The library call doing the same work in one go, as a yardstick."""
    xp, p = backend.xp, case.params
    simple: dict[str, tuple[str, Callable[[], Any]]] = {
        "gemm": ("matmul", lambda: xp.matmul(device["a"], device["b"])),
        "fft": ("fft.fft", lambda: xp.fft.fft(device["x"], axis=-1)),
        "reduce": ("sum", lambda: xp.sum(device["x"], dtype=xp.float64)),
        "poly": ("whole-array horner", lambda: _horner_whole(xp, device["x"], p["coeffs"])),
        "mlp": ("matmul chain", lambda: _mlp_whole(xp, device)),
        "kmeans_step": ("one distance matrix", lambda: _kmeans_whole(xp, device)),
        "option_mc": ("library generator", lambda: _library_random(xp, case)),
        "monte_carlo_pi": ("library generator", lambda: _library_random(xp, case)),
    }
    if case.kernel == "stencil2d":
        return _stencil_baseline(backend, case, device)
    return simple[case.kernel]


def _horner_whole(xp: Any, x: Any, coeffs: list[float]) -> Any:
    y = xp.zeros_like(x)
    for c in coeffs:
        y = y * x + c
    return y


def _mlp_whole(xp: Any, device: dict[str, Any]) -> Any:
    h, i = device["x"], 0
    while f"w{i}" in device:
        h = xp.matmul(h, device[f"w{i}"]) + device[f"b{i}"]
        h = xp.maximum(h, 0) if f"w{i + 1}" in device else h
        i += 1
    return h


def _kmeans_whole(xp: Any, device: dict[str, Any]) -> Any:
    p, c = device["points"], device["centroids"]
    d2 = (p * p).sum(1)[:, None] - 2 * (p @ c.T) + (c * c).sum(1)[None, :]
    return xp.bincount(xp.argmin(d2, axis=1), minlength=c.shape[0])


def _stencil_baseline(
    backend: Backend, case: Case, device: dict[str, Any]
) -> tuple[str, Callable[[], Any]]:
    if is_cupy(backend.xp):
        from cupyx.scipy import ndimage

        w = backend.xp.asarray(case.params["weights"], dtype=device["u"].dtype)
        iterations = int(case.params["iterations"])

        def correlate() -> Any:
            u = device["u"]
            for _ in range(iterations):
                u = ndimage.correlate(u, w, mode="nearest")
            return u

        return "cupyx.scipy.ndimage.correlate", correlate
    twin = dict(case.params)
    return "numpy twin", lambda: kernels_signal.stencil2d(np, twin, device, lambda: None)


def _library_random(xp: Any, case: Case) -> Any:
    """The same estimate from the library's own generator (whose numbers differ)."""
    p = case.params
    count = int(p.get("paths", p.get("samples", 1)))
    rng = xp.random.default_rng(1)
    if case.kernel == "monte_carlo_pi":
        u = rng.random((2, count))
        return xp.count_nonzero(u[0] * u[0] + u[1] * u[1] <= 1.0)
    s0, strike, drift, vol, discount, put = kernels_sim.option_terms(p)
    price = s0 * xp.exp(drift + vol * rng.standard_normal(count))
    gain = strike - price if put else price - strike
    return (discount * xp.maximum(gain, 0.0)).sum()


def check_throughput(backend: Backend, tasks: list[Case], repeats: int = 3) -> list[Record]:
    """GFLOP/s of each kernel (device-resident inputs) against its library baseline."""
    records = []
    for case in tasks:
        device = {k: backend.to_device(v) for k, v in case.inputs.items()}
        gflop = cost_gflop(case.kernel, case.params, case.inputs)
        pacer_probe = Pacer(backend.xp, None)
        get_kernel(case.kernel).fn(backend.xp, case.params, device, pacer_probe.tick)
        ours_s = _timed(backend, _ours(backend, case, device), repeats)
        name, baseline = _baseline(backend, case, device)
        base_s = _timed(backend, baseline, repeats)
        records.append(
            {
                "check": "throughput",
                "kernel": case.kernel,
                "case": case.label,
                "backend": backend.name,
                "gflop": gflop,
                "slices": pacer_probe.slices,
                "ours_s": ours_s,
                "ours_gflops": gflop / ours_s,
                "mean_slice_ms": 1e3 * ours_s / max(1, pacer_probe.slices),
                "baseline": name,
                "baseline_s": base_s,
                "baseline_gflops": gflop / base_s,
                "speed_vs_baseline": base_s / ours_s,
            }
        )
    return records


def throughput_cases() -> list[Case]:
    """Tasks big enough to fill a large GPU for milliseconds per slice."""
    rng = _rng(11)
    f32 = np.float32
    return [
        Case(
            "gemm",
            {},
            {"a": rng.random((8192, 8192), f32), "b": rng.random((8192, 8192), f32)},
            "8192",
        ),
        Case("mlp", {}, _mlp_inputs(65536, 1024, 4, f32), "65536x1024x4"),
        Case(
            "kmeans_step",
            {},
            {"points": rng.random((1 << 21, 32), f32), "centroids": rng.random((256, 32), f32)},
            "2M x 32, k=256",
        ),
        Case("fft", {}, {"x": rng.random((16384, 4096), f32).astype(np.complex64)}, "16384x4096"),
        Case(
            "stencil2d",
            {"weights": _HEAT, "iterations": 200},
            {"u": rng.random((4096, 4096), f32)},
            "4096^2 x 200",
        ),
        Case("monte_carlo_pi", {"seed": 1, "samples": 1 << 27}, {}, "2^27"),
        Case("option_mc", {**_OPTION, "seed": 1, "paths": 1 << 27, "kind": "call"}, {}, "2^27"),
        Case("poly", {"coeffs": [0.5] * 8}, {"x": rng.random(1 << 26, f32)}, "2^26"),
        Case("reduce", {"op": "sumsq"}, {"x": rng.random(1 << 26)}, "2^26"),
    ]


# --- prefetch -------------------------------------------------------------------------


def _pinned_tasks(count: int, edge: int) -> list[dict[str, Any]]:
    """gemm tasks whose inputs sit in page-locked memory, where a worker would decode them."""
    import cupyx

    rng, distinct = _rng(13), []
    for _ in range(min(count, 4)):
        task = {key: cupyx.empty_pinned((edge, edge), dtype=np.float32) for key in ("a", "b")}
        for array in task.values():
            array[...] = rng.random((edge, edge), np.float32)
        distinct.append(task)
    return [distinct[i % len(distinct)] for i in range(count)]


def _feed(backend: Backend, tasks: list[dict[str, Any]], prefetch: int) -> tuple[float, float]:
    """Run gemm over ``tasks`` like a worker; busy seconds (CUDA events) and wall seconds.

    Prefetch 0 copies each task's inputs on the compute stream just before its kernel;
    prefetch 1 stages task n+1 on the copy stream right after queueing kernel n.
    """
    xp, cuda = backend.xp, backend.xp.cuda
    compute, stager, kernel = cuda.Stream(non_blocking=True), Stager(backend), get_kernel("gemm")
    events: list[tuple[Any, Any]] = []
    began = time.perf_counter()
    staged = stager.stage(tasks[0]) if prefetch else None
    for i, task in enumerate(tasks):
        with compute:
            device = (
                staged.inputs_on(compute) if staged else {k: xp.asarray(v) for k, v in task.items()}
            )
            start, end = cuda.Event(), cuda.Event()
            start.record(compute)
            out = kernel.fn(xp, {}, device, Pacer(xp, None).tick)
            end.record(compute)
            if prefetch and i + 1 < len(tasks):
                staged = stager.stage(tasks[i + 1])  # overlaps the kernel just queued
            out.get(stream=compute)
            compute.synchronize()
        events.append((start, end))
    wall = time.perf_counter() - began
    return sum(cuda.get_elapsed_time(s, e) for s, e in events) / 1e3, wall


def check_prefetch(backend: Backend, count: int = 24, edge: int = 4096) -> list[Record]:
    """The GPU's busy fraction over a stream of gemm tasks, without and with prefetch."""
    if not is_cupy(backend.xp):
        return []
    tasks = _pinned_tasks(count, edge)
    _feed(backend, tasks[:2], 1)  # warm-up: cuBLAS handle, memory pools, streams
    records = []
    for prefetch in (0, 1):
        busy, wall = _feed(backend, tasks, prefetch)
        task = f"gemm {edge}^2 float32, pinned inputs"
        records.append(
            {"check": "prefetch", "prefetch": prefetch, "tasks": count, "task": task}
            | {"busy_s": busy, "wall_s": wall, "busy_fraction": busy / wall}
        )
    return records


# --- main -----------------------------------------------------------------------------


def environment(backend: Backend | None) -> Record:
    """What this run measured on: the GPU, CuPy and NumPy versions, or why there is none."""
    record: Record = {"check": "environment", "gpu": backend is not None, "numpy": np.__version__}
    record["bundle"] = str(BUNDLE) if BUNDLE.is_dir() else None
    if backend is not None:
        props = backend.xp.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        record["device"] = name.decode() if isinstance(name, bytes) else str(name)
        record["cupy"] = backend.xp.__version__
    return record


def _emit(records: list[Record]) -> list[Record]:
    for record in records:
        print(json.dumps(record), flush=True)
    return records


def _gpu() -> Backend | None:
    try:
        return select_backend("cupy")
    except ConfigError:
        return None


def run(backend: Backend, only: str) -> list[Record]:
    """Every check, or just one group; each record is printed as soon as it is made."""
    records: list[Record] = []
    if only in ("all", "parity"):
        records += _emit(check_parity(backend, cases(8)))
        default = slicing.SLICES
        slicing.SLICES = TINY_SLICES
        try:
            records += _emit(check_parity(backend, cases(2), "tiny"))
        finally:
            slicing.SLICES = default
        records += _emit(check_twins(backend))
    if only in ("all", "throughput"):
        records += _emit(check_throughput(backend, throughput_cases()))
    if only in ("all", "prefetch"):
        records += _emit(check_prefetch(backend))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = ("all", "environment", "parity", "throughput", "prefetch")
    parser.add_argument("--only", choices=choices, default="all", help="run one group of checks")
    args = parser.parse_args(argv)
    backend = _gpu()
    _emit([environment(backend)])
    if backend is None:
        print(
            "gpu-check: no usable CUDA GPU (CuPy missing or no device); nothing to check",
            file=sys.stderr,
        )
        return 2
    if args.only == "environment":
        return 0
    records = run(backend, args.only)
    failed = [r for r in records if r.get("ok") is False]
    _emit([{"check": "summary", "records": len(records), "failed": len(failed)}])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
