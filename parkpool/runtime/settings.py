# SPDX-License-Identifier: Apache-2.0
"""Settings from flags and environment, shared by every role's CLI.

Each option is declared once with its environment variable; ``--help`` shows both, and
values that are secrets never appear in a repr or a log line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SECRET_MARKERS = ("password", "secret", "sasl.oauthbearer", "ssl.key")


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


def env_default(name: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else cast(raw)


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
        default=env_default(env, default, cast),
        type=cast,
        help=f"{help_text} [env {env}; default {shown}]",
    )


def parse_kafka_config(items: str) -> dict[str, str]:
    """``key=value,key=value`` pass-through settings for librdkafka (SASL, TLS, tuning)."""
    config: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in items.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"kafka config item {item!r} is not key=value")
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

    def __repr__(self) -> str:
        return f"KafkaConnection(bootstrap={self.bootstrap!r}, extra={redact(self.extra)!r})"

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


def add_mqtt_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--mqtt-host", "PARKPOOL_MQTT_HOST", "127.0.0.1", "MQTT broker host")
    add_option(parser, "--mqtt-port", "PARKPOOL_MQTT_PORT", 1883, "MQTT broker port", int)
    add_option(parser, "--mqtt-username", "PARKPOOL_MQTT_USERNAME", "", "MQTT user name")
    add_option(parser, "--mqtt-password", "PARKPOOL_MQTT_PASSWORD", "", "MQTT password")
    add_option(parser, "--mqtt-tls-ca", "PARKPOOL_MQTT_TLS_CA", "", "CA file: connect with TLS")
    add_option(parser, "--mqtt-tls-cert", "PARKPOOL_MQTT_TLS_CERT", "", "client certificate")
    add_option(parser, "--mqtt-tls-key", "PARKPOOL_MQTT_TLS_KEY", "", "client certificate key")


def add_namespace_option(parser: argparse.ArgumentParser) -> None:
    add_option(
        parser,
        "--namespace",
        "PARKPOOL_NAMESPACE",
        "parkpool",
        "namespace of the Kafka and MQTT topics",
    )


def kafka_from_args(args: argparse.Namespace) -> KafkaConnection:
    return KafkaConnection(bootstrap=args.kafka_bootstrap, extra=dict(args.kafka_config))


def mqtt_from_args(args: argparse.Namespace) -> MqttConnection:
    return MqttConnection(
        host=args.mqtt_host,
        port=args.mqtt_port,
        username=args.mqtt_username,
        password=Secret(args.mqtt_password),
        tls_ca=args.mqtt_tls_ca,
        tls_cert=args.mqtt_tls_cert,
        tls_key=args.mqtt_tls_key,
    )
