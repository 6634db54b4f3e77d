# SPDX-License-Identifier: Apache-2.0
"""A job's handle is typed by its kernel's answer, as a type checker sees it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).with_name("typed_handles.py")


def test_handles_are_typed_by_their_kernel() -> None:
    # Given code that states, with assert_type, what each handle's answer is
    # When mypy (strict, as `make mypy` runs it) reads it
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", str(SAMPLE)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    # Then every claim holds
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Success: no issues found in 1 source file" in checked.stdout
