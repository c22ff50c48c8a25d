# igdrec — make install | test | demo | bench-* (see README.md)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU users install their CUDA torch into .venv first (README) and set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.igdrec-installed
RUN_DIR ?= runs/demo

.PHONY: install test demo bench-ig bench-sft bench-decode clean-venv reproduce-table1

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

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
	rm -rf $(VENV)
