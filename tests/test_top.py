# SPDX-License-Identifier: Apache-2.0
"""``parkpool top``: the view model from literal scrapes, and one frame of a real gateway.

The unit tests feed literal Prometheus text and ``/status`` JSON through the same parser
the live view uses; the integration test runs the command against a real gateway's
status server after a real job.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import urllib.error
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

from parkpool.app.top.build import Pair, build_view, merge_jobs
from parkpool.app.top.cli import DEFAULT_URL, resolve_urls, url_from_log
from parkpool.app.top.model import GatewayState, JobView, View
from parkpool.app.top.rates import bucket_window, quantile, rate
from parkpool.app.top.render import render
from parkpool.app.top.scrape import Sample, error_name, fetch
from parkpool.app.top.series import parse_metrics
from parkpool.producer.client import ParkpoolClient
from parkpool.runtime.http import StatusServer
from parkpool.schemas.errors import ConfigError
from parkpool.worker.fleet import Fleet
from tests.conftest import RunningGateway
from tests.helpers import wait_for

GatewayFactory = Callable[..., RunningGateway]
FleetFactory = Callable[..., Fleet]
URL = "http://gw-1:9464"
INF = float("inf")

BEFORE = """\
# TYPE parkpool_gateway_tasks_total counter
parkpool_gateway_tasks_total{status="completed"} 10
parkpool_gateway_tasks_total{status="dispatched"} 12
# TYPE parkpool_gateway_dead_lettered_total counter
parkpool_gateway_dead_lettered_total{reason="max_attempts"} 1
parkpool_gateway_dead_lettered_total{reason="malformed"} 1
# TYPE parkpool_gateway_redelivered_total counter
parkpool_gateway_redelivered_total{cause="nack"} 1
# TYPE parkpool_gateway_dropped_total counter
# TYPE parkpool_gateway_kafka_delivery_errors_total counter
# TYPE parkpool_gateway_mqtt_reconnects_total counter
parkpool_gateway_mqtt_reconnects_total 1
# TYPE parkpool_gateway_end_to_end_seconds histogram
parkpool_gateway_end_to_end_seconds_bucket{le="0.1"} 10
parkpool_gateway_end_to_end_seconds_bucket{le="0.5"} 10
parkpool_gateway_end_to_end_seconds_bucket{le="1.0"} 10
parkpool_gateway_end_to_end_seconds_bucket{le="+Inf"} 10
parkpool_gateway_end_to_end_seconds_count 10
"""

AFTER = """\
# TYPE parkpool_gateway_tasks_total counter
parkpool_gateway_tasks_total{status="completed"} 30
parkpool_gateway_tasks_total{status="dispatched"} 40
# TYPE parkpool_gateway_dead_lettered_total counter
parkpool_gateway_dead_lettered_total{reason="max_attempts"} 2
parkpool_gateway_dead_lettered_total{reason="malformed"} 4
# TYPE parkpool_gateway_redelivered_total counter
parkpool_gateway_redelivered_total{cause="nack"} 1
parkpool_gateway_redelivered_total{cause="lease_expired"} 4
# TYPE parkpool_gateway_dropped_total counter
parkpool_gateway_dropped_total{source="mqtt",reason="malformed"} 2
# TYPE parkpool_gateway_kafka_delivery_errors_total counter
# TYPE parkpool_gateway_mqtt_reconnects_total counter
parkpool_gateway_mqtt_reconnects_total 1
# TYPE parkpool_gateway_end_to_end_seconds histogram
parkpool_gateway_end_to_end_seconds_bucket{le="0.1"} 10
parkpool_gateway_end_to_end_seconds_bucket{le="0.5"} 60
parkpool_gateway_end_to_end_seconds_bucket{le="1.0"} 110
parkpool_gateway_end_to_end_seconds_bucket{le="+Inf"} 110
parkpool_gateway_end_to_end_seconds_count 110
"""

STATUS: dict[str, Any] = {
    "gateway_id": "gw-1",
    "ready": True,
    "draining": False,
    "updated_at": 1000.0,
    "leases": 7,
    "queued": 40,
    "partitions": [
        {
            "topic": "pp.tasks",
            "partition": 0,
            "window_used": 3,
            "window_size": 512,
            "paused": False,
            "committed": 90,
            "end": 100,
            "lag": 10,
        }
    ],
    "jobs": [{"job_id": "job-a", "queued": 40, "leased": 7, "priority": "high"}],
    "fleet": {
        "known": 16,
        "by_state": {"eligible": 9, "computing": 5, "suspended": 2},
        "suspended_reasons": {"owner": 2},
        "credits_outstanding": 11,
    },
}
READY = {"status": "ok", "details": {"draining": False}}


def sample(
    metrics: str | None,
    at: float,
    status: Mapping[str, Any] | None = None,
    readiness: Mapping[str, Any] | None = READY,
    url: str = URL,
) -> Sample:
    """A scrape as ``fetch`` would return it, from literal page contents."""
    series = parse_metrics(metrics) if metrics is not None else None
    error = None if series is not None else "ConnectionRefusedError"
    return Sample(url, at, 1002.5, series, error, readiness, status)


def frame(view: View) -> str:
    """The frame as plain text, the way ``--once`` prints it."""
    out = io.StringIO()
    console = Console(file=out, width=140, no_color=True, highlight=False, emoji=False)
    console.print(render(view, interval_s=2.0, clock="12:00:00"))
    return out.getvalue()


def line_with(text: str, label: str) -> str:
    """The one line of a frame that carries *label*."""
    lines = [line for line in text.splitlines() if label in line]
    assert len(lines) == 1, f"{label!r} on {len(lines)} lines of:\n{text}"
    return lines[0]


def cell(text: str, label: str) -> str:
    """The value in the cell right of *label*'s, on the one line that carries it."""
    return line_with(text, label).split(label, 1)[1].split("│")[1].strip()


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestRates:
    """Counters become rates between two scrapes, and a reset counts from zero."""

    def test_rate_is_increase_over_seconds(self) -> None:
        # Given a counter read at 10 and then at 30, two seconds apart
        # When the rate is computed
        # Then it is 10 per second
        assert rate(10, 30, 2.0) == 10.0

    def test_reset_counter_counts_from_zero(self) -> None:
        # Given a counter that went down (the gateway restarted) to 5 in one second
        # When the rate is computed
        # Then the 5 are new
        assert rate(100, 5, 1.0) == 5.0

    def test_unknown_side_or_no_time_is_unknown(self) -> None:
        # Given a first frame (no previous value) or two scrapes at the same instant
        # When rates are computed
        # Then they are unknown, not zero
        assert rate(None, 5, 1.0) is None
        assert rate(1, None, 1.0) is None
        assert rate(1, 5, 0.0) is None

    def test_view_rates_every_counter(self) -> None:
        # Given two scrapes two seconds apart
        pair: Pair = (sample(BEFORE, 100.0, STATUS), sample(AFTER, 102.0, STATUS))
        # When the view is built
        view = build_view([pair])
        # Then completions, dead letters and each breakdown have totals and rates
        assert (view.completed.total, view.completed.per_s) == (30, 10.0)
        assert (view.errors.dead_lettered.total, view.errors.dead_lettered.per_s) == (6, 2.0)
        redelivered = view.errors.redelivered
        assert redelivered is not None
        assert {k: (c.total, c.per_s) for k, c in redelivered.items()} == {
            "lease_expired": (4, 2.0),
            "nack": (1, 0.0),
        }
        dropped = view.errors.dropped
        assert dropped is not None
        assert {k: (c.total, c.per_s) for k, c in dropped.items()} == {"mqtt/malformed": (2, 1.0)}
        # And a declared counter with no sample is zero, not unknown
        assert (view.errors.delivery_errors.total, view.errors.delivery_errors.per_s) == (0, 0)
        assert view.errors.mqtt_reconnects.per_s == 0.0


class TestQuantiles:
    """Quantiles are interpolated within buckets, as Prometheus's histogram_quantile does."""

    BUCKETS = ((0.1, 10.0), (0.5, 60.0), (1.0, 100.0), (INF, 100.0))

    def test_interpolates_within_the_bucket(self) -> None:
        # Given 100 observations: 10 up to 0.1 s, 50 up to 0.5 s, 40 up to 1 s
        # When the median and the 99th percentile are estimated
        # Then each falls proportionally inside its bucket
        assert quantile(0.5, self.BUCKETS) == pytest.approx(0.1 + 0.4 * 40 / 50)
        assert quantile(0.99, self.BUCKETS) == pytest.approx(0.5 + 0.5 * 39 / 40)

    def test_rank_in_the_inf_bucket_is_the_highest_finite_bound(self) -> None:
        # Given most observations above the last finite bound
        # When the 99th percentile is estimated
        # Then it is that bound, as nothing more is known
        assert quantile(0.99, ((1.0, 1.0), (INF, 10.0))) == 1.0

    def test_no_observation_is_unknown(self) -> None:
        # Given no buckets, or buckets that are all zero
        # When a quantile is asked for
        # Then it is unknown
        assert quantile(0.5, None) is None
        assert quantile(0.5, ((1.0, 0.0), (INF, 0.0))) is None

    def test_view_uses_the_last_interval(self) -> None:
        # Given 10 fast observations before, then 100 slower ones during the interval
        view = build_view([(sample(BEFORE, 100.0), sample(AFTER, 102.0))])
        # When the latency quantiles are estimated
        # Then only the interval's observations count: half of them took at most 0.5 s
        assert view.latency.end_to_end_p50_s == pytest.approx(0.5)
        assert view.latency.end_to_end_p99_s == pytest.approx(0.5 + 0.5 * 49 / 50)

    def test_quiet_interval_falls_back_to_since_start(self) -> None:
        # Given no new observation between two scrapes
        nothing_new = tuple((le, 0.0) for le, _ in self.BUCKETS)
        assert bucket_window(self.BUCKETS, self.BUCKETS) == nothing_new
        view = build_view([(sample(AFTER, 100.0), sample(AFTER, 102.0))])
        # When the quantiles are estimated
        # Then they describe every observation since the gateway started
        assert view.latency.end_to_end_p50_s == pytest.approx(0.1 + 0.4 * 45 / 50)

    def test_missing_histograms_are_unknown(self) -> None:
        # Given a gateway without the preemption histogram
        view = build_view([(None, sample(AFTER, 102.0))])
        # When the view is built
        # Then preemption p99 is unknown and shown as ?
        assert view.latency.preemption_p99_s is None
        assert cell(frame(view), "Preemption p99") == "?"


class TestStatus:
    """The /status JSON fills the queue, job and fleet sections."""

    def test_status_fills_every_section(self) -> None:
        # Given a gateway that serves the full /status contract
        view = build_view([(None, sample(AFTER, 102.0, STATUS))])
        # When the view is built
        gateway = view.gateways[0]
        # Then its row, the partitions, the jobs and the fleet come from it
        assert (gateway.gateway_id, gateway.state, gateway.leases, gateway.queued) == (
            "gw-1",
            GatewayState.READY,
            7,
            40,
        )
        assert gateway.lag == 10
        assert gateway.status_age_s == pytest.approx(2.5)
        assert [(p.topic, p.partition, p.window_used, p.paused) for p in view.partitions] == [
            ("pp.tasks", 0, 3, False)
        ]
        assert view.jobs == (JobView("job-a", "high", 40, 7),)
        assert view.fleet.known == 16
        assert dict(view.fleet.by_state) == {
            "eligible": 9,
            "computing": 5,
            "draining": None,
            "suspended": 2,
            "offline": None,
        }
        assert dict(view.fleet.suspended_reasons) == {"owner": 2}
        assert view.fleet.credits_outstanding == 11

    def test_missing_keys_show_as_question_marks(self) -> None:
        # Given a /status with only an id, and a fleet without counts
        status = {"gateway_id": "gw-1", "fleet": {"by_state": {"computing": "many"}}}
        view = build_view([(None, sample("", 1.0, status, readiness=None))])
        # When it is rendered
        text = frame(view)
        # Then nothing crashes and each missing value is a ?
        assert view.gateways[0].state is GatewayState.UNKNOWN
        assert view.fleet.known is None
        assert view.fleet.by_state["computing"] is None
        for label in ("Known", "Computing", "Credits outstanding", "Completion rate"):
            assert cell(text, label) == "?", label
        assert line_with(text, "http://gw-1:9464").split("│")[3].strip() == "?"

    def test_offset_not_known_yet_is_unknown(self) -> None:
        # Given a partition whose end librdkafka has not reported yet (-1001)
        partition = {"topic": "pp.tasks", "partition": 2, "committed": 0, "end": -1001}
        # When the view is built
        view = build_view([(None, sample("", 1.0, {"partitions": [partition]}))])
        # Then the end is unknown while the committed offset 0 is known
        assert [(p.committed, p.end) for p in view.partitions] == [(0, None)]

    def test_older_gateway_falls_back_to_gauges(self) -> None:
        # Given a gateway without /status, whose /metrics has the queue and fleet gauges
        metrics = """\
# TYPE parkpool_gateway_leases gauge
parkpool_gateway_leases 3
# TYPE parkpool_gateway_queued_tasks gauge
parkpool_gateway_queued_tasks 8
# TYPE parkpool_gateway_kafka_lag gauge
parkpool_gateway_kafka_lag{partition="1"} 4
parkpool_gateway_kafka_lag{partition="0"} 2
# TYPE parkpool_gateway_vehicles gauge
parkpool_gateway_vehicles{state="online"} 5
# TYPE parkpool_gateway_vehicles_known gauge
parkpool_gateway_vehicles_known 6
"""
        # When the view is built
        view = build_view([(None, sample(metrics, 1.0, status=None))])
        # Then the row, the partitions and the fleet come from the gauges
        gateway = view.gateways[0]
        assert (gateway.leases, gateway.queued, gateway.lag) == (3, 8, 6)
        assert [(p.partition, p.lag, p.topic) for p in view.partitions] == [
            (0, 2, None),
            (1, 4, None),
        ]
        assert (view.fleet.known, view.fleet.by_state["online"]) == (6, 5)
        # And the jobs, which only /status reports, are unknown rather than none
        assert view.jobs is None
        jobs_section = frame(view).split("Jobs in flight", 1)[1]
        rows = [line for line in jobs_section.splitlines() if line.startswith("│")]
        assert [c.strip() for c in rows[0].split("│")[1:-1]] == ["?", "?", "?", "?"]


class TestGatewayStates:
    """Each gateway's readiness is shown; a DOWN one is listed and counted nowhere else."""

    def test_readiness_and_draining(self) -> None:
        # Given three gateways: ready, not ready, and draining
        not_ready = {"status": "fail", "details": {"draining": False}}
        draining = {"status": "fail", "details": {"draining": True}}
        pairs: list[Pair] = [
            (None, sample(AFTER, 1.0, url="http://a")),
            (None, sample(AFTER, 1.0, readiness=not_ready, url="http://b")),
            (None, sample(AFTER, 1.0, readiness=draining, url="http://c")),
        ]
        # When the view is built
        states = [g.state for g in build_view(pairs).gateways]
        # Then each says what it is
        assert states == [GatewayState.READY, GatewayState.NOT_READY, GatewayState.DRAINING]

    def test_down_gateway_is_listed_with_its_error(self) -> None:
        # Given one gateway that answered and one that did not
        pairs: list[Pair] = [
            (sample(BEFORE, 100.0, STATUS), sample(AFTER, 102.0, STATUS)),
            (None, sample(None, 102.0, url="http://gw-2:9464")),
        ]
        # When the view is built and rendered
        view = build_view(pairs)
        text = frame(view)
        # Then the second is DOWN with the error's type, and totals are the first's alone
        assert view.gateways[1].state is GatewayState.DOWN
        assert "DOWN: ConnectionRefusedError" in line_with(text, "http://gw-2:9464")
        assert "gateways up 1/2" in text
        assert (view.leases, view.completed.total, view.completed.per_s) == (7, 30, 10.0)

    def test_jobs_of_several_gateways_are_merged(self) -> None:
        # Given the same job at two gateways, and a smaller one at one of them
        jobs = [
            JobView("job-a", "high", 4, 1),
            JobView("job-b", None, 0, 3),
            JobView("job-a", None, 2, 5),
        ]
        # When they are merged
        # Then each job is one row, most tasks in flight first
        assert merge_jobs(jobs) == (JobView("job-a", "high", 6, 6), JobView("job-b", None, 0, 3))


class TestScrape:
    """Reading a gateway never raises: what went wrong is shown by type."""

    def test_unreachable_gateway_is_down(self) -> None:
        # Given a port nothing listens on
        url = f"http://127.0.0.1:{free_port()}"
        # When it is scraped
        down = fetch(url, timeout=1.0)
        # Then the sample is DOWN with the error's type, and the view says so
        assert (down.series, down.error) == (None, "ConnectionRefusedError")
        assert build_view([(None, down)]).gateways[0].error == "ConnectionRefusedError"

    def test_a_server_that_is_not_a_gateway_is_down(self, status_server: StatusServer) -> None:
        # Given a status server, reached under a path where it serves nothing
        url = f"http://127.0.0.1:{status_server.port}/not-here"
        # When it is scraped
        # Then its 404 is the error
        assert fetch(url, timeout=1.0).error == "HTTP 404"

    def test_older_gateway_without_status_still_answers(self, status_server: StatusServer) -> None:
        # Given a status server without /status
        # When it is scraped
        sample = fetch(f"http://127.0.0.1:{status_server.port}", timeout=1.0)
        # Then metrics and readiness are read and status is simply absent
        assert sample.error is None and sample.series is not None
        assert sample.readiness == {"status": "ok", "details": {}}
        assert sample.status is None

    def test_error_names_look_through_urllib(self) -> None:
        # Given a timeout as urllib wraps it
        # When it is named
        # Then the name is the underlying error's
        assert error_name(urllib.error.URLError(TimeoutError())) == "TimeoutError"
        assert error_name(ValueError("bad page")) == "ValueError"


@pytest.fixture
def status_server() -> Iterator[StatusServer]:
    """A status server over an empty registry, ready, without /status."""
    server = StatusServer(
        "127.0.0.1", 0, CollectorRegistry(), lambda: (True, {}), lambda: (True, {})
    ).start()
    yield server
    server.close()


class TestCommandLine:
    """Gateways are named by --url, by a gateway's log, or by the environment."""

    def test_urls_come_from_flags_then_environment_then_default(self) -> None:
        # Given --url twice (one with a comma), only the environment, or nothing
        # When the URLs are resolved
        # Then the flags win, a bare host:port gets a scheme, and the default is last
        assert resolve_urls(["http://a:1,b:2", "c:3"], [], "http://env:9") == [
            "http://a:1",
            "http://b:2",
            "http://c:3",
        ]
        assert resolve_urls([], [], "http://x:1, http://y:2") == ["http://x:1", "http://y:2"]
        assert resolve_urls([], [], None) == [DEFAULT_URL]

    def test_url_from_a_gateway_log(self, tmp_path: Path) -> None:
        # Given a JSON log in which the status server started twice, on different ports
        log = tmp_path / "gateway.log"
        log.write_text(
            '{"event": "status_server_started", "host": "127.0.0.1", "port": 1111}\n'
            "not json\n"
            '{"event": "status_server_started", "host": "::1", "port": 2222}\n'
            '{"event": "gateway_started"}\n'
        )
        # When the URL is read from it
        # Then it is the last one, with an IPv6 host in brackets
        assert url_from_log(log) == "http://[::1]:2222"

    def test_log_without_status_server_is_a_config_error(self, tmp_path: Path) -> None:
        # Given a log of a gateway started without --metrics-port, and no log at all
        log = tmp_path / "gateway.log"
        log.write_text('{"event": "gateway_started"}\n')
        # When the URL is read
        # Then both are errors the command line reports
        with pytest.raises(ConfigError, match="does not say"):
            url_from_log(log)
        with pytest.raises(ConfigError, match="cannot read"):
            url_from_log(tmp_path / "missing.log")


def _knows(view: View, vehicles: int, partitions: int) -> bool:
    return view.fleet.known == vehicles and len(view.partitions) == partitions


@pytest.mark.integration
class TestAgainstRealGateway:
    """``parkpool top --once`` shows a real gateway's readiness, throughput and fleet."""

    def test_once_frame_after_a_job(
        self, gateway_factory: GatewayFactory, fleet_factory: FleetFactory, client: ParkpoolClient
    ) -> None:
        # Given a gateway with its status server, three cars, and a job they completed
        running = gateway_factory()
        gateway = running.gateway
        snapshot = getattr(gateway, "status_snapshot", None)
        server = StatusServer(
            "127.0.0.1",
            0,
            gateway.metrics.registry,
            gateway.health,
            gateway.readiness,
            status=snapshot,
        ).start()
        try:
            fleet_factory(3)
            x = np.arange(2000, dtype=np.float64)
            handle = client.submit("reduce", {"x": x, "op": "sum"}, chunk_elems=500)
            assert handle.wait(timeout=60) == float(x.sum())
            n = handle.n_chunks
            url = f"http://127.0.0.1:{server.port}"
            wait_for(
                lambda: _knows(build_view([(None, fetch(url, 1.0))]), vehicles=3, partitions=3),
                what="the gateway to report three cars and three partitions",
            )
            wait_for(
                lambda: running.metric("parkpool_gateway_tasks_total", status="completed") == n
            )
            # When `parkpool top --once` reads it
            command = [sys.executable, "-m", "parkpool.app.cli", "top", "--once"]
            command += ["--interval", "0.3", "--url", url]
            env = {**os.environ, "COLUMNS": "140"}
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=60, check=False, env=env
            )
        finally:
            server.close()
        # Then the frame shows the gateway as ready, the completions and the fleet
        assert done.returncode == 0, done.stderr
        text = done.stdout
        assert "gateways up 1/1" in text
        row = line_with(text, url).split("│")
        assert row[3].strip() == "READY"
        assert row[6].strip() == str(n)
        assert cell(text, "Tasks completed") == str(n)
        assert cell(text, "Completion rate").endswith("/s")
        assert cell(text, "End-to-end p99") != "?"
        assert "Fleet" in text
        assert cell(text, "Known") == "3"
        if snapshot is not None:
            # And with /status, the gateway's id and its partitions
            assert row[1].strip() == "gw1"
            assert text.count("│ gw1 ") >= 2, text
