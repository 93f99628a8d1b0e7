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

# Every experiment on its real setting (hours on a 2-core CPU; minutes on a GPU). The shared
# recurrent run trains once into runs/experiments/ and is reused; reports go to
# experiments/results/<name>.{md,json,png}.
EXPERIMENTS := e0_language_modelling e1_test_time_scaling e2_fixed_depth_baselines e3_easy_to_hard e4_adaptive_exit \
	e5_cache_sharing e6_continuous_cot e7_latent_trajectories e8_retrofit coconut_prosqa
experiments: $(STAMP)
	cd experiments && for e in $(EXPERIMENTS); do JAX_PLATFORMS=cpu ../$(PY) $$e.py || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
