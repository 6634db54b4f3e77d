# SPDX-License-Identifier: Apache-2.0
"""The reputation book counts its quarantined cars as notices come, so that a gateway
reads the figure at every loop step without a pass over the cars."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from parkpool.runtime.reputation import ReputationBook
from parkpool.schemas.reputation import CarState, CarTally, QuarantineNotice

CARS = st.sampled_from(["car-a", "car-b", "car-c"])
NOTICES = st.builds(
    lambda car, state, generation: QuarantineNotice(car, state, generation, 1.0, "w", "why"),
    CARS,
    st.sampled_from(list(CarState)),
    st.integers(0, 3),
)
TALLIES = st.builds(lambda car: CarTally(car, "w", 0, 1, 0, 0, 1.0), CARS)


class TestQuarantinedCount:
    """The running count is always what a pass over the book would find."""

    @given(records=st.lists(st.one_of(NOTICES, TALLIES), max_size=40))
    def test_the_count_matches_the_quarantined_cars(
        self, records: list[QuarantineNotice | CarTally]
    ) -> None:
        # Given any run of quarantines, releases, repeats and tallies, on either book
        for book in (ReputationBook(), ReputationBook(tallies=False)):
            for record in records:
                book.apply(record)
                # Then after each, the count is the number of quarantined cars
                assert book.quarantined_count() == len(book.quarantined_cars())

    def test_a_repeated_notice_counts_its_car_once(self) -> None:
        # Given a car quarantined by two clients, and another quarantined then released
        book = ReputationBook(tallies=False)
        book.apply(QuarantineNotice("car-a", CarState.QUARANTINED, 0, 1.0, "sdk-1", "lied"))
        book.apply(QuarantineNotice("car-a", CarState.QUARANTINED, 0, 2.0, "sdk-2", "lied"))
        book.apply(QuarantineNotice("car-b", CarState.QUARANTINED, 0, 1.0, "sdk-1", "lied"))
        book.apply(QuarantineNotice("car-b", CarState.RELEASED, 1, 3.0, "ops", "released"))
        # Then one car is quarantined
        assert book.quarantined_count() == 1

    def test_reading_the_count_does_not_grow_with_the_book(self) -> None:
        # Given a gateway's book holding 20,000 quarantined cars
        book = ReputationBook(tallies=False)
        for i in range(20_000):
            book.apply(QuarantineNotice(f"car-{i}", CarState.QUARANTINED, 0, 1.0, "w", "lied"))
        # When the gauge reads the count as often as its loop turns
        start = time.perf_counter()
        for _ in range(1000):
            assert book.quarantined_count() == 20_000
        # Then a thousand reads take far less than one pass over the cars did per read
        # (some 7 ms each: a 5 ms loop step's budget, and more)
        assert time.perf_counter() - start < 0.05
