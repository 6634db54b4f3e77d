# SPDX-License-Identifier: Apache-2.0
"""The status server of a parkpool process: Prometheus ``/metrics``, ``/healthz`` and
``/readyz``, and optionally ``/status`` (a JSON snapshot, e.g. for ``parkpool top``).

The gateway and the producer SDK both serve one, on an opt-in port. Probes are plain
callables returning ``(ok, details)``; the server only renders them.
A probe that raises answers 503 with the exception's type name (never its message,
which may carry a DSN), and nothing a request does can stop the serving thread.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder

from parkpool.runtime import logs

__all__ = ["Probe", "StatusServer", "request_counter"]

Probe = Callable[[], tuple[bool, Mapping[str, Any]]]
Snapshot = Callable[[], Mapping[str, Any]]

log = logs.get_logger("parkpool.http")

JSON = "application/json"
KNOWN_PATHS = ("/metrics", "/healthz", "/readyz", "/status")
# Unknown paths share one label value, so a scanner cannot grow the series count.
OTHER_PATH = "other"
# A client that connects and stalls is dropped after this long.
CLIENT_TIMEOUT_S = 10.0
# How often the serving loop checks for close(); the upper bound on how long close() waits.
SHUTDOWN_POLL_S = 0.1
# Each registry's request counters, by role; gone with the registry (a counter does
# not refer to it).
_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Counter]] = (
    weakref.WeakKeyDictionary()
)
_COUNTERS_LOCK = threading.Lock()


def request_counter(registry: CollectorRegistry, role: str = "gateway") -> Counter:
    """``parkpool_<role>_http_requests_total{path,code}`` on *registry*, registered once:
    SDK clients sharing a host's registry share it too."""
    with _COUNTERS_LOCK:
        counters = _COUNTERS.setdefault(registry, {})
        if role not in counters:
            counters[role] = Counter(
                f"parkpool_{role}_http_requests",
                "Requests to the status server",
                ["path", "code"],
                registry=registry,
            )
        return counters[role]


@dataclass(frozen=True)
class _Response:
    """One rendered response: status, content type and body."""

    status: HTTPStatus
    content_type: str
    body: bytes


def _json(status: HTTPStatus, payload: Mapping[str, Any]) -> _Response:
    body = json.dumps(payload, default=str, separators=(",", ":")).encode()
    return _Response(status, JSON, body)


def _probe(name: str, probe: Probe) -> _Response:
    try:
        ok, details = probe()
        status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
        return _json(status, {"status": "ok" if ok else "fail", "details": dict(details)})
    except Exception as exc:
        log.warning("probe_raised", probe=name, error=type(exc).__name__, exc_info=True)
        return _json(
            HTTPStatus.SERVICE_UNAVAILABLE, {"status": "error", "error": type(exc).__name__}
        )


@dataclass(frozen=True)
class _Endpoints:
    """Maps a path to its response; knows nothing about sockets."""

    registry: CollectorRegistry
    health: Probe
    ready: Probe
    requests: Counter | None
    status: Snapshot | None = None

    def respond(self, path: str, accept: str) -> _Response:
        if path == "/metrics":
            encoder, content_type = choose_encoder(accept)
            return _Response(HTTPStatus.OK, content_type, encoder(self.registry))
        if path == "/healthz":
            return _probe("healthz", self.health)
        if path == "/readyz":
            return _probe("readyz", self.ready)
        if path == "/status" and self.status is not None:
            return _json(HTTPStatus.OK, self.status())
        return _json(HTTPStatus.NOT_FOUND, {"status": "not_found"})

    def count(self, path: str, status: int) -> None:
        if self.requests is not None:
            label = path if path in KNOWN_PATHS else OTHER_PATH
            self.requests.labels(path=label, code=str(status)).inc()


class _Handler(BaseHTTPRequestHandler):
    """Answers GET and HEAD from the endpoints; never logs to stderr."""

    timeout = CLIENT_TIMEOUT_S

    def __init__(self, endpoints: _Endpoints, *args: Any, **kwargs: Any) -> None:
        self.endpoints = endpoints  # set first: the base class handles the request in __init__
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        path = urlsplit(self.path).path
        try:
            response = self.endpoints.respond(path, self.headers.get("Accept", ""))
        except Exception as exc:  # a collector that raises must not take the server down
            log.warning("status_request_failed", path=path, exc_info=True)
            response = _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": type(exc).__name__})
        # Count before answering: a client that reads the counter next must see this request.
        self.endpoints.count(path, response.status)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr line; requests are counted instead."""


class _Server(ThreadingHTTPServer):
    """A threaded HTTP server with daemon threads, quiet errors and no reverse DNS."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Callable[..., _Handler]) -> None:
        # Read by TCPServer.__init__ when it creates the socket, so an IPv6 host binds too.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), which can stall on a slow resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Usually a scraper hanging up mid-response; the base class prints to stderr.
        log.debug("status_connection_error", client=str(client_address), exc_info=True)


class StatusServer:
    """Serves metrics and probes on a daemon thread from ``start()`` until ``close()``."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Probe,
        ready: Probe,
        *,
        requests: Counter | None = None,
        status: Snapshot | None = None,
    ) -> None:
        self._address = (host, port)
        self._endpoints = _Endpoints(registry, health, ready, requests, status)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> StatusServer:
        """Bind and serve on a daemon thread; port 0 picks a free port."""
        with self._lock:
            if self._closed or self._server is not None:
                raise RuntimeError("a StatusServer starts once")
            self._server = _Server(self._address, partial(_Handler, self._endpoints))
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                args=(SHUTDOWN_POLL_S,),
                name="parkpool-status-http",
                daemon=True,
            )
            self._thread.start()
        log.info("status_server_started", host=self._address[0], port=self.port)
        return self

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._server is None:
            raise RuntimeError("StatusServer is not started")
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving and free the port; safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.shutdown()
            thread.join()
            server.server_close()
