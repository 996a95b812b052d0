# Two commands do all the set-up on a fresh clone:
#   make run    venv + install, then `twistd -n sense-gateway` on the embedded defaults
#   make test   venv + test dependencies + the servers the tests talk to, then the suite
#               and a few seconds of each fuzz target
#   make fuzz   each fuzz target (tests/fuzz.py) for FUZZ_SECONDS (default 60)
# ARGS="..." passes options to the gateway, e.g. make run ARGS="--coap-port 5700".

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# twistd finds twisted/plugins only in a compat-mode editable install.
PIP_INSTALL := $(BIN)/pip install --quiet --config-settings editable_mode=compat
# Debian packages the tests use: command -> package.
SYSTEM_PACKAGES := coap-client-notls:libcoap3-bin victoria-metrics:victoria-metrics influxd:influxdb \
	chromium:chromium shellcheck:shellcheck npm:npm systemd-analyze:systemd promtool:prometheus

# Seconds per fuzz target: `make fuzz` for finding things, `make test` as a
# regression guard.
FUZZ_SECONDS ?= 60
FUZZ_SECONDS_TEST ?= 3

.PHONY: run test test-pytest test-trial fuzz fuzz-short system-packages web-packages clean

run: $(VENV)/.installed web-packages
	$(BIN)/twistd -n sense-gateway $(ARGS)

test: $(VENV)/.installed-test system-packages node_modules/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m twisted.trial tests
	$(MAKE) --no-print-directory fuzz-short

fuzz: $(VENV)/.installed-test
	$(BIN)/python tests/fuzz.py --seconds $(FUZZ_SECONDS)

fuzz-short: $(VENV)/.installed-test
	$(BIN)/python tests/fuzz.py --seconds $(FUZZ_SECONDS_TEST)

test-pytest: $(VENV)/.installed-test system-packages node_modules/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-trial: $(VENV)/.installed-test system-packages node_modules/.installed
	$(BIN)/python -m twisted.trial tests

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	touch $@

# The dashboard's chart library (uPlot) and the browser test's driver
# (playwright-core) come from npm at set-up time; nothing is vendored.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# `make run` works without Node.js too: the dashboard then shows its tables
# and says how to get the charts.
web-packages:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory node_modules/.installed; \
	else echo "npm not found: the dashboard at http://127.0.0.1:8080/ will show no charts (apt-get install npm)"; fi

system-packages:
	@missing=""; \
	for pair in $(SYSTEM_PACKAGES); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

clean:
	rm -rf $(VENV) var _trial_temp build *.egg-info node_modules
