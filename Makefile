# make train: set up .venv if needed, then train with ds_config.json.
# make test:  set up .venv if needed, then run the whole test suite.
PY      ?= python3
VENV    ?= .venv
# A CPU machine gets torch's CPU build when it is on hand; pass TORCH_SPEC="torch" to take PyPI's default.
TORCH_SPEC ?= torch==2.13.0
ARGS    ?=

BIN := $(VENV)/bin

.PHONY: train test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet ".[dev]"
	touch $@

train: $(BIN)/.installed
	$(BIN)/python cifar10_deepspeed.py $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
