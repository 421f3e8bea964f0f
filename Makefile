# edgectl: `make setup` then `make test`; `make demo` runs the whole path end to end.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where the machine keeps wheels on disk (the CPU torch build); harmless when absent.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=
# Locked, hashed installs: `make lock` writes these from pyproject.toml and constraints-dev.txt.
DEV_LOCK := requirements/dev.lock
AGENT_LOCK := requirements/agent.lock
UV ?= $(if $(wildcard $(VENV)/bin/uv),$(VENV)/bin/uv,uv)

.PHONY: setup broker chromium faketime test lint format proto bench demo clean check-deploy lock

setup: $(VENV)/.installed broker chromium faketime  ## create .venv, install everything (mosquitto, chromium too)

# Every third-party package comes from the lock and must match its hash (pip included); edgectl
# itself is then installed editable on top, with nothing more to fetch.
$(VENV)/.installed: pyproject.toml setup.py $(DEV_LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) --require-hashes -r $(DEV_LOCK)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

# The dev lock is for CI and development machines (CPython 3.11, x86_64 Linux, the CPU torch wheel
# in /opt/wheels); the agent lock is universal: Jetsons and CPU boxes, any supported Python.
# Existing pins are kept unless pyproject.toml needs others; `make lock UPGRADE=1` takes the newest.
LOCK_FLAGS = --generate-hashes -c constraints-dev.txt --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade,)
lock:  ## regenerate requirements/dev.lock and requirements/agent.lock (pinned, with hashes)
	@command -v $(UV) >/dev/null || { echo "uv is missing: make setup (or pip install uv)"; exit 1; }
	$(UV) pip compile -q pyproject.toml requirements/build.in --extra dev $(LOCK_FLAGS) $(FIND_LINKS) \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o $(DEV_LOCK)
	$(UV) pip compile -q pyproject.toml --extra agent $(LOCK_FLAGS) --universal --python-version 3.10 -o $(AGENT_LOCK)

broker:  ## mosquitto from apt when missing (root), else the command to run
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then \
		echo "mosquitto: $$(command -v mosquitto || echo /usr/sbin/mosquitto)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto mosquitto-clients; \
	else \
		echo "mosquitto is missing; run: sudo apt-get install -y mosquitto mosquitto-clients"; exit 1; \
	fi

# The console's browser test drives Debian's chromium through Playwright (never `playwright install`).
chromium:  ## Debian's chromium from apt when missing (root), else the command to run
	@if [ -x /usr/bin/chromium ]; then \
		echo "chromium: /usr/bin/chromium"; \
	elif [ "$$(id -u)" = 0 ]; then \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; }; \
	else \
		echo "chromium is missing (the console's browser test skips without it); run: sudo apt-get install -y chromium"; \
	fi

faketime:  ## libfaketime for the clock-skew fault test (optional: the test falls back to an in-process shift)
	@if [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] || [ -e /usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1 ]; then \
		echo "libfaketime: installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q faketime; }; } || echo "libfaketime not installed: the clock-skew test uses its in-process variant"; \
	else \
		echo "optional: sudo apt-get install -y faketime (the clock-skew fault test then also runs under libfaketime)"; \
	fi

# test and demo need all of setup (mosquitto too), not only the venv: on a fresh machine each README
# command sets itself up; once installed, broker and faketime are checks that take milliseconds.
# One pytest worker per core (TEST_WORKERS=0: one process); a worker steals queued tests from a busy
# one, so a file of slow integration tests does not hold the run back. Servers bind free ports and
# PostgreSQL tests take their own schema, so workers never share state.
TEST_WORKERS ?= auto
test: setup  ## the suite without slow benchmarks, on every core
	$(PY) -m pytest -q -m "not slow and not bench" -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: $(VENV)/.installed  ## ruff + mypy --strict on the packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/typecheck_tree.py >/dev/null
	cd build/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml -p edgectl

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

proto: $(VENV)/.installed  ## regenerate protos/*_pb2*.py from the .proto files
	$(PY) scripts/gen_protos.py

bench: $(VENV)/.installed  ## benchmarks: print ratios measured side by side
	@set -e; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b; done
	$(PY) -m pytest -q -m "slow or bench" $(PYTEST_ARGS)

demo: setup  ## train, compress, deploy, infer, roll back: all local
	$(VENV)/bin/edgectl demo

# checkov pins older boto3/botocore/packaging than the dev extra, so it lives in a venv of its own.
check-deploy: $(VENV)/.installed  ## deployment files: k8s schema, checkov, manifest start, systemd-analyze
	test -x .venv-checkov/bin/checkov || { python3 -m venv .venv-checkov && .venv-checkov/bin/python -m pip install -q 'checkov==3.3.30'; }
	EDGECTL_REQUIRE_CHECKOV=1 $(PY) -m pytest -q tests/test_deploy_files.py tests/control_plane/test_cp_deploy_manifest.py $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
