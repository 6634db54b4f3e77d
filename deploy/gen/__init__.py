# SPDX-License-Identifier: Apache-2.0
"""Generates deploy/compose/ and deploy/kubernetes/ from the values' own sources.

Topics come from deploy/kafka_topics.production.toml, rules from deploy/prometheus/, the
MQTT limits and ACL from broker_config/, ports and defaults from the settings they live
in: nothing in the generated files is typed twice. ``python -m deploy.gen`` writes them;
``python -m deploy.gen --check`` fails when a committed file differs from a fresh run
(tests/test_deploy_generated.py runs it on every ``make test``).
"""
