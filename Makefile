# `make test` and `make demo` work on a fresh machine with only Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo experiments clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The main job on the embedded default: train configs/demo.yaml, evaluate accuracy vs r, write
# runs/demo/results.md and runs/demo/accuracy_vs_r.png. Re-running resumes or reuses the run.
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m rdlm demo configs/demo.yaml

# pytest exits 5 when it collects nothing: make treats that as failure, as it should.
# Two workers: most test time is XLA compilation, which runs on one core per process.
test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
