# SPDX-License-Identifier: Apache-2.0
"""The application: the ``parkpool`` command line, the demo and ``parkpool top``.

It is the top layer: it composes the roles (producer, gateway, worker, broker_config),
and nothing below imports it.
"""
