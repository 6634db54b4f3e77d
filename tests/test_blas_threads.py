# SPDX-License-Identifier: Apache-2.0
"""A simulated fleet runs its cars' kernels on one BLAS thread each, and gives the
process its own setting back when its last fleet stops (worker.blas_threads)."""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits

from parkpool.runtime.settings import MqttConnection
from parkpool.worker.fleet import Fleet
from parkpool.worker.held import WorkerSettings


def blas_threads() -> int:
    return min(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")


def fleet(prefix: str) -> Fleet:
    # No car is added: nothing connects, so no broker is needed to hold the setting.
    template = WorkerSettings("template", MqttConnection("127.0.0.1", 1), "blas")
    return Fleet(template, prefix=prefix)


class TestFleetBlasThreads:
    def test_one_thread_while_any_fleet_runs_then_the_original(self) -> None:
        # Given a process whose BLAS runs 2 threads
        with threadpool_limits(2, user_api="blas"):
            before = blas_threads()
            # When two fleets start
            first = fleet("blas-a")
            try:
                second = fleet("blas-b")
                try:
                    # Then kernels get one BLAS thread
                    assert blas_threads() == 1
                    # And stopping one fleet (twice: counted once) keeps it for the other
                    first.stop_all()
                    first.stop_all()
                    assert blas_threads() == 1
                finally:
                    second.stop_all()
            finally:
                first.stop_all()
            # And the last fleet to stop gives the process its setting back
            assert blas_threads() == before == 2
