# SPDX-License-Identifier: Apache-2.0
"""``make certs``: a local CA and certificates for development and tests.

The broker's certificate names 127.0.0.1 and localhost. Each client certificate's common
name is its identity: with mutual TLS, Mosquitto takes it as the username
(``use_identity_as_username``), so the same ``%u`` ACL pins a car to its own topics
whether it logs in with a password or a certificate. Never use these in production:
the CA key sits next to the certificates.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 30


def make_certs(directory: Path, clients: Iterable[str]) -> Path:
    """Write ``ca.pem``, ``server.pem``/``server.key`` and ``<id>.pem``/``<id>.key`` for
    every client id into ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("parkpool dev CA", ca_key.public_key(), ca_key, None, ca=True)
    _write(directory, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _certificate("localhost", server_key.public_key(), ca_key, ca, names=names)
    _write(directory, "server", server, server_key)
    for identity in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        _write(directory, identity, _certificate(identity, key.public_key(), ca_key, ca), key)
    return directory


def _certificate(
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    *,
    ca: bool = False,
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(directory / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above applies to a new file only, not one replaced
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("directory", type=Path)
    p.add_argument("clients", nargs="*", default=["gateway", "car-00001", "car-00002"])
    args = p.parse_args()
    print(make_certs(args.directory, args.clients))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
