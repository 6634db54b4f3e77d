# SPDX-License-Identifier: Apache-2.0
"""The generated deployment files equal a fresh generation, and say what their sources say.

``python -m deploy.gen`` writes deploy/compose/ and deploy/kubernetes/ from the topic spec,
the Prometheus rules, the MQTT broker's config and ACL, and the gateway's settings. These
tests read the committed files and compare them with those sources directly, not through
the generator, so a generator bug cannot hide behind its own output.
"""

from __future__ import annotations

import inspect
import math
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from deploy.gen.__main__ import drifted, generated
from parkpool.app.capacity_inputs import stored_inputs
from parkpool.app.capacity_model import Capacities, Scenario, new_design
from parkpool.broker_config.auth import ACL
from parkpool.broker_config.topics import load_specs
from parkpool.gateway.fleet_stats import FleetStats
from parkpool.gateway.gateway import Gateway
from parkpool.gateway.settings import GatewaySettings
from parkpool.gateway.vehicles import VehicleView
from parkpool.runtime.settings import DEFAULT_MQTT_MAX_MESSAGE_BYTES, MqttConnection
from parkpool.schemas import VehicleState
from parkpool.worker.held import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
# Written by hand, not generated: the compose stack's local credentials and set-up step,
# and the operators' CRD schemas (deploy/gen/crds.py vendors them).
HAND_WRITTEN = {"compose/.env", "compose/init.py"}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in sorted(KUBE.rglob("*.yaml")) for d in load_all(p) if d.get("kind") == kind]


class TestNoDrift:
    """What is committed is what the generator makes now."""

    def test_committed_files_equal_a_fresh_generation(self) -> None:
        stale = [str(p.relative_to(ROOT)) for p in drifted()]
        assert stale == [], "run `.venv/bin/python -m deploy.gen` and commit"

    def test_every_file_there_is_generated_or_known(self) -> None:
        made = {p.relative_to(DEPLOY).as_posix() for p in generated()}
        there = {
            p.relative_to(DEPLOY).as_posix()
            for folder in ("compose", "kubernetes")
            for p in (DEPLOY / folder).rglob("*")
            if p.is_file() and "crd-schemas" not in p.parts and "__pycache__" not in p.parts
        }
        assert sorted(there - made - HAND_WRITTEN) == []


class TestSourcesOfTruth:
    """Each generated resource carries its source's values unchanged."""

    def test_prometheus_rule_holds_both_rule_files(self) -> None:
        config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
        groups = [
            g
            for name in config["rule_files"]
            for g in yaml.safe_load((PROMETHEUS / name).read_text())["groups"]
        ]
        (rule,) = of_kind("PrometheusRule")
        assert rule["spec"]["groups"] == groups

    def test_service_monitor_scrapes_like_the_gateway_job(self) -> None:
        config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "parkpool-gateway"]
        (monitor,) = of_kind("ServiceMonitor")
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == job["metrics_path"]
        assert endpoint["interval"] == config["global"]["scrape_interval"]
        # The rules select gateways by job: the operator's default (the Service) is replaced
        assert {"action": "replace", "targetLabel": "job", "replacement": job["job_name"]} in (
            endpoint["relabelings"]
        )

    def test_kafka_topics_are_the_production_spec(self) -> None:
        specs = load_specs(DEPLOY / "kafka_topics.production.toml")
        topics = {t["spec"]["topicName"]: t["spec"] for t in of_kind("KafkaTopic")}
        assert len(topics) == len(specs)
        for spec in specs:
            made = topics[spec.topic_name("parkpool")]
            assert made["partitions"] == spec.partitions
            assert made["replicas"] == spec.replication_factor
            assert made["config"] == dict(spec.config)
            assert made["config"]["max.message.bytes"]

    def test_kafka_users_reach_only_their_namespace(self) -> None:
        users = of_kind("KafkaUser")
        assert {u["metadata"]["name"] for u in users} == {"parkpool-gateway", "parkpool-sdk"}
        for user in users:
            for acl in user["spec"]["authorization"]["acls"]:
                assert acl["resource"]["name"].startswith("parkpool.")

    def test_emqx_acl_is_the_mosquitto_acl(self) -> None:
        patterns = [line.split() for line in ACL.splitlines() if line.startswith("pattern ")]
        verbs = {"read": "subscribe", "write": "publish"}
        expected = [
            f'{{allow, all, {verbs[access]}, ["{topic.replace("%u", "${username}")}"]}}.'
            for _, access, topic in patterns
        ]
        for config_map in (c for c in of_kind("ConfigMap") if "acl.conf" in c["data"]):
            rules = [r for r in config_map["data"]["acl.conf"].splitlines() if r.startswith("{")]
            # Then: the gateways' rule, the cars' rules in order, and deny for the rest
            assert rules[1:-1] == expected
            assert rules[-1] == "{deny, all}."

    def test_emqx_limits_match_the_client_and_mosquitto(self) -> None:
        conf = dict(
            line.split(" ", 1)
            for line in (ROOT / "broker_config" / "mosquitto.conf").read_text().splitlines()
            if line and not line.startswith("#") and " " in line
        )
        overhead = int(conf["max_packet_size"]) - int(conf["message_size_limit"])
        for emqx in of_kind("EMQX"):
            hocon = emqx["spec"]["config"]["data"]
            assert f"max_packet_size = {DEFAULT_MQTT_MAX_MESSAGE_BYTES + overhead}\n" in hocon
            assert f"max_inflight = {conf['max_inflight_messages']}\n" in hocon
            assert f"max_mqueue_len = {conf['max_queued_messages']}\n" in hocon
            assert "peer_cert_as_username = cn" in hocon

    def test_grace_period_outlasts_the_drain(self) -> None:
        drain = next(
            f.default
            for f in GatewaySettings.__dataclass_fields__.values()
            if f.name == "drain_seconds"
        )
        flush = inspect.signature(Gateway.shutdown).parameters["timeout"].default
        statefulsets = of_kind("StatefulSet")
        assert statefulsets
        for sts in statefulsets:
            pod = sts["spec"]["template"]["spec"]
            assert pod["terminationGracePeriodSeconds"] > math.ceil(drain + flush)
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert float(env["PARKPOOL_DRAIN_SECONDS"]) == drain

    def test_gateways_have_probes_and_a_budget(self) -> None:
        for sts in of_kind("StatefulSet"):
            (container,) = sts["spec"]["template"]["spec"]["containers"]
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        budgets = {b["metadata"]["name"] for b in of_kind("PodDisruptionBudget")}
        assert budgets == {s["metadata"]["name"] for s in of_kind("StatefulSet")}

    def test_gateways_run_as_an_account_there_is_to_annotate_for_irsa(self) -> None:
        # The store's credentials may come from IRSA, which hangs the IAM role on the
        # pods' service account: the gateways must run as one the manifests create
        accounts = {a["metadata"]["name"] for a in of_kind("ServiceAccount")}
        for sts in of_kind("StatefulSet"):
            pod = sts["spec"]["template"]["spec"]
            assert pod["serviceAccountName"] in accounts
            assert pod["automountServiceAccountToken"] is False  # no Kubernetes API use


class TestAutoscaling:
    """Each cell's gateways follow its cars: a cell's share of the task partitions is its
    share of the gateways, so a fixed count per cell let a cell with few cars hold as
    much of every job as one with many."""

    def test_every_cells_gateways_are_autoscaled_and_name_no_count(self) -> None:
        scalers = {
            h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind("HorizontalPodAutoscaler")
        }
        for sts in of_kind("StatefulSet"):
            assert (
                scalers[sts["metadata"]["name"]]["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
            )
            # A count here would undo the autoscaler's at every apply
            assert "replicas" not in sts["spec"]

    def test_bounds_keep_each_car_its_gateways_and_each_gateway_a_partition(self) -> None:
        toml = tomllib.loads((DEPLOY / "kafka_topics.production.toml").read_text())
        partitions = toml["topics"]["tasks"]["partitions"]
        scalers = of_kind("HorizontalPodAutoscaler")
        k = WorkerSettings("car", MqttConnection("h", 1), "ns").gateways_per_vehicle
        budgets = {b["metadata"]["name"]: b["spec"] for b in of_kind("PodDisruptionBudget")}
        for scaler in scalers:
            spec = scaler["spec"]
            unavailable = budgets[scaler["metadata"]["name"]]["maxUnavailable"]
            assert spec["minReplicas"] - unavailable >= k
        assert sum(s["spec"]["maxReplicas"] for s in scalers) <= partitions

    def test_the_metric_is_the_adapters_and_counts_connected_cars_per_gateway(self) -> None:
        values = yaml.safe_load(
            (KUBE / "monitoring" / "prometheus-adapter-values.yaml").read_text()
        )
        (rule,) = values["rules"]["custom"]
        series = rule["seriesQuery"].split("{")[0]
        # The series is the gauge a gateway exports of the cars it counts, by state
        (gauge,) = [m for m in FleetStats(CollectorRegistry()).vehicles.describe()]
        assert series == gauge.name
        assert 'state!="offline"' in rule["metricsQuery"]
        assert {"namespace", "instance"} == set(rule["resources"]["overrides"])
        for scaler in of_kind("HorizontalPodAutoscaler"):
            (metric,) = scaler["spec"]["metrics"]
            assert metric["pods"]["metric"]["name"] == rule["name"]["as"]

    def test_a_cells_gateways_count_each_connected_car_once(self) -> None:
        """The target is cars per gateway counted once: the gauge must sum, over a cell's
        gateways, to the cell's cars, whichever K = 2 of them each car talks to."""
        views = []
        for i in range(5):
            for rank, gateway in enumerate(("gw1", "gw2")):  # every car talks to both
                view = VehicleView(f"car{i}")
                view.state, view.primary = VehicleState.ONLINE, rank == (i % 2)
                views.append((gateway, view))
        offline = VehicleView("gone")
        offline.state, offline.primary = VehicleState.OFFLINE, True
        views.append(("gw1", offline))
        counted = 0.0
        for gateway in ("gw1", "gw2"):
            stats = FleetStats(CollectorRegistry())
            mine = [v for g, v in views if g == gateway]
            stats.count(mine, computing=lambda _: False, available=lambda _: 0)
            counted += sum(
                s.value
                for m in stats.vehicles.collect()
                for s in m.samples
                if s.labels["state"] != "offline"
            )
        assert counted == 5

    def test_the_target_is_what_the_capacity_model_sizes_a_gateway_for(self) -> None:
        inputs = stored_inputs()
        capacities = Capacities(**{f.name: inputs[f.name].value for f in fields(Capacities)})
        full_cell = new_design(Scenario(vehicles=Scenario.cell_vehicles), capacities)
        for scaler in of_kind("HorizontalPodAutoscaler"):
            (metric,) = scaler["spec"]["metrics"]
            target = int(metric["pods"]["target"]["averageValue"])
            # At that target a full cell runs the gateways the model sizes it with
            assert math.ceil(Scenario.cell_vehicles / target) == full_cell.gateways_per_cell


class TestComposeStack:
    """The compose stack has the parts the issue lists and loads deploy/prometheus/."""

    def test_services(self) -> None:
        services = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())["services"]
        kinds = [name.rstrip("0123456789").rstrip("-") for name in services]
        assert kinds.count("kafka") == 3
        assert kinds.count("gw") == 3
        assert {"mqtt-a", "mqtt-b", "store", "fleet", "prometheus", "grafana"} <= set(services)
        mounts = " ".join(services["prometheus"]["volumes"])
        for name in ("prometheus.yml", "recording_rules.yml", "alert_rules.yml"):
            assert f"../prometheus/{name}:" in mounts
