# SPDX-License-Identifier: Apache-2.0
"""Why a car is not computing: the reason a ``VehicleStatus`` gives when it is
draining or suspended.

Part of the contract because gateways turn these into metric labels and SREs alert
on them; the owner policy (worker/policy.py, docs/OWNER_POLICY.md) gives only these.
A car may still send other text; gateways count it as "other".
"""

from __future__ import annotations

# Battery and thermal stops latch; while a car waits out the hysteresis and dwell after
# one, it reports the stop's reason with this suffix.
LIMIT_REASONS = frozenset({"battery_low", "battery_hot", "battery_cold", "compute_hot"})
COOLDOWN_SUFFIX = "_cooldown"

POLICY_REASONS = frozenset(
    {
        "signals_stale",
        "owner_paused",
        "driving",
        "owner_present",
        "preconditioning",
        "owner_recent",
        "departure_soon",
        "dc_fast_charging",
        "not_plugged_in",
        "energy_budget",
        "predrain",
        *LIMIT_REASONS,
        *(reason + COOLDOWN_SUFFIX for reason in LIMIT_REASONS),
    }
)
