# SPDX-License-Identifier: Apache-2.0
"""``parkpool store lifecycle`` never expires a job's objects sooner than the TTL asked:
S3 lifecycle rules count whole days, so the hours are rounded up, and it says so."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog

from parkpool.app.cli import main
from parkpool.app.store_cli import expire_days
from parkpool.runtime.blobstore import LIFECYCLE_RULE_ID, with_expiry_rule


@pytest.fixture(autouse=True)
def _logging_reset() -> Iterator[None]:
    """``main`` points structlog at the stderr that capsys captures and then closes; later
    tests in the process must not log to a closed file."""
    yield
    structlog.reset_defaults()


class TestExpireDays:
    """The rule's days are the TTL rounded up to a whole day, and at least one."""

    @pytest.mark.parametrize(
        ("ttl_hours", "days"),
        [(0.5, 1), (24, 1), (24.01, 2), (35, 2), (48, 2), (60, 3), (72, 3), (1000, 42)],
    )
    def test_never_shorter_than_asked(self, ttl_hours: float, days: int) -> None:
        # When an operator asks for a TTL in hours
        # Then the rule keeps objects at least that long, and less than a day longer
        assert expire_days(ttl_hours) == days
        assert ttl_hours <= days * 24 < max(ttl_hours, 1) + 24


class TestTheCommandSaysSo:
    """The rounding is in the help, and a TTL that is not a number of hours is refused."""

    def test_the_help_names_whole_days(self, capsys: pytest.CaptureFixture[str]) -> None:
        # When an operator reads the lifecycle command's help
        with pytest.raises(SystemExit):
            main(["store", "lifecycle", "--help"])
        # Then it says the TTL is rounded up to whole days
        text = " ".join(capsys.readouterr().out.split())
        assert "rounded up to whole days" in text
        assert "objects may stay up to about two days longer" in text

    @pytest.mark.parametrize("ttl", ["0", "-3", "nan", "inf"])
    def test_a_ttl_that_is_not_a_positive_number_is_refused(
        self, ttl: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # When the lifecycle is asked for with such a TTL
        # Then it is refused by name, before any store is touched
        assert main(["store", "lifecycle", "--ttl-hours", ttl]) == 2
        assert "--ttl-hours must be a positive number of hours" in capsys.readouterr().err


OTHER_RULE = {"ID": "logs-30d", "Filter": {"Prefix": "logs/"}, "Status": "Enabled"}


class TestTheRuleKeepsTheBucketsOthers:
    """S3's PutBucketLifecycleConfiguration replaces the whole configuration: parkpool's
    rule is put in place of its own earlier one, and every other rule is kept."""

    def test_another_rule_is_kept_and_ours_added(self) -> None:
        rules = with_expiry_rule([OTHER_RULE], "jobs/", 2)
        assert rules[0] == OTHER_RULE
        assert [r["ID"] for r in rules] == ["logs-30d", LIFECYCLE_RULE_ID]
        assert rules[1]["Expiration"] == {"Days": 2}
        assert rules[1]["Filter"] == {"Prefix": "jobs/"}

    def test_our_earlier_rule_is_replaced_not_repeated(self) -> None:
        first = with_expiry_rule([OTHER_RULE], "jobs/", 2)
        again = with_expiry_rule(first, "jobs/", 5)
        assert [r["ID"] for r in again] == ["logs-30d", LIFECYCLE_RULE_ID]
        assert again[1]["Expiration"] == {"Days": 5}

    def test_noncurrent_versions_expire_too(self) -> None:
        # On a versioned bucket a delete only adds a marker: the bytes would stay
        (rule,) = with_expiry_rule([], "jobs/", 2)
        assert rule["NoncurrentVersionExpiration"] == {"NoncurrentDays": 1}

    def test_a_rule_in_s3s_first_form_is_kept_as_a_filter(self) -> None:
        # S3 refuses a configuration mixing a rule's own Prefix with another's Filter
        old = {"ID": "logs", "Prefix": "logs/", "Status": "Enabled", "Expiration": {"Days": 30}}
        kept, _ours = with_expiry_rule([old], "jobs/", 2)
        assert "Prefix" not in kept
        assert kept == {
            "ID": "logs",
            "Filter": {"Prefix": "logs/"},
            "Status": "Enabled",
            "Expiration": {"Days": 30},
        }
