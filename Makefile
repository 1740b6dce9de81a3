# Two commands do all the set-up on a fresh machine (see README.md):
#   make demo   # trains the embedded default on CPU, then evaluates, samples and exports
#   make test   # lint + the fast test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow lint bench

$(BIN)/.installed: requirements/cpu.lock requirements/test.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -r requirements/cpu.lock -r requirements/test.lock 2>&1 | grep -v 'is ignored: it is neither' || true
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v 'is ignored: it is neither' || true
	$(BIN)/python -c 'import tf_denseflow, tensorflow_probability, keras, tensorflow_datasets'
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check tf_denseflow tests benchmarks
	$(BIN)/ruff format --check tf_denseflow tests benchmarks

test: lint
	$(BIN)/python -m pytest -q tests

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

# TF_CPP_MIN_LOG_LEVEL=2 hides TensorFlow's C++ notices (read at import; `-v=0` shows INFO logs).
demo: setup
	TF_CPP_MIN_LOG_LEVEL=$${TF_CPP_MIN_LOG_LEVEL:-2} $(BIN)/python -m tf_denseflow.train --workdir=runs/default

bench: setup
	$(BIN)/python -m tf_denseflow.bench --preset=small --image_size=32 --batch_size=16 --json=runs/bench_small.json
