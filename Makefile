# `make demo` and `make test` set everything up themselves on a fresh machine.
# torch is installed first and pinned to the CPU build this machine serves, so no
# dependency range can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
ALGO ?= stapo
SEED ?= 0
PYTEST_ARGS ?=

.PHONY: install test demo lint clean

$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.stamp

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m stapo train objective.name=$(ALGO) seed=$(SEED)

lint: install
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
