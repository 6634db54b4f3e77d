# SPDX-License-Identifier: Apache-2.0
"""The owner policy: may this car compute right now, and if not, why not.

The policy is a pure function of the car's state, the time and the energy used today,
plus three pieces of memory that make it stable: when the owner was last present, which
battery or thermal stop is still latched, and whether that stop has cooled down. Every
answer carries a reason, which the worker reports to the gateway.

Defaults and the reasoning behind each live in ``worker/owner_policy.toml`` and
docs/OWNER_POLICY.md.
"""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from parkpool.runtime import logs
from parkpool.schemas.errors import ConfigError
from parkpool.schemas.reasons import COOLDOWN_SUFFIX
from parkpool.worker.carstate import CarState, Charging, Gear

DEFAULT_POLICY_FILE = Path(__file__).with_name("owner_policy.toml")
log = logs.get_logger("parkpool.worker.policy")


class Mode(enum.StrEnum):
    RUN = "run"  # take and run tasks
    DRAIN = "drain"  # finish what is held, take nothing new
    SUSPEND = "suspend"  # hold nothing: hand every task back


@dataclass(frozen=True)
class Decision:
    mode: Mode
    reason: str
    preempt: bool = False  # stop running kernels now, not after the current slice of work

    @property
    def runs(self) -> bool:
        return self.mode is Mode.RUN


RUN = Decision(Mode.RUN, "eligible")


@dataclass(frozen=True)
class PolicyConfig:
    require_plugged_in: bool = True
    soc_floor_pct: float = 50.0
    default_trip_need_pct: float = 20.0
    trip_margin_pct: float = 10.0
    soc_resume_margin_pct: float = 3.0
    battery_max_c: float = 40.0
    battery_resume_c: float = 37.0
    battery_min_c: float = 0.0
    battery_cold_resume_c: float = 3.0
    compute_max_c: float = 85.0
    compute_resume_c: float = 75.0
    resume_after_stop_s: float = 300.0
    owner_away_s: float = 120.0
    departure_stop_s: float = 300.0
    predrain_s: float = 900.0
    daily_energy_kwh: float = 2.5
    compute_power_w: float = 300.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise ConfigError(f"owner policy: {f.name} must be true or false")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"owner policy: {f.name} must be a number, not {value!r}")
        self._check_hysteresis()

    def _check_hysteresis(self) -> None:
        # A resume threshold on the wrong side of its stop threshold would make it flap.
        if self.battery_resume_c > self.battery_max_c:
            raise ConfigError("owner policy: battery_resume_c must not exceed battery_max_c")
        if self.compute_resume_c > self.compute_max_c:
            raise ConfigError("owner policy: compute_resume_c must not exceed compute_max_c")
        if self.battery_cold_resume_c < self.battery_min_c:
            raise ConfigError("owner policy: battery_cold_resume_c is below battery_min_c")
        if self.predrain_s < self.departure_stop_s:
            raise ConfigError("owner policy: predrain_s must be at least departure_stop_s")

    @classmethod
    def load(cls, path: Path | None = None) -> PolicyConfig:
        """Read a TOML file of ``key = value`` lines.

        Unknown keys are warned about and ignored: a policy pushed over the air ahead of
        the software that knows a new setting must not stop the agent from starting. A
        known key with a bad value is still an error, since a wrong threshold is unsafe.
        """
        path = path or DEFAULT_POLICY_FILE
        try:
            data: dict[str, Any] = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read owner policy {path}: {exc}") from exc
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            log.warning("owner_policy_unknown_settings", path=str(path), ignored=unknown)
        return cls(**{key: value for key, value in data.items() if key in known})

    def soc_needed(self, state: CarState) -> float:
        """State of charge the car must keep on battery: the owner's floor, or the next
        trip's need plus a margin, whichever is higher."""
        need = state.next_trip_need_pct
        trip = self.default_trip_need_pct if need is None else need
        return max(self.soc_floor_pct, trip + self.trip_margin_pct)


class OwnerPolicy:
    """Evaluates the rules in order; the first that objects decides."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self._owner_seen_at = float("-inf")
        self._latched: str | None = None  # a battery or thermal stop not yet cleared
        self._latched_at = 0.0

    def evaluate(
        self, state: CarState, now: float, energy_today_kwh: float = 0.0, fresh: bool = True
    ) -> Decision:
        if not fresh:
            return Decision(Mode.SUSPEND, "signals_stale", preempt=True)
        for rule in (self._owner, self._departure, self._supply, self._limits):
            decision = rule(state, now)
            if decision is not None:
                return decision
        if energy_today_kwh >= self.config.daily_energy_kwh:
            return Decision(Mode.DRAIN, "energy_budget")
        if self._departs_within(state, now, self.config.predrain_s):
            return Decision(Mode.DRAIN, "predrain")
        return RUN

    # ---------------------------------------------------------------- the rules

    def _owner(self, state: CarState, now: float) -> Decision | None:
        # The owner's pause is sticky: no other signal and no amount of time clears it.
        if state.owner_paused:
            return Decision(Mode.SUSPEND, "owner_paused", preempt=True)
        present = (
            ("driving", state.gear is not Gear.PARK),
            ("owner_present", not state.locked or state.owner_nearby),
            ("preconditioning", state.preconditioning),
        )
        for reason, holds in present:
            if holds:
                self._owner_seen_at = now
                return Decision(Mode.SUSPEND, reason, preempt=True)
        if now - self._owner_seen_at < self.config.owner_away_s:
            return Decision(Mode.SUSPEND, "owner_recent")  # they may come straight back
        return None

    def _departure(self, state: CarState, now: float) -> Decision | None:
        if self._departs_within(state, now, self.config.departure_stop_s):
            return Decision(Mode.SUSPEND, "departure_soon", preempt=True)
        return None

    def _supply(self, state: CarState, now: float) -> Decision | None:
        if state.charging is Charging.DC_FAST:
            return Decision(Mode.SUSPEND, "dc_fast_charging", preempt=True)
        if state.charging is Charging.UNPLUGGED and self.config.require_plugged_in:
            return Decision(Mode.SUSPEND, "not_plugged_in", preempt=True)
        return None

    def _limits(self, state: CarState, now: float) -> Decision | None:
        """Battery and thermal stops latch: they resume only past a hysteresis threshold
        and after ``resume_after_stop_s``, so a car on the edge does not flap."""
        breach = self._breach(state)
        if breach is not None:
            if self._latched != breach:
                self._latched, self._latched_at = breach, now
            return Decision(Mode.SUSPEND, breach, preempt=True)
        if self._latched is None:
            return None
        if self._recovered(self._latched, state) and (
            now - self._latched_at >= self.config.resume_after_stop_s
        ):
            self._latched = None
            return None
        return Decision(Mode.SUSPEND, self._latched + COOLDOWN_SUFFIX)

    def _breach(self, state: CarState) -> str | None:
        c = self.config
        on_battery = state.charging is Charging.UNPLUGGED
        checks = (
            ("battery_low", on_battery and state.soc_pct < c.soc_needed(state)),
            ("battery_hot", state.battery_temp_c > c.battery_max_c),
            ("battery_cold", state.battery_temp_c < c.battery_min_c),
            ("compute_hot", state.compute_temp_c > c.compute_max_c),
        )
        return next((reason for reason, breached in checks if breached), None)

    def _recovered(self, reason: str, state: CarState) -> bool:
        c = self.config
        if reason == "battery_low":
            on_battery = state.charging is Charging.UNPLUGGED
            return not on_battery or state.soc_pct >= c.soc_needed(state) + c.soc_resume_margin_pct
        if reason == "battery_hot":
            return state.battery_temp_c <= c.battery_resume_c
        if reason == "battery_cold":
            return state.battery_temp_c >= c.battery_cold_resume_c
        return state.compute_temp_c <= c.compute_resume_c

    @staticmethod
    def _departs_within(state: CarState, now: float, seconds: float) -> bool:
        return state.next_departure is not None and state.next_departure - now <= seconds
