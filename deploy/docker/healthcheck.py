# SPDX-License-Identifier: Apache-2.0
"""The images' HEALTHCHECK: GET /healthz and /readyz on this container's status port.

Docker keeps one health state, and compose's ``service_healthy`` means "ready for what
depends on it", so both must answer 200. Kubernetes asks them apart (liveness /healthz,
readiness /readyz) and does not run this. The port is the one the process was told to
serve: PARKPOOL_METRICS_PORT (gateway) or PARKPOOL_WORKER_METRICS_PORT (worker, sim).
A process with no status port (a one-shot CLI command) has nothing to check: healthy.
Standard library only: the image has no curl or wget.
"""

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def status_port() -> int:
    for variable in ("PARKPOOL_METRICS_PORT", "PARKPOOL_WORKER_METRICS_PORT"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return False


def main() -> int:
    port = status_port()
    if not port:
        return 0
    paths = ("/healthz", "/readyz")
    return 0 if all(answers_ok(f"http://127.0.0.1:{port}{p}") for p in paths) else 1


if __name__ == "__main__":
    sys.exit(main())
