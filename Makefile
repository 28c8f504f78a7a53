# `make demo`: set up .venv if needed, then run the main job on the embedded default.
# `make test`: set up .venv if needed, then run the test suite.
# `make test-fast`: the tests that start no processes (no torchrun, no launcher runs): about a minute.
# `make mutations`: every tests/mutations_*.py (breakages that a test must catch; long: an hour or more).
# `make lint`: ruff's checks (pyflakes, imports, pycodestyle, shadowed builtins), as pyproject.toml configures them.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint mutations clean

setup: $(STAMP)

$(STAMP): requirements-ci.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-ci.txt
	touch $(STAMP)

demo: setup
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not processes" tests

mutations: setup
	status=0; for script in tests/mutations_*.py; do $(PY) $$script || status=1; done; exit $$status

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf demo_out runs
