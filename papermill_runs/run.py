#!/usr/bin/env python3
"""Entry script of the notebook batch runner; the code and its documentation: :mod:`papermill_runs.runner`.

    .venv/bin/python papermill_runs/run.py --profile smoke [--force] [--only 03 05] [--from 04] [--list] ...
"""
import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:  # started as a script, sys.path[0] is papermill_runs/ itself
    sys.path.insert(0, REPO_ROOT)

try:
    from papermill_runs.runner import main
except ModuleNotFoundError as _exc:  # a third-party package missing: the wrong interpreter
    if not _exc.name or _exc.name.split(".")[0] in ("papermill_runs", "icm_helpers"):
        raise
    sys.exit(
        f"error: {_exc.name} is not installed for {sys.executable}; run the runner with the project's "
        "virtualenv (.venv/bin/python papermill_runs/run.py ..., or `make smoke`)"
    )

if __name__ == "__main__":
    sys.exit(main())
