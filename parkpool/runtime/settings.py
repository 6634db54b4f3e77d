# SPDX-License-Identifier: Apache-2.0
"""Settings from flags and environment, shared by every role's CLI.

Each option is declared once with its environment variable; ``--help`` shows both, and
values that are secrets never appear in a repr or a log line.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from parkpool.schemas.errors import ConfigError

SECRET_MARKERS = ("password", "secret", "sasl.oauthbearer", "ssl.key")
# Apache Kafka's broker and topic default (message.max.bytes, max.message.bytes) is
# 1 MiB plus 12 bytes; a record batch of at most 1 MiB fits it everywhere.
DEFAULT_MAX_RECORD_BYTES = 1 << 20
# One Kafka record's worth of task, plus the envelope an assignment wraps it in. EMQX
# defaults to 1 MB and AWS IoT Core to 128 KB: lower it for them (docs/ARCHITECTURE.md).
DEFAULT_MQTT_MAX_MESSAGE_BYTES = (1 << 20) + (64 << 10)
# Below this, not even a small task with its lease and signature fits.
MIN_LIMIT_BYTES = 16 << 10


@dataclass(frozen=True)
class Secret:
    """A string that prints as ``'***'`` so that it cannot leak through logs or reprs."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')" if self.value else "Secret('')"

    def __str__(self) -> str:
        return "***" if self.value else ""

    def __bool__(self) -> bool:
        return bool(self.value)


class FromEnv(str):
    """A default taken from an environment variable, still to be converted by argparse.

    argparse converts string defaults with the option's ``type`` only when the option is
    used, so ``--help`` never fails on a bad variable; and a value that does not convert
    is blamed on the variable that held it, not on a flag the user never typed.
    """

    __slots__ = ("variable",)
    variable: str

    def __new__(cls, value: str, variable: str) -> FromEnv:
        made = super().__new__(cls, value)
        made.variable = variable
        return made


def env_default(name: str, default: Any) -> Any:
    """The variable's raw value (tagged with its name), or ``default`` when it is unset."""
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else FromEnv(raw, name)


def _converter(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(value: str) -> Any:
        try:
            return cast(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            if not isinstance(value, FromEnv):
                raise  # argparse words it: "argument --x: invalid int value: 'abc'"
            kind = getattr(cast, "__name__", "value")
            detail = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"not {kind}"
            shown = "" if _may_hold_secrets(value.variable) else f"={str(value)!r}"
            raise argparse.ArgumentTypeError(
                f"environment variable {value.variable}{shown} is invalid: {detail}"
            ) from None

    convert.__name__ = getattr(cast, "__name__", "value")
    return convert


def _may_hold_secrets(variable: str) -> bool:
    """A variable whose value an error must not repeat: a secret, or a pass-through
    client config (``PARKPOOL_KAFKA_CONFIG`` carries SASL passwords)."""
    lowered = variable.lower()
    return "config" in lowered or any(marker in lowered for marker in SECRET_MARKERS)


def add_option(
    parser: argparse.ArgumentParser,
    flag: str,
    env: str,
    default: Any,
    help_text: str,
    cast: Callable[[str], Any] = str,
) -> None:
    """Add ``--flag`` whose default comes from ``env``; --help names the variable."""
    shown = "(secret)" if "PASSWORD" in env or "SECRET" in env else f"{default!r}"
    parser.add_argument(
        flag,
        default=env_default(env, default),
        type=_converter(cast),
        help=f"{help_text} [env {env}; default {shown}]",
    )


def add_flag(parser: argparse.ArgumentParser, flag: str, env: str, help_text: str) -> None:
    """A yes/no option: ``--flag`` alone means yes, ``--flag no`` no; the variable takes
    1/0, true/false, yes/no or on/off, and a bad value is an error naming it."""
    parser.add_argument(
        flag,
        nargs="?",
        const=True,
        default=env_default(env, False),
        type=_converter(boolean),
        metavar="yes|no",
        help=f"{help_text} [env {env}; default no]",
    )


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in _BOOLEANS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(_BOOLEANS)}")
    return _BOOLEANS[value]


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLEANS |= {"0": False, "false": False, "no": False, "off": False}


def positive_int(text: str) -> int:
    """A count or size flag: a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def positive_seconds(text: str) -> float:
    """A time flag: finite and above zero (nan would never expire; a wait would hang)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def byte_limit(text: str) -> int:
    """A message or record size limit: a whole number of bytes, at least 16 KiB."""
    value = int(text)
    if value < MIN_LIMIT_BYTES:
        raise argparse.ArgumentTypeError(f"{value} is below the smallest limit, {MIN_LIMIT_BYTES}")
    return value


def parse_kafka_config(items: str) -> dict[str, str]:
    """``key=value,key=value`` pass-through settings for librdkafka (SASL, TLS, tuning)."""
    config: dict[str, str] = {}
    for number, item in enumerate(filter(None, (p.strip() for p in items.split(","))), 1):
        key, sep, value = item.partition("=")
        if not sep:
            # Named by position, not shown: "sasl.password hunter2" is one typo away.
            raise argparse.ArgumentTypeError(f"kafka config item {number} is not key=value")
        config[key.strip()] = value.strip()
    return config


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a client config that is safe to log."""
    return {
        key: "***" if any(marker in key.lower() for marker in SECRET_MARKERS) else value
        for key, value in config.items()
    }


@dataclass(frozen=True)
class KafkaConnection:
    bootstrap: str
    extra: Mapping[str, str] = field(default_factory=dict)
    # The largest record batch parkpool writes: value, key, headers and Kafka's framing.
    # It must not exceed the topics' max.message.bytes (`parkpool brokers bootstrap`
    # checks); records above it are refused before they are sent, never half-written.
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES

    def __repr__(self) -> str:
        return (
            f"KafkaConnection(bootstrap={self.bootstrap!r}, extra={redact(self.extra)!r}, "
            f"max_record_bytes={self.max_record_bytes})"
        )

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, **self.extra, **overrides}


@dataclass(frozen=True)
class MqttConnection:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: Secret = Secret("")
    keepalive: int = 15
    # TLS: the CA that signed the broker's certificate; with a client certificate and key
    # too, mutual TLS (the certificate's common name is then the identity).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # The largest PUBLISH payload parkpool sends; the broker's own limit must allow it.
    max_message_bytes: int = DEFAULT_MQTT_MAX_MESSAGE_BYTES


# Arrays at least this large travel through the object store, not inside the record:
# small ones stay inline, where they cost no extra round trip.
DEFAULT_INLINE_MAX_BYTES = 64 << 10


@dataclass(frozen=True)
class StoreConnection:
    """The S3-compatible object store that holds bulk arrays (schemas.blobref).

    ``endpoint`` is what the SDK and gateways use; ``public_endpoint`` what cars reach
    (the public S3 name, or a proxy that keeps the Host header and path: SigV4 signs
    both), and what presigned URLs name; "" means the same. ``region`` must be the
    bucket's: it is signed into every presigned URL.
    An empty endpoint turns the claim check off: everything travels inline.
    """

    endpoint: str = ""
    bucket: str = "parkpool"
    access_key: str = ""
    secret_key: Secret = Secret("")
    region: str = "us-east-1"
    public_endpoint: str = ""
    inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)

    @property
    def urls_in_clear(self) -> bool:
        """Whether cars are sent plain-HTTP URLs to a host beyond this machine: each is
        a bearer token for its object, and a plain job's bytes would cross in clear."""
        url = urlsplit(self.public_endpoint or self.endpoint)
        return url.scheme == "http" and not _loopback(url.hostname or "")


def add_store_options(parser: argparse.ArgumentParser) -> None:
    add_option(
        parser,
        "--store-endpoint",
        "PARKPOOL_STORE_ENDPOINT",
        "",
        "S3 endpoint URL for job data; empty: arrays travel inside the messages",
    )
    add_option(parser, "--store-bucket", "PARKPOOL_STORE_BUCKET", "parkpool", "S3 bucket")
    add_option(parser, "--store-access-key", "PARKPOOL_STORE_ACCESS_KEY", "", "S3 access key id")
    add_option(parser, "--store-secret-key", "PARKPOOL_STORE_SECRET_KEY", "", "S3 secret key")
    add_option(
        parser,
        "--store-region",
        "PARKPOOL_STORE_REGION",
        "us-east-1",
        "the bucket's S3 region, signed into every presigned URL",
    )
    add_option(
        parser,
        "--store-public-endpoint",
        "PARKPOOL_STORE_PUBLIC_ENDPOINT",
        "",
        "the endpoint cars reach, named in presigned URLs; empty: --store-endpoint",
    )
    add_option(
        parser,
        "--inline-max-bytes",
        "PARKPOOL_INLINE_MAX_BYTES",
        DEFAULT_INLINE_MAX_BYTES,
        "arrays (and results) at least this large go through the object store",
        int,
    )


def store_from_args(args: argparse.Namespace) -> StoreConnection:
    return StoreConnection(
        endpoint=args.store_endpoint,
        bucket=args.store_bucket,
        access_key=args.store_access_key,
        secret_key=Secret(args.store_secret_key),
        region=args.store_region,
        public_endpoint=args.store_public_endpoint,
        inline_max_bytes=args.inline_max_bytes,
    )


def add_kafka_options(parser: argparse.ArgumentParser) -> None:
    add_option(
        parser,
        "--kafka-bootstrap",
        "PARKPOOL_KAFKA_BOOTSTRAP",
        "127.0.0.1:9092",
        "Kafka bootstrap servers",
    )
    add_option(
        parser,
        "--kafka-config",
        "PARKPOOL_KAFKA_CONFIG",
        {},
        "extra librdkafka settings as key=value,key=value (SASL/TLS go here)",
        parse_kafka_config,
    )
    add_option(
        parser,
        "--kafka-max-record-bytes",
        "PARKPOOL_KAFKA_MAX_RECORD_BYTES",
        DEFAULT_MAX_RECORD_BYTES,
        "largest Kafka record written (value, key and framing); at most the topics' "
        "max.message.bytes",
        byte_limit,
    )


def add_mqtt_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--mqtt-host", "PARKPOOL_MQTT_HOST", "127.0.0.1", "MQTT broker host")
    add_option(parser, "--mqtt-port", "PARKPOOL_MQTT_PORT", 1883, "MQTT broker port", port)
    add_option(parser, "--mqtt-username", "PARKPOOL_MQTT_USERNAME", "", "MQTT user name")
    add_option(parser, "--mqtt-password", "PARKPOOL_MQTT_PASSWORD", "", "MQTT password")
    add_option(
        parser,
        "--mqtt-password-file",
        "PARKPOOL_MQTT_PASSWORD_FILE",
        "",
        "file holding the MQTT password (systemd LoadCredential=); instead of --mqtt-password",
    )
    add_option(parser, "--mqtt-tls-ca", "PARKPOOL_MQTT_TLS_CA", "", "CA file: connect with TLS")
    add_option(parser, "--mqtt-tls-cert", "PARKPOOL_MQTT_TLS_CERT", "", "client certificate")
    add_option(parser, "--mqtt-tls-key", "PARKPOOL_MQTT_TLS_KEY", "", "client certificate key")
    add_option(
        parser,
        "--mqtt-max-message-bytes",
        "PARKPOOL_MQTT_MAX_MESSAGE_BYTES",
        DEFAULT_MQTT_MAX_MESSAGE_BYTES,
        "largest MQTT payload sent; at most the broker's packet limit",
        byte_limit,
    )


def add_namespace_option(parser: argparse.ArgumentParser) -> None:
    add_option(
        parser,
        "--namespace",
        "PARKPOOL_NAMESPACE",
        "parkpool",
        "namespace of the Kafka and MQTT topics",
    )


def port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return value


def kafka_from_args(args: argparse.Namespace) -> KafkaConnection:
    return KafkaConnection(
        bootstrap=args.kafka_bootstrap,
        extra=dict(args.kafka_config),
        max_record_bytes=args.kafka_max_record_bytes,
    )


def mqtt_from_args(args: argparse.Namespace) -> MqttConnection:
    return MqttConnection(
        host=args.mqtt_host,
        port=args.mqtt_port,
        username=args.mqtt_username,
        password=Secret(_password(args.mqtt_password, args.mqtt_password_file)),
        tls_ca=args.mqtt_tls_ca,
        tls_cert=args.mqtt_tls_cert,
        tls_key=args.mqtt_tls_key,
        max_message_bytes=args.mqtt_max_message_bytes,
    )


def _password(password: str, password_file: str) -> str:
    if not password_file:
        return password
    if password:
        raise ConfigError("set the MQTT password or a password file, not both")
    try:
        return Path(password_file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read the MQTT password file {password_file}: {exc}") from exc


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: assume it is reached over the network
        return False
