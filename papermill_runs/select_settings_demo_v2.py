#!/usr/bin/env python3
"""Apply protocol v2's demo rule R2d (docs/protocol_v2.md section 9) to the demo profile and log what it measured.

    .venv/bin/python papermill_runs/select_settings_demo_v2.py --stage costs|fixed|r2d|all --smoke-seconds S

Stages, registered in ``STAGES`` in the order ``--stage all`` runs them (one ``StageContext`` each):

- ``costs``: v1's cost measurement (``select_settings.stage_costs``: seconds per training step of each task x arm,
  per evaluated image, bit-map image and anchor image) on the demo's v2 settings. No warm-start step is timed: the
  branch is shipped, so the demo pre-trains nothing. (The logged outcome was measured when ``stage_costs`` timed a
  hand-written copy of the ICM step; it now times the real job, ``select_settings.icm_step_seconds``.)
- ``fixed``: the seconds of notebooks 01-07 that do not scale with the steps or the test images: their wall time with
  4 steps per model and 16 test images, minus what the measured costs say those took (v1's ``fixed`` stage, without
  its warm-start override: the shipped branch is installed as in the real run).
- ``r2d``: S = the largest of ``STEP_CANDIDATES`` whose modelled wall time (v1's ``profile_seconds``) is within
  ``--budget-factor`` (1.45) x the smoke run's seconds; 20 with the overrun reported when none is.

Only timing runs: the costs stage trains a few steps of each arm and reads no loss. Runs live in
``runs/demo_v2_selection/`` (git-ignored); the log in ``docs/protocol_outcomes/demo_v2.json``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's icm_helpers, not an installed copy

from papermill_runs import select_settings as v1  # noqa: E402
from papermill_runs.selection import StageContext, StageTable, profile_tasks  # noqa: E402

PROFILE = "demo"
OUTCOME = ROOT / "docs" / "protocol_outcomes" / "demo_v2.json"
STEP_CANDIDATES = (60, 50, 40, 30, 20)  # R2d, largest first
FALLBACK_STEPS = 20
BUDGET_FACTOR = 1.45  # section 9: v1's registered factor for the demo (the limit is 1.6)
TIMING_STEPS, TIMING_IMAGES = 4, 16  # the fixed stage's run
STAGES = StageTable()


def warmup_steps(steps: int) -> int:
    """V2: the linear warm-up lasts max(10, S / 10) steps."""
    return max(10, round(steps / 10))


def choose_steps(seconds_by_steps: dict[int, float], time_budget_seconds: float) -> int:
    """R2d: the largest candidate whose modelled seconds fit the budget, else ``FALLBACK_STEPS``."""
    fitting = [s for s, seconds in seconds_by_steps.items() if seconds <= time_budget_seconds]
    return max(fitting, default=FALLBACK_STEPS)


def step_overrides(tasks: list[str], steps: int) -> dict[str, Any]:
    """The profile settings of S steps: one epoch of S steps and its warm-up, per task."""
    out: dict[str, Any] = {}
    for task in tasks:
        out[f"tasks.{task}.train.epochs"] = 1
        out[f"tasks.{task}.train.steps_per_epoch"] = steps
        out[f"tasks.{task}.train.warmup_steps"] = warmup_steps(steps)
    return out


def _experiment(overrides: dict[str, Any] | None = None):
    """The demo's Experiment in the v2 selection's run dir (its world is generated once there)."""
    from icm_helpers.experiment import Experiment  # here, not at the top: --help stays fast

    ex = Experiment(PROFILE, run_dir=ROOT / "runs" / "demo_v2_selection" / "main", overrides=overrides or {}, log=None)
    ex.prepare_data()
    return ex


@STAGES.register("costs")
def stage_costs(ctx: StageContext) -> dict[str, Any]:
    """v1's costs stage on the v2 settings, in this selection's run dir, without the warm-start timing (the branch
    is shipped: nothing is pre-trained)."""
    return v1.measure_costs(ctx, root=ROOT / "runs" / "demo_v2_selection", warm_starts=False)


@STAGES.register("fixed")
def stage_fixed(ctx: StageContext) -> dict[str, Any]:
    """Notebooks 01-07 with ``TIMING_STEPS`` steps per model and ``TIMING_IMAGES`` test images in a fresh run dir,
    minus the modelled seconds of those steps and images."""
    tmp = Path(tempfile.mkdtemp(prefix="fixed_demo_v2_"))
    over = {**step_overrides(ctx.tasks, TIMING_STEPS), "evaluation.max_images": TIMING_IMAGES}
    sets = [f"{k}={v}" for k, v in over.items()]
    env = {**os.environ, "ICM_RUNS_DIR": str(tmp / "runs"), "ICM_FIGURES_DIR": str(tmp / "figures")}
    cmd = [sys.executable, str(ROOT / "papermill_runs" / "run.py"), "--profile", PROFILE, "--out-dir",
           str(tmp / "out"), "--only", *ctx.args.notebooks, "--set", *sets]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"the timing run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    costs = ctx.outcome["stages"]["costs"]
    variable = v1.profile_seconds(_experiment(over), costs, TIMING_STEPS, 0, TIMING_IMAGES, 0.0)
    return {"wall_seconds": wall, "modelled_variable_seconds": variable, "fixed_seconds": max(0.0, wall - variable),
            "notebooks": ctx.args.notebooks, "overrides": sets}


@STAGES.register("r2d")
def stage_r2d(ctx: StageContext) -> dict[str, Any]:
    costs, fixed = ctx.outcome["stages"]["costs"], ctx.outcome["stages"]["fixed"]["fixed_seconds"]
    n_test = int(_experiment().cfg["evaluation"]["max_images"])
    table = {s: v1.profile_seconds(_experiment(step_overrides(ctx.tasks, s)), costs, s, 0, n_test, fixed)
             for s in STEP_CANDIDATES}
    chosen = choose_steps(table, ctx.time_budget_seconds)
    return {"budget_seconds": ctx.time_budget_seconds, "fixed_seconds": fixed, "test_images": n_test,
            "estimated_seconds_by_steps": table, "steps": chosen, "warmup_steps": warmup_steps(chosen),
            "fits": table.get(chosen, float("inf")) <= ctx.time_budget_seconds,
            "rule": f"the largest of {list(STEP_CANDIDATES)} steps whose modelled make-demo seconds are within "
                    f"the budget, else {FALLBACK_STEPS} (protocol v2 section 9, R2d)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", default="all", choices=(*STAGES.names(), "all"))
    ap.add_argument("--smoke-seconds", type=float, required=True,
                    help="the smoke run of notebooks 01-07 on this machine (seconds)")
    ap.add_argument("--budget-factor", type=float, default=BUDGET_FACTOR)
    ap.add_argument("--notebooks", nargs="+", default=["01", "02", "03", "04", "05", "06", "07"])
    ap.add_argument("--redo", action="store_true", help="redo the selected stage even if logged")
    args = ap.parse_args(argv)
    args.transfer = False
    outcome = json.loads(OUTCOME.read_text()) if OUTCOME.exists() else {"profile": PROFILE, "stages": {}}
    ctx = StageContext(profile=PROFILE, args=args, outcome=outcome, outcome_path=OUTCOME,
                       tasks=profile_tasks(PROFILE), budget_factor=args.budget_factor,
                       smoke_seconds=args.smoke_seconds, log=functools.partial(print, flush=True))
    ctx.outcome["budget"] = {"factor": args.budget_factor, "smoke_seconds": args.smoke_seconds,
                             "notebooks": args.notebooks}
    STAGES.run_logged(args.stage, ctx, args.redo)
    if "r2d" in ctx.outcome["stages"]:
        ctx.outcome["profile_settings"] = step_overrides(ctx.tasks, ctx.outcome["stages"]["r2d"]["steps"])
        ctx.save()
        print(json.dumps(ctx.outcome["profile_settings"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
