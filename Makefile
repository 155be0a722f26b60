# Quick start: `make run` (serve the demo policy) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
POLICY ?= policies/demo.yaml
# Offline machines: tiktoken encodings shipped beside the checkout (the gateway
# falls back to an estimate, and says so, when none can be loaded).
SHARED_TIKTOKEN := $(abspath ../shared/tiktoken)
# (Set but empty counts as unset: `?=` would keep the empty value, and tiktoken would then download.)
ifneq ($(wildcard $(SHARED_TIKTOKEN)),)
ifeq ($(strip $(TIKTOKEN_CACHE_DIR)),)
export TIKTOKEN_CACHE_DIR := $(SHARED_TIKTOKEN)
endif
endif
REDIS_PORT ?= 6379
# make stack's trace UI (arize-phoenix) lives in a venv of its own: its pins are not the gateway's.
PHOENIX_VENV ?= .venv-phoenix
STACK_DIR ?= .stack

.PHONY: run test test-slow conformance lint bench redis install install-dev clean screenshots stack stack-down \
	stack-tools image soak

# pip prints one line per package it collects and installs (no --quiet), so a first `make run` shows its
# progress instead of ~30 s of silence; later runs skip these steps.
PIP := $(PY) -m pip install --disable-pip-version-check --progress-bar off

$(VENV)/.installed: pyproject.toml
	@echo "==> creating $(VENV) and installing switchboard (first run only, ~30 s)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	@echo "==> installing the test, load-test and self-hosted server dependencies (llama-cpp-python compiles llama.cpp: ~10 min the first time)"
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) -e '.[dev,load,selfhosted]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	@echo "==> serving $(POLICY) on http://127.0.0.1:$(PORT)  (Ctrl-C stops it)"
	@echo "    demo key sk-switchboard-demo; console http://127.0.0.1:$(PORT)/ui/ (password sk-switchboard-admin-demo)"
	@echo "    the switchboard command: $(VENV)/bin/switchboard (or: source $(VENV)/bin/activate)"
	PORT=$(PORT) $(VENV)/bin/switchboard serve --policy $(POLICY)

# Make sure a Redis answers on 127.0.0.1:$(REDIS_PORT); start one if not.
redis:
	@redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 \
	  || redis-server --daemonize yes --bind 127.0.0.1 --port $(REDIS_PORT) --save "" --appendonly no >/dev/null
	@for i in $$(seq 50); do redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 && exit 0; sleep 0.1; done; \
	  echo "no Redis answers on 127.0.0.1:$(REDIS_PORT)"; exit 1

test: install-dev redis
	$(PY) -m pytest -n 2 -m "not slow"

# Multi-process and soak tests; exit code 5 means none are collected.
test-slow: install-dev redis stack-tools $(PHOENIX_VENV)/.installed
	SWITCHBOARD_PHOENIX=$(abspath $(PHOENIX_VENV))/bin/phoenix $(PY) -m pytest -m slow || [ $$? -eq 5 ]

# Run every test that claims a conformance-matrix cell and regenerate docs/conformance.md.
conformance: install-dev redis
	$(PY) -m pytest -n 2 -m conformance --conformance-report=docs/conformance.md

# Refresh docs/console-*.png from the console's browser test (needs chromium and chromium-driver).
screenshots: install-dev
	SWITCHBOARD_SCREENSHOTS=docs $(PY) -m pytest -n 0 -m slow tests/test_console_browser.py

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache  # the layers of docs/architecture.md (pyproject.toml [tool.importlinter])

bench: install-dev
	$(PY) loadtests/bench.py

# Memory soak (issue 17): 1M mixed requests on 3 replicas sharing a private Redis, 30-60 min; niced so a
# shared machine stays usable. SOAK_ARGS passes options, e.g. SOAK_ARGS="--requests 50000".
soak: install-dev
	nice -n 10 $(PY) loadtests/soak.py $(SOAK_ARGS)

# --- deploy/: the multi-replica stack as processes, and the container image ---------------------
# `make stack`: HAProxy on 127.0.0.1:8180 over three replicas, a private Redis (6399), Prometheus
# (9190) and Arize Phoenix (6016). Debian's haproxy, prometheus and redis-server come from apt;
# Phoenix from PyPI into a venv of its own (~1 GB, several minutes the first time; its pins are not
# the gateway's). deploy/README.md describes it.

stack-tools:
	@missing=""; for tool in haproxy:haproxy prometheus:prometheus redis-server:redis-server; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

$(PHOENIX_VENV)/.installed:
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/pip install --quiet 'arize-phoenix>=12'
	touch $@

stack: install stack-tools $(PHOENIX_VENV)/.installed
	$(PY) deploy/stack/stack.py up --dir $(STACK_DIR) --switchboard $(VENV)/bin/switchboard \
	  --phoenix $(PHOENIX_VENV)/bin/phoenix

stack-down:
	$(PY) deploy/stack/stack.py down --dir $(STACK_DIR)

# The container image, built with podman where no Docker engine runs (deploy/README.md, "Image").
image:
	mkdir -p deploy/tiktoken-seed && { [ -z "$$TIKTOKEN_CACHE_DIR" ] || cp -r "$$TIKTOKEN_CACHE_DIR"/. deploy/tiktoken-seed/; }
	deploy/image.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
