# `make train` and `make test` set up everything they need on a fresh machine (a virtualenv in .venv).
SHELL := /bin/bash
PYTHON_SYSTEM ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: the CPU build on CPU-only machines where pip is configured for it; on PyPI the same pin is
# a CUDA build for Linux GPU machines. Use your own with `make TORCH_SPEC='torch==X' ...`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.dlm-installed
ARGS ?=
PYTEST_ARGS ?=
# Tests never reach a hub; wandb stays local.
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true

.PHONY: help install train test test-gpu test-slow lint dry-run sweep bench bench-all clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# DeepSpeed builds its ops lazily; its setup needs the torch installed above.
	$(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16"
	touch $(STAMP)

install: $(STAMP) ## create .venv with torch, the package and its tools

train: install ## train the default masked diffusion LM on the embedded data (ARGS='key=value ...')
	$(PY) -m dlm.train $(ARGS)

test: install ## run the fast CPU test suite
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install ## run the slow tests too
	$(TEST_ENV) $(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-gpu: install ## run the GPU tests (needs CUDA)
	$(TEST_ENV) $(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

lint: install ## ruff over the package and tests
	$(VENV)/bin/ruff check dlm tests benchmarks

dry-run: install ## print the plan of the reference A2D command without training
	$(PY) -m dlm.train model=moe30b schedule=linear trainer=deepspeed dry_run=true

sweep: install ## a small CPU ablation (methods x schedules) that notebooks/compare_runs reads
	$(PY) -m dlm.train -m method=mdlm,diffusionbert,bd3lm schedule=linear,cosine trainer.max_steps=300 trainer.val_check_interval=100 data.batch_size=32 logger=none hydra.sweep.dir=runs/multirun/sweep
	@echo "compare: DLM_SWEEP=runs/multirun/sweep jupyter notebook notebooks/compare_runs.ipynb"

bench: install ## sampler speed vs the naive sampler on a tiny trained model (ARGS='--quick' or '--run runs/...')
	$(TEST_ENV) $(PY) benchmarks/samplers.py $(ARGS)

bench-all: install ## every ratio of the README's benchmark table, measured in one run, printed as that table (ARGS='--quick')
	$(TEST_ENV) $(PY) benchmarks/all.py $(ARGS)

clean: ## remove caches (keeps .venv and runs/)
	rm -rf .cache .pytest_cache .ruff_cache
