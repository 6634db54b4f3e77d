# SPDX-License-Identifier: Apache-2.0
"""What SREs load is valid, tested, and names only series that parkpool exposes.

promtool (from the Debian ``prometheus`` package, installed by ``make setup``) checks the
scrape config and the rule files and runs the rules' unit tests. The Grafana dashboard,
the rules, the rule tests and docs/OPERATIONS.md may name only series that the real
registries (gateway, fleet, SDK, status servers) expose, recording rules, or ``up``.
A missing promtool fails these tests: it must never pass as a skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RECORDING_RULES = PROMETHEUS_DIR / "recording_rules.yml"
ALERT_RULES = PROMETHEUS_DIR / "alert_rules.yml"
RULE_FILES = (RECORDING_RULES, ALERT_RULES)
ALERT_TESTS = PROMETHEUS_DIR / "alert_rules_test.yml"
RULE_TESTS = (ALERT_TESTS, PROMETHEUS_DIR / "recording_rules_test.yml")
DASHBOARD = ROOT / "deploy" / "grafana" / "parkpool-dashboard.json"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"
PROMTOOL = Path("/usr/bin/promtool")

# What the dashboard must show (the panels SREs asked for), by title.
REQUIRED_PANELS = (
    "Throughput",
    "End-to-end latency percentiles",
    "Kafka lag by partition",
    "In-flight leases and queue",
    "Window use by partition",
    "Fleet by state",
    "Redeliveries and dead letters by reason",
    "Preemption latency",
    "Error rates",
)
SEVERITIES = {"critical", "warning"}
# Prometheus' own series that the rules and the dashboard may use.
PROMETHEUS_SERIES = frozenset({"up"})


# --- promtool ------------------------------------------------------------------------


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; fail (never skip) when it is not installed."""
    assert PROMTOOL.is_file(), f"{PROMTOOL} missing: run `make setup` (Debian package prometheus)"
    return subprocess.run(
        [str(PROMTOOL), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return rules(ALERT_RULES)


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules(RECORDING_RULES)}


# --- the series parkpool exposes -------------------------------------------------------


def _families(registry: CollectorRegistry) -> dict[str, str]:
    """Family name -> type, as prometheus_client names them (counters without _total)."""
    return {family.name: family.type for family in registry.collect()}


@cache
def exposed_families() -> dict[str, str]:
    """Every family the gateway and SDK processes expose, from their real registries.

    Built the way the processes build them: ``GatewayMetrics`` holds the process's own
    series (``runtime.build_info``), ``Gateway`` adds ``FleetStats`` to its registry, and
    each status server adds its request counter.
    """
    from parkpool.gateway.fleet_stats import FleetStats
    from parkpool.gateway.metrics import GatewayMetrics
    from parkpool.producer.metrics import SdkMetrics
    from parkpool.runtime.http import request_counter

    gateway = GatewayMetrics().registry
    FleetStats(gateway)
    sdk = SdkMetrics().registry
    for registry, role in ((gateway, "gateway"), (sdk, "sdk")):
        if f"parkpool_{role}_http_requests" not in _families(registry):
            request_counter(registry, role)
    return {**_families(gateway), **_families(sdk)}


def series_names(families: dict[str, str]) -> set[str]:
    """The sample names of each family: counters get _total, histograms their three."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        name + suffix for name, kind in families.items() for suffix in suffixes.get(kind, ("",))
    }


def exposed_series() -> set[str]:
    return series_names(exposed_families())


def known_series() -> set[str]:
    """What PromQL in the rules and the dashboard may select."""
    return exposed_series() | recorded_names() | PROMETHEUS_SERIES


# --- PromQL: which series an expression selects ---------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_NUMBER_OR_DURATION = re.compile(r"(?<![\w:])\d[\w.]*")
_IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"and", "or", "unless", "inf", "nan", "atan2"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, labels or keywords)."""
    for pattern in (_STRING, _MATCHERS, _RANGE, _GROUPING, _VARIABLE, _NUMBER_OR_DURATION):
        expr = pattern.sub(" ", expr)
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        called = expr[match.end() :].lstrip().startswith("(")
        if not called and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


# --- the dashboard ----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    return [rule["expr"] for path in RULE_FILES for rule in rules(path)]


def fed_series() -> list[str]:
    """The series the promtool unit tests feed in, as selectors."""
    return [
        series["series"]
        for path in RULE_TESTS
        for case in load_yaml(path)["tests"]
        for series in case["input_series"]
    ]


def unknown(exprs: Iterable[str]) -> dict[str, set[str]]:
    known = known_series()
    found = {expr: metric_names(expr) - known for expr in exprs}
    return {expr: names for expr, names in found.items() if names}


# --- docs/OPERATIONS.md --------------------------------------------------------------------


def documented_metrics() -> set[str]:
    """Names in the first column of the metrics tables (rows starting ``| `parkpool_``, or
    ``process_`` and ``python_`` for prometheus_client's process series)."""
    first_column = r"^\|\s*`((?:parkpool|process|python)_[a-z0-9_]+)`"
    return set(re.findall(first_column, OPERATIONS.read_text(), re.MULTILINE))


def exposed_metric_names() -> set[str]:
    """Each family as OPERATIONS.md names it: counters with _total, others as they are."""
    return {
        name + ("_total" if kind == "counter" else "") for name, kind in exposed_families().items()
    }


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


# ======================================================================================


class TestPromqlMetricNames:
    """The name extractor finds the series an expression selects and nothing else."""

    def test_functions_labels_ranges_and_keywords_are_not_names(self) -> None:
        # Given an expression with every construct that is not a series name
        expr = (
            'histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{b="x{y}",c=~"5.."}'
            "[$__rate_interval]))) / on (job) group_left (site) d_total offset 5m"
            " > bool 1e-3 and e:f_g:rate5m unless up"
        )
        # When its names are extracted
        names = metric_names(expr)
        # Then exactly the four selected series come back
        assert names == {"a_seconds_bucket", "d_total", "e:f_g:rate5m", "up"}

    def test_an_unknown_series_is_reported(self) -> None:
        # Given an expression with a misspelt series
        # When it is checked against the exposed series
        found = unknown(['sum(rate(parkpool_gateway_task_total{status="completed"}[5m]))'])
        # Then the misspelling is named
        assert list(found.values()) == [{"parkpool_gateway_task_total"}]


class TestExposedSeries:
    """The registries expose every family the rules and dashboard are written against."""

    def test_histograms_and_counters_expand_to_their_samples(self) -> None:
        # Given the families of the real registries
        series = exposed_series()
        # Then histograms have buckets, sums and counts, and counters end in _total
        assert {
            "parkpool_gateway_end_to_end_seconds_bucket",
            "parkpool_sdk_end_to_end_seconds_count",
            "parkpool_fleet_preemption_seconds_sum",
            "parkpool_gateway_tasks_total",
            "parkpool_sdk_http_requests_total",
            "parkpool_gateway_http_requests_total",
            "parkpool_fleet_vehicles",
            "parkpool_build_info",
            "process_cpu_seconds_total",
            "python_info",
        } <= series
        assert "parkpool_gateway_tasks" not in series


class TestPromtoolConfig:
    """promtool accepts the scrape config, the rule files it loads and the example targets."""

    def test_shipped_config_is_valid(self, tmp_path: Path) -> None:
        # Given the config with the example target files in place, as an operator would
        copy = tmp_path / "prometheus"
        shutil.copytree(PROMETHEUS_DIR, copy)
        for example in (copy / "targets").glob("*.yml.example"):
            shutil.copy(example, example.with_suffix(""))
        # When promtool checks it
        result = promtool("check", "config", copy / "prometheus.yml")
        # Then the config, both rule files and the target files are valid, with no warning
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "valid prometheus config file syntax" in output
        assert f"SUCCESS: {len(RULE_FILES)} rule files found" in output
        assert "WARNING" not in output
        for path in RULE_FILES:
            assert f"SUCCESS: {len(rules(path))} rules found" in output

    def test_scrapes_the_gateways_and_the_sdk_and_loads_both_rule_files(self) -> None:
        # Given the shipped config
        config = load_yaml(CONFIG)
        # Then it has the two jobs the rules select by name, and loads both rule files
        jobs = {job["job_name"] for job in config["scrape_configs"]}
        assert {"parkpool-gateway", "parkpool-sdk"} <= jobs
        assert config["rule_files"] == [path.name for path in RULE_FILES]


class TestPromtoolRules:
    """promtool accepts both rule files and passes every rule unit test."""

    @pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
    def test_rule_file_is_valid(self, path: Path) -> None:
        # When promtool checks the rule file
        result = promtool("check", "rules", path)
        # Then it finds every rule the file holds
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(rules(path))} rules found" in result.stdout

    @pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
    def test_rule_unit_tests_pass(self, path: Path) -> None:
        # When promtool runs the unit tests
        result = promtool("test", "rules", path)
        # Then every one passes
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout
        assert "FAILED" not in result.stdout + result.stderr

    def test_a_wrong_expectation_fails(self, tmp_path: Path) -> None:
        # Given the alert tests with one expected summary changed
        shutil.copytree(PROMETHEUS_DIR, tmp_path / "prometheus")
        tests = tmp_path / "prometheus" / ALERT_TESTS.name
        text = tests.read_text()
        assert "parkpool gateway gw1:9464 is down" in text
        tests.write_text(text.replace("gw1:9464 is down", "gw2:9464 is down", 1))
        # When promtool runs them
        result = promtool("test", "rules", tests)
        # Then it reports the failure: the unit tests really compare what fires
        assert result.returncode != 0
        assert "FAILED" in result.stdout + result.stderr

    def test_every_alert_has_a_firing_and_a_quiet_case(self) -> None:
        # Given the alert unit tests
        cases = [
            check for case in load_yaml(ALERT_TESTS)["tests"] for check in case["alert_rule_test"]
        ]
        # Then each alert fires in one case and stays quiet in another, after its `for:`
        for alert in alerts():
            name, wait = alert["alert"], _minutes(alert["for"])
            mine = [c for c in cases if c["alertname"] == name]
            assert any(c["exp_alerts"] for c in mine), f"{name} never fires in a test"
            quiet = [c for c in mine if not c["exp_alerts"] and _minutes(c["eval_time"]) > wait]
            assert quiet, f"{name} has no quiet case after its for: {alert['for']}"


def _minutes(duration: str) -> float:
    """'90s', '15m', '2h' -> minutes."""
    value, unit = float(duration[:-1]), duration[-1]
    return value * {"s": 1 / 60, "m": 1.0, "h": 60.0}[unit]


class TestAlertRules:
    """Every alert waits, has a severity, explains itself and links to its runbook."""

    def test_every_alert_is_complete(self) -> None:
        # Given the alert rules and the runbook headings in OPERATIONS.md
        anchors = heading_anchors(OPERATIONS.read_text())
        assert len(alerts()) >= 7
        for alert in alerts():
            name = alert["alert"]
            # Then each has a for:, a known severity and the three annotations
            assert _minutes(alert["for"]) > 0, name
            assert alert["labels"]["severity"] in SEVERITIES, name
            annotations = alert["annotations"]
            assert annotations["summary"] and annotations["description"], name
            # And its runbook is the section of OPERATIONS.md named after it
            assert annotations["runbook"] == f"docs/OPERATIONS.md#{name.lower()}"
            assert name.lower() in anchors, f"no '### {name}' section in OPERATIONS.md"


class TestRecordingRuleNames:
    """Every recording rule is named level:metric:operations after a series that exists."""

    def test_names_follow_the_convention(self) -> None:
        families = exposed_families()
        for rule in rules(RECORDING_RULES):
            # Given a rule's name
            level, metric, operations = rule["record"].split(":")
            # Then the level is label names, the metric a real family, the operations known
            assert re.fullmatch(r"[a-z]+(?:_[a-z]+)*", level), rule["record"]
            assert metric in families, f"{rule['record']}: no family {metric}"
            assert re.fullmatch(r"(?:[a-z]+_)*(?:rate\d+m|sum|max)", operations), rule["record"]
            # And it reads the metric it is named after (or a rule recorded from it)
            assert any(metric in name for name in metric_names(rule["expr"])), rule["record"]


class TestSeriesNamesExist:
    """Rules, rule tests and dashboard select only series that are exposed or recorded."""

    def test_rules_select_known_series(self) -> None:
        # When every rule expression's series are checked
        # Then none is unknown
        assert unknown(rule_exprs()) == {}

    def test_rule_tests_feed_known_series(self) -> None:
        # When the series fed to the promtool unit tests are checked
        # Then none is unknown (the tests exercise the names the processes really expose)
        assert unknown(fed_series()) == {}

    def test_dashboard_selects_known_series(self) -> None:
        # Given every query of every dashboard panel
        exprs = dashboard_exprs()
        assert exprs
        # Then each names at least one series, and every series it names exists
        assert all(metric_names(expr) for expr in exprs)
        assert unknown(exprs) == {}


class TestDashboard:
    """The Grafana dashboard is importable and every panel queries the chosen Prometheus."""

    def test_datasource_is_a_template_variable(self) -> None:
        # Given the dashboard
        board = dashboard()
        # Then it is a modern schema with a Prometheus datasource variable
        assert board["schemaVersion"] >= 36
        assert board["uid"] and board["title"]
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"

    def test_every_panel_has_a_title_a_datasource_and_a_query(self) -> None:
        # Given every panel
        all_panels = list(panels(dashboard()))
        assert len({p["id"] for p in all_panels}) == len(all_panels)
        for panel in all_panels:
            # Then it has a title, uses the variable datasource, and queries PromQL
            assert panel["title"], panel["id"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip(), panel["title"]
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]

    def test_has_the_panels_sres_asked_for(self) -> None:
        # Given the panel titles
        titles = {p["title"] for p in panels(dashboard())}
        # Then every required panel is there
        assert set(REQUIRED_PANELS) <= titles

    def test_panels_do_not_overlap(self) -> None:
        # Given the grid cells each panel covers
        taken: dict[tuple[int, int], str] = {}
        for panel in panels(dashboard()):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, panel["title"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    # Then no cell belongs to two panels
                    assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                    taken[(x, y)] = panel["title"]


class TestOperationsDoc:
    """docs/OPERATIONS.md documents every exposed series, every alert and every rule."""

    def test_metrics_table_lists_exactly_the_exposed_series(self) -> None:
        # Given the names in the metrics tables and those the registries expose
        documented, exposed = documented_metrics(), exposed_metric_names()
        # Then they are the same set
        assert sorted(exposed - documented) == [], "exposed but not documented"
        assert sorted(documented - exposed) == [], "documented but not exposed"

    def test_every_recording_rule_is_documented(self) -> None:
        # Given the doc's text
        text = OPERATIONS.read_text()
        # Then every recorded series is named in it
        assert sorted(n for n in recorded_names() if f"`{n}`" not in text) == []
