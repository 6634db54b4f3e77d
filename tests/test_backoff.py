# SPDX-License-Identifier: Apache-2.0
"""Capped exponential backoff with full jitter (parkpool.runtime.backoff)."""

from __future__ import annotations

import random

import pytest

from parkpool.runtime.backoff import Backoff, compute_backoff


class TestComputeBackoff:
    """The wait is uniform between zero and a ceiling that doubles up to the cap."""

    @pytest.mark.parametrize(
        ("failures", "ceiling"), [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (7, 30.0), (50, 30.0)]
    )
    def test_stays_under_the_ceiling(self, failures: int, ceiling: float) -> None:
        rng = random.Random(failures)
        draws = [compute_backoff(failures, rng=rng) for _ in range(2000)]
        assert min(draws) >= 0.0 and max(draws) <= ceiling
        # Full jitter: the draws fill the whole window, not a band near its top.
        assert min(draws) < 0.05 * ceiling and max(draws) > 0.95 * ceiling


class TestBackoff:
    """One client's schedule widens with each failure and starts over after a success."""

    def test_widens_then_resets(self) -> None:
        # Given many clients failing six times in a row
        clients = [Backoff(base=1.0, cap=8.0, rng=random.Random(n)) for n in range(300)]
        delays = [[client.next_delay() for _ in range(6)] for client in clients]
        # Then the n-th wait is drawn from [0, min(8, 2^(n-1))], and fills that window
        for attempt, ceiling in enumerate([1.0, 2.0, 4.0, 8.0, 8.0, 8.0]):
            column = [row[attempt] for row in delays]
            assert max(column) <= ceiling
            assert max(column) > 0.9 * ceiling
        # And after a success the window is back to its smallest
        client = clients[0]
        client.reset()
        assert client.failures == 0
        assert client.next_delay() <= 1.0

    def test_clients_that_fail_together_spread_out(self) -> None:
        # Given a thousand clients that lost their broker in the same instant
        clients = [Backoff(base=1.0, cap=60.0, rng=random.Random(n)) for n in range(1000)]
        # When each waits its first delay
        first = sorted(client.next_delay() for client in clients)
        # Then no tenth of a second holds more than a few percent of them
        buckets = [0] * 10
        for delay in first:
            buckets[min(9, int(delay * 10))] += 1
        assert max(buckets) < 0.15 * len(clients)

    def test_without_jitter_every_client_waits_the_same(self) -> None:
        # Given the bench's baseline: jitter off
        clients = [
            Backoff(base=1.0, cap=2.0, jitter=False, rng=random.Random(n)) for n in range(50)
        ]
        # Then every client waits the whole ceiling, in lockstep: 1 s, then 2 s for ever
        waits = {tuple(client.next_delay() for _ in range(4)) for client in clients}
        assert waits == {(1.0, 2.0, 2.0, 2.0)}
