# One command sets everything up and runs: `make demo` (the main job on a built-in
# example) or `make test` (the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH := torch==2.13.0
DEMO_OUT ?= demo_out
DATA ?=

.PHONY: install lint format test test-fast demo bench bench-throughput bench-annotate bench-cluster clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	DATA="$(DATA)" bash examples/demo.sh $(DEMO_OUT)

bench: $(STAMP)
	$(BIN)/python bench/preprocess.py

bench-throughput: $(STAMP)
	$(BIN)/python bench/throughput.py

bench-annotate: $(STAMP)
	$(BIN)/python bench/annotate.py --seeds 42,43,44

bench-cluster: $(STAMP)
	$(BIN)/python bench/cluster.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
