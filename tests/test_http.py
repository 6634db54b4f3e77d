# SPDX-License-Identifier: Apache-2.0
"""The status server serves metrics and probes over real HTTP on a free loopback port."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from parkpool.runtime.http import StatusServer, request_counter

HOST = "127.0.0.1"
# Never go through a proxy from the environment to reach loopback.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class ProbeState:
    """Mutable state behind the probes, flipped by the tests."""

    alive: bool = True
    ready: bool = False
    error: Exception | None = None
    details: dict[str, Any] = field(default_factory=lambda: {"mqtt": "subscribed"})

    def health(self) -> tuple[bool, Mapping[str, Any]]:
        if self.error is not None:
            raise self.error
        return self.alive, self.details

    def readiness(self) -> tuple[bool, Mapping[str, Any]]:
        if self.error is not None:
            raise self.error
        return self.ready, self.details


@dataclass(frozen=True)
class Reply:
    """Status, headers and body of one HTTP exchange."""

    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Running:
    """A started server with the registry, state and counters behind it."""

    server: StatusServer
    registry: CollectorRegistry
    state: ProbeState
    tasks: Counter

    def get(self, path: str, method: str = "GET", accept: str | None = None) -> Reply:
        headers = {"Accept": accept} if accept else {}
        url = f"http://{HOST}:{self.server.port}{path}"
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with OPENER.open(request, timeout=5) as response:
                return Reply(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            with error:
                return Reply(error.code, error.headers, error.read())

    def requests_counted(self, path: str, code: int) -> float:
        labels = {"path": path, "code": str(code)}
        value = self.registry.get_sample_value("parkpool_gateway_http_requests_total", labels)
        return value or 0.0


def start_server(*, count_requests: bool = True) -> Running:
    registry = CollectorRegistry()
    tasks = Counter("parkpool_test_tasks", "Tasks seen", ["status"], registry=registry)
    tasks.labels(status="completed").inc(3)
    requests = request_counter(registry) if count_requests else None
    state = ProbeState()
    server = StatusServer(HOST, 0, registry, state.health, state.readiness, requests=requests)
    return Running(server.start(), registry, state, tasks)


@pytest.fixture
def running() -> Iterator[Running]:
    started = start_server()
    yield started
    started.server.close()


def port_is_listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((HOST, port)) == 0


class TestMetrics:
    """/metrics renders the given registry in the format the scraper asks for."""

    def test_plain_text_exposition_holds_the_counter_sample(self, running: Running) -> None:
        reply = running.get("/metrics")
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=")
        assert b'parkpool_test_tasks_total{status="completed"} 3.0' in reply.body

    def test_each_scrape_sees_the_current_value(self, running: Running) -> None:
        running.tasks.labels(status="completed").inc()
        assert b'parkpool_test_tasks_total{status="completed"} 4.0' in running.get("/metrics").body

    def test_openmetrics_when_the_scraper_accepts_it(self, running: Running) -> None:
        reply = running.get("/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        assert reply.body.endswith(b"# EOF\n")


class TestProbes:
    """/healthz and /readyz follow their callables: 200 when ok, 503 with details when not."""

    @pytest.mark.parametrize(("path", "attribute"), [("/healthz", "alive"), ("/readyz", "ready")])
    def test_flips_with_the_state(self, running: Running, path: str, attribute: str) -> None:
        # Given a passing probe
        setattr(running.state, attribute, True)
        reply = running.get(path)
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "application/json"
        assert reply.json() == {"status": "ok", "details": {"mqtt": "subscribed"}}
        # When the state turns bad, Then the probe answers 503 with the details
        setattr(running.state, attribute, False)
        running.state.details = {"mqtt": "disconnected", "assigned": 0}
        reply = running.get(path)
        assert reply.status == 503
        assert reply.json() == {
            "status": "fail",
            "details": {"mqtt": "disconnected", "assigned": 0},
        }
        # When it recovers, Then it passes again
        setattr(running.state, attribute, True)
        assert running.get(path).status == 200

    def test_liveness_and_readiness_are_independent(self, running: Running) -> None:
        running.state.alive, running.state.ready = True, False
        assert running.get("/healthz").status == 200
        assert running.get("/readyz").status == 503

    @pytest.mark.parametrize("path", ["/healthz", "/readyz"])
    def test_raising_probe_is_503_with_the_type_name_only(
        self, running: Running, path: str
    ) -> None:
        # Given a probe that raises with a message that must not leak
        running.state.error = ConnectionError("kafka://user:secret@broker")
        reply = running.get(path)
        # Then it answers 503 with the exception's type name and nothing else
        assert reply.status == 503
        assert reply.json() == {"status": "error", "error": "ConnectionError"}
        assert b"secret" not in reply.body
        # And the server keeps serving
        running.state.error = None
        running.state.ready = True
        assert running.get(path).status == 200
        assert running.get("/metrics").status == 200

    def test_details_that_json_cannot_encode_are_stringified(self, running: Running) -> None:
        running.state.details = {"lag_s": 1.5, "owner": object}
        reply = running.get("/healthz")
        assert reply.status == 200
        assert reply.json()["details"] == {"lag_s": 1.5, "owner": str(object)}

    def test_query_string_is_ignored(self, running: Running) -> None:
        assert running.get("/healthz?verbose=1").status == 200


class TestRouting:
    """Unknown paths are 404, HEAD answers like GET without a body, and requests are counted."""

    @pytest.mark.parametrize("path", ["/", "/metrics/", "/nope", "/healthz/extra"])
    def test_unknown_path_is_404(self, running: Running, path: str) -> None:
        assert running.get(path).status == 404

    @pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
    def test_head_has_headers_and_no_body(self, running: Running, path: str) -> None:
        running.state.ready = True
        head = running.get(path, method="HEAD")
        get = running.get(path)
        assert head.status == get.status == 200
        assert head.body == b""
        assert head.headers["Content-Type"] == get.headers["Content-Type"]
        assert int(head.headers["Content-Length"]) > 0

    def test_head_follows_the_probe_state(self, running: Running) -> None:
        running.state.alive = False
        assert running.get("/healthz", method="HEAD").status == 503

    def test_requests_are_counted_by_path_and_code(self, running: Running) -> None:
        running.get("/readyz")
        running.get("/readyz")
        running.state.ready = True
        running.get("/readyz", method="HEAD")
        running.get("/metrics")
        running.get("/wp-login.php")
        running.get("/.env")
        assert running.requests_counted("/readyz", 503) == 2
        assert running.requests_counted("/readyz", 200) == 1
        assert running.requests_counted("/metrics", 200) == 1
        # Unknown paths share one label value, so scanners cannot add series
        assert running.requests_counted("other", 404) == 2
        assert b"wp-login" not in running.get("/metrics").body

    def test_the_request_counter_is_optional(self) -> None:
        # Given a server without a request counter
        running = start_server(count_requests=False)
        try:
            # Then it serves, and registers nothing on the registry by itself
            assert running.get("/healthz").status == 200
            assert b"parkpool_gateway_http_requests" not in running.get("/metrics").body
        finally:
            running.server.close()


class TestLifecycle:
    """start() binds a free port, close() frees it and may be called again."""

    def test_close_frees_the_port_and_is_idempotent(self, running: Running) -> None:
        port = running.server.port
        assert port != 0
        assert port_is_listening(port)
        # When closed, twice
        running.server.close()
        running.server.close()
        # Then nothing listens, and a new server can bind the same port
        assert not port_is_listening(port)
        state = ProbeState()
        again = StatusServer(HOST, port, running.registry, state.health, state.readiness)
        try:
            assert again.start().port == port
        finally:
            again.close()

    def test_close_before_start_is_harmless(self) -> None:
        state = ProbeState()
        server = StatusServer(HOST, 0, CollectorRegistry(), state.health, state.readiness)
        server.close()
        server.close()
        with pytest.raises(RuntimeError):
            server.start()

    def test_starts_only_once(self, running: Running) -> None:
        with pytest.raises(RuntimeError):
            running.server.start()

    def test_port_before_start_is_an_error(self) -> None:
        state = ProbeState()
        server = StatusServer(HOST, 0, CollectorRegistry(), state.health, state.readiness)
        with pytest.raises(RuntimeError):
            _ = server.port
