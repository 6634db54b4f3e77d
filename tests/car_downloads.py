# SPDX-License-Identifier: Apache-2.0
"""A car's input downloads, as tests see them: a store that holds each download
half-way for as long as the test likes, one stored input, the test's voice as a gateway
on the car's task topic, and what the car said back.

The store stands for a large input on a slow link: the car is mid-download until the
test opens the gate, so what ends a download (a revoke, the owner, a stop) can be seen
and timed from the store's side, as the owner's network would see it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import select
import socket
import ssl
import threading
import time

import numpy as np
import pytest

from parkpool.runtime.settings import MqttConnection
from parkpool.schemas import (
    Assignment,
    BlobRef,
    MqttTopics,
    Nack,
    Result,
    Revoke,
    TaskChunk,
    encode,
)
from parkpool.worker.blobcache import BlobCache
from parkpool.worker.worker import VehicleWorker
from tests.helpers import RawMqtt

X = np.arange(128 * 1024, dtype=np.float64)  # 1 MiB: a minute and more of time limit
BODY = X.tobytes()
REF = BlobRef("x", hashlib.sha256(BODY).hexdigest(), len(BODY), "<f8", X.shape)
GATEWAY = "gwx"  # a made-up gateway: the test speaks for it


class GatedStore:
    """Answers every GET with ``body``: the first half at once, the rest once ``gate``
    is set. ``requested`` is set once a first half is out; ``hung_up`` (and
    ``hung_up_at``, monotonic) when a car closed its connection before the gate."""

    def __init__(self, body: bytes, context: ssl.SSLContext | None = None) -> None:
        self.body = body
        self.gate = threading.Event()
        self.requested = threading.Event()
        self.hung_up = threading.Event()
        self.hung_up_at = 0.0
        self.requests: list[str] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        if context is not None:
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        scheme = "http" if context is None else "https"
        self.base = f"{scheme}://127.0.0.1:{self._server.server_port}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def close(self) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()

    def answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        self.requests.append(handler.path)
        half = len(self.body) // 2
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(self.body)))
        handler.end_headers()
        handler.wfile.write(self.body[:half])
        handler.wfile.flush()
        self.requested.set()
        if not self._hung_up_before_gate(handler.connection):
            with contextlib.suppress(OSError):
                handler.wfile.write(self.body[half:])

    def _hung_up_before_gate(self, conn: socket.socket) -> bool:
        # The car sends nothing after its request, so the connection turning readable
        # means its end closed: its FIN, seen within microseconds on loopback.
        while not self.gate.is_set():
            readable, _, _ = select.select([conn], [], [], 0.01)
            if readable and not _still_open(conn):
                self.hung_up_at = time.monotonic()
                self.hung_up.set()
                return True
        return False


def _still_open(conn: socket.socket) -> bool:
    try:
        return bool(conn.recv(1))
    except OSError:  # a reset, or TLS ended without its close_notify
        return False


def _handler(store: GatedStore) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: object) -> None:
            pass

        def do_GET(self) -> None:
            store.answer(self)

    return Handler


def stored_task(store: GatedStore, car: VehicleWorker, epoch: int) -> Assignment:
    """A lease on a reduce over the one stored input, fetched from its own URL."""
    params = {"op": "sum"}
    task = TaskChunk("gated", epoch, 64, "reduce", params, {}, "r", 1e10, 0.0, refs=(REF,))
    url = store.url(f"x?epoch={epoch}")
    deadline = time.time() + 300
    return Assignment(GATEWAY, car.vehicle_id, epoch, 1, deadline, encode(task), urls=(url,))


class Said:
    """What a car sent through its outbox: every nack and result, as they went out."""

    def __init__(self, car: VehicleWorker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nacks: list[Nack] = []
        self.results: list[Result] = []
        self.result_sent = threading.Event()
        nack, result = car.outbox.nack, car.outbox.result

        def nacked(message: Nack) -> None:
            self.nacks.append(message)
            nack(message)

        def answered(message: Result) -> str | None:
            self.results.append(message)
            self.result_sent.set()
            return result(message)

        monkeypatch.setattr(car.outbox, "nack", nacked)
        monkeypatch.setattr(car.outbox, "result", answered)


class GatewayVoice:
    """The test's voice on the car's task topic, through the broker."""

    def __init__(self, mqtt: MqttConnection, namespace: str, car: VehicleWorker) -> None:
        self.peer = RawMqtt(mqtt, f"gw-{namespace}")
        self.topic = MqttTopics(namespace).task(car.vehicle_id)
        self.car = car

    def assign(self, assignment: Assignment) -> None:
        self.peer.publish(self.topic, encode(assignment))

    def revoke(self, epoch: int) -> None:
        revoke = Revoke(GATEWAY, self.car.vehicle_id, epoch, "job_cancelled")
        self.peer.publish(self.topic, encode(revoke))


def readers(cache: BlobCache, sha256: str) -> int:
    """How many callers want the download of ``sha256`` in flight (white-box: no public
    figure says a task is waiting for another's download)."""
    flight = cache._fetching.get(sha256)
    return flight.wanted if flight is not None else 0
