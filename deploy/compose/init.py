# SPDX-License-Identifier: Apache-2.0
"""One-shot set-up of the compose stack: the namespace's topics (from the production spec,
mounted at PARKPOOL_TOPICS_FILE) and the job-data bucket with its expiry rule.

Every step is safe to repeat; compose restarts this until it succeeds (Kafka and the
store may take a moment to accept requests).
"""

import os
import sys

from parkpool.app.cli import main as parkpool
from parkpool.runtime.blobstore import BlobStore
from parkpool.runtime.settings import Secret, StoreConnection

# Job data left by a crashed client goes after two days (deploy/README.md, 5b).
TTL_HOURS = "48"


def main() -> int:
    status = parkpool(["brokers", "bootstrap"])  # reads PARKPOOL_* from the environment
    if status:
        return status
    store = StoreConnection(
        endpoint=os.environ["PARKPOOL_STORE_ENDPOINT"],
        bucket=os.environ["PARKPOOL_STORE_BUCKET"],
        access_key=os.environ["PARKPOOL_STORE_ACCESS_KEY"],
        secret_key=Secret(os.environ["PARKPOOL_STORE_SECRET_KEY"]),
    )
    BlobStore(store).ensure_bucket()
    return parkpool(["store", "lifecycle", "--ttl-hours", TTL_HOURS])


if __name__ == "__main__":
    sys.exit(main())
