# igdrec — make install | test | test-lowest | lock | demo | bench-* (see README.md, "Development")
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU users install their CUDA torch into .venv first (README) and set TORCH_SPEC=torch.
# A torch already importable in .venv is kept: the lock file leaves torch out for that reason.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.igdrec-installed
RUN_DIR ?= runs/demo
PIP := pip --disable-pip-version-check
LOCK := requirements.lock

# uv (from PyPI, in a tool environment of its own) resolves the lock file and the lowest-versions environment.
TOOLS := .venv-tools
UV := $(TOOLS)/bin/uv
UV_SPEC ?= uv==0.13.9
# The lock is resolved against the CPU build of torch, whose dependencies are few and platform-free (the
# CUDA build from PyPI would add the nvidia-* wheels). Where pip finds that wheel (pip config
# find-links, e.g. a local wheel directory, or https://download.pytorch.org/whl/cpu/torch/):
LOCK_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null || echo https://download.pytorch.org/whl/cpu/torch/)
LOCK_TORCH ?= torch==2.13.0+cpu

# `make test-lowest`: every direct dependency at the lower bound pyproject.toml declares.
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.igdrec-installed
TORCH_LOWEST_SPEC ?= torch==2.13.0

.PHONY: install test test-lowest lock demo bench-ig bench-sft bench-decode clean-venv reproduce-table1

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/$(PIP) install -q "$(TORCH_SPEC)"
	$(BIN)/$(PIP) install -q -r $(LOCK)
	$(BIN)/$(PIP) install -q --no-deps -e '.[dev,tensorboard]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/$(PIP) install -q "$(UV_SPEC)"

# Re-resolve the lock from pyproject.toml (after adding or changing a dependency): newest allowed
# versions, every file's sha256, torch left out (see TORCH_SPEC). Commit the result.
lock: $(UV)
	echo "$(LOCK_TORCH)" > $(TOOLS)/torch-constraint.txt
	$(UV) pip compile pyproject.toml --extra dev --extra tensorboard --universal --python-version 3.11 --generate-hashes \
		--no-emit-package torch --find-links $(LOCK_FIND_LINKS) -c $(TOOLS)/torch-constraint.txt \
		--custom-compile-command "make lock" --upgrade -o $(LOCK)

$(LOWEST_STAMP): pyproject.toml Makefile | $(UV)
	rm -rf $(LOWEST)
	$(UV) venv -q --seed --python $(PYTHON) $(LOWEST)  # --seed: pip, which igdrec's asset fetcher runs
	$(LOWEST)/bin/$(PIP) install -q "$(TORCH_LOWEST_SPEC)"  # pip: honours its config's find-links
	$(LOWEST)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(LOWEST)/torch-constraint.txt
	$(UV) pip install -q --python $(LOWEST)/bin/python --resolution lowest-direct \
		-c $(LOWEST)/torch-constraint.txt -e '.[dev,tensorboard]'
	touch $(LOWEST_STAMP)

test-lowest: $(LOWEST_STAMP)
	$(LOWEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|peft|typer|pyyaml|polars|rich|numpy|gguf|safetensors|pytest|pytest-timeout|click|tokenizers|tensorboard)=='
	$(LOWEST)/bin/python -m pytest -q

demo: install
	$(BIN)/igdrec run configs/demo.yaml --run-dir $(RUN_DIR)

# The paper's Tables 1–4 and figures: SCALE = smoke | mini (default) | gpu | paper (configs/grid/SCALE.yaml).
# Resumable: rerun after a kill and the finished cells are cached. Reports: runs/grid/SCALE/reports/.
SCALE ?= mini
reproduce-table1: install
	@test -f configs/grid/$(SCALE).yaml || { echo "SCALE=$(SCALE): no configs/grid/$(SCALE).yaml (smoke, mini, gpu, paper)"; exit 2; }
	$(BIN)/igdrec grid configs/grid/$(SCALE).yaml

bench-ig: install
	$(BIN)/python bench/bench_ig_index.py

bench-sft: install
	$(BIN)/python bench/bench_sft_step.py

bench-decode: install
	$(BIN)/python bench/bench_decode.py

clean-venv:
	rm -rf $(VENV) $(LOWEST) $(TOOLS)
