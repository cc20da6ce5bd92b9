# One entry point per job. `make run` shows the product working on this
# machine (a local agent + coworkctl) and installs only the venv it needs;
# `make test` installs everything the tests need and runs every test tier
# that this machine can run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TOOLS := .tools
PROTO_SRC := $(wildcard proto/cowork/agent/v1/*.proto)
GEN_DIR := cowork/agent/v1

.PHONY: setup dev tools proto proto-check proto-lock lint test test-local e2e lima-e2e soak bench bench-quick bench-lima run clean

# The host side only: .venv with the project (coworkctl, CoworkClient, cowork-agent) and
# its Python dependencies. No system packages, no sudo: the same on macOS and Linux.
setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@touch $@

# + what lint, proto and the tests import (pytest, mypy, ruff, grpcio-tools, ...).
dev: $(VENV)/.stamp-dev

$(VENV)/.stamp-dev: $(VENV)/.stamp
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# System and third-party tools the tests use (sshd, bubblewrap, Claude Code CLI,
# limactl, QEMU, vhost-device-vsock, ...; Debian packages through apt-get).
# Each installer is idempotent and cached under $(TOOLS)/.
tools:
	@bash scripts/install-tools.sh

proto: dev
	@bash scripts/gen-proto.sh $(PY) .

# Fails when the committed generated code differs from what `make proto` makes, or
# when proto/ changed without a PROTOCOL_VERSION bump (proto/cowork/agent/v1/PROTOCOL.lock).
proto-check: dev
	@bash scripts/gen-proto.sh $(PY) --check

# After a proto change: bump PROTOCOL_VERSION in cowork/defaults.py, then this, and commit
# PROTOCOL.lock. Refuses to re-lock a version that was locked with other .proto content.
proto-lock: dev
	@$(PY) scripts/proto_lock.py lock

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/vermin --target=3.10- --no-tips --violations --eval-annotations --exclude-regex 'cowork/agent/v1/.*' host_client guest_agent

# Every tier: local (agent subprocess, real CLI, real sshd, real limactl), then
# the VM tier (a real Debian guest under QEMU reached over virtio-vsock), then the
# Lima tier (coworkctl init boots lima/cowork.yaml; everything through lima:NAME).
test: test-local e2e lima-e2e

test-local: dev tools proto-check lint
	$(BIN)/pytest -q -m "not vm and not lima_e2e"

e2e: dev tools
	$(BIN)/pytest -q -m vm tests/vm

# The user's path for real: `coworkctl init` boots Lima (TCG here) with a local Debian
# image, Lima provisions it with lima/, then exec/cp/shell/ask/stop/start/a dead
# forward/snapshots/clones/delete through lima:NAME (~30 min on 2 cores under TCG;
# tests/lima_e2e).
lima-e2e: dev tools
	$(BIN)/pytest -q -m lima_e2e tests/lima_e2e

# Endurance: 10,000 mixed calls per mode against an agent under the unit's fd
# limit; figures per 1,000 calls in bench/results/soak.json. `make test` runs a
# bounded 1,500 of the same (tests/soak).
soak: dev tools
	rm -f bench/results/soak.json
	COWORK_SOAK_CALLS=10000 COWORK_SOAK_REPORT=bench/results/soak.json \
		$(BIN)/pytest -q -m soak tests/soak

bench: dev tools
	$(PY) -m bench.run --out bench/results

bench-quick: dev tools
	$(PY) -m bench.run --quick --out bench/results

# Lima: exec latency vs limactl shell / ssh, init to ready, cp vs limactl copy
# (boots its own VM like the Lima tier; bench/results/lima.md and lima.json).
bench-lima: dev tools
	$(PY) -m bench.lima_latency --out bench/results

# The main job on a machine without a VM: start the embedded local agent and
# drive it with coworkctl. Needs the venv only (no test tools).
run: setup
	@bash scripts/demo.sh

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
