# Set-up is offline-friendly: torch is pinned to the CPU wheel available here only
# when no torch is installed yet; any torch >= 2.2 already present is kept.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Empty: ../shared/data/cifar10-jpeg when present, else CIFAR-10 downloaded into ./data.
DATA ?=
# Extra pytest options, e.g. make test PYTEST_ARGS="--random-order" (shuffled order)
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "torchattacks>=3.5"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/hahnet reproduce --preset demo --out runs/demo $(if $(DATA),--data $(DATA))

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/hahnet bench

clean:
	rm -rf $(VENV) src/*.egg-info .pytest_cache
