# SPDX-License-Identifier: Apache-2.0
"""The owner policy: thresholds, hysteresis, dwell times and the sticky pause."""
# ruff: noqa: E501 - the decision tables read best one case per line

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from parkpool.schemas.errors import ConfigError
from parkpool.schemas.reasons import POLICY_REASONS
from parkpool.worker.carstate import CarState, Charging, Gear
from parkpool.worker.policy import DEFAULT_POLICY_FILE, Mode, OwnerPolicy, PolicyConfig

NOW = 1_800_000_000.0
PARKED = CarState(at=NOW)  # park, locked, plugged in, 80 %, 25 °C, 45 °C: eligible
ON_BATTERY = PolicyConfig(require_plugged_in=False)


def decide(state: CarState, config: PolicyConfig | None = None, **kwargs: Any) -> Any:
    return OwnerPolicy(config).evaluate(state, NOW, **kwargs)


# (case, config, changes to PARKED, energy used today, expected mode, reason, preempt)
# fmt: off
TABLE: list[tuple[str, PolicyConfig | None, dict[str, Any], float, Mode, str, bool]] = [
    ("parked and plugged in", None, {}, 0.0, Mode.RUN, "eligible", False),
    ("owner pause", None, {"owner_paused": True}, 0.0, Mode.SUSPEND, "owner_paused", True),
    ("gear out of park", None, {"gear": Gear.DRIVE}, 0.0, Mode.SUSPEND, "driving", True),
    ("unlocked", None, {"locked": False}, 0.0, Mode.SUSPEND, "owner_present", True),
    ("key nearby", None, {"owner_nearby": True}, 0.0, Mode.SUSPEND, "owner_present", True),
    ("preconditioning", None, {"preconditioning": True}, 0, Mode.SUSPEND, "preconditioning", True),
    ("departs in 5 min", None, {"next_departure": NOW + 300}, 0, Mode.SUSPEND, "departure_soon", True),
    ("departs in 6 min", None, {"next_departure": NOW + 360}, 0, Mode.DRAIN, "predrain", False),
    ("departs in 15 min", None, {"next_departure": NOW + 900}, 0, Mode.DRAIN, "predrain", False),
    ("departs in 16 min", None, {"next_departure": NOW + 960}, 0, Mode.RUN, "eligible", False),
    ("departure overdue", None, {"next_departure": NOW - 60}, 0, Mode.SUSPEND, "departure_soon", True),
    ("DC fast charger", None, {"charging": Charging.DC_FAST}, 0, Mode.SUSPEND, "dc_fast_charging", True),
    ("AC charging", None, {"charging": Charging.AC}, 0.0, Mode.RUN, "eligible", False),
    ("unplugged", None, {"charging": Charging.UNPLUGGED}, 0, Mode.SUSPEND, "not_plugged_in", True),
    # On battery (allowed): needs max(50 %, need 20 % + 10 %) = 50 %, or need + 10 if higher.
    ("battery 50 %", ON_BATTERY, {"charging": "unplugged", "soc_pct": 50.0}, 0, Mode.RUN, "eligible", False),
    ("battery 49.9 %", ON_BATTERY, {"charging": "unplugged", "soc_pct": 49.9}, 0, Mode.SUSPEND, "battery_low", True),
    ("long trip ahead", ON_BATTERY, {"charging": "unplugged", "soc_pct": 60.0, "next_trip_need_pct": 55.0}, 0, Mode.SUSPEND, "battery_low", True),
    ("short trip ahead", ON_BATTERY, {"charging": "unplugged", "soc_pct": 60.0, "next_trip_need_pct": 5.0}, 0, Mode.RUN, "eligible", False),
    ("low SoC on the plug", None, {"soc_pct": 10.0}, 0.0, Mode.RUN, "eligible", False),
    ("battery 40 °C", None, {"battery_temp_c": 40.0}, 0.0, Mode.RUN, "eligible", False),
    ("battery 40.1 °C", None, {"battery_temp_c": 40.1}, 0, Mode.SUSPEND, "battery_hot", True),
    ("battery -0.1 °C", None, {"battery_temp_c": -0.1}, 0, Mode.SUSPEND, "battery_cold", True),
    ("compute 85 °C", None, {"compute_temp_c": 85.0}, 0.0, Mode.RUN, "eligible", False),
    ("compute 85.5 °C", None, {"compute_temp_c": 85.5}, 0, Mode.SUSPEND, "compute_hot", True),
    ("energy budget used", None, {}, 2.5, Mode.DRAIN, "energy_budget", False),
    ("energy budget almost used", None, {}, 2.49, Mode.RUN, "eligible", False),
    # Order: the owner outranks everything, and safety outranks the budget.
    ("owner and heat", None, {"locked": False, "battery_temp_c": 50.0}, 0, Mode.SUSPEND, "owner_present", True),
    ("heat and budget", None, {"battery_temp_c": 50.0}, 9.0, Mode.SUSPEND, "battery_hot", True),
]
# fmt: on


# (stop reading, back inside the limit, past the resume threshold, reason)
# fmt: off
THERMAL = [
    ({"battery_temp_c": 41.0}, {"battery_temp_c": 38.0}, {"battery_temp_c": 37.0}, "battery_hot"),
    ({"battery_temp_c": -2.0}, {"battery_temp_c": 2.0}, {"battery_temp_c": 3.0}, "battery_cold"),
    ({"compute_temp_c": 90.0}, {"compute_temp_c": 80.0}, {"compute_temp_c": 75.0}, "compute_hot"),
]
# fmt: on


class TestThresholds:
    """Each rule fires exactly at its documented threshold, with the documented reason."""

    @pytest.mark.parametrize(
        ("config", "changes", "energy", "mode", "reason", "preempt"),
        [case[1:] for case in TABLE],
        ids=[case[0] for case in TABLE],
    )
    def test_decision(
        self,
        config: PolicyConfig | None,
        changes: dict[str, Any],
        energy: float,
        mode: Mode,
        reason: str,
        preempt: bool,
    ) -> None:
        # Given a parked, plugged-in car with these signals changed, When it is evaluated
        decision = decide(replace(PARKED, **changes), config, energy_today_kwh=energy)
        # Then the mode, the reason and whether kernels stop at once are the documented ones
        assert (decision.mode, decision.reason, decision.preempt) == (mode, reason, preempt)

    def test_stale_signals_stop_everything(self) -> None:
        decision = decide(PARKED, fresh=False)
        assert (decision.mode, decision.reason, decision.preempt) == (
            Mode.SUSPEND,
            "signals_stale",
            True,
        )


class TestHysteresis:
    """A battery or thermal stop resumes only past its resume threshold and its dwell."""

    @pytest.mark.parametrize(("hot", "cooling", "cool", "reason"), THERMAL)
    def test_thermal_stop_resumes_after_threshold_and_dwell(
        self, hot: dict[str, float], cooling: dict[str, float], cool: dict[str, float], reason: str
    ) -> None:
        policy = OwnerPolicy()
        # Given a thermal stop at NOW
        assert policy.evaluate(replace(PARKED, **hot), NOW).reason == reason
        # When the reading is back inside the limit but not past the resume threshold
        back_inside = policy.evaluate(replace(PARKED, **cooling), NOW + 600)
        # Then it stays stopped (hysteresis), without preempting anything new
        assert (back_inside.mode, back_inside.reason) == (Mode.SUSPEND, f"{reason}_cooldown")
        assert not back_inside.preempt
        # When it is past the resume threshold but the 300 s dwell has not passed
        early = OwnerPolicy()
        early.evaluate(replace(PARKED, **hot), NOW)
        assert early.evaluate(replace(PARKED, **cool), NOW + 299).mode is Mode.SUSPEND
        # Then only at 300 s does it run again
        assert early.evaluate(replace(PARKED, **cool), NOW + 300).mode is Mode.RUN

    def test_battery_low_needs_margin_to_resume(self) -> None:
        policy = OwnerPolicy(ON_BATTERY)
        low = replace(PARKED, charging=Charging.UNPLUGGED, soc_pct=49.0)
        assert policy.evaluate(low, NOW).reason == "battery_low"
        # 52 % is above the 50 % threshold but not the 3-point resume margin
        assert policy.evaluate(replace(low, soc_pct=52.0), NOW + 400).mode is Mode.SUSPEND
        assert policy.evaluate(replace(low, soc_pct=53.0), NOW + 400).mode is Mode.RUN

    def test_plugging_in_clears_battery_low_after_dwell(self) -> None:
        policy = OwnerPolicy(ON_BATTERY)
        policy.evaluate(replace(PARKED, charging=Charging.UNPLUGGED, soc_pct=30.0), NOW)
        plugged = replace(PARKED, charging=Charging.AC, soc_pct=30.0)
        assert policy.evaluate(plugged, NOW + 10).reason == "battery_low_cooldown"
        assert policy.evaluate(plugged, NOW + 300).mode is Mode.RUN

    def test_flapping_reading_restarts_nothing(self) -> None:
        # A temperature oscillating across the stop threshold every 10 s for 10 minutes
        policy = OwnerPolicy()
        runs = [
            policy.evaluate(replace(PARKED, battery_temp_c=41.0 if i % 2 else 39.0), NOW + 10 * i)
            for i in range(1, 60)
        ]
        # never lets work resume: each excursion re-latches the stop
        assert not any(d.runs for d in runs)


class TestOwnerDwell:
    """Work resumes only some time after the owner has gone."""

    def test_owner_recently_present_waits(self) -> None:
        policy = OwnerPolicy()
        assert policy.evaluate(replace(PARKED, locked=False), NOW).reason == "owner_present"
        assert policy.evaluate(PARKED, NOW + 119).reason == "owner_recent"
        assert policy.evaluate(PARKED, NOW + 120).mode is Mode.RUN


class TestStickyPause:
    """The owner's pause holds, whatever else happens, until the owner resumes."""

    def test_pause_survives_everything_but_resume(self) -> None:
        policy = OwnerPolicy()
        paused = replace(PARKED, owner_paused=True)
        # Given a pause, When every other condition is ideal for a whole day
        decisions = [policy.evaluate(paused, NOW + hour * 3600) for hour in range(25)]
        # Then it never runs
        assert {(d.mode, d.reason) for d in decisions} == {(Mode.SUSPEND, "owner_paused")}
        # And the owner's resume lets it run at once (no cooldown: the owner chose)
        assert policy.evaluate(PARKED, NOW + 25 * 3600).mode is Mode.RUN


class TestConfig:
    """The policy file: defaults as documented, bad settings refused, unknown ones
    warned about and ignored (a policy pushed ahead of the software must not brick it)."""

    def test_shipped_file_is_the_defaults(self) -> None:
        assert PolicyConfig.load(DEFAULT_POLICY_FILE) == PolicyConfig()

    def test_partial_file_keeps_other_defaults(self, tmp_path: Path) -> None:
        path = tmp_path / "policy.toml"
        path.write_text("require_plugged_in = false\nsoc_floor_pct = 60\n")
        config = PolicyConfig.load(path)
        assert (config.require_plugged_in, config.soc_floor_pct) == (False, 60)
        assert config.battery_max_c == PolicyConfig().battery_max_c

    def test_unknown_settings_are_ignored_with_a_warning(self, tmp_path: Path) -> None:
        # Given a policy with a setting this agent does not know, beside one it does
        path = tmp_path / "policy.toml"
        path.write_text("night_mode_quiet_fans = true\nsoc_floor_pct = 60\n")
        # When it is loaded
        with capture_logs() as logs:
            config = PolicyConfig.load(path)
        # Then the known one applies, and the unknown one is named in a warning
        assert config.soc_floor_pct == 60
        (warning,) = [e for e in logs if e["event"] == "owner_policy_unknown_settings"]
        assert warning["ignored"] == ["night_mode_quiet_fans"] and warning["log_level"] == "warning"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("soc_floor_pct = 'high'\n", "must be a number"),
            ("require_plugged_in = 1\n", "true or false"),
            ("battery_resume_c = 45\n", "battery_resume_c"),
            ("predrain_s = 10\n", "predrain_s"),
            ("not toml at all [\n", "cannot read"),
        ],
    )
    def test_bad_file_is_refused(self, tmp_path: Path, text: str, message: str) -> None:
        path = tmp_path / "policy.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            PolicyConfig.load(path)


class TestReasonVocabulary:
    """Every reason the policy gives is in the contract's vocabulary (schemas.reasons)."""

    def test_reasons_are_known_to_the_fleet_series(self) -> None:
        given = {case[5] for case in TABLE} - {"eligible"}
        given |= {"signals_stale", "owner_recent"}
        given |= {f"{reason}_cooldown" for *_, reason in THERMAL} | {"battery_low_cooldown"}
        assert given <= POLICY_REASONS, given - POLICY_REASONS
