# SPDX-License-Identifier: Apache-2.0
"""``python -m parkpool_train``: train on the fleet and in one process; print both.

Connection flags and environment variables are parkpool's own (``--bootstrap``,
``PARKPOOL_NAMESPACE``, the store's), so it runs wherever ``parkpool submit`` does.
"""

from __future__ import annotations

import argparse
import json
import sys

from parkpool.producer.client import ParkpoolClient, ProducerSettings
from parkpool.runtime.settings import (
    add_kafka_options,
    add_namespace_option,
    add_store_options,
    kafka_from_args,
    store_from_args,
)
from parkpool_train.training import Digits, in_process, on_fleet, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parkpool_train", description=__doc__)
    add_kafka_options(parser)
    add_store_options(parser)
    add_namespace_option(parser)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=512, help="rows per round")
    parser.add_argument("--shards", type=int, default=4, help="chunks per round")
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = Digits.load(args.seed)
    knobs = {"rounds": args.rounds, "batch": args.batch, "lr": args.lr, "seed": args.seed}
    local = train(in_process, data, **knobs)
    settings = ProducerSettings(kafka_from_args(args), args.namespace, store=store_from_args(args))
    with ParkpoolClient(settings) as client:
        fleet = train(on_fleet(client, args.shards), data, **knobs)
    report = {
        "rounds": args.rounds,
        "train_rows": len(data.x_train),
        "test_rows": len(data.x_test),
        "fleet_accuracy": fleet.accuracy,
        "local_accuracy": local.accuracy,
        "fleet_final_loss": fleet.losses[-1],
        "local_final_loss": local.losses[-1],
        "fleet_round_s_median": fleet.median_round_s,
        "local_round_s_median": local.median_round_s,
        "max_loss_gap": max(abs(a - b) for a, b in zip(fleet.losses, local.losses, strict=True)),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
