# SPDX-License-Identifier: Apache-2.0
"""``python -m deploy.gen [--check]``: write (or compare) every generated deploy file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from deploy.gen import compose, emqx, kube, sources, strimzi
from deploy.gen.render import documents, to_yaml

SRC_TOPICS = "deploy/kafka_topics.production.toml"
SRC_RULES = "deploy/prometheus/"
SRC_SETTINGS = "parkpool.gateway.settings, deploy/gateway.env.example"
SRC_MQTT = "broker_config/mosquitto.conf, broker_config/auth.py, parkpool.runtime.settings"


def _kustomization(resources: list[str], **extra: Any) -> str:
    body = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    return sources.header("deploy/gen/__main__.py") + to_yaml(
        {**body, **extra, "resources": resources}
    )


def kubernetes_files() -> dict[str, str]:
    files = {
        "kustomization.yaml": _kustomization(
            [
                "namespace.yaml",
                "serviceaccount.yaml",
                "kafka",
                "monitoring",
                *(f"cells/{c}" for c in compose.CELLS),
            ],
            namespace=sources.topics().namespace,
            images=[{"name": kube.IMAGE, "newName": kube.IMAGE, "newTag": sources.version()}],
        ),
        "namespace.yaml": documents(sources.header("schemas.topics"), [kube.namespace()]),
        "serviceaccount.yaml": documents(
            sources.header("deploy/gen/kube.py"), [kube.service_account()]
        ),
        "kafka/kustomization.yaml": _kustomization(["cluster.yaml", "topics.yaml", "users.yaml"]),
        "kafka/cluster.yaml": documents(sources.header(SRC_TOPICS), strimzi.kafka()),
        "kafka/topics.yaml": documents(sources.header(SRC_TOPICS), strimzi.kafka_topics()),
        "kafka/users.yaml": documents(
            sources.header("schemas.topics", "parkpool.gateway.settings"), strimzi.kafka_users()
        ),
        "monitoring/kustomization.yaml": _kustomization(
            ["servicemonitor.yaml", "prometheusrule.yaml", "dashboard.yaml"]
        ),
        "monitoring/servicemonitor.yaml": documents(
            sources.header("deploy/prometheus/prometheus.yml"), [kube.service_monitor()]
        ),
        "monitoring/prometheusrule.yaml": documents(
            sources.header(SRC_RULES), [kube.prometheus_rule()]
        ),
        "monitoring/dashboard.yaml": documents(
            sources.header("deploy/grafana/parkpool-dashboard.json"), [kube.dashboard()]
        ),
        # Not a resource of the kustomization: Helm values for the Prometheus Adapter,
        # which the SRE installs (deploy/README.md, "Kubernetes").
        "monitoring/prometheus-adapter-values.yaml": sources.header("deploy/gen/kube.py")
        + to_yaml(kube.adapter_values()),
    }
    for cell in compose.CELLS:
        files[f"cells/{cell}/kustomization.yaml"] = _kustomization(["emqx.yaml", "gateways.yaml"])
        files[f"cells/{cell}/emqx.yaml"] = documents(
            sources.header(SRC_MQTT), emqx.cell_broker(cell)
        )
        files[f"cells/{cell}/gateways.yaml"] = documents(
            sources.header(SRC_SETTINGS, "deploy/gen/strimzi.py", "deploy/gen/emqx.py"),
            kube.gateways(cell, len(compose.CELLS)),
        )
    return {f"kubernetes/{path}": text for path, text in files.items()}


def compose_files() -> dict[str, str]:
    head = sources.header
    mosquitto_head = head("broker_config/mosquitto.conf") + (
        "# Rendered for the compose stack: every interface, anonymous, log on stdout.\n"
    )
    files = {
        "compose.yaml": head(SRC_TOPICS, SRC_SETTINGS, "deploy/gen/compose.py")
        + to_yaml(compose.compose_file()),
        "mosquitto.conf": mosquitto_head + compose.mosquitto_conf(),
        "prometheus-targets.yml": head("deploy/gen/compose.py")
        + to_yaml(compose.prometheus_targets()),
        "grafana/datasource.yml": head("deploy/gen/compose.py")
        + to_yaml(compose.grafana_datasource()),
        "grafana/dashboards.yml": head("deploy/gen/compose.py")
        + to_yaml(compose.grafana_dashboards()),
    }
    return {f"compose/{path}": text for path, text in files.items()}


def generated() -> dict[Path, str]:
    """Every generated file, by its path, with the text a fresh generation gives it."""
    made = {**kubernetes_files(), **compose_files()}
    return {sources.DEPLOY / path: text for path, text in made.items()}


def drifted() -> list[Path]:
    """The generated files whose committed text differs from a fresh generation."""
    return [
        path for path, text in generated().items() if not path.is_file() or path.read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.gen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = drifted()
        for path in stale:
            print(f"{path.relative_to(sources.ROOT)} differs: run python -m deploy.gen")
        return 1 if stale else 0
    for path, text in generated().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(sources.ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
