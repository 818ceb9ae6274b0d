"""The one batch runner of the notebook suite: executes ``notebooks/NN_*.ipynb`` with papermill.

Usage (from the repository root; ``make smoke`` / ``make demo`` call it)::

    .venv/bin/python papermill_runs/run.py --profile smoke [--force] [--only 03 05] [--from 04]
        [--param key=value ...] [--set dotted.key=value ...] [--notebooks-dir notebooks] [--out-dir papermill_runs]
        [--params-dir papermill_runs/params] [--kernel NAME] [--timeout SECONDS] [--list] [--check]

* Parameters injected into every notebook: ``<params-dir>/<profile>.yaml`` (a flat YAML mapping)
  + ``profile: <profile>`` + the ``--param`` overrides (values parsed as YAML, never eval'ed)
  + ``overrides``: the ``--set`` dotted profile settings, when given. ``--profile path/to/mine.yaml``: a profile
  file; its ``name`` names the outputs, the parameters come from ``mine.params.yaml`` beside it when there.
  A notebook's parameters cell declares only the parameters it reads; papermill injects every parameter anyway, and
  one a notebook does not declare (``--param alpha=0.3`` for notebook 02) is an unused variable there, logged by
  papermill as "Passed unknown parameter".
* Notebooks ``<notebooks-dir>/[0-9][0-9]_*.ipynb`` run in numeric order, with the notebooks dir as
  working directory; executed copies go to ``<out-dir>/<profile>/<same name>.ipynb``. Which ones: the profile's
  ``notebooks:`` list (the paper profile: 01-07; no list: every notebook), or those named by ``--only`` (any
  notebook); ``--from`` then starts within that selection.
* ``<out-dir>/<profile>/run_status.json`` records, per notebook, status / hashes / timings; a notebook
  that is complete with the same parameters and the same source (and whose executed copy exists) is
  skipped, so rerunning after a failure continues from the failed notebook.
* The first failure stops the run (exit code 1) naming the notebook, the failing cell and the cause;
  the executed copy with the error stays on disk.
* Nothing is written outside ``<out-dir>/<profile>/``.
* ``--check``: the pre-flight checks of ``icm_helpers.preflight`` for the profile and its parameters (device,
  ``--set`` overrides); exit code 1 when one fails. ``--list`` and ``--check`` run no notebook and write nothing.

Exit codes: 0 all selected notebooks complete (or skipped), 1 a notebook failed, 2 bad usage or
configuration (unknown profile, bad parameter, ...), 130 interrupted.

Modules: ``params`` (profiles, params files, ``--param`` / ``--set``), ``notebooks`` (discovery, ``--only`` /
``--from``, source hashes), ``status`` (status file, lock, skip or run), ``kernel`` (kernel resolution), ``plan``
(options, what would run, ``--list``), ``execute`` (papermill, one notebook at a time; imports papermill, so it is
imported only when notebooks run), ``failures`` (the failing cell and cause), ``logs`` (papermill's log on stdout),
``batch`` (:func:`run`), ``cli`` (:func:`main`).
"""
from .batch import run
from .cli import build_parser, main
from .common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, RunnerError
from .kernel import THIS_INTERPRETER_KERNEL, KernelChoice, resolve_kernel, same_interpreter
from .notebooks import discover_notebooks, select_notebooks, source_sha256
from .params import (ProfileChoice, build_params, params_sha256, parse_param_overrides, parse_set_overrides,
                     parse_yaml_value, resolve_profile)
from .plan import Options
from .status import STATUS_FILE, STATUS_VERSION, Decision, decide, load_status, save_status

__all__ = [
    "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "STATUS_FILE", "STATUS_VERSION",
    "THIS_INTERPRETER_KERNEL", "Decision", "KernelChoice", "Options", "ProfileChoice", "RunnerError", "build_params",
    "build_parser", "decide", "discover_notebooks", "load_status", "main", "params_sha256", "parse_param_overrides",
    "parse_set_overrides", "parse_yaml_value", "resolve_kernel", "resolve_profile", "run", "same_interpreter",
    "save_status", "select_notebooks", "source_sha256",
]
