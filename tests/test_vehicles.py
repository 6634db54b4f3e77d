# SPDX-License-Identifier: Apache-2.0
"""The vehicle book: absolute credits, round-robin hunger, states and liveness."""

from __future__ import annotations

import time
from typing import Any

import pytest

from parkpool.gateway.vehicles import FETCH_PAUSE_MAX_S, VehicleBook
from parkpool.runtime.reputation import ReputationBook
from parkpool.schemas import Capabilities, PullRequest, VehicleState
from parkpool.schemas.reputation import CarState, QuarantineNotice

CAPS = Capabilities("numpy", ("reduce", "poly"))


def pull(vehicle_id: str, credits: int, seen: dict[str, int] | None = None) -> PullRequest:
    """A pull that grants all its credits to gw1, the gateway under test."""
    return PullRequest(vehicle_id, credits, CAPS, seen or {}, {"gw1": credits} if credits else {})


class TestPulls:
    """A pull sets a vehicle's credits to what it says, never adding to them."""

    def test_pull_registers_the_vehicle(self) -> None:
        book = VehicleBook("gw1")
        view = book.on_pull(pull("car1", 3, {"gw1": 42, "gw2": 7}))
        assert book.get("car1") is view
        assert len(book) == 1
        assert view.credits == 3
        assert view.seen_epoch == 42  # only this gateway's entry counts
        assert view.capabilities == CAPS
        assert view.state is VehicleState.ONLINE
        assert book.hungry() == ["car1"]

    def test_duplicated_pull_grants_nothing_extra(self) -> None:
        book = VehicleBook("gw1")
        # When the same pull arrives twice (MQTT QoS 1 may redeliver)
        book.on_pull(pull("car1", 2))
        view = book.on_pull(pull("car1", 2))
        # Then the credits are what the vehicle said, not twice that
        assert view.credits == 2
        assert book.hungry() == ["car1"]

    def test_later_pull_replaces_credits_and_seen_epoch(self) -> None:
        book = VehicleBook("gw1")
        book.on_pull(pull("car1", 5, {"gw1": 10}))
        view = book.on_pull(pull("car1", 1))
        assert view.credits == 1
        assert view.seen_epoch == 0  # no entry for this gateway: it has seen nothing

    def test_pull_without_credits_does_not_make_a_vehicle_hungry(self) -> None:
        book = VehicleBook("gw1")
        view = book.on_pull(pull("car1", 0))
        assert view.credits == 0
        assert book.hungry() == []

    def test_pull_brings_a_suspended_vehicle_back_online(self) -> None:
        book = VehicleBook("gw1")
        book.set_state("car1", VehicleState.SUSPENDED)
        view = book.on_pull(pull("car1", 2))
        assert view.state is VehicleState.ONLINE
        assert book.hungry() == ["car1"]


class TestAskedAt:
    """When a vehicle started waiting for work: the start of its dispatch latency."""

    def test_refreshed_pull_keeps_the_first_ask(self) -> None:
        book = VehicleBook("gw1")
        first = book.on_pull(pull("car1", 2)).asked_at
        time.sleep(0.01)
        # A refresh while still hungry must not hide how long the vehicle has waited
        assert book.on_pull(pull("car1", 2)).asked_at == first

    def test_ask_after_being_full_starts_a_new_wait(self) -> None:
        book = VehicleBook("gw1")
        first = book.on_pull(pull("car1", 1)).asked_at
        book.served("car1", still_hungry=False)
        time.sleep(0.01)
        assert book.on_pull(pull("car1", 1)).asked_at > first


class TestRoundRobin:
    """Hungry vehicles are served longest-waiting first, then rotate to the back."""

    def test_first_hungry_is_the_longest_waiting(self) -> None:
        book = VehicleBook("gw1")
        for vehicle_id in ("car-a", "car-b"):
            book.on_pull(pull(vehicle_id, 1))
        assert book.hungry_count() == 2
        assert book.first_hungry().vehicle_id == "car-a"
        book.served("car-a", still_hungry=True)
        assert book.first_hungry().vehicle_id == "car-b"

    def test_served_vehicle_rotates_to_the_back(self) -> None:
        book = VehicleBook("gw1")
        for vehicle_id in ("car-a", "car-b", "car-c"):
            book.on_pull(pull(vehicle_id, 2))
        assert book.hungry() == ["car-a", "car-b", "car-c"]
        # When car-a gets a task and still has credit
        book.served("car-a", still_hungry=True)
        # Then it waits behind the others
        assert book.hungry() == ["car-b", "car-c", "car-a"]

    def test_full_vehicle_leaves_the_hungry_list(self) -> None:
        book = VehicleBook("gw1")
        book.on_pull(pull("car-a", 1))
        book.on_pull(pull("car-b", 1))
        book.served("car-a", still_hungry=False)
        assert book.hungry() == ["car-b"]
        # And it comes back at the end when it pulls again
        book.on_pull(pull("car-a", 1))
        assert book.hungry() == ["car-b", "car-a"]

    def test_repeated_pull_keeps_a_waiting_vehicles_place(self) -> None:
        book = VehicleBook("gw1")
        book.on_pull(pull("car-a", 1))
        book.on_pull(pull("car-b", 1))
        book.on_pull(pull("car-a", 3))
        assert book.hungry() == ["car-a", "car-b"]

    def test_fair_turns_over_several_rounds(self) -> None:
        # Given three hungry vehicles with plenty of credit
        book = VehicleBook("gw1")
        for vehicle_id in ("car-a", "car-b", "car-c"):
            book.on_pull(pull(vehicle_id, 100))
        # When six tasks go out, each to the head of the hungry list
        turns = []
        for _ in range(6):
            head = book.hungry()[0]
            turns.append(head)
            book.served(head, still_hungry=True)
        # Then every vehicle got exactly two, in turn
        assert turns == ["car-a", "car-b", "car-c"] * 2


class TestStates:
    """A vehicle that is not ONLINE has no credit and is never hungry."""

    @pytest.mark.parametrize(
        "state", [VehicleState.SUSPENDED, VehicleState.DRAINING, VehicleState.OFFLINE]
    )
    def test_non_online_state_drops_hunger_and_credits(self, state: VehicleState) -> None:
        book = VehicleBook("gw1")
        book.on_pull(pull("car-a", 4))
        book.on_pull(pull("car-b", 4))
        view = book.set_state("car-a", state)
        assert view.state is state
        assert view.credits == 0
        assert book.hungry() == ["car-b"]

    def test_online_state_keeps_credits(self) -> None:
        book = VehicleBook("gw1")
        book.on_pull(pull("car-a", 4))
        view = book.set_state("car-a", VehicleState.ONLINE)
        assert view.credits == 4
        assert book.hungry() == ["car-a"]

    def test_set_state_registers_an_unknown_vehicle(self) -> None:
        book = VehicleBook("gw1")
        view = book.set_state("car-x", VehicleState.DRAINING)
        assert book.get("car-x") is view
        assert view.credits == 0
        assert book.hungry() == []

    def test_forget_removes_everywhere(self) -> None:
        book = VehicleBook("gw1")
        book.on_pull(pull("car-a", 4))
        book.forget("car-a")
        book.forget("car-never-seen")
        assert book.get("car-a") is None
        assert book.hungry() == []
        assert len(book) == 0

    def test_only_online_cars_that_grant_work_count_as_another_car_here(self) -> None:
        # Given car-a granting work, and cars that are known but grant nothing
        book = VehicleBook("gw1")
        book.on_pull(pull("car-a", 1))
        book.on_pull(pull("car-idle", 0))
        book.set_state("car-gone", VehicleState.OFFLINE)
        # Then car-a is alone, and every other car has car-a beside it
        assert not book.others_granting("car-a")
        assert book.others_granting("car-idle") and book.others_granting("car-new")
        # When car-b grants work too, then neither is alone
        book.on_pull(pull("car-b", 2))
        assert book.others_granting("car-a") and book.others_granting("car-b")
        # And when car-b suspends, takes its grant back, or is forgotten, car-a is alone again
        for leave in (
            lambda: book.set_state("car-b", VehicleState.SUSPENDED),
            lambda: book.on_pull(pull("car-b", 0)),
            lambda: book.forget("car-b"),
        ):
            book.on_pull(pull("car-b", 2))
            leave()
            assert not book.others_granting("car-a")

    def test_a_quarantined_car_is_no_other_cars_reason_to_wait(self) -> None:
        # Given a book that asks the gateway's reputation book who is quarantined, and
        # car-a granting work beside car-bad, which was quarantined since its last pull
        reputation = ReputationBook(tallies=False)
        book = VehicleBook("gw1", quarantined=reputation.quarantined)
        book.on_pull(pull("car-a", 1))
        book.on_pull(pull("car-bad", 1))
        reputation.apply(QuarantineNotice("car-bad", CarState.QUARANTINED, 0, 1.0, "sdk", "lied"))
        assert book.others_granting("car-a")
        # When dispatch refuses it work, Then car-a is alone
        book.refused("car-bad")
        assert not book.others_granting("car-a")
        # And however often car-bad pulls, it stays hungry but car-a stays alone
        book.on_pull(pull("car-bad", 4))
        assert not book.others_granting("car-a") and "car-bad" in book.hungry()
        # When an operator releases it, Then its next pull counts it again
        reputation.apply(QuarantineNotice("car-bad", CarState.RELEASED, 1, 2.0, "ops", "released"))
        book.on_pull(pull("car-bad", 1))
        assert book.others_granting("car-a")


class TestHeldInputs:
    """Which stored inputs each car is thought to hold, and how many cars hold each."""

    def test_a_car_holds_its_last_inputs_and_each_is_counted_once_per_car(self) -> None:
        # Given two cars, each sent some inputs (the first twice the same one)
        book = VehicleBook("gw1")
        a, b = book.heard("car-a"), book.heard("car-b")
        book.remember_blobs(a, [1, 2], keep=3)
        book.remember_blobs(a, [2, 3], keep=3)
        book.remember_blobs(b, [1], keep=3)
        # Then each car holds what it was sent, and 1 is held by both
        assert (a.blobs, b.blobs) == ((1, 2, 3), (1,))
        assert [book.holders(h) for h in (1, 2, 3, 4)] == [2, 1, 1, 0]
        # When the first is sent a fourth, its oldest falls out
        book.remember_blobs(a, [4], keep=3)
        assert a.blobs == (2, 3, 4) and [book.holders(h) for h in (1, 4)] == [1, 1]

    def test_an_input_sent_again_is_the_newest_and_outlasts_older_ones(self) -> None:
        # Given a car sent row block 9 with each of three column blocks
        book = VehicleBook("gw1")
        car = book.heard("car-a")
        for column in (1, 2, 3):
            book.remember_blobs(car, [9, column], keep=3)
        # Then the row block, sent with every tile, is still held; the oldest column not
        assert car.blobs == (2, 9, 3) and book.holders(9) == 1 and book.holders(1) == 0

    def test_one_input_named_twice_is_held_once(self) -> None:
        # Given a tile of gemm(A, A) on the diagonal: both inputs are the one block
        book = VehicleBook("gw1")
        car = book.heard("car-a")
        book.remember_blobs(car, [5, 5], keep=3)
        assert car.blobs == (5,) and book.holders(5) == 1
        # When the car is forgotten, nothing is left counted
        book.forget("car-a")
        assert book.holders(5) == 0 and not book.holds_any()

    def test_a_forgotten_car_holds_nothing(self) -> None:
        book = VehicleBook("gw1")
        book.remember_blobs(book.heard("car-a"), [7, 8], keep=8)
        book.forget("car-a")
        assert book.holders(7) == book.holders(8) == 0 and not book.holds_any()


class TestLiveness:
    """silent_since reports each vehicle not heard from since a cutoff, once."""

    def test_silent_since(self) -> None:
        book = VehicleBook("gw1")
        now = time.monotonic()
        book.heard("car-old", now - 60)
        book.heard("car-new", now - 1)
        assert book.silent_since(now - 120) == []
        assert book.silent_since(now - 30) == ["car-old"]
        assert book.silent_since(now) == ["car-new"]  # car-old was reported already

    def test_hearing_a_vehicle_refreshes_it(self) -> None:
        book = VehicleBook("gw1")
        now = time.monotonic()
        book.heard("car1", now - 60)
        # When any message arrives from it
        book.heard("car1", now)
        # Then it is no longer silent, and is reported once it is silent again
        assert book.silent_since(now - 30) == []
        assert book.silent_since(now + 1) == ["car1"]

    def test_the_cost_is_the_silent_cars_not_the_fleet(self) -> None:
        # Given 10,000 cars heard just now and one silent for a minute
        book = VehicleBook("gw1")
        now = time.monotonic()
        book.heard("quiet", now - 60)
        for i in range(10_000):
            book.heard(f"car-{i}", now)
        # Then finding the silent one looks at the heap's head only
        assert book.silent_since(now - 30) == ["quiet"]
        assert len(book._silence) == 10_000


class TestGrants:
    """A gateway takes only the credits granted to it, so gateways never over-fill a car."""

    def test_credits_granted_to_another_gateway_are_not_ours(self) -> None:
        # Given a vehicle with 3 free slots that grants 1 to us and 2 to gw2
        book = VehicleBook("gw1")
        view = book.on_pull(PullRequest("car1", 3, CAPS, {}, {"gw1": 1, "gw2": 2}))
        # Then we may send it exactly one task
        assert view.credits == 1
        assert book.hungry() == ["car1"]

    def test_no_grant_means_not_hungry(self) -> None:
        book = VehicleBook("gw1")
        book.on_pull(PullRequest("car1", 2, CAPS, {}, {"gw1": 2}))
        # When the next pull grants everything to gw2
        view = book.on_pull(PullRequest("car1", 2, CAPS, {}, {"gw2": 2}))
        # Then this gateway stops sending to it
        assert view.credits == 0
        assert book.hungry() == []


class TestDwellFit:
    """A task is sent only if it should finish before the car is expected to leave."""

    def _view(self, gflops: float, dwell_s: float) -> Any:
        book = VehicleBook("gw1")
        caps = Capabilities("numpy", ("reduce",), gflops_per_s=gflops)
        request = PullRequest("car1", 1, caps, {}, {"gw1": 1}, dwell_s)
        return book.on_pull(request)

    def test_fits_by_cost_over_rate(self) -> None:
        view = self._view(gflops=10.0, dwell_s=60.0)
        now = view.dwell_at
        assert view.fits(600.0, now)  # 60 s of work in 60 s
        assert not view.fits(601.0, now)
        # 30 s later only 30 s are left
        assert not view.fits(400.0, now + 30)
        assert view.fits(300.0, now + 30)

    def test_unknowns_never_block(self) -> None:
        assert self._view(gflops=0.0, dwell_s=60.0).fits(1e6, time.monotonic())
        assert self._view(gflops=10.0, dwell_s=0.0).fits(1e6, time.monotonic())
        assert self._view(gflops=10.0, dwell_s=1.0).fits(0.0, time.monotonic() + 99)


class TestFetchFailures:
    """A car the store fails is woken again after a pause that doubles, to a cap."""

    def test_the_pause_doubles_with_each_failure_in_a_row_up_to_the_cap(self) -> None:
        book = VehicleBook("gw1")
        book.on_pull(pull("car", 1))
        book.served("car", False)
        assert FETCH_PAUSE_MAX_S == 60.0
        for pause in (5.0, 10.0, 20.0, 40.0, 60.0, 60.0):
            book.fetch_failed("car", 0.0)
            # Not woken a moment before its pause ends; woken at its end
            book.wake_due(pause - 0.01)
            assert "car" not in book.hungry()
            book.wake_due(pause)
            assert book.hungry() == ["car"]
            book.served("car", False)

    def test_a_car_the_store_serves_again_starts_from_the_shortest_pause(self) -> None:
        book = VehicleBook("gw1")
        book.on_pull(pull("car", 1))
        book.served("car", False)
        for _ in range(3):
            book.fetch_failed("car", 0.0)
        book.wake_due(100.0)
        book.served("car", False)
        # When its next result comes (the gateway resets the count it keeps), Then the
        # next failure waits the shortest pause again
        book.heard("car").fetch_failures = 0
        book.fetch_failed("car", 100.0)
        book.wake_due(105.0)
        assert book.hungry() == ["car"]
