# SPDX-License-Identifier: Apache-2.0
"""The whole system on one host, for trying it out: deploy/compose/.

Three KRaft Kafka brokers, one Mosquitto per cell (two cells), MinIO, three gateways, a
simulated fleet, Prometheus with deploy/prometheus/ and Grafana with the dashboard.
Local only: MQTT is anonymous and plain, Kafka plain; credentials are in compose/.env.
"""

from __future__ import annotations

import re
from typing import Any

from deploy.gen import sources

KAFKA_IMAGE = "apache/kafka:3.9.1"
MOSQUITTO_IMAGE = "eclipse-mosquitto:2.0.20"
STORE_IMAGE = "minio/minio:RELEASE.2025-04-22T22-12-26Z"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.4"
GRAFANA_IMAGE = "grafana/grafana:11.6.0"
KAFKA_NODES = 3
KAFKA_PORT, CONTROLLER_PORT, MQTT_PORT, STORE_PORT = 9092, 9093, 1883, 9000
# 16 bytes, base64url without padding, as KRaft wants: the text "parkpool-compose".
CLUSTER_ID = "cGFya3Bvb2wtY29tcG9zZQ"
# Gateway -> cell. Cell b has one gateway, so it shows a cell smaller than K (2).
GATEWAYS = {"gw-1": "a", "gw-2": "a", "gw-3": "b"}
CELLS = ("a", "b")
FLEET_VEHICLES = 24
BUILD = {"context": "../..", "dockerfile": "deploy/docker/Dockerfile"}
IMAGE = f"parkpool:{sources.version()}"


def _kafka_nodes() -> str:
    return ",".join(f"kafka-{i}:{KAFKA_PORT}" for i in range(1, KAFKA_NODES + 1))


def _kafka(node: int) -> dict[str, Any]:
    durability = sources.kafka_durability()
    voters = ",".join(f"{i}@kafka-{i}:{CONTROLLER_PORT}" for i in range(1, KAFKA_NODES + 1))
    env = {
        "CLUSTER_ID": CLUSTER_ID,
        "KAFKA_NODE_ID": node,
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": f"PLAINTEXT://:{KAFKA_PORT},CONTROLLER://:{CONTROLLER_PORT}",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://kafka-{node}:{KAFKA_PORT}",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": voters,
        "KAFKA_LOG_DIRS": "/var/lib/kafka/data",
        "KAFKA_MESSAGE_MAX_BYTES": sources.kafka_max_message_bytes(),
        "KAFKA_DEFAULT_REPLICATION_FACTOR": durability["replicas"],
        "KAFKA_MIN_INSYNC_REPLICAS": durability["min_insync"],
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": durability["replicas"],
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": durability["replicas"],
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": durability["min_insync"],
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }
    probe = f"/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server localhost:{KAFKA_PORT}"
    return {
        "image": KAFKA_IMAGE,
        "environment": {k: str(v) for k, v in env.items()},
        "volumes": [f"kafka-{node}:/var/lib/kafka/data"],
        "healthcheck": {
            "test": ["CMD-SHELL", f"{probe} >/dev/null 2>&1"],
            "interval": "10s",
            "timeout": "10s",
            "retries": 12,
        },
    }


def _parkpool_env() -> dict[str, str]:
    """What every parkpool container shares; secrets come from .env (env_file)."""
    return {
        "PARKPOOL_NAMESPACE": sources.topics().namespace,
        "PARKPOOL_KAFKA_BOOTSTRAP": _kafka_nodes(),
        "PARKPOOL_STORE_ENDPOINT": f"http://store:{STORE_PORT}",
        "PARKPOOL_STORE_BUCKET": sources.store_defaults().bucket,
        "PARKPOOL_LOG_JSON": "1",
    }


def _parkpool(command: list[str], env: dict[str, str], **more: Any) -> dict[str, Any]:
    return {
        "image": IMAGE,
        "build": BUILD,
        "command": command,
        "env_file": [".env"],
        "environment": {**_parkpool_env(), **env},
        **more,
    }


def _gateway(gateway_id: str, cell: str) -> dict[str, Any]:
    env = {
        "PARKPOOL_GATEWAY_ID": gateway_id,
        "PARKPOOL_CELL": cell,
        "PARKPOOL_MQTT_HOST": f"mqtt-{cell}",
        "PARKPOOL_MQTT_PORT": str(MQTT_PORT),
        "PARKPOOL_METRICS_PORT": str(sources.metrics_port()),
        "PARKPOOL_DRAIN_SECONDS": str(sources.gateway_defaults().drain_seconds),
    }
    after = {
        "init": {"condition": "service_completed_successfully"},
        f"mqtt-{cell}": {"condition": "service_started"},
    }
    grace = f"{sources.termination_grace_s()}s"
    return _parkpool(["gateway"], env, depends_on=after, stop_grace_period=grace)


def services() -> dict[str, Any]:
    made: dict[str, Any] = {f"kafka-{n}": _kafka(n) for n in range(1, KAFKA_NODES + 1)}
    for cell in CELLS:
        made[f"mqtt-{cell}"] = {
            "image": MOSQUITTO_IMAGE,
            "volumes": ["./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro"],
        }
    made["store"] = {
        "image": STORE_IMAGE,
        "command": ["server", "/data"],
        "environment": {
            "MINIO_ROOT_USER": "${PARKPOOL_STORE_ACCESS_KEY}",
            "MINIO_ROOT_PASSWORD": "${PARKPOOL_STORE_SECRET_KEY}",
        },
        "volumes": ["store:/data"],
    }
    kafka_ready = {
        f"kafka-{n}": {"condition": "service_healthy"} for n in range(1, KAFKA_NODES + 1)
    }
    made["init"] = _parkpool(
        [],
        {"PARKPOOL_TOPICS_FILE": "/etc/parkpool/kafka_topics.production.toml"},
        entrypoint=["python", "/etc/parkpool/init.py"],
        volumes=[
            "../kafka_topics.production.toml:/etc/parkpool/kafka_topics.production.toml:ro",
            "./init.py:/etc/parkpool/init.py:ro",
        ],
        depends_on={**kafka_ready, "store": {"condition": "service_started"}},
        restart="on-failure",
    )
    for gateway_id, cell in GATEWAYS.items():
        made[gateway_id] = _gateway(gateway_id, cell)
    cells = ",".join(f"{c}=mqtt-{c}:{MQTT_PORT}" for c in CELLS)
    fleet_env = {
        "PARKPOOL_SIM_VEHICLES": str(FLEET_VEHICLES),
        "PARKPOOL_SIM_CELLS": cells,
        "PARKPOOL_WORKER_METRICS_PORT": str(sources.metrics_port()),
    }
    made["fleet"] = _parkpool(["sim"], fleet_env, depends_on=list(GATEWAYS))
    # `docker-compose run --rm cli submit ...`: the CLI against this stack, on demand.
    made["cli"] = _parkpool(["--help"], {}, profiles=["tools"], depends_on=["init"])
    made["prometheus"] = _prometheus()
    made["grafana"] = {
        "image": GRAFANA_IMAGE,
        "environment": {"GF_SECURITY_ADMIN_PASSWORD": "${GRAFANA_ADMIN_PASSWORD}"},
        "volumes": [
            "./grafana/datasource.yml:/etc/grafana/provisioning/datasources/parkpool.yml:ro",
            "./grafana/dashboards.yml:/etc/grafana/provisioning/dashboards/parkpool.yml:ro",
            f"../grafana/{sources.DASHBOARD.name}:{DASHBOARD_DIR}/{sources.DASHBOARD.name}:ro",
        ],
        "ports": ["127.0.0.1:3000:3000"],
        "depends_on": ["prometheus"],
    }
    return made


DASHBOARD_DIR = "/var/lib/grafana/dashboards/parkpool"


def _prometheus() -> dict[str, Any]:
    """deploy/prometheus/ as it is, plus a file_sd target list naming the gateways."""
    mounts = [
        f"../prometheus/{name}:/etc/prometheus/{name}:ro"
        for name in ("prometheus.yml", *sources.prometheus_config()["rule_files"])
    ]
    mounts.append("./prometheus-targets.yml:/etc/prometheus/targets/gateways-compose.yml:ro")
    return {
        "image": PROMETHEUS_IMAGE,
        "command": [
            "--config.file=/etc/prometheus/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
        ],
        "volumes": mounts,
        "ports": ["127.0.0.1:9090:9090"],
    }


def compose_file() -> dict[str, Any]:
    names = [f"kafka-{n}" for n in range(1, KAFKA_NODES + 1)] + ["store"]
    volumes: dict[str, dict[str, Any]] = {name: {} for name in names}
    return {"version": "3.9", "services": services(), "volumes": volumes}


def prometheus_targets() -> list[dict[str, Any]]:
    port = sources.metrics_port()
    labels = {"namespace": sources.topics().namespace, "site": "compose"}
    return [{"targets": [f"{g}:{port}" for g in GATEWAYS], "labels": labels}]


def grafana_datasource() -> dict[str, Any]:
    source = {"name": "Prometheus", "type": "prometheus", "access": "proxy"}
    return {
        "apiVersion": 1,
        "datasources": [{**source, "url": "http://prometheus:9090", "isDefault": True}],
    }


def grafana_dashboards() -> dict[str, Any]:
    provider = {"name": "parkpool", "type": "file", "options": {"path": DASHBOARD_DIR}}
    return {"apiVersion": 1, "providers": [provider]}


def mosquitto_conf() -> str:
    """broker_config/mosquitto.conf rendered for a container: every interface of its own
    network, its data volume, the log on stdout, anonymous (local only)."""
    text = sources.MOSQUITTO_CONF.read_text().format(
        user="mosquitto",
        port=MQTT_PORT,
        run_dir="/mosquitto/data",
        auth="allow_anonymous true",
        tls="",
    )
    for pattern, replacement in (
        (rf"^listener {MQTT_PORT} 127\.0\.0\.1$", f"listener {MQTT_PORT}"),
        (r"^log_dest file .*$", "log_dest stdout"),
    ):
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if count != 1:
            raise ValueError(f"mosquitto.conf: {pattern!r} matched {count} lines, not 1")
    return text
