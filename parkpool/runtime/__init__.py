# SPDX-License-Identifier: Apache-2.0
"""The shared runtime every role builds on: settings, Kafka and MQTT clients, signing,
sealing, logs, the status server and signals.

It sits below the roles and beside the wire contract (``parkpool.schemas``): it may
import the contract, never a role or the application.
"""
