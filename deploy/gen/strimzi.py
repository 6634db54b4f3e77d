# SPDX-License-Identifier: Apache-2.0
"""Strimzi resources: the KRaft Kafka cluster, one KafkaTopic per topic spec, and the
KafkaUsers whose ACLs confine each role to its own namespace's topics and groups."""

from __future__ import annotations

from typing import Any

from deploy.gen import sources
from deploy.gen.render import meta

API = "kafka.strimzi.io/v1"
CLUSTER = "parkpool"
# The one listener clients use: TLS, SCRAM-SHA-512 logins (KafkaUser Secrets).
LISTENER = {"name": "tls", "port": 9093, "type": "internal", "tls": True}
GATEWAY_USER = "parkpool-gateway"
SDK_USER = "parkpool-sdk"
_CLUSTER_LABEL = {"strimzi.io/cluster": CLUSTER}


def bootstrap() -> str:
    """The address clients bootstrap from (Strimzi's bootstrap Service)."""
    return f"{CLUSTER}-kafka-bootstrap:{LISTENER['port']}"


def ca_secret() -> str:
    """The Secret Strimzi keeps the cluster CA's certificate in (key ``ca.crt``)."""
    return f"{CLUSTER}-cluster-ca-cert"


def client_config(user: str, ca_file: str) -> str:
    """PARKPOOL_KAFKA_CONFIG for ``user``; the password comes from $(KAFKA_PASSWORD),
    which Kubernetes fills in from the KafkaUser's Secret: never written here."""
    return ",".join(
        (
            "security.protocol=SASL_SSL",
            "sasl.mechanism=SCRAM-SHA-512",
            f"sasl.username={user}",
            "sasl.password=$(KAFKA_PASSWORD)",
            f"ssl.ca.location={ca_file}",
        )
    )


def kafka() -> list[dict[str, Any]]:
    durability = sources.kafka_durability()
    replicas = durability["replicas"]
    pool = {
        "apiVersion": API,
        "kind": "KafkaNodePool",
        "metadata": meta("dual-role", _CLUSTER_LABEL),
        "spec": {
            # As many nodes as the topics have replicas; `parkpool capacity` says how many
            # brokers a fleet needs (docs/OPERATIONS.md, "Sizing"): raise it to that.
            "replicas": replicas,
            "roles": ["controller", "broker"],
            "storage": {
                "type": "jbod",
                "volumes": [
                    # Size for a week of tasks and results (retention.ms): the capacity
                    # report's sdk -> kafka and gateway -> kafka MiB/s x 604800 s / brokers.
                    {"id": 0, "type": "persistent-claim", "size": "100Gi", "deleteClaim": False}
                ],
            },
        },
    }
    cluster = {
        "apiVersion": API,
        "kind": "Kafka",
        "metadata": meta(CLUSTER),
        "spec": {
            "kafka": {
                "listeners": [{**LISTENER, "authentication": {"type": "scram-sha-512"}}],
                "authorization": {"type": "simple"},
                "config": {
                    "message.max.bytes": sources.kafka_max_message_bytes(),
                    "default.replication.factor": replicas,
                    "min.insync.replicas": durability["min_insync"],
                    "offsets.topic.replication.factor": replicas,
                    "transaction.state.log.replication.factor": replicas,
                    "transaction.state.log.min.isr": durability["min_insync"],
                    # Topics are KafkaTopic resources, never made by a client's first use.
                    "auto.create.topics.enable": False,
                },
            },
            "entityOperator": {"topicOperator": {}, "userOperator": {}},
        },
    }
    return [pool, cluster]


def kafka_topics() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": API,
            "kind": "KafkaTopic",
            "metadata": meta(spec.topic_name(sources.topics().namespace), _CLUSTER_LABEL),
            "spec": {
                "topicName": spec.topic_name(sources.topics().namespace),
                "partitions": spec.partitions,
                "replicas": spec.replication_factor,
                "config": dict(spec.config),
            },
        }
        for spec in sources.topic_specs()
    ]


def _acl(kind: str, name: str, pattern: str, *operations: str) -> dict[str, Any]:
    return {
        "resource": {"type": kind, "name": name, "patternType": pattern},
        "operations": list(operations),
    }


def kafka_users() -> list[dict[str, Any]]:
    """Gateways read and write their namespace's topics in their own group; SDK clients
    (producers, `parkpool dlq`, `parkpool quarantine`) the same topics in any group of
    the namespace. Nothing outside ``<namespace>.`` is reachable."""
    prefix = f"{sources.topics().namespace}."
    topic_ops = ("Read", "Write", "Describe", "DescribeConfigs")
    gateway_acls = [
        _acl("topic", prefix, "prefix", *topic_ops),
        _acl("group", sources.gateway_defaults().group, "literal", "Read", "Describe"),
    ]
    sdk_acls = [
        _acl("topic", prefix, "prefix", *topic_ops),
        _acl("group", prefix, "prefix", "Read", "Describe"),
    ]
    return [
        {
            "apiVersion": API,
            "kind": "KafkaUser",
            "metadata": meta(user, _CLUSTER_LABEL),
            "spec": {
                "authentication": {"type": "scram-sha-512"},
                "authorization": {"type": "simple", "acls": acls},
            },
        }
        for user, acls in ((GATEWAY_USER, gateway_acls), (SDK_USER, sdk_acls))
    ]
