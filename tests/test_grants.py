# SPDX-License-Identifier: Apache-2.0
"""How a car splits its credits between gateways, and what it remembers of them."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from parkpool.schemas import GatewayState, GatewayStatus
from parkpool.worker.grants import MAX_GATEWAYS, GatewayBook, allocate

BACKLOGS = st.dictionaries(st.from_regex(r"gw[0-9]{1,3}", fullmatch=True), st.integers(0, 10**6))


class TestAllocate:
    """Grants add up to exactly the credits, and follow the work."""

    @given(credits=st.integers(0, 1024), backlog=BACKLOGS, rotation=st.integers(0, 100))
    def test_grants_add_up_to_the_credits_and_name_only_known_gateways(
        self, credits: int, backlog: dict[str, int], rotation: int
    ) -> None:
        grants = allocate(credits, backlog, rotation)
        assert set(grants) <= set(backlog)
        assert all(n > 0 for n in grants.values())
        assert sum(grants.values()) == (credits if backlog else 0)

    def test_credits_follow_the_backlog(self) -> None:
        assert allocate(10, {"busy": 900, "light": 100, "idle": 0}) == {"busy": 9, "light": 1}

    def test_without_backlog_the_odd_credit_rotates(self) -> None:
        firsts = {next(iter(allocate(1, {"a": 0, "b": 0, "c": 0}, r))) for r in range(3)}
        assert firsts == {"a", "b", "c"}


def _status(gateway_id: str, queued: int = 0, online: bool = True) -> GatewayStatus:
    state = GatewayState.ONLINE if online else GatewayState.OFFLINE
    return GatewayStatus(gateway_id, state, time.time(), queued)


class TestGatewayBook:
    """A car pulls at once when a gateway appears or its backlog appears, and its pulls
    stay within the contract's 64 gateways."""

    def test_when_to_pull_at_once(self) -> None:
        book = GatewayBook()
        assert book.announced(_status("gw1")) is True  # new: knows nothing of our pull
        assert book.announced(_status("gw1")) is False  # nothing changed
        assert book.announced(_status("gw1", queued=5)) is True  # work appeared
        assert book.announced(_status("gw1", queued=9)) is False  # more of it: no hurry
        assert book.announced(_status("gw1", online=False)) is False
        assert not book.any_online()

    def test_seen_epochs_only_rise_and_only_name_online_gateways(self) -> None:
        book = GatewayBook()
        book.announced(_status("gw1", queued=1))
        book.received("gw1", 7)
        book.received("gw1", 3)  # an older assignment arriving late
        book.received("gone", 99)
        seen, grants = book.split(4)
        assert seen == {"gw1": 7} and grants == {"gw1": 4}

    def test_a_pull_names_at_most_the_busiest_64_gateways(self) -> None:
        book = GatewayBook()
        for n in range(MAX_GATEWAYS + 6):
            book.announced(_status(f"gw{n}", queued=n + 1))
            book.received(f"gw{n}", 1)
        seen, grants = book.split(1024)
        assert len(seen) == MAX_GATEWAYS and "gw0" not in seen
        assert set(grants) <= set(seen) and sum(grants.values()) == 1024
