# SPDX-License-Identifier: Apache-2.0
"""The GPU check's parts run on NumPy, and the script itself needs only NumPy and msgpack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parkpool.schemas.kernels import BUILTIN
from parkpool.worker.backend import available_backends, numpy_backend
from tests import gpu_check

NUMPY = numpy_backend()
HAS_GPU = any(backend.is_gpu for backend in available_backends())
# What a GPU machine with only Python, NumPy and CuPy lacks.
ABSENT = ("structlog", "paho", "confluent_kafka", "pytest", "prometheus_client", "yaml")
BARE_RUN = """
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
        return None
sys.meta_path.insert(0, Absent())
sys.argv = ["gpu_check", "--only", "environment"]
runpy.run_module("tests.gpu_check", run_name="__main__")
"""


class TestScript:
    """The script imports on a bare machine and says plainly whether there is a GPU."""

    def test_environment_probe_without_project_dependencies(self) -> None:
        # Given an interpreter where the project's broker and logging libraries are absent
        code = BARE_RUN.format(absent=ABSENT)
        # When the script probes the environment
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
        )
        # Then it reports the machine as a JSON line: status 0 with a GPU, 2 without one
        first = json.loads(run.stdout.splitlines()[0])
        assert first["check"] == "environment" and first["gpu"] is HAS_GPU, run.stderr
        assert run.returncode == (0 if HAS_GPU else 2)
        if not HAS_GPU:
            assert "no usable CUDA GPU" in run.stderr and "Traceback" not in run.stderr

    def test_bundle_goes_first_on_the_path(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given an unpacked bundle, and a path where there is none
        site = tmp_path / "site"
        site.mkdir()
        monkeypatch.setattr(sys, "path", list(sys.path))
        # When each is offered / Then only the existing one is put first, once
        assert gpu_check.use_bundle(site) and gpu_check.use_bundle(site)
        assert sys.path[0] == str(site) and sys.path.count(str(site)) == 1
        assert not gpu_check.use_bundle(tmp_path / "missing")


class TestChecksOnNumpy:
    """Parity, twin and throughput checks produce complete records on the NumPy backend."""

    def test_parity_covers_every_kernel(self) -> None:
        # Given the small cases / When checked on NumPy
        records = gpu_check.check_parity(NUMPY, gpu_check.cases(1))
        # Then every built-in kernel is covered and within its tolerance
        assert {r["kernel"] for r in records} == set(BUILTIN)
        assert all(r["ok"] and r["max_rel_err"] <= r["rtol"] for r in records), records
        assert all(r["check"] == "parity" and r["backend"] == "numpy" for r in records)

    def test_parity_with_tiny_slices(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given slices so small that every task is tiled, batched and paced
        monkeypatch.setattr(gpu_check.slicing, "SLICES", gpu_check.TINY_SLICES)
        monkeypatch.setattr(gpu_check.slicing, "CPU_SLICES", gpu_check.TINY_SLICES)
        # When checked / Then every kernel still matches its reference
        records = gpu_check.check_parity(NUMPY, gpu_check.cases(1), "tiny")
        assert all(r["ok"] and r["slices"] == "tiny" for r in records), records

    def test_twins(self) -> None:
        # Given / When the twins are checked without a GPU
        records = gpu_check.check_twins(NUMPY)
        # Then the stencil twin matches the reference and the option twin the scalar oracle
        assert sorted(r["kernel"] for r in records) == ["option_mc", "stencil2d", "stencil2d"]
        assert all(r["ok"] and r["hand_written"] is False for r in records), records

    def test_throughput_records(self) -> None:
        # Given one small case per kernel
        small = {case.kernel: case for case in gpu_check.cases(1)}
        # When timed against their baselines
        records = gpu_check.check_throughput(NUMPY, list(small.values()), repeats=1)
        # Then each record has a positive rate for both, from the cost model
        assert {r["kernel"] for r in records} == set(BUILTIN)
        for record in records:
            assert record["gflop"] > 0 and record["slices"] >= 1
            assert record["ours_gflops"] > 0 and record["baseline_gflops"] > 0
            assert record["baseline"]

    def test_prefetch_needs_a_gpu(self) -> None:
        # Given / When the prefetch check is asked of NumPy / Then it measures nothing
        assert gpu_check.check_prefetch(NUMPY) == []
