#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Make a stand-in for the CPU image's base on a machine that reaches no image registry,
# then build parkpool's CPU image on it. Needs root, debootstrap, a Docker daemon, and
# deb.debian.org and PyPI.
#
#   sh deploy/docker/local-base.sh            (from the repository root; `make images-local`)
#
# The Dockerfile pins python:3.11.13-slim-bookworm and keeps that default. This script
# does not pretend to be that image: it builds a Debian bookworm minbase with Debian's own
# Python (3.11.2), tags it under its own name (parkpool-local/python:3.11-bookworm) and
# passes it through the Dockerfile's PYTHON_IMAGE build argument. What the Dockerfile
# expects of its base, and the official image has, is provided the same way here:
# `python` on PATH (python-is-python3), `python -m venv` (python3-venv), `groupadd` and
# `useradd`, and pip, setuptools and wheel installed by pip into /usr/local (so the final
# stage can uninstall them) with no EXTERNALLY-MANAGED marker (CPython built from source, as in
# the official image, has none).
#
# The image is built with the classic builder (DOCKER_BUILDKIT=0): BuildKit would fetch
# the `# syntax=docker/dockerfile:1` frontend from Docker Hub. The classic builder does
# not read Dockerfile.dockerignore, so the build context is `git archive HEAD` (tracked,
# committed files only), not the working tree with its virtualenvs.
#
# Behind a TLS-intercepting egress proxy, pip in the chroot and in the image's build stage
# trusts only Debian's CA bundle; EXTRA_CA_CERTS (space-separated PEM files, e.g. the
# proxy's CA from /usr/local/share/ca-certificates/) adds certificates to the stand-in
# base's trust store. They then stay in the base and in the image built on it, which is
# one more reason that image is for this machine only and never pushed.
set -eu

BASE_TAG=${BASE_TAG:-parkpool-local/python:3.11-bookworm}
IMAGE_TAG=${IMAGE_TAG:-parkpool:0.1.0-local}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/parkpool-base.XXXXXX")
ROOTFS=$WORK/rootfs
trap 'rm -rf "$WORK"' EXIT

if ! "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR"
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  for ca in ${EXTRA_CA_CERTS:-}; do
    cp "$ca" "$ROOTFS/usr/local/share/ca-certificates/$(basename "$ca" .crt).crt"
  done
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$ROOTFS" /bin/sh -eu -c '
    update-ca-certificates >/dev/null
    python3 -m pip install --quiet --no-cache-dir --break-system-packages \
      --root-user-action=ignore --ignore-installed \
      pip==24.0 setuptools==65.5.1 wheel==0.45.1
    rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
    DEBIAN_FRONTEND=noninteractive apt-get purge --yes --quiet --autoremove python3-pip >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /root/.cache
    : > /etc/resolv.conf
  '
  tar -C "$ROOTFS" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_TAG"
  rm -rf "$ROOTFS"
fi

git archive --format=tar HEAD | DOCKER_BUILDKIT=0 "$DOCKER" build --network host \
  --build-arg PYTHON_IMAGE="$BASE_TAG" -f deploy/docker/Dockerfile -t "$IMAGE_TAG" -
