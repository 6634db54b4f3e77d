# SPDX-License-Identifier: Apache-2.0
"""A car's own credentials, as its secure storage keeps them: one folder, one file each.

Enrollment (``parkpool fleet enroll --car-dir``) writes them once for the hand-over and
the broker's side keeps only a hash and the public key. The names are the ones a
systemd unit's ``LoadCredential=`` gives the agent (deploy/systemd/), and the simulated
fleet reads the same layout, so a simulated car is provisioned like a real one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from parkpool.schemas.errors import ConfigError

PASSWORD_FILE = "mqtt-password"
RESULT_KEY_FILE = "result.key"


@dataclass(frozen=True)
class CarCredentials:
    """The folder holding one car's MQTT password and its result-signing key."""

    directory: Path

    @classmethod
    def of(cls, root: Path, vehicle_id: str) -> CarCredentials:
        return cls(root / vehicle_id)

    @property
    def password_file(self) -> Path:
        return self.directory / PASSWORD_FILE

    @property
    def result_key(self) -> Path:
        return self.directory / RESULT_KEY_FILE

    def password(self) -> str:
        try:
            return self.password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"no MQTT password for this car in {self.directory}: {exc}") from exc

    def write(self, password: str, result_key: Path) -> CarCredentials:
        """Store a new password, and move the private key here; both mode 0600."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(password + "\n")
        shutil.move(result_key, self.result_key)
        os.chmod(self.result_key, 0o600)
        return self
