# Two commands do all the set-up on a fresh clone:
#   make run    venv + install, then `twistd -n sense-gateway` on the embedded defaults
#   make test   venv + test dependencies + the servers the tests talk to, then the suite
# ARGS="..." passes options to the gateway, e.g. make run ARGS="--coap-port 5700".

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# twistd finds twisted/plugins only in a compat-mode editable install.
PIP_INSTALL := $(BIN)/pip install --quiet --config-settings editable_mode=compat
# Debian packages the tests use: command -> package.
SYSTEM_PACKAGES := coap-client-notls:libcoap3-bin victoria-metrics:victoria-metrics influxd:influxdb

.PHONY: run test test-pytest test-trial system-packages clean

run: $(VENV)/.installed
	$(BIN)/twistd -n sense-gateway $(ARGS)

test: $(VENV)/.installed-test system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m twisted.trial tests

test-pytest: $(VENV)/.installed-test system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-trial: $(VENV)/.installed-test system-packages
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
	rm -rf $(VENV) var _trial_temp build *.egg-info
