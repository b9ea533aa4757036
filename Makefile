# Two entry points: `make demo` and `make test`. Each builds its own .venv with pinned
# dependencies; torch is installed first so that the CPU wheel satisfies `torch>=`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: venv demo test test-fast bench clean

$(BIN)/bida: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/bida

venv: $(BIN)/bida

demo: venv
	$(BIN)/bida demo

# The suite runs in PYTEST_WORKERS processes (pytest-xdist) of one thread each: on 2 cores
# about twice as fast as one process of two threads; PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal

# Everything but the tests marked slow (whole runs, torchrun, every config): about a minute.
test-fast: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not slow"

bench: venv
	$(BIN)/python benchmarks/method_extras.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/evaluation.py

clean:
	rm -rf $(VENV) runs .pytest_cache
