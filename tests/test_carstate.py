# SPDX-License-Identifier: Apache-2.0
"""The car's signals: validation, the simulated bus and the file feed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from parkpool.schemas.errors import ValidationError
from parkpool.worker.carstate import CarState, Charging, FileFeed, Gear, SimulatedBus
from tests.helpers import wait_for


class TestCarState:
    """A snapshot refuses values no car can report."""

    @pytest.mark.parametrize(
        ("data", "reason"),
        [
            ({"soc_pct": 101.0}, "out_of_range"),
            ({"gear": "warp"}, "bad_value"),
            ({"charging": "solar"}, "bad_value"),
            ({"locked": "yes"}, "wrong_type"),
            ({"battery_temp_c": "hot"}, "wrong_type"),
            ({"soc_pct": True}, "wrong_type"),
        ],
    )
    def test_bad_values_are_refused(self, data: dict[str, object], reason: str) -> None:
        with pytest.raises(ValidationError) as caught:
            CarState.from_mapping(data)
        assert caught.value.reason == reason

    def test_unknown_keys_are_ignored_and_named(self) -> None:
        # Given a feed from an integration newer than this agent
        data = {"soc_pct": 80.0, "seats": 5, "cabin_overheat_protection": True}
        # Then the state is read, and the keys it does not know are named
        assert CarState.from_mapping(data).soc_pct == 80.0
        assert CarState.unknown_fields(data) == ["cabin_overheat_protection", "seats"]

    def test_strings_become_enums(self) -> None:
        state = CarState.from_mapping({"gear": "drive", "charging": "dc_fast"})
        assert (state.gear, state.charging) == (Gear.DRIVE, Charging.DC_FAST)


class TestSimulatedBus:
    """Every change reaches subscribers before set() returns; no change, no call."""

    def test_subscribers_see_each_change(self) -> None:
        bus = SimulatedBus()
        seen: list[CarState] = []
        bus.subscribe(seen.append)
        bus.set(locked=False)
        assert [s.locked for s in seen] == [False]
        bus.set(locked=False, at=bus.current().at)  # the same state again
        assert len(seen) == 1
        assert bus.fresh(time.time() + 10**6)


class TestFileFeed:
    """An in-car integration rewrites a JSON file; bad content keeps the last good state."""

    def test_reads_changes_and_survives_garbage(self, tmp_path: Path) -> None:
        path = tmp_path / "car.json"
        # Given no file yet: the feed reports a state it will not act on
        feed = FileFeed(path, poll_s=0.02, stale_after_s=5)
        try:
            assert not feed.fresh(time.time())
            seen: list[CarState] = []
            feed.subscribe(seen.append)
            # When the integration writes a state
            _write(path, {"locked": False, "soc_pct": 64.0})
            # Then subscribers get it, and it is fresh
            wait_for(lambda: seen and not seen[-1].locked, 5, "the first state")
            assert feed.current().soc_pct == 64.0
            assert feed.fresh(time.time())
            # When garbage is written
            _write_raw(path, "{not json")
            wait_for(lambda: feed.errors == 1, 5, "the bad write to be counted")
            # Then the last good state stays
            assert feed.current().soc_pct == 64.0
            # And a wrong field is refused the same way
            _write(path, {"soc_pct": 250})
            wait_for(lambda: feed.errors == 2, 5, "the out-of-range write to be counted")
            assert feed.current().soc_pct == 64.0
        finally:
            feed.close()

    def test_fields_it_does_not_know_are_read_past(self, tmp_path: Path) -> None:
        # Given an integration newer than the agent, writing a field the agent lacks
        path = tmp_path / "car.json"
        _write(path, {"soc_pct": 70.0, "v2g_export_kw": 3.5})
        feed = FileFeed(path, poll_s=0.02)
        try:
            # Then the state is taken, the field named once, and nothing counted as bad
            assert feed.current().soc_pct == 70.0
            assert feed.unknown_fields == {"v2g_export_kw"} and feed.errors == 0
            with capture_logs() as logs:
                _write(path, {"soc_pct": 71.0, "v2g_export_kw": 3.0})
                wait_for(lambda: feed.current().soc_pct == 71.0, 5, "the second state")
            assert [e for e in logs if e["event"] == "car_state_unknown_fields"] == []
        finally:
            feed.close()

    def test_state_goes_stale_when_not_rewritten(self, tmp_path: Path) -> None:
        path = tmp_path / "car.json"
        _write(path, {"at": time.time() - 60})
        feed = FileFeed(path, stale_after_s=30)
        try:
            assert not feed.fresh(time.time())
        finally:
            feed.close()


def _write(path: Path, data: dict[str, object]) -> None:
    _write_raw(path, json.dumps(data))


def _write_raw(path: Path, text: str) -> None:
    # As an integration should: write aside, then rename over, so no half-state is read.
    temp = path.with_suffix(".tmp")
    temp.write_text(text)
    os.replace(temp, path)
