# SPDX-License-Identifier: Apache-2.0
"""Futures and asyncio across jobs, on the real brokers, as a backend engineer uses them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

import parkpool
from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.settings import KafkaConnection
from parkpool.schemas.reputation import Level
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway

JOBS = 5


def inputs(i: int) -> np.ndarray:
    return np.arange(1000 * (i + 1), dtype=np.float64)


class TestFutures:
    """as_completed and wait, importable from parkpool, over several running jobs."""

    def test_as_completed_over_five_jobs(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        client: ParkpoolClient,
    ) -> None:
        # Given a gateway, cars, and five jobs of different sizes in flight at once
        gateway_factory()
        fleet_factory(3)
        jobs = {
            client.submit("reduce", {"x": inputs(i), "op": "sum"}, chunk_elems=500): i
            for i in range(JOBS)
        }
        # When they are taken as they complete
        finished = list(parkpool.as_completed(jobs, timeout=120))
        # Then each comes back once, with its own right answer
        assert sorted(jobs[job] for job in finished) == list(range(JOBS))
        for job in finished:
            assert job.future.result() == inputs(jobs[job]).sum()
        done, pending = parkpool.wait(jobs, timeout=0, return_when=parkpool.ALL_COMPLETED)
        assert done == set(jobs) and pending == set()


class TestAsyncio:
    """Five concurrent jobs under one event loop, with the async client."""

    def test_five_concurrent_jobs_under_one_loop(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        namespace: str,
        kafka_conn: KafkaConnection,
    ) -> None:
        gateway_factory()
        fleet_factory(3)
        settings = ProducerSettings(kafka_conn, namespace, verification=Level.UNCHECKED)

        async def one(client: ParkpoolClient, i: int) -> tuple[float, list[int]]:
            job = await client.asubmit("reduce", {"x": inputs(i), "op": "sum"}, chunk_elems=500)
            ids = [chunk.chunk_id async for chunk in job.chunks(timeout=60)]
            return await job, ids

        async def main() -> list[tuple[float, list[int]]]:
            async with ParkpoolClient(settings) as client:
                ticks = 0

                async def heartbeat() -> None:  # the loop keeps turning meanwhile
                    nonlocal ticks
                    while True:
                        ticks += 1
                        await asyncio.sleep(0.01)

                beating = asyncio.create_task(heartbeat())
                outcomes = await asyncio.wait_for(
                    asyncio.gather(*(one(client, i) for i in range(JOBS))), 120
                )
                beating.cancel()
                assert ticks > 10, "the event loop was blocked while jobs ran"
                return outcomes

        outcomes = asyncio.run(main())
        for i, (answer, ids) in enumerate(outcomes):
            assert answer == inputs(i).sum()
            assert sorted(ids) == list(range(len(ids))) and len(ids) == 2 * (i + 1)
