# icm-aux: set-up, notebook runs and tests.  Everything runs in the virtualenv .venv, created on
# first use from $(PYTHON) (CI: .ci/run on a clean clone with only python3 available).
#
#   make setup        create .venv if missing and install the suite with its extras (redone when pyproject.toml changes)
#   make setup-mmseg  add MMSegmentation when an mmcv 2.1.0 wheel is at MMCV_WHEEL (../shared/wheels; else a notice)
#   make setup-detectron2  add detectron2 0.6 when its wheel is at D2_WHEEL (../shared/wheels; else a notice)
#   make setup-paper  both paper-exact backends (setup-mmseg + setup-detectron2)
#   make demo         set up, then run notebooks 01-07 with the demo profile (the main job; docs/protocol.md)
#   make study        set up, then protocol v2 with the study profile: notebooks 01 + 11 (learning curves, cosines)
#   make study-rd     set up, then the study's BD-rate part (02, 03, 07: aux-enc vs w/o aux, the MSE positive control);
#                     not funded within make study's budget on a 2-core machine (docs/protocol_outcomes/study_v2.json)
#   make study-seg    set up, then the study's part (d): segmentation's curves and cosines (notebook 11; deviation 8)
#   make extensions   set up, then run the beyond-the-paper notebook 08 (adaptive alpha) on the demo profile
#   make smoke        set up, then run all notebooks (01-12) with the smoke profile (tiny, CPU)
#   make test         set up (+ setup-paper), ruff, unit tests, smoke run, nbval over the executed smoke notebooks
#   make lab          set up, start JupyterLab in notebooks/ (kernel "python3" = .venv's python)
#   make explore      set up, open notebook 12 (the bit-map explorer of finished runs; trains nothing) in JupyterLab
#   make browser-test notebook 12's comparer in headless JupyterLab/Chromium (needs a smoke run, chromium and
#                     chromium-driver)
#   make clean-smoke  remove the smoke outputs (runs/smoke, papermill_runs/smoke)
#
#   any profile or notebook: .venv/bin/python papermill_runs/run.py --profile NAME [--only 09 10] [--list] [--check]
#   extra runner options: make smoke RUN_ARGS="--force --only 03"

PYTHON ?= python3
VENV ?= .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNNER := papermill_runs/run.py
RUN_ARGS ?=
# The main job's profile: demo (the paper's grid in miniature on CPU; icm_helpers/profiles/demo.yaml).
DEMO_PROFILE ?= demo
# The paper's grid (the main job), the study's notebooks and the notebook that goes beyond the paper (08: adaptive
# alpha). 09 (dose-response) and 10 (transfer) have no target: run.py --only 09 10.
MAIN_NOTEBOOKS ?= 01 02 03 04 05 06 07
# protocol v2's order of funding (docs/protocol_v2.md R2v2): the mechanism first, then the BD-rates
STUDY_NOTEBOOKS ?= 01 11
STUDY_RD_NOTEBOOKS ?= 01 02 03 07
EXTENSION_NOTEBOOKS ?= 08
SMOKE_OUT := papermill_runs/smoke
PYTEST := $(VENV_PY) -m pytest -q -p no:cacheprovider

.DEFAULT_GOAL := help
.PHONY: help setup setup-mmseg setup-detectron2 setup-paper demo study study-rd study-seg extensions smoke test lab explore \
	clean-smoke browser-test

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

# --- set-up: venv when missing, editable install with the extras; redone when pyproject changes
$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV_PY)
	$(VENV)/bin/pip install -e ".[notebooks,dev]"
	touch $@

setup: $(STAMP)

# --- optional: MMSegmentation (the paper's segmentation backend) for the DeepLabV3+ port's equivalence test.
# mmseg 1.2.2 needs mmcv 2.1.0, which must be built from source against torch 2.14 (~21 min); a wheel built that way
# (recipe in its README) is used when present at MMCV_WHEEL. Without it, the mmseg tests skip.
MMCV_WHEEL ?= $(firstword $(wildcard ../shared/wheels/mmcv-2.1.0-*.whl))
MMSEG_STAMP := $(VENV)/.mmseg-installed

$(MMSEG_STAMP): $(STAMP)
ifneq ($(MMCV_WHEEL),)
	$(VENV)/bin/pip install "$(MMCV_WHEEL)" mmengine==0.10.7 mmsegmentation==1.2.2 ftfy regex "setuptools<81" "numpy<2" "opencv-python<4.12"
	touch $@
else
	@echo "(no mmcv 2.1.0 wheel at MMCV_WHEEL: the MMSegmentation equivalence tests will be skipped)"
endif

setup-mmseg: $(MMSEG_STAMP)

# --- optional: detectron2 0.6, the paper's detector (Faster R-CNN X101-32x8d-FPN). Not on PyPI; a wheel built from
# source against torch 2.14 for this machine kind (recipe and sha256 in its README) is used when present at D2_WHEEL.
# detectron2.model_zoo imports pkg_resources, hence setuptools<81, installed first with wheel (the README's order).
# Without it, the detectron2 tests skip.
D2_WHEEL ?= $(firstword $(wildcard ../shared/wheels/detectron2-0.6-*.whl))
D2_STAMP := $(VENV)/.detectron2-installed

$(D2_STAMP): $(STAMP)
ifneq ($(D2_WHEEL),)
	$(VENV)/bin/pip install wheel "setuptools<81"
	$(VENV)/bin/pip install "$(D2_WHEEL)" "setuptools<81"
	touch $@
else
	@echo "(no detectron2 0.6 wheel at D2_WHEEL: the detectron2 tests will be skipped)"
endif

setup-detectron2: $(D2_STAMP)

# both paper-exact backends; `make test` installs them, and .ci/run requires their tests to run
setup-paper: setup-mmseg setup-detectron2

# --- runs
demo: $(STAMP)
	$(VENV_PY) $(RUNNER) --profile $(DEMO_PROFILE) --only $(MAIN_NOTEBOOKS) $(RUN_ARGS)

study: $(STAMP)
	$(VENV_PY) $(RUNNER) --profile study --only $(STUDY_NOTEBOOKS) $(RUN_ARGS)

study-rd: $(STAMP)
	$(VENV_PY) $(RUNNER) --profile study --only $(STUDY_RD_NOTEBOOKS) $(RUN_ARGS)

# Protocol v2 part (d), segmentation's curves and cosines (deviation 8): notebook 11 with validation steps set
study-seg: $(STAMP)
	$(VENV_PY) $(RUNNER) --profile study --only 11 --param task=segmentation \
		--set 'tasks.segmentation.validate_at_steps=[0, 10, 30, 100, 300]' $(RUN_ARGS)

extensions: $(STAMP)
	$(VENV_PY) $(RUNNER) --profile $(DEMO_PROFILE) --only $(EXTENSION_NOTEBOOKS) $(RUN_ARGS)

smoke: $(STAMP)
	$(VENV_PY) $(RUNNER) --profile smoke $(RUN_ARGS)

# --- tests: ruff (pyproject's [tool.ruff]), unit tests, then the smoke run, then nbval re-executes the executed smoke
# notebooks (--nbval-lax: only cells marked NBVAL_CHECK_OUTPUT compare outputs; every cell must run).
# Explicit paths on the command line, so pyproject's testpaths does not apply.
# ICM_NO_NETWORK=1: outgoing (non-loopback) connections raise inside every process that imports icm_helpers,
# papermill kernels included (icm_helpers/netguard.py): the tests and the smoke run prove the suite needs no network.
# The unit tests print the 10 slowest, the reasons of every skip (-rs) and a section listing each paper-exact backend
# test (detectron2, MMSeg) with its outcome and time; ICM_REQUIRE_PAPER_BACKENDS=1 (.ci/run) fails their skips.
test: $(STAMP) setup-paper
	$(VENV)/bin/ruff check icm_helpers papermill_runs tests
	ICM_NO_NETWORK=1 $(PYTEST) -m "not browser" -rs --durations=10 tests
	ICM_NO_NETWORK=1 $(VENV_PY) $(RUNNER) --profile smoke
	ICM_NO_NETWORK=1 $(PYTEST) --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg $(SMOKE_OUT)/[0-9]*.ipynb

# --- notebook 12's comparer in JupyterLab driven by Debian's Chromium (tests/test_browser.py; after a smoke run).
# Skips when chromium / chromium-driver (apt) are missing; ICM_REQUIRE_BROWSER=1 makes that an error (.ci/run sets it).
browser-test: $(STAMP)
	ICM_NO_NETWORK=1 $(PYTEST) -m browser -rs -s tests/test_browser.py

# --- JupyterLab of .venv in notebooks/. The notebooks name the kernel "python3" (what papermill, nbval and CI use);
# JUPYTER_PREFER_ENV_PATH=1 makes .venv's kernelspecs win over user-level ones, so "python3" starts .venv's python.
lab: $(STAMP)
	cd notebooks && JUPYTER_PREFER_ENV_PATH=1 "$(abspath $(VENV))/bin/jupyter" lab

# --- the same JupyterLab, opening notebook 12 (set its parameters cell's profile, then Run All)
explore: $(STAMP)
	cd notebooks && JUPYTER_PREFER_ENV_PATH=1 "$(abspath $(VENV))/bin/jupyter" lab 12_explore_bit_maps.ipynb

clean-smoke:
	rm -rf runs/smoke $(SMOKE_OUT)
