#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Run the CPU image for real against the embedded brokers on this host: a gateway and a
# simulated fleet in containers (host network), a job submitted from a third container,
# the image's HEALTHCHECK and its user checked, then the gateway stopped with SIGTERM.
# Needs a Docker daemon, the image (deploy/docker/local-base.sh or `docker build`) and
# the project's virtualenv (`make setup`), whose `parkpool brokers up` runs the brokers.
#
#   sh deploy/docker/smoke-local.sh            (from the repository root; `make images-local`)
#
# Development brokers only: this shows that the image runs every role, not the compose
# stack (deploy/README.md, "What was and was not run here").
set -eu

IMAGE=${IMAGE:-parkpool:0.1.0-local}
DOCKER=${DOCKER:-docker}
PARKPOOL=${PARKPOOL:-.venv/bin/parkpool}
GW_PORT=${GW_PORT:-19464}
FLEET_PORT=${FLEET_PORT:-19465}
RUN=$(mktemp -d "${TMPDIR:-/tmp}/parkpool-smoke.XXXXXX")
BROKERS=""

cleanup() {
  "$DOCKER" rm -f pp-smoke-gw pp-smoke-fleet >/dev/null 2>&1 || true
  if [ -n "$BROKERS" ]; then kill "$BROKERS" 2>/dev/null && wait "$BROKERS" 2>/dev/null || true; fi
  rm -rf "$RUN"
}
trap cleanup EXIT

echo "== brokers on the host (parkpool brokers up)"
"$PARKPOOL" brokers up --run-dir "$RUN/brokers" >"$RUN/brokers.out" 2>&1 &
BROKERS=$!
i=0
until grep -q '^brokers up' "$RUN/brokers.out"; do
  i=$((i + 1)); [ "$i" -le 120 ] || { cat "$RUN/brokers.out"; exit 1; }
  sleep 1
done
sed -n 's/^export //p' "$RUN/brokers.out" >"$RUN/env"
echo PARKPOOL_LOG_JSON=1 >>"$RUN/env"
grep -v -e ACCESS_KEY -e SECRET_KEY "$RUN/env"

echo "== gateway and fleet containers"
"$DOCKER" run -d --name pp-smoke-gw --network host --env-file "$RUN/env" \
  -e PARKPOOL_GATEWAY_ID=gw-1 -e PARKPOOL_METRICS_PORT="$GW_PORT" "$IMAGE" gateway >/dev/null
"$DOCKER" run -d --name pp-smoke-fleet --network host --env-file "$RUN/env" \
  -e PARKPOOL_SIM_VEHICLES=4 -e PARKPOOL_WORKER_METRICS_PORT="$FLEET_PORT" "$IMAGE" sim >/dev/null
for c in pp-smoke-gw pp-smoke-fleet; do
  i=0
  until [ "$("$DOCKER" inspect --format '{{.State.Health.Status}}' "$c")" = healthy ]; do
    i=$((i + 1)); [ "$i" -le 90 ] || { "$DOCKER" logs "$c"; exit 1; }
    sleep 1
  done
  echo "$c: $("$DOCKER" inspect --format '{{.State.Health.Status}}' "$c") after ${i}s"
done

echo "== submit from a container"
"$DOCKER" run --rm --network host --env-file "$RUN/env" -e PARKPOOL_LOG_JSON=0 "$IMAGE" \
  submit gemm --size 512 --verify --timeout 120 2>/dev/null | tail -n 1

echo "== user"
"$DOCKER" run --rm --entrypoint id "$IMAGE"

echo "== SIGTERM to the gateway"
"$DOCKER" stop -t 40 pp-smoke-gw >/dev/null
echo "exit code $("$DOCKER" inspect --format '{{.State.ExitCode}}' pp-smoke-gw)"
"$DOCKER" logs pp-smoke-gw 2>&1 | grep -o '"event": "[a-z_]*"' | tr '\n' ' '
echo
