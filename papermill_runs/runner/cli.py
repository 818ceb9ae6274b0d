"""The command line: ``papermill_runs/run.py --profile NAME [...]`` -> :class:`Options` -> :func:`run`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .batch import run
from .common import DEFAULT_NOTEBOOKS_DIR, DEFAULT_OUT_DIR, DEFAULT_PARAMS_DIR, EXIT_USAGE, RunnerError
from .logs import setup_logging
from .plan import Options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="papermill_runs/run.py",
        description="Execute the NN_*.ipynb notebooks in order with papermill for one parameter profile; "
        "complete, unchanged notebooks are skipped; the first failure stops the run.",
    )
    parser.add_argument(
        "--profile", required=True,
        help="a profile name (params: <params-dir>/<name>.yaml) or a profile YAML file (params: <stem>.params.yaml "
             "beside it, else the notebooks' defaults)",
    )
    parser.add_argument("--force", action="store_true", help="rerun the selected notebooks even if complete")
    parser.add_argument("--only", nargs="+", metavar="NB", help="only these notebooks (numbers like 03, or names)")
    parser.add_argument("--from", dest="start", metavar="NB", help="start at this notebook (number or name)")
    parser.add_argument(
        "--param", action="append", default=[], nargs="+", metavar="KEY=VALUE",
        help="override/add a parameter; the value is parsed as YAML (repeatable)",
    )
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], nargs="+", metavar="KEY=VALUE",
        help="dotted profile setting for every notebook's Experiment, e.g. evaluation.max_images=4 (value parsed as "
             "YAML; repeatable)",
    )
    parser.add_argument("--notebooks-dir", type=Path, default=DEFAULT_NOTEBOOKS_DIR, help="default: <repo>/notebooks")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: <repo>/papermill_runs")
    parser.add_argument(
        "--params-dir", type=Path, default=DEFAULT_PARAMS_DIR, help="default: <repo>/papermill_runs/params"
    )
    parser.add_argument(
        "--kernel", default="auto",
        help="Jupyter kernel name; default 'auto' = a kernel running the interpreter that runs this script",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="per-cell execution timeout (default: none)"
    )
    parser.add_argument(
        "--list", dest="list_only", action="store_true",
        help="show profiles, notebooks and what would run; run nothing",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="pre-flight: data, checkpoints, backends, disk and GPU for this profile and its parameters, one line "
             "each with the fix for a FAIL (exit code 1); runs no notebook",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The runner's command line (``argv``, default ``sys.argv[1:]``) -> its exit code."""
    args = build_parser().parse_args(argv)
    opts = Options(
        profile=args.profile,
        notebooks_dir=args.notebooks_dir,
        out_dir=args.out_dir,
        params_dir=args.params_dir,
        params=[item for group in args.param for item in group],
        sets=[item for group in args.sets for item in group],
        only=args.only,
        start=args.start,
        force=args.force,
        kernel=args.kernel,
        timeout=args.timeout,
        list_only=args.list_only,
        check=args.check,
    )
    setup_logging()
    try:
        return run(opts)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
