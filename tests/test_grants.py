# SPDX-License-Identifier: Apache-2.0
"""Which gateways a car talks to, and how it splits its credits between them."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parkpool.runtime.rendezvous import top
from parkpool.schemas import GatewayState, GatewayStatus
from parkpool.worker import grants
from parkpool.worker.grants import GatewayBook, PullTo, allocate

WEIGHTS = st.dictionaries(st.from_regex(r"gw[0-9]{1,3}", fullmatch=True), st.integers(0, 10**6))


def _status(gateway_id: str, online: bool = True) -> GatewayStatus:
    state = GatewayState.ONLINE if online else GatewayState.OFFLINE
    return GatewayStatus(gateway_id, state, time.time())


def _book(*gateways: str, vehicle: str = "car-1", k: int = 2) -> GatewayBook:
    book = GatewayBook(vehicle, k)
    for gateway in gateways:
        book.announced(_status(gateway))
    return book


class TestAllocate:
    """Grants add up to exactly the credits, follow the work, and are stable."""

    @given(credits=st.integers(0, 1024), weights=WEIGHTS)
    def test_grants_add_up_to_the_credits_and_name_only_known_gateways(
        self, credits: int, weights: dict[str, int]
    ) -> None:
        grants = allocate(credits, weights)
        assert set(grants) <= set(weights)
        assert all(n > 0 for n in grants.values())
        assert sum(grants.values()) == (credits if weights else 0)
        assert allocate(credits, weights) == grants  # the same inputs, the same split

    def test_credits_follow_the_backlog(self) -> None:
        assert allocate(10, {"busy": 900, "light": 100, "idle": 0}) == {"busy": 9, "light": 1}

    def test_the_odd_credit_goes_to_the_first_ranked(self) -> None:
        assert allocate(1, {"b": 5, "a": 5}) == {"b": 1}
        assert allocate(3, {"a": 0, "b": 0}) == {"a": 2, "b": 1}  # none has work: even


class TestRendezvous:
    """Each car picks K gateways alone, and a new gateway moves only its share of cars."""

    def test_a_car_talks_to_k_of_the_roster(self) -> None:
        book = _book("gw1", "gw2", "gw3", "gw4")
        assert book.mine() == top("car-1", ["gw1", "gw2", "gw3", "gw4"], 2)
        assert len(book.mine()) == 2

    def test_a_new_gateway_moves_about_k_over_n_of_the_cars(self) -> None:
        # Given 2,000 cars on 3 gateways, when a 4th joins
        cars = [f"car-{i}" for i in range(2000)]
        before = {car: set(top(car, ["g1", "g2", "g3"], 2)) for car in cars}
        after = {car: set(top(car, ["g1", "g2", "g3", "g4"], 2)) for car in cars}
        moved = sum(before[car] != after[car] for car in cars)
        # Then about K/N = 2/4 of them change one gateway, and none changes both
        assert 0.4 < moved / len(cars) < 0.6
        assert all(len(before[car] & after[car]) >= 1 for car in cars)

    def test_zero_means_every_gateway(self) -> None:
        assert _book("gw1", "gw2", "gw3", k=0).mine() == top("car-1", ["gw1", "gw2", "gw3"], 0)
        assert len(_book("gw1", "gw2", "gw3", k=0).mine()) == 3


class TestPulls:
    """A car pulls only when what a gateway may send it must change."""

    def test_the_first_pull_splits_evenly_between_gateways_not_heard_from(self) -> None:
        book = _book("gw1", "gw2")
        first, second = book.mine()
        assert book.pulls(2, []) == [PullTo(first, 0, 1), PullTo(second, 0, 1)]
        assert book.pulls(2, []) == []  # nothing changed: nothing sent

    def test_steady_work_needs_no_pull(self) -> None:
        # Given a car that pulled for 2 and then got one task from each gateway
        book = _book("gw1", "gw2")
        first, second = book.mine()
        book.pulls(2, [])
        book.received(first, 10)
        book.received(second, 20)
        assert book.pulls(2, [(first, 10), (second, 20)]) == []
        # When a task finishes (its lease ends there, freeing the slot), or the next
        # arrives: still no pull, as each gateway refills its own slot
        assert book.pulls(2, [(second, 20)]) == []
        book.received(first, 11)
        assert book.pulls(2, [(first, 11), (second, 20)]) == []

    def test_a_task_from_before_the_pull_frees_credit_to_grant(self) -> None:
        # Given a car that already held a task from `first` when it first pulled
        book = _book("gw1", "gw2")
        first, second = book.mine()
        book.received(first, 5)
        assert book.pulls(2, [(first, 5)]) == [PullTo(first, 5, 0), PullTo(second, 0, 1)]
        # When that task finishes: `first` does not count it, so the car says so
        assert book.pulls(2, []) == [PullTo(first, 5, 1)]

    def test_tasks_from_a_gateway_outside_the_k_use_capacity(self) -> None:
        book = _book("gw1", "gw2")
        # A task still held from a gateway the car no longer talks to leaves one credit
        pulls = book.pulls(2, [("old-gw", 3)])
        assert sum(p.grant for p in pulls) == 1

    def test_a_gateway_with_no_work_gets_no_credit(self) -> None:
        book = _book("gw1", "gw2")
        first, second = book.mine()
        book.pulls(2, [])
        # When `first` says it has nothing, the car moves its credit to `second`
        assert book.noticed(first, 0) is True
        assert book.pulls(2, []) == [PullTo(first, 0, 0), PullTo(second, 0, 2)]
        # And when work comes back there, the split follows again
        assert book.noticed(first, 40) is True
        assert sorted(p.grant for p in book.pulls(2, [])) == [1, 1]

    def test_a_shrunk_share_never_lets_the_other_gateway_overfill(self) -> None:
        # Given a car whose 2 slots both hold tasks from `second` (`first` had no work)
        book = _book("gw1", "gw2")
        first, second = book.mine()
        book.noticed(first, 0)
        book.pulls(2, [])
        held = [(second, 1), (second, 2)]
        # When `first` has work again, the even split cannot be granted yet: no slot free
        book.noticed(first, 9)
        assert {p.gateway_id: p.grant for p in book.pulls(2, held)}.get(first, 0) == 0
        # And once one of `second`'s tasks ends, `first` gets that slot, not more
        pulls = book.pulls(2, held[1:])
        assert [p for p in pulls if p.gateway_id == first] == [PullTo(first, 0, 1)]

    def test_no_work_is_believed_only_for_a_while(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given a car told by `first` that it has no work
        clock = [1000.0]
        monkeypatch.setattr(grants.time, "monotonic", lambda: clock[0])
        book = _book("gw1", "gw2")
        first = book.mine()[0]
        book.pulls(2, [])
        book.noticed(first, 0)
        assert {p.gateway_id: p.grant for p in book.pulls(2, [])}[first] == 0
        # When the notice that work came back is lost, the car asks again after the TTL
        clock[0] += grants.EMPTY_TTL_S + 1
        assert PullTo(first, 0, 1) in book.pulls(2, [], refresh=True)

    def test_a_reconnect_or_a_gateway_restart_forgets_no_work(self) -> None:
        book = _book("gw1", "gw2")
        first, second = book.mine()
        book.noticed(first, 0)
        book.noticed(second, 0)
        book.reset()  # a reconnect: notices sent meanwhile were lost
        assert sorted(p.grant for p in book.pulls(2, [])) == [1, 1]
        book.noticed(first, 0)
        book.pulls(2, [])
        book.announced(_status(first))  # it restarted (without a will seen)
        assert PullTo(first, 0, 1) in book.pulls(2, [])

    def test_learning_a_backlog_it_assumed_is_no_reason_to_pull(self) -> None:
        book = _book("gw1", "gw2")
        book.pulls(2, [])
        assert book.noticed(book.mine()[0], 12) is False
        assert book.noticed(book.mine()[0], -1) is False  # "not said"

    def test_a_gateway_that_leaves_the_k_is_told_zero(self) -> None:
        # Given a car granting credit to its two gateways
        book = _book("gw1", "gw2")
        mine = book.mine()
        book.pulls(2, [])
        # When a gateway that outranks one of them joins
        newcomer = next(
            g for g in (f"gw{i}" for i in range(3, 99)) if top("car-1", [*mine, g], 2) != mine
        )
        assert book.announced(_status(newcomer)) is True
        dropped = next(g for g in mine if g not in book.mine())
        pulls = {p.gateway_id: p.grant for p in book.pulls(2, [])}
        # Then the dropped one hears zero, the newcomer gets credit
        assert pulls[dropped] == 0
        assert pulls[newcomer] >= 1

    def test_a_gateway_that_restarts_hears_the_car_again_past_its_old_leases(self) -> None:
        # Given a car holding a task from `first`'s previous run
        book = _book("gw1", "gw2")
        first, _ = book.mine()
        book.pulls(2, [])
        book.received(first, 7)
        # When `first` restarts (offline, then online again)
        book.announced(_status(first, online=False))
        assert book.announced(_status(first)) is True
        # Then its new run hears a pull whose seen covers the old task, which it never
        # sent and so must not refill
        assert PullTo(first, 7, 0) in book.pulls(2, [(first, 7)])

    def test_refresh_repeats_the_pulls_no_gateway_answered(self) -> None:
        # Given a car that pulled from both gateways
        book = _book("gw1", "gw2")
        first, second = book.mine()
        book.pulls(2, [])
        # When `first` answers (a notice, or an assignment), the periodic refresh goes
        # only to `second`, whose answer may have been lost with a QoS 0 pull
        book.answered(first)
        assert [p.gateway_id for p in book.pulls(2, [], refresh=True)] == [second]
        book.received(second, 9)
        assert book.pulls(2, [], refresh=True) == []
        # And after a reset (a reconnect), both hear it again
        book.reset()
        assert len(book.pulls(2, [])) == 2

    def test_no_roster_no_pull(self) -> None:
        book = GatewayBook("car-1")
        assert not book.any_online()
        assert book.pulls(2, []) == []
