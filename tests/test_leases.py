# SPDX-License-Identifier: Apache-2.0
"""The lease table: unique increasing epochs, lookups by vehicle, and lazy expiry."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from parkpool.gateway.leases import LIFT_GAP, MAX_QUOTED_AHEAD_US, LeaseTable
from parkpool.gateway.tasks import PendingTask
from parkpool.producer.client import ParkpoolClient
from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import MqttTopics, TaskChunk
from tests.conftest import RunningGateway
from tests.helpers import hold_lease


def pending_task(chunk_id: int = 0, n_chunks: int = 8, offset: int = 0) -> PendingTask:
    chunk = TaskChunk(
        job_id="job-1",
        chunk_id=chunk_id,
        n_chunks=n_chunks,
        kernel="reduce",
        params={"op": "sum"},
        inputs={"x": np.arange(4, dtype=np.float64)},
        reply_topic="parkpool.results",
        deadline=time.time() + 60,
        created_at=time.time(),
    )
    return PendingTask("parkpool.tasks", 0, offset, b"raw", chunk)


class TestEpochs:
    """Every lease gets a new, larger epoch, also from a table created after a restart."""

    def test_epochs_are_unique_and_increasing(self) -> None:
        table = LeaseTable()
        epochs = [table.grant(f"car{i % 3}", pending_task(i), 30).epoch for i in range(8)]
        assert epochs == sorted(epochs)
        assert len(set(epochs)) == len(epochs)

    def test_epochs_start_from_the_wall_clock(self) -> None:
        before_us = time.time_ns() // 1000
        epoch = LeaseTable().grant("car1", pending_task(), 30).epoch
        assert before_us <= epoch <= time.time_ns() // 1000

    def test_restarted_table_never_reuses_epochs(self) -> None:
        # Given an old gateway that granted some leases
        old = LeaseTable()
        old_epochs = [old.grant("car1", pending_task(i), 30).epoch for i in range(5)]
        time.sleep(0.002)  # a restart takes far longer than this
        # When a new gateway starts and grants leases
        new = LeaseTable()
        new_epochs = [new.grant("car1", pending_task(i), 30).epoch for i in range(5)]
        # Then all its epochs are above the old ones, so an old result cannot match
        assert min(new_epochs) > max(old_epochs)

    def test_a_restart_on_a_clock_stepped_back_stays_above_what_cars_quote(self) -> None:
        # Given an old gateway whose last lease to a car had the highest epoch it saw
        old = LeaseTable()
        last = [old.grant("car1", pending_task(i), 30).epoch for i in range(5)][-1]
        # When the gateway restarts on a clock stepped back by a minute, and the car's
        # pull quotes that epoch as the highest it received from this gateway
        back_us = 60 * 1_000_000
        new = LeaseTable(wall_us=lambda: time.time_ns() // 1000 - back_us)
        assert new.grant("car2", pending_task(), 30).epoch < last  # the hazard itself
        new.quoted(last)
        # Then every lease from then on is above it: the car counts them as in flight
        lifted = new.grant("car1", pending_task(1), 30).epoch
        assert lifted > last
        # And above what the old run may have granted other cars since (they all
        # quote epochs the quoting car never saw): a gap, not the next number
        assert lifted == last + 1 + LIFT_GAP
        assert new.grant("car1", pending_task(2), 30).epoch == lifted + 1

    def test_a_lift_stops_at_the_ceiling_so_later_quotes_still_count(self) -> None:
        """A car quoting at the very ceiling cannot lift epochs past it: honest cars'
        quotes, a few leases above its epoch, must still be taken after a restart."""
        now_us = [time.time_ns() // 1000]
        table = LeaseTable(wall_us=lambda: now_us[0])
        ceiling = now_us[0] + MAX_QUOTED_AHEAD_US
        table.quoted(ceiling)
        granted = [table.grant("car1", pending_task(i), 30).epoch for i in range(3)]
        assert granted[0] == ceiling + 1
        now_us[0] += 1_000_000  # a restart a second later, the clock where it was
        restarted = LeaseTable(wall_us=lambda: now_us[0])
        restarted.quoted(granted[-1])  # an honest car's quote of what it received
        assert restarted.grant("car2", pending_task(), 30).epoch > granted[-1]

    def test_a_quote_below_the_next_epoch_changes_nothing(self) -> None:
        table = LeaseTable()
        first = table.grant("car1", pending_task(), 30).epoch
        table.quoted(first - 1000)
        table.quoted(0)
        assert table.grant("car1", pending_task(1), 30).epoch == first + 1

    def test_an_absurd_quote_is_ignored(self) -> None:
        """Only a car's word: a quote past the wall clock by more than a day could push
        every later epoch towards the end of the range, and is not taken."""
        table = LeaseTable()
        first = table.grant("car1", pending_task(), 30).epoch
        table.quoted(first + MAX_QUOTED_AHEAD_US * 2)
        table.quoted(2**63 - 1)
        assert table.grant("car1", pending_task(1), 30).epoch == first + 1

    def test_ended_epoch_is_not_reissued(self) -> None:
        table = LeaseTable()
        first = table.grant("car1", pending_task(), 30)
        table.end(first.epoch)
        second = table.grant("car1", pending_task(), 30)
        assert second.epoch > first.epoch


class TestLookups:
    """Leases are found by epoch and by vehicle until they end."""

    def test_get_and_end(self) -> None:
        table = LeaseTable()
        task = pending_task()
        lease = table.grant("car1", task, 30)
        assert table.get(lease.epoch) is lease
        assert lease.task is task
        assert lease.vehicle_id == "car1"
        assert len(table) == 1
        # When the lease ends
        assert table.end(lease.epoch) is lease
        # Then it is gone everywhere
        assert table.get(lease.epoch) is None
        assert table.of_vehicle("car1") == []
        assert len(table) == 0
        assert table.all() == []

    def test_end_unknown_epoch_returns_none(self) -> None:
        table = LeaseTable()
        lease = table.grant("car1", pending_task(), 30)
        assert table.end(lease.epoch + 1000) is None
        assert table.end(lease.epoch) is lease
        assert table.end(lease.epoch) is None

    def test_of_vehicle_lists_only_that_vehicles_leases_in_epoch_order(self) -> None:
        table = LeaseTable()
        a1 = table.grant("car-a", pending_task(0), 30)
        b1 = table.grant("car-b", pending_task(1), 30)
        a2 = table.grant("car-a", pending_task(2), 30)
        assert table.of_vehicle("car-a") == [a1, a2]
        assert table.of_vehicle("car-b") == [b1]
        assert table.of_vehicle("car-c") == []
        # When one of car-a's leases ends, only the other remains
        table.end(a1.epoch)
        assert table.of_vehicle("car-a") == [a2]
        assert {lease.epoch for lease in table.all()} == {b1.epoch, a2.epoch}

    def test_count_after_counts_only_newer_leases_of_that_vehicle(self) -> None:
        # Given three leases to car-a and one to car-b
        table = LeaseTable()
        a = [table.grant("car-a", pending_task(i), 30) for i in range(3)]
        table.grant("car-b", pending_task(3), 30)
        # Then leases the vehicle has not seen yet are those after its seen epoch
        assert table.count_after("car-a", 0) == 3
        assert table.count_after("car-a", a[0].epoch) == 2
        assert table.count_after("car-a", a[2].epoch) == 0
        assert table.count_after("car-c", 0) == 0
        # When a newer lease ends, it no longer counts
        table.end(a[2].epoch)
        assert table.count_after("car-a", a[0].epoch) == 1


class TestExpiry:
    """pop_expired yields each expired lease once and skips leases that already ended."""

    def test_yields_only_expired_in_deadline_order(self) -> None:
        table = LeaseTable()
        late = table.grant("car1", pending_task(0), 300)
        early = table.grant("car2", pending_task(1), 10)
        middle = table.grant("car1", pending_task(2), 20)
        # When the clock reaches the middle deadline
        expired = list(table.pop_expired(middle.deadline))
        # Then the two earliest expire, soonest first, and are removed
        assert expired == [early, middle]
        assert table.all() == [late]
        assert table.of_vehicle("car2") == []

    def test_nothing_expires_before_its_deadline(self) -> None:
        table = LeaseTable()
        lease = table.grant("car1", pending_task(), 10)
        assert list(table.pop_expired(lease.deadline - 0.001)) == []
        assert table.get(lease.epoch) is lease

    def test_ended_leases_are_skipped(self) -> None:
        table = LeaseTable()
        ended = table.grant("car1", pending_task(0), 10)
        kept = table.grant("car1", pending_task(1), 10)
        table.end(ended.epoch)
        assert list(table.pop_expired(kept.deadline + 1)) == [kept]
        assert len(table) == 0

    def test_never_yields_a_lease_twice(self) -> None:
        table = LeaseTable()
        leases = [table.grant("car1", pending_task(i), 10 + i) for i in range(4)]
        later = leases[-1].deadline + 1
        first = list(table.pop_expired(later))
        second = list(table.pop_expired(later))
        assert first == leases
        assert second == []

    def test_default_now_is_the_monotonic_clock(self) -> None:
        table = LeaseTable()
        due = table.grant("car1", pending_task(0), 0)
        table.grant("car1", pending_task(1), 3600)
        assert list(table.pop_expired()) == [due]
        assert len(table) == 1


class TestExtension:
    """A heartbeat moves a lease's deadline, within a limit, at no cost in memory."""

    def test_an_extended_lease_expires_at_its_new_deadline(self) -> None:
        table = LeaseTable()
        lease = table.grant("car1", pending_task(), 10)
        first = lease.deadline
        table.extend(lease.epoch, 100)
        # When the clock passes its first deadline
        assert list(table.pop_expired(first + 1)) == []
        # Then it lives on to the new one, and expires there, once
        assert list(table.pop_expired(lease.deadline)) == [lease]
        assert list(table.pop_expired(lease.deadline + 1000)) == []

    def test_extension_stops_at_the_limit_and_never_shortens(self) -> None:
        table = LeaseTable()
        lease = table.grant("car1", pending_task(), 30)
        granted = lease.deadline
        # When heartbeats ask for more than the limit allows, then for less than it has
        table.extend(lease.epoch, 3600, limit=60)
        assert lease.deadline == lease.dispatched_at + 60
        table.extend(lease.epoch, 1)
        # Then the limit holds, and a short extension does not pull the deadline back
        assert lease.deadline == lease.dispatched_at + 60 > granted

    def test_heartbeats_add_no_entries(self) -> None:
        table = LeaseTable()
        lease = table.grant("car1", pending_task(), 10)
        for _ in range(10_000):
            table.extend(lease.epoch, 10)
        assert len(table._deadlines) == 1


@pytest.mark.integration
class TestQuotedEpochs:
    """A gateway's leases stay above the epoch a car's pull quotes, whatever its clock."""

    def test_a_lease_after_a_quoting_pull_is_above_the_quote(
        self,
        gateway_factory: Callable[..., RunningGateway],
        client: ParkpoolClient,
        mqtt_conn: MqttConnection,
        mqtt_topics: MqttTopics,
    ) -> None:
        # Given a gateway, and a job for it
        gateway_factory()
        client.submit("reduce", {"x": np.ones(8), "op": "sum"})
        # When a car pulls quoting an epoch an hour ahead of the gateway's clock (one it
        # got from this gateway before a restart on a clock since stepped back)
        quoted = time.time_ns() // 1000 + 3600 * 1_000_000
        holder = hold_lease(mqtt_conn, mqtt_topics, seen=quoted)
        # Then its lease is above the quote, so the car counts it as in flight
        assert holder.assignment.epoch > quoted
        holder.close()
