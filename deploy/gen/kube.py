# SPDX-License-Identifier: Apache-2.0
"""The gateways of a cell (StatefulSet, Services, PodDisruptionBudget, the autoscaler)
and the monitoring resources (ServiceMonitor, PrometheusRule, the Grafana dashboard, and
the Prometheus Adapter rule the autoscalers read)."""

from __future__ import annotations

from typing import Any

from deploy.gen import emqx, sources, strimzi
from deploy.gen.render import CELL_LABEL, CELL_META, meta

APP = "parkpool-gateway"
IMAGE = "parkpool"  # kustomization.yaml's `images:` sets the registry and tag
KAFKA_CA_DIR = "/etc/parkpool/kafka-ca"
MQTT_TLS_DIR = "/etc/parkpool/mqtt-tls"
KEYS_DIR = "/etc/parkpool/keys"
VEHICLE_KEYS_DIR = "/etc/parkpool/vehicle-keys"
# Secrets and ConfigMaps the SRE makes (deploy/README.md, "Kubernetes"); never written here.
GATEWAY_MQTT_TLS = "parkpool-gateway-mqtt-tls"
GATEWAY_KEYS = "parkpool-gateway-keys"
VEHICLE_KEYS = "parkpool-vehicle-keys"
STORE = "parkpool-store"
# A cell never runs fewer gateways than a car talks to (K = 2) plus one, so that one
# gateway's restart or eviction leaves every car K to pull from.
MIN_GATEWAYS = 3
# What the autoscalers scale on, per gateway pod: the connected cars (every state but
# offline) it counts in its fleet gauge, which counts each car at the first of its K
# gateways only, so the cell's gateways sum to its cars. Served by the Prometheus
# Adapter rule below.
CARS_METRIC = "parkpool_cars_connected"


def gateway_name(cell: str) -> str:
    return f"{APP}-{cell}"


def _labels(cell: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, CELL_LABEL: cell}


def _env(cell: str) -> list[dict[str, Any]]:
    defaults = sources.gateway_defaults()

    def value(name: str, text: object) -> dict[str, Any]:
        return {"name": name, "value": str(text)}

    def ref(name: str, kind: str, source: str, key: str, optional: bool) -> dict[str, Any]:
        selector = {"name": source, "key": key, "optional": optional}
        return {"name": name, "valueFrom": {kind: selector}}

    return [
        {"name": "PARKPOOL_GATEWAY_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        value("PARKPOOL_NAMESPACE", defaults.namespace),
        value("PARKPOOL_CELL", cell),
        value("PARKPOOL_KAFKA_BOOTSTRAP", strimzi.bootstrap()),
        ref("KAFKA_PASSWORD", "secretKeyRef", strimzi.GATEWAY_USER, "password", False),
        value(
            "PARKPOOL_KAFKA_CONFIG",
            strimzi.client_config(strimzi.GATEWAY_USER, f"{KAFKA_CA_DIR}/ca.crt"),
        ),
        value("PARKPOOL_MQTT_HOST", emqx.listeners_service(cell)),
        value("PARKPOOL_MQTT_PORT", emqx.PORT),
        value("PARKPOOL_MQTT_TLS_CA", f"{MQTT_TLS_DIR}/ca.crt"),
        value("PARKPOOL_MQTT_TLS_CERT", f"{MQTT_TLS_DIR}/tls.crt"),
        value("PARKPOOL_MQTT_TLS_KEY", f"{MQTT_TLS_DIR}/tls.key"),
        ref("PARKPOOL_STORE_ENDPOINT", "configMapKeyRef", STORE, "endpoint", False),
        ref("PARKPOOL_STORE_PUBLIC_ENDPOINT", "configMapKeyRef", STORE, "public-endpoint", True),
        ref("PARKPOOL_STORE_BUCKET", "configMapKeyRef", STORE, "bucket", True),
        ref("PARKPOOL_STORE_REGION", "configMapKeyRef", STORE, "region", True),
        # Optional: without them boto3 takes the pod's role (IRSA, workload identity).
        ref("PARKPOOL_STORE_ACCESS_KEY", "secretKeyRef", STORE, "access-key", True),
        ref("PARKPOOL_STORE_SECRET_KEY", "secretKeyRef", STORE, "secret-key", True),
        value("PARKPOOL_SIGNING_KEY", f"{KEYS_DIR}/task-signing.key"),
        value("PARKPOOL_VEHICLE_KEYS", VEHICLE_KEYS_DIR),
        value("PARKPOOL_METRICS_PORT", sources.metrics_port()),
        value("PARKPOOL_METRICS_ADDR", "0.0.0.0"),
        value("PARKPOOL_DRAIN_SECONDS", defaults.drain_seconds),
    ]


def _volumes() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "kafka-ca", "secret": {"secretName": strimzi.ca_secret()}},
        {"name": "mqtt-tls", "secret": {"secretName": GATEWAY_MQTT_TLS}},
        {"name": "keys", "secret": {"secretName": GATEWAY_KEYS, "defaultMode": 0o400}},
        {"name": "vehicle-keys", "configMap": {"name": VEHICLE_KEYS}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "kafka-ca", "mountPath": KAFKA_CA_DIR, "readOnly": True},
        {"name": "mqtt-tls", "mountPath": MQTT_TLS_DIR, "readOnly": True},
        {"name": "keys", "mountPath": KEYS_DIR, "readOnly": True},
        {"name": "vehicle-keys", "mountPath": VEHICLE_KEYS_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    return volumes, mounts


def _container() -> dict[str, Any]:
    probe = {"port": "status", "scheme": "HTTP"}
    return {
        "name": "gateway",
        "image": IMAGE,
        "args": ["gateway"],
        "ports": [{"name": "status", "containerPort": sources.metrics_port()}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", **probe},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", **probe},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "startupProbe": {
            "httpGet": {"path": "/healthz", **probe},
            "periodSeconds": 5,
            "failureThreshold": 24,
        },
        "resources": {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"memory": f"{sources.gateway_memory_limit_mib()}Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def gateways(cell: str, cells: int) -> list[dict[str, Any]]:
    """One cell's gateways. Their pod names (``parkpool-gateway-<cell>-<n>``) are their
    gateway ids, so each keeps its persistent MQTT session across restarts. How many
    there are is the autoscaler's to say, so the StatefulSet names no replica count: one
    here would undo the autoscaler's at every apply, and each change of the count moves
    partitions between every gateway of every cell."""
    name, labels = gateway_name(cell), _labels(cell)
    volumes, mounts = _volumes()
    container = {**_container(), "env": _env(cell), "volumeMounts": mounts}
    pod = {
        # Longer than the drain (PARKPOOL_DRAIN_SECONDS) plus the flush and commit after it.
        "terminationGracePeriodSeconds": sources.termination_grace_s(),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Its own identity, for the store's credentials (IRSA: annotate it with the role;
        # deploy/README.md). The pods never call the Kubernetes API, so no API token is
        # mounted; IRSA's webhook projects its own web-identity token regardless.
        "serviceAccountName": APP,
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": volumes,
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(name, labels),
        "spec": {
            "serviceName": name,
            # Gateways need no ordered start; parallel makes a rollout of many quicker.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name, labels),
        "spec": {
            "clusterIP": "None",
            "selector": labels,
            "ports": [{"name": "status", "port": sources.metrics_port(), "targetPort": "status"}],
        },
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(name, labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }
    return [statefulset, service, budget, autoscaler(cell, cells)]


def autoscaler(cell: str, cells: int) -> dict[str, Any]:
    """Gateways follow the cell's cars. Every gateway of every cell is one member of the
    task group, so a cell's share of the partitions, and of the work, is its share of
    the gateways: with a fixed count per cell, a cell with few cars held as many
    partitions as one with many, and finished last. Scaled on the cell's cars per
    gateway, to what `parkpool capacity` sizes a gateway for, a cell's gateways, and so
    its partitions, follow its cars."""
    name = gateway_name(cell)
    # Every cell at its largest still leaves each gateway a partition of the tasks topic.
    most = max(MIN_GATEWAYS, sources.task_partitions() // cells)
    per_pod = {"type": "AverageValue", "averageValue": str(sources.cars_per_gateway())}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta(name, _labels(cell)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name},
            "minReplicas": MIN_GATEWAYS,
            "maxReplicas": most,
            "metrics": [
                {"type": "Pods", "pods": {"metric": {"name": CARS_METRIC}, "target": per_pod}}
            ],
            # Each change moves partitions (a rebalance of the whole task group) and
            # about K/N of the cell's cars: up at once when cars arrive, down slowly and
            # a quarter at a time, so that cars leaving at dawn do not set off a
            # rebalance a minute.
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 60,
                    "policies": [{"type": "Percent", "value": 100, "periodSeconds": 60}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 900,
                    "policies": [{"type": "Percent", "value": 25, "periodSeconds": 300}],
                },
            },
        },
    }


def adapter_values() -> dict[str, Any]:
    """Helm values for the Prometheus Adapter (prometheus-community/prometheus-adapter):
    the custom metric the autoscalers read, per gateway pod. The ServiceMonitor names
    each target's ``instance`` after its pod, which the adapter maps to the pods."""
    series = f'parkpool_fleet_vehicles{{job="{sources.GATEWAY_JOB}",namespace!="",instance!=""}}'
    return {
        "rules": {
            "custom": [
                {
                    "seriesQuery": series,
                    "resources": {
                        "overrides": {
                            "namespace": {"resource": "namespace"},
                            "instance": {"resource": "pod"},
                        }
                    },
                    "name": {"matches": "^parkpool_fleet_vehicles$", "as": CARS_METRIC},
                    "metricsQuery": (
                        'sum(<<.Series>>{<<.LabelMatchers>>,state!="offline"}) by (<<.GroupBy>>)'
                    ),
                }
            ]
        }
    }


# Labels the Prometheus Operator puts on every target of a ServiceMonitor, besides
# namespace, job and instance. The rules sum `without (instance)`, as over any other
# Prometheus' targets, so these would keep one sum per pod. The pod's name becomes
# `instance` instead (it names a gateway better than an address that changes with each
# restart), and the cell, which the per-cell Service stood for, is kept as `cell`, as
# `site` is on file_sd targets.
OPERATOR_TARGET_LABELS = ("pod", "service", "container", "endpoint", "node")


def service_monitor() -> dict[str, Any]:
    """prometheus.yml's parkpool-gateway job, for the Prometheus Operator: its targets
    end up with the labels a file_sd target has (job, instance, namespace) and the cell.
    The job label is set to that job's name, which every rule selects by."""
    scrape = sources.gateway_scrape()
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta(APP),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": APP}},
            "endpoints": [
                {
                    "port": "status",
                    "path": scrape["metrics_path"],
                    "interval": scrape["scrape_interval"],
                    "scrapeTimeout": scrape["scrape_timeout"],
                    "relabelings": [
                        {
                            "action": "replace",
                            "targetLabel": "job",
                            "replacement": scrape["job_name"],
                        },
                        {
                            "action": "replace",
                            "sourceLabels": ["__meta_kubernetes_pod_name"],
                            "targetLabel": "instance",
                        },
                        {
                            "action": "replace",
                            "sourceLabels": [CELL_META],
                            "targetLabel": "cell",
                        },
                        {"action": "labeldrop", "regex": "|".join(OPERATOR_TARGET_LABELS)},
                    ],
                }
            ],
        },
    }


def prometheus_rule() -> dict[str, Any]:
    """Both rule files of deploy/prometheus/, groups unchanged."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": meta("parkpool"),
        "spec": {"groups": sources.rule_groups()},
    }


def dashboard() -> dict[str, Any]:
    """The dashboard for Grafana's sidecar (kube-prometheus-stack: label grafana_dashboard)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta("parkpool-dashboard", {"grafana_dashboard": "1"}),
        "data": {sources.DASHBOARD.name: sources.DASHBOARD.read_text()},
    }


def namespace() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta(sources.topics().namespace)}


def service_account() -> dict[str, Any]:
    """Every cell's gateways' identity. On EKS the SRE annotates it with the IAM role the
    gateways presign with (``eks.amazonaws.com/role-arn``); elsewhere it names them."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(APP, {"app.kubernetes.io/name": APP}),
        "automountServiceAccountToken": False,
    }
