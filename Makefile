# icm-aux: set-up, notebook runs and tests.  Everything runs in the virtualenv .venv, created on
# first use from $(PYTHON) (CI: .ci/run on a clean clone with only python3 available).
#
#   make demo         set up, then run the notebooks with the demo profile (the main job)
#   make smoke        set up, then run the notebooks with the smoke profile (tiny, CPU)
#   make test         set up, unit tests, smoke run, nbval over the executed smoke notebooks
#   make lab          set up, install the "icm-aux" kernel into .venv, start JupyterLab in notebooks/
#   make clean-smoke  remove the smoke outputs (runs/smoke, papermill_runs/smoke)
#
# Extra runner options: make smoke RUN_ARGS="--force --only 03"

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNNER := papermill_runs/run.py
RUN_ARGS ?=
# The main job's profile.  It becomes `demo` when papermill_runs/params/demo.yaml lands.
DEMO_PROFILE ?= smoke
SMOKE_OUT := papermill_runs/smoke
PYTEST := $(VENV_PY) -m pytest -q -p no:cacheprovider

.DEFAULT_GOAL := help
.PHONY: help setup demo smoke test lab clean-smoke

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

# --- set-up: venv when missing, editable install with the extras; redone when pyproject changes
$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV_PY)
	$(VENV)/bin/pip install -e ".[notebooks,dev]"
	touch $@

setup: $(STAMP)

# --- runs
demo: $(STAMP)
	$(VENV_PY) $(RUNNER) --profile $(DEMO_PROFILE) $(RUN_ARGS)

smoke: $(STAMP)
	$(VENV_PY) $(RUNNER) --profile smoke $(RUN_ARGS)

# --- tests: unit tests, then the smoke run, then nbval re-executes the executed smoke notebooks
# (--nbval-lax: only cells marked NBVAL_CHECK_OUTPUT compare outputs; every cell must run).
# Explicit paths on the command line, so pyproject's testpaths does not apply.
test: $(STAMP)
	$(PYTEST) tests
	$(VENV_PY) $(RUNNER) --profile smoke
	$(PYTEST) --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg $(SMOKE_OUT)/[0-9]*.ipynb

# --- JupyterLab with a kernel named icm-aux that runs .venv's python
lab: $(STAMP)
	$(VENV_PY) -m ipykernel install --sys-prefix --name icm-aux --display-name "Python (icm-aux)"
	cd notebooks && "$(abspath $(VENV))/bin/jupyter" lab

clean-smoke:
	rm -rf runs/smoke $(SMOKE_OUT)
