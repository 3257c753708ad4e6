# make train:     set up .venv if needed, then train with ds_config.json.
# make test:      set up .venv if needed, then run the whole test suite.
# make gpu-test:  the GPU tests (pytest -m gpu) with GPU_PY, a Python whose torch has CUDA (default python3).
# make gpu-check: scripts/gpu_check.sh OUT_DIR=gpu-check: every GPU figure in one sitting.
PY      ?= python3
VENV    ?= .venv
# A CPU machine gets torch's CPU build when it is on hand; pass TORCH_SPEC="torch" to take PyPI's default.
TORCH_SPEC ?= torch==2.13.0
ARGS    ?=
GPU_PY  ?= python3
OUT_DIR ?= gpu-check

BIN := $(VENV)/bin

.PHONY: train test gpu-test gpu-check lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet ".[dev]"
	touch $@

train: $(BIN)/.installed
	$(BIN)/python cifar10_deepspeed.py $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=25 tests

gpu-test:
	$(GPU_PY) -m pytest -q -m gpu tests

gpu-check:
	PYTHON=$(GPU_PY) scripts/gpu_check.sh $(OUT_DIR)

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
