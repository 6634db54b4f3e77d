# SPDX-License-Identifier: Apache-2.0
"""Per-vehicle rate limits: a flooding car is cut back, honest cars are not."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from parkpool.gateway.ratelimit import DEFAULT_MAX_KEYS, RateLimiter
from parkpool.producer.client import ParkpoolClient
from parkpool.producer.splitters import ChunkSpec
from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import Capabilities, MqttTopics, PullRequest, encode
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway
from tests.helpers import RawMqtt, wait_for


class TestTokenBucket:
    """A burst is allowed, then the steady rate; memory is bounded however many ids."""

    def test_burst_then_rate(self) -> None:
        limiter = RateLimiter(rate_per_s=10, burst=5)
        assert [limiter.allow("car", 0.0) for _ in range(6)] == [True] * 5 + [False]
        assert limiter.allow("car", 0.1)  # one token back after 1/10 s
        assert not limiter.allow("car", 0.1)
        assert limiter.allow("other", 0.1)  # each car has its own bucket

    def test_tokens_do_not_pile_up_beyond_the_burst(self) -> None:
        limiter = RateLimiter(rate_per_s=10, burst=3)
        limiter.allow("car", 0.0)
        allowed = [limiter.allow("car", 3600.0) for _ in range(5)]
        assert allowed == [True] * 3 + [False] * 2

    def test_made_up_ids_cannot_grow_memory(self) -> None:
        limiter = RateLimiter(rate_per_s=1, burst=1, max_keys=100)
        for i in range(10_000):
            limiter.allow(f"fake-{i}", 0.0)
        assert len(limiter) == 100

    def test_nonsense_settings_refused(self) -> None:
        with pytest.raises(ValueError, match="positive rate"):
            RateLimiter(rate_per_s=0, burst=1)
        with pytest.raises(ValueError, match="at least one key"):
            RateLimiter(rate_per_s=1, burst=1, max_keys=0)

    def test_default_size_is_kept_for_older_callers(self) -> None:
        assert RateLimiter(10, 5).max_keys == DEFAULT_MAX_KEYS


class TestTableSize:
    """The table follows the cell; evictions are counted, and lossy ones apart."""

    def test_a_table_sized_for_the_cell_evicts_nothing(self) -> None:
        # Given a table for twice the cars the gateway keeps state for
        cars = 1_000
        limiter = RateLimiter(rate_per_s=1, burst=2, max_keys=2 * cars)
        # When every car is heard from, twice
        for now in (0.0, 1.0):
            for i in range(cars):
                limiter.allow(f"car-{i}", now)
        # Then no bucket was dropped
        assert (limiter.evictions, limiter.lossy_evictions) == (0, 0)

    def test_evicting_a_refilled_bucket_is_not_lossy(self) -> None:
        # Given a table of two and a car that took one token long ago
        limiter = RateLimiter(rate_per_s=10, burst=5, max_keys=2)
        limiter.allow("old", 0.0)
        limiter.allow("b", 0.0)
        # When a third car arrives after "old" has refilled
        limiter.allow("c", 10.0)
        # Then "old" is evicted, and nothing is lost: a new bucket would start full too
        assert len(limiter) == 2
        assert (limiter.evictions, limiter.lossy_evictions) == (1, 0)

    def test_evicting_a_drained_bucket_is_lossy(self) -> None:
        # Given a table of two and a car that drained its bucket
        limiter = RateLimiter(rate_per_s=1, burst=3, max_keys=2)
        assert [limiter.allow("flooder", 0.0) for _ in range(4)] == [True] * 3 + [False]
        # When two other cars are heard from at once
        limiter.allow("b", 0.1)
        limiter.allow("c", 0.1)
        # Then the drained bucket was evicted and counted as lossy
        assert (limiter.evictions, limiter.lossy_evictions) == (1, 1)
        # And this is why it matters: the flooder gets a whole burst again
        assert [limiter.allow("flooder", 0.2) for _ in range(4)] == [True] * 3 + [False]

    def test_made_up_ids_are_counted_as_evictions(self) -> None:
        limiter = RateLimiter(rate_per_s=1, burst=1, max_keys=100)
        for i in range(1_000):
            limiter.allow(f"fake-{i}", float(i))
        assert limiter.evictions == 900
        # Each fake took its one token and was evicted 100 s later, refilled: harmless
        assert limiter.lossy_evictions == 0


@pytest.mark.integration
class TestFloodingCar:
    """One car flooding pulls is dropped and counted; the job still completes on the rest."""

    def test_flood_is_cut_back_and_work_goes_on(
        self,
        gateway_factory: Callable[..., RunningGateway],
        fleet_factory: Callable[..., Fleet],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        namespace: str,
    ) -> None:
        gateway = gateway_factory(pull_rate=20.0)
        fleet_factory(2)
        flooder = RawMqtt(mqtt_conn, f"flooder-{namespace}")
        topic = MqttTopics(namespace).pull("flooder", "gw1")
        pull = encode(PullRequest("flooder", 0, Capabilities("numpy", ("reduce",))))
        # When one car sends 400 pulls as fast as it can
        for _ in range(400):
            flooder.client.publish(topic, pull, qos=0)
        # Then most are dropped as rate-limited (a burst of 40 and 20/s get through)
        dropped = (
            "parkpool_gateway_dropped_total",
            {"source": "mqtt_pull", "reason": "rate_limited"},
        )
        wait_for(lambda: gateway.metric(dropped[0], **dropped[1]) >= 300, 15, "the flood dropped")
        # And a job on the honest cars completes with every chunk once
        chunks = [ChunkSpec({"op": "sum"}, {"x": np.full(4, float(i))}) for i in range(10)]
        handle = client.publish("reduce", chunks)
        handle.wait(timeout=60)
        assert sorted(c.chunk_id for c in handle.chunks(timeout=1)) == list(range(10))
        flooder.close()
