# mjfilter: `make run` and `make test` work on a fresh Debian machine as root:
# they install what is missing (Debian packages, a virtualenv in .venv) first.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONF ?= conf/mjfilter.yaml

# Debian packages: building pymilter, the venv; Postfix and Redis for the integration tests.
RUN_DEBS := gcc libc6-dev python3-dev python3-venv libmilter-dev
TEST_DEBS := $(RUN_DEBS) postfix redis-server postgresql slapd ldap-utils

.PHONY: run test bench bench-dedup deps-run deps-test venv venv-test clean help

help:
	@echo "make run    install what is missing, run the milter with $(CONF)"
	@echo "make test   install what is missing, run the whole test suite (real Postfix included)"
	@echo "make bench  throughput/latency/CPU/RSS through a real Postfix vs no milter, a no-op milter, OpenDKIM"
	@echo "make bench-dedup  dedup store throughput and added latency through a real Postfix"
	@echo "make clean  remove the virtualenv and build leftovers"

run: deps-run venv
	$(VENV)/bin/mjfilter run -c $(CONF)

test: deps-test venv-test
	$(PY) -m pytest $(PYTEST_ARGS)

BENCH_DEBS := $(TEST_DEBS) opendkim opendkim-tools
bench: deps-test venv-test
	@DEBS="$(BENCH_DEBS)" ./scripts/install-debs
	$(PY) -m pip install --quiet 'matplotlib>=3.7'
	$(PY) bench/bench.py $(BENCH_ARGS)

bench-dedup: deps-test venv-test
	$(PY) bench/dedup.py

deps-run:
	@DEBS="$(RUN_DEBS)" ./scripts/install-debs

deps-test:
	@DEBS="$(TEST_DEBS)" ./scripts/install-debs

# The project installed editable; redone when pyproject.toml changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# Plus the test tools and the plugin packages the tests load through entry points.
venv-test: $(VENV)/.installed-test
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml contrib/example-plugin/pyproject.toml tests/plugins/pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]' -e contrib/example-plugin -e tests/plugins
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
