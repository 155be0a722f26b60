# Quick start: `make run` (serve the demo policy) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
POLICY ?= policies/demo.yaml
# Offline machines: tiktoken encodings shipped beside the checkout (the gateway
# falls back to an estimate, and says so, when none can be loaded).
SHARED_TIKTOKEN := $(abspath ../shared/tiktoken)
ifneq ($(wildcard $(SHARED_TIKTOKEN)),)
export TIKTOKEN_CACHE_DIR ?= $(SHARED_TIKTOKEN)
endif
REDIS_PORT ?= 6379

.PHONY: run test test-slow conformance lint bench redis install install-dev clean screenshots

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
	@echo "==> installing the test and load-test dependencies"
	$(PIP) -e '.[dev,load]'
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
test-slow: install-dev redis
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]

# Run every test that claims a conformance-matrix cell and regenerate docs/conformance.md.
conformance: install-dev redis
	$(PY) -m pytest -n 2 -m conformance --conformance-report=docs/conformance.md

# Refresh docs/console-*.png from the console's browser test (needs chromium and chromium-driver).
screenshots: install-dev
	SWITCHBOARD_SCREENSHOTS=docs $(PY) -m pytest -n 0 -m slow tests/test_console_browser.py

lint: install-dev
	$(VENV)/bin/ruff check .

bench: install-dev
	$(PY) loadtests/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
