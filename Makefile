# tiktok-conversions-worker — every target a newcomer needs. `make demo` and `make test` on a
# fresh machine install everything first (`make setup` is idempotent and fast when cached).
SHELL := /bin/bash
# The interpreter .venv is built from: Debian bookworm's python3.11 package, the same build the
# image runs and the bench measures (issue 18; Debian builds it with PGO and LTO). Installed by
# scripts/provision-python when missing; `make setup PYTHON=/path/to/python3.11` uses another.
PYTHON ?= /usr/bin/python3.11
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup lock provision lint fmt test test-unit demo bench chaos manifests manifests-check image clean

setup: $(VENV)/.installed provision

# Dependencies come from the lock file, every one pinned and hash-checked; the worker itself is
# installed editable on top, without resolving anything. The repository root goes on the venv's
# path (devtools.pth), so the developer tooling that is kept out of the wheel (devkit/, bench/,
# tests/) imports the same way from every process. --clear: a .venv made from another
# interpreter is rebuilt, not patched.
$(VENV)/.installed: pyproject.toml requirements-dev.lock Makefile scripts/provision-python
	./scripts/provision-python $(PYTHON)
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -c 'import sysconfig; print("$(CURDIR)", file=open(sysconfig.get_paths()["purelib"] + "/devtools.pth", "w"))'
	touch $@

# Re-resolve both lock files to the newest versions pyproject.toml allows, with hashes for every
# platform (the image's arch may differ from this machine's). Commit the result.
LOCK := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --upgrade --quiet --custom-compile-command 'make lock'
lock: $(VENV)/.installed
	$(LOCK) -o requirements.lock
	$(LOCK) --extra aws -c requirements.lock -o requirements-aws.lock
	$(LOCK) --extra test --extra dev -o requirements-dev.lock

# Kafka jars from Maven Central, redis-server and prometheus from Debian, Helm via go install.
provision:
	./scripts/provision

lint: $(VENV)/.installed
	$(BIN)/ruff check worker devkit tests scripts bench
	$(BIN)/ruff format --check worker
	$(BIN)/mypy

fmt: $(VENV)/.installed
	$(BIN)/ruff format worker tests bench
	$(BIN)/ruff check --fix worker tests bench

# The whole suite, integration tests on real Kafka/Redis/Prometheus included.
test: setup lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Unit tests only (no servers, no Helm/promtool/node, no wheel build): the quick loop.
test-unit: $(VENV)/.installed
	$(BIN)/pytest -q -m "not integration and not tools" $(PYTEST_ARGS)

demo: setup
	$(BIN)/python scripts/demo.py

bench: setup
	$(BIN)/python bench/run.py

# The long run, then issue 14's done-when with the product defaults; each writes its section
# of docs/reliability.md.
chaos: setup
	$(BIN)/python devkit/chaos/run.py --long
	$(BIN)/python devkit/chaos/run.py --defaults

# Plain manifests in deploy/ are rendered from the chart; -check fails when they drift.
manifests: setup
	./scripts/render-manifests

manifests-check: setup
	./scripts/render-manifests --check

# The container image, with docker, podman or buildah (whichever exists; one line if none):
#   make image IMAGE=registry.example.com/team/tiktok-conversions-worker TAG=0.1.0
image:
	@./scripts/build-image

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
