# flowlab: `make demo` runs the quick-start study, `make test` runs the test suite.
# Both create .venv (Python 3.11) and install flowlab into it when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
# A CPU build of torch lies on disk on our machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flowlab-installed
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-all lint bench studies install clean

$(PY):
	@test -n "$(PYTHON)" || { echo "make: no python3.11 found (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowlab run studies/quickstart.toml --overwrite && $(VENV)/bin/flowlab report runs/quickstart

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check flowlab tests studies

bench: $(STAMP)
	$(PY) -m flowlab.bench sgd

# Every results/ folder from scratch: each study script in studies/ (two at a time, one thread each;
# wall times in results/STUDIES.md), then the benchmarks alone (results/bench/bench.md).
studies: $(STAMP)
	$(PY) -m flowlab.studykit --jobs 2
	$(VENV)/bin/flowlab bench

clean:
	rm -rf $(VENV) runs
