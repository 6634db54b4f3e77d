# SPDX-License-Identifier: Apache-2.0
"""Per-vehicle MQTT identities and the ACL that isolates them, for Mosquitto.

Every vehicle logs in with its own username (its vehicle id) and password; gateways have
their own, privileged identities. The ACL uses Mosquitto's ``%u`` substitution, so one
pattern confines every car to its own topics (docs/SECURITY.md):
it may read only ``<ns>/v/<its id>/task`` and the cell's roster (the gateways' retained
statuses), and write only its own topics: pull and status to a gateway it names, its
last will, and result, nack and heartbeat to the lease holder.

The store is a directory: ``passwd`` (Mosquitto's ``$7$`` PBKDF2-SHA512 hashes, as
``mosquitto_passwd`` writes them), ``acl``, and ``keys/<id>.pub``, the cars' public
result-signing keys for gateways. It keeps no secret: a password is returned once, when
it is made, and a car's private key goes straight to its own credentials folder
(``parkpool.runtime.credentials``) for the hand-over. A stolen store lets nobody log in.
After a change Mosquitto must re-read the files (SIGHUP); a revoked car keeps its
current connection but cannot connect again.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from pathlib import Path

from parkpool.runtime.credentials import CarCredentials
from parkpool.schemas.errors import ConfigError

ITERATIONS = 101  # what mosquitto_passwd uses for $7$
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ACL = """\
# parkpool: every client sees only what its role needs (broker_config/auth.py).
# Vehicles: %u is the vehicle id they logged in with.
pattern read +/v/%u/task
pattern read +/gw/+/status
pattern write +/v/%u/pull/+
pattern write +/v/%u/status/+
pattern write +/v/%u/status
pattern write +/v/%u/result/+
pattern write +/v/%u/nack/+
pattern write +/v/%u/heartbeat/+
"""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<salt>$<PBKDF2-SHA512>``."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS, 64)
    encode = base64.b64encode
    return f"$7${ITERATIONS}${encode(salt).decode()}${encode(digest).decode()}"


class AuthStore:
    """The password file, the ACL and the cars' public keys in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.passwd = directory / "passwd"
        self.acl = directory / "acl"

    def init(self) -> AuthStore:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.passwd.exists():
            self._write(self.passwd, "")
        self._write_acl()
        return self

    @property
    def legacy_secrets(self) -> Path | None:
        """The plaintext ``secrets/`` folder stores made before 0.2 kept, if still there."""
        folder = self.directory / "secrets"
        return folder if folder.is_dir() else None

    def enroll(self, identity: str) -> str:
        """Create (or replace) an identity's password; returns it, and only its hash stays."""
        _check(identity)
        password = secrets.token_urlsafe(24)
        self._accept(identity, password)
        return password

    def enroll_vehicle(self, vehicle_id: str, car_dir: Path) -> CarCredentials:
        """A car's login plus its own result-signing key: the password and the key pair
        are made in ``car_dir/<vehicle_id>/`` for the hand-over to the car, and only the
        hash and the public half stay here (``keys/``, for gateways' ``--vehicle-keys``).
        The broker accepts the password only once the car's copy is written."""
        _check(vehicle_id)
        car = CarCredentials.of(car_dir, vehicle_id).issue(secrets.token_urlsafe(24))
        self.vehicle_keys.mkdir(parents=True, exist_ok=True)
        (self.vehicle_keys / f"{vehicle_id}.pub").write_bytes(car.result_public_key.read_bytes())
        self._accept(vehicle_id, car.password())
        return car

    def _accept(self, identity: str, password: str) -> None:
        entries = self._entries()
        entries[identity] = hash_password(password)
        self._save(entries)

    @property
    def vehicle_keys(self) -> Path:
        return self.directory / "keys"

    def add_gateway(self, identity: str) -> str:
        """A gateway identity: may read and write every topic. Returns its password."""
        password = self.enroll(identity)
        gateways = set(self._gateways()) | {identity}
        self._write(self.directory / "gateways", "".join(f"{g}\n" for g in sorted(gateways)))
        self._write_acl()
        return password

    def revoke(self, identity: str) -> bool:
        """Remove an identity; True if it existed."""
        entries = self._entries()
        existed = entries.pop(identity, None) is not None
        self._save(entries)
        (self.vehicle_keys / f"{identity}.pub").unlink(missing_ok=True)
        return existed

    def enrolled(self) -> list[str]:
        return sorted(self._entries())

    def _gateways(self) -> list[str]:
        path = self.directory / "gateways"
        return path.read_text().split() if path.exists() else []

    def _write_acl(self) -> None:
        sections = "".join(f"\nuser {g}\ntopic readwrite #\n" for g in self._gateways())
        self._write(self.acl, ACL + sections)

    def _entries(self) -> dict[str, str]:
        if not self.passwd.exists():
            return {}
        lines = (line.split(":", 1) for line in self.passwd.read_text().splitlines() if line)
        return {name: hashed for name, hashed in lines}

    def _save(self, entries: dict[str, str]) -> None:
        self._write(self.passwd, "".join(f"{n}:{h}\n" for n, h in sorted(entries.items())))

    @staticmethod
    def _write(path: Path, text: str) -> None:
        # Write aside and rename, so Mosquitto never reads half a file on SIGHUP.
        temp = path.with_name(path.name + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temp, path)


def _check(identity: str) -> None:
    if not _ID.match(identity):
        raise ConfigError(f"an identity must match {_ID.pattern}, not {identity!r}")
