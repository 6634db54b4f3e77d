# SPDX-License-Identifier: Apache-2.0
"""A car's own credentials, as its secure storage keeps them: one folder, one file each.

Enrollment (``parkpool fleet enroll --car-dir``) writes them once for the hand-over, and
the broker's side keeps only the password's hash and the public key. The file names are
the credential names the systemd unit's ``LoadCredential=`` gives the agent
(deploy/systemd/parkpool-worker.service), and the simulated fleet reads the same layout,
so a simulated car is provisioned like a real one.

    <root>/<vehicle id>/mqtt-password   the MQTT password (mode 0600)
    <root>/<vehicle id>/result.key      its private result-signing key (mode 0600)
    <root>/<vehicle id>/result.pub      the public half, which gateways also hold
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from parkpool.runtime.signing import generate
from parkpool.schemas.errors import ConfigError

PASSWORD_FILE = "mqtt-password"
RESULT_KEY_NAME = "result"  # result.key and result.pub


@dataclass(frozen=True)
class CarCredentials:
    """The folder holding one car's MQTT password and its result-signing key pair."""

    directory: Path

    @classmethod
    def of(cls, root: Path, vehicle_id: str) -> CarCredentials:
        return cls(root / vehicle_id)

    @property
    def password_file(self) -> Path:
        return self.directory / PASSWORD_FILE

    @property
    def result_key(self) -> Path:
        return self.directory / f"{RESULT_KEY_NAME}.key"

    @property
    def result_public_key(self) -> Path:
        return self.directory / f"{RESULT_KEY_NAME}.pub"

    def password(self) -> str:
        try:
            return self.password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"no MQTT password for this car in {self.directory}: {exc}") from exc

    def issue(self, password: str) -> CarCredentials:
        """Store a new password and make a new result-signing key pair here.

        The private key is made in this folder and nowhere else, so it never passes
        through the broker's store, even for a moment; the folder and every secret in it
        are for the owner's eyes only (0700 and 0600) whatever the umask.
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        temp = self.password_file.with_name(PASSWORD_FILE + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(password + "\n")
        os.replace(temp, self.password_file)
        generate(self.directory, RESULT_KEY_NAME)
        return self
