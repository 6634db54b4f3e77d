# SPDX-License-Identifier: Apache-2.0
"""Settings come from flags or the environment, and secrets never show in reprs or logs."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parkpool.gateway.settings import GatewaySettings
from parkpool.runtime.settings import (
    KafkaConnection,
    MqttConnection,
    Secret,
    StoreConnection,
    add_kafka_options,
    add_mqtt_options,
    add_option,
    kafka_from_args,
    mqtt_from_args,
    parse_kafka_config,
    redact,
)
from parkpool.schemas.errors import ConfigError
from parkpool.schemas.messages import MAX_BATCH
from parkpool.worker.cli import parse_cells

PASSWORD = "hunter2-s3cr3t"


class TestSecret:
    """A Secret keeps its value but never prints it."""

    def test_value_never_shows(self) -> None:
        secret = Secret(PASSWORD)
        shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret)]
        assert all(PASSWORD not in text for text in shown)
        assert str(secret) == "***"
        assert secret.value == PASSWORD
        assert secret

    def test_empty_secret_is_falsy_and_prints_empty(self) -> None:
        secret = Secret("")
        assert not secret
        assert str(secret) == ""
        assert repr(secret) == "Secret('')"

    def test_secret_inside_a_dataclass_repr(self) -> None:
        conn = MqttConnection(username="fleet", password=Secret(PASSWORD))
        assert PASSWORD not in repr(conn)
        assert "fleet" in repr(conn)


class TestRedact:
    """redact() hides every password and secret of a librdkafka config."""

    def test_hides_secret_keys_and_keeps_others(self) -> None:
        config = {
            "bootstrap.servers": "kafka:9093",
            "security.protocol": "SASL_SSL",
            "sasl.username": "fleet",
            "sasl.password": PASSWORD,
            "ssl.key.password": PASSWORD,
            "ssl.key.pem": PASSWORD,
            "sasl.oauthbearer.client.secret": PASSWORD,
            "SASL.PASSWORD": PASSWORD,
        }
        safe = redact(config)
        assert PASSWORD not in repr(safe)
        assert safe["sasl.password"] == "***"
        assert safe["SASL.PASSWORD"] == "***"
        assert safe["sasl.username"] == "fleet"
        assert safe["bootstrap.servers"] == "kafka:9093"
        assert safe.keys() == config.keys()
        # And the original is untouched
        assert config["sasl.password"] == PASSWORD

    def test_kafka_connection_repr_hides_the_password(self) -> None:
        conn = KafkaConnection("kafka:9093", {"sasl.password": PASSWORD, "sasl.username": "u"})
        assert PASSWORD not in repr(conn)
        assert PASSWORD not in str(conn)
        assert PASSWORD not in f"{conn}"
        assert "kafka:9093" in repr(conn)
        # But the client still gets the real value
        assert conn.client_config()["sasl.password"] == PASSWORD


class TestParseKafkaConfig:
    """--kafka-config takes key=value pairs separated by commas."""

    def test_parses_pairs(self) -> None:
        assert parse_kafka_config("a=b,c=d") == {"a": "b", "c": "d"}

    def test_strips_spaces_and_skips_empty_items(self) -> None:
        assert parse_kafka_config(" a = b ,, c=d=e ,") == {"a": "b", "c": "d=e"}
        assert parse_kafka_config("") == {}

    def test_rejects_item_without_equals(self) -> None:
        with pytest.raises(argparse.ArgumentTypeError, match="item 2 is not key=value"):
            parse_kafka_config("a=b,oops")

    def test_a_bad_item_is_named_without_its_value(self) -> None:
        # A typo away from a secret: the error must not repeat it
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            parse_kafka_config("sasl.username=u,sasl.password hunter2")
        assert "hunter2" not in str(refused.value)


class TestAddOption:
    """add_option takes its default from an environment variable and names it in --help."""

    def test_default_when_variable_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("PARKPOOL_TEST_PORT", raising=False)
        parser = argparse.ArgumentParser()
        add_option(parser, "--port", "PARKPOOL_TEST_PORT", 1883, "broker port", int)
        assert parser.parse_args([]).port == 1883

    def test_default_from_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PARKPOOL_TEST_PORT", "8883")
        parser = argparse.ArgumentParser()
        add_option(parser, "--port", "PARKPOOL_TEST_PORT", 1883, "broker port", int)
        assert parser.parse_args([]).port == 8883
        # And a flag still wins over the variable
        assert parser.parse_args(["--port", "1999"]).port == 1999

    def test_empty_variable_means_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PARKPOOL_TEST_HOST", "")
        parser = argparse.ArgumentParser()
        add_option(parser, "--host", "PARKPOOL_TEST_HOST", "127.0.0.1", "broker host")
        assert parser.parse_args([]).host == "127.0.0.1"

    def test_help_names_the_variable_and_default(self) -> None:
        parser = argparse.ArgumentParser()
        add_option(parser, "--host", "PARKPOOL_TEST_HOST", "127.0.0.1", "broker host")
        text = parser.format_help()
        assert "PARKPOOL_TEST_HOST" in text
        assert "'127.0.0.1'" in text

    def test_help_hides_a_password_taken_from_the_environment(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PARKPOOL_MQTT_PASSWORD", PASSWORD)
        parser = argparse.ArgumentParser()
        add_mqtt_options(parser)
        text = parser.format_help()
        assert "PARKPOOL_MQTT_PASSWORD" in text
        assert PASSWORD not in text
        # When the settings are built, the password is wrapped as a Secret
        conn = mqtt_from_args(parser.parse_args([]))
        assert conn.password.value == PASSWORD
        assert PASSWORD not in repr(conn)

    def test_kafka_config_from_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PARKPOOL_KAFKA_BOOTSTRAP", "kafka:9093")
        monkeypatch.setenv("PARKPOOL_KAFKA_CONFIG", f"sasl.password={PASSWORD},acks=all")
        parser = argparse.ArgumentParser()
        add_kafka_options(parser)
        conn = kafka_from_args(parser.parse_args([]))
        assert conn.bootstrap == "kafka:9093"
        assert conn.extra == {"sasl.password": PASSWORD, "acks": "all"}
        assert PASSWORD not in repr(conn)
        assert PASSWORD not in parser.format_help()


class TestBadEnvironment:
    """A bad environment value is an error naming the variable, never a traceback."""

    def test_parse_names_the_variable(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("PARKPOOL_MQTT_PORT", "abc")
        parser = argparse.ArgumentParser()
        add_mqtt_options(parser)
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([])
        assert exit_info.value.code == 2
        assert "PARKPOOL_MQTT_PORT='abc' is invalid" in capsys.readouterr().err

    def test_a_bad_client_config_is_named_without_its_secrets(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("PARKPOOL_KAFKA_CONFIG", "sasl.username=u,sasl.password=hunter2,oops")
        parser = argparse.ArgumentParser()
        add_kafka_options(parser)
        with pytest.raises(SystemExit):
            parser.parse_args([])
        err = capsys.readouterr().err
        assert "PARKPOOL_KAFKA_CONFIG is invalid" in err and "item 3" in err
        assert "hunter2" not in err

    def test_a_flag_overrides_a_bad_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PARKPOOL_MQTT_PORT", "abc")
        parser = argparse.ArgumentParser()
        add_mqtt_options(parser)
        assert parser.parse_args(["--mqtt-port", "1884"]).mqtt_port == 1884

    def test_a_bad_flag_is_blamed_on_the_flag(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.delenv("PARKPOOL_MQTT_PORT", raising=False)
        parser = argparse.ArgumentParser()
        add_mqtt_options(parser)
        with pytest.raises(SystemExit):
            parser.parse_args(["--mqtt-port", "70000"])
        err = capsys.readouterr().err
        assert "--mqtt-port" in err and "70000 is not a TCP port" in err
        assert "PARKPOOL_MQTT_PORT" not in err

    @pytest.mark.parametrize(
        ("variable", "value", "command"),
        [
            ("PARKPOOL_MQTT_PORT", "abc", ["--help"]),
            ("PARKPOOL_MQTT_PORT", "abc", ["worker", "--vehicle-id", "car-1"]),
            ("PARKPOOL_WINDOW", "many", ["gateway"]),
            ("PARKPOOL_KAFKA_MAX_RECORD_BYTES", "12", ["submit", "gemm"]),
            ("PARKPOOL_LOG_LEVEL", "loud", ["gateway"]),
            ("PARKPOOL_LOG_JSON", "yes", ["gateway"]),
        ],
    )
    def test_the_command_line_never_prints_a_traceback(
        self, variable: str, value: str, command: list[str]
    ) -> None:
        env = {**os.environ, variable: value}
        done = subprocess.run(
            [sys.executable, "-m", "parkpool", *command],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "Traceback" not in done.stderr, done.stderr
        if command == ["--help"]:
            assert done.returncode == 0 and "usage: parkpool" in done.stdout
        else:
            assert done.returncode == 2
            assert variable in done.stderr


class TestPasswordFile:
    """The MQTT password can come from a file, as systemd's LoadCredential= provides it."""

    def test_read_from_the_file(self, tmp_path: Path) -> None:
        secret = tmp_path / "mqtt-password"
        secret.write_text(PASSWORD + "\n")
        parser = argparse.ArgumentParser()
        add_mqtt_options(parser)
        conn = mqtt_from_args(parser.parse_args(["--mqtt-password-file", str(secret)]))
        assert conn.password.value == PASSWORD
        assert PASSWORD not in repr(conn)

    def test_both_is_an_error(self, tmp_path: Path) -> None:
        secret = tmp_path / "mqtt-password"
        secret.write_text(PASSWORD)
        parser = argparse.ArgumentParser()
        add_mqtt_options(parser)
        args = parser.parse_args(["--mqtt-password", "x", "--mqtt-password-file", str(secret)])
        with pytest.raises(ConfigError, match="not both"):
            mqtt_from_args(args)

    def test_a_missing_file_is_named(self, tmp_path: Path) -> None:
        parser = argparse.ArgumentParser()
        add_mqtt_options(parser)
        args = parser.parse_args(["--mqtt-password-file", str(tmp_path / "absent")])
        with pytest.raises(ConfigError, match="absent"):
            mqtt_from_args(args)


class TestSimCells:
    """``parkpool sim --cells`` names each cell's broker; a bad entry is refused by name."""

    def test_each_cell_keeps_the_other_settings(self) -> None:
        base = MqttConnection("ignored", 1, username="u", keepalive=30)
        cells = parse_cells("east=10.0.0.1:1883, west=10.0.0.2:1884", base)
        assert {n: (c.host, c.port, c.username) for n, c in cells.items()} == {
            "east": ("10.0.0.1", 1883, "u"),
            "west": ("10.0.0.2", 1884, "u"),
        }
        assert parse_cells("", base) == {}

    def test_bad_entries_are_refused(self) -> None:
        for text in ("east", "east=host", "east=host:0", "=h:1", "a=h:1,a=h:2"):
            with pytest.raises(ConfigError, match="--cells"):
                parse_cells(text, MqttConnection())


class TestStoreUrlsInClear:
    """A gateway warns when cars would get plain-HTTP presigned URLs to another host."""

    @pytest.mark.parametrize(
        ("endpoint", "public", "in_clear"),
        [
            ("http://127.0.0.1:9000", "", False),  # the embedded store: this machine only
            ("http://localhost:9000", "", False),
            ("http://[::1]:9000", "", False),
            ("https://s3.eu-west-1.amazonaws.com", "", False),
            ("http://minio.internal:9000", "", True),
            ("http://10.0.0.5:9000", "", True),
            ("http://minio.internal:9000", "https://data.example.com", False),  # what cars see
            ("https://s3.internal", "http://data.example.com", True),
        ],
    )
    def test_only_http_beyond_this_machine_is_in_clear(
        self, endpoint: str, public: str, in_clear: bool
    ) -> None:
        conn = StoreConnection(endpoint, public_endpoint=public)
        assert conn.urls_in_clear is in_clear


class TestGatewayBatch:
    """A batch is one AssignmentBatch message: at most 64 assignments."""

    @staticmethod
    def settings(max_batch: int) -> GatewaySettings:
        kafka = KafkaConnection("127.0.0.1:9092")
        return GatewaySettings("gw1", kafka, MqttConnection(), max_batch=max_batch)

    def test_a_batch_no_car_accepts_is_refused_by_name(self) -> None:
        with pytest.raises(ConfigError, match="max_batch must be 1 to 64"):
            self.settings(MAX_BATCH + 1)
        with pytest.raises(ConfigError):
            self.settings(0)
        assert self.settings(MAX_BATCH).max_batch == MAX_BATCH
