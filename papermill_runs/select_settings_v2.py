#!/usr/bin/env python3
"""Apply protocol v2's rules (docs/protocol_v2.md section 4) to the study profile and log what they measured.

    .venv/bin/python papermill_runs/select_settings_v2.py --stage r3v2|costs|r2v2|all [--smoke-seconds S]

Stages, registered in ``STAGES`` in the order ``--stage all`` runs them; each gets one ``StageContext`` (the study
profile, command line, outcome, the tasks, the time budget):

- ``r3v2``: the learning rate. For each candidate (the paper's rate, read from paper.yaml, times 1/10, 1/3, 1), w/o
  aux (seed 0) trains 100 steps (warm-up 10, the profile's schedule otherwise) at the task's ``ablation_lambda``; its
  validation main loss after 100 steps decides: the lowest; within 1% of it, the larger rate.
- ``costs``: seconds per training step of each job kind (w/o aux, aux-enc, MSE, branch pre-training) from short runs
  of the profile's models, and of one validation pass.
- ``r2v2``: the steps: parts (a)-(d) funded in order within the time budget, ``--budget-factor`` x the smoke run's
  seconds.

Only the start codec, the w/o-aux arm and the branch alone are trained; no comparison of arms is made. The runs live
in ``runs/study_v2_selection/`` (git-ignored); the log in ``docs/protocol_outcomes/study_v2.json``.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's icm_helpers, not an installed copy

from icm_helpers.io import read_json  # noqa: E402
from papermill_runs.selection import StageContext, StageTable, paper_task_settings, profile_tasks  # noqa: E402

PROFILE = "study"  # protocol v2 selects the study's settings
OUTCOME = ROOT / "docs" / "protocol_outcomes" / "study_v2.json"
LR_FACTORS = (0.1, 1 / 3, 1.0)  # R3v2
R3_STEPS = 100
CURVE_PARTS = (("a", "detection"), ("d", "segmentation"))  # R2v2: the parts with curves, in the order they are funded
STAGES = StageTable()


def experiment(overrides: dict[str, Any], name: str):
    """The study's Experiment in ``runs/study_v2_selection/<name>/``; every such run dir shares one generated world
    (``data`` links to ``main/data``)."""
    from icm_helpers.experiment import Experiment  # here, not at the top: --help stays fast

    root = ROOT / "runs" / "study_v2_selection"
    ex = Experiment(PROFILE, run_dir=root / name, overrides=overrides)
    if name != "main" and not ex.data_dir.exists():
        Experiment(PROFILE, run_dir=root / "main").prepare_data()
        ex.run_dir.mkdir(parents=True, exist_ok=True)
        ex.data_dir.symlink_to(root / "main" / "data", target_is_directory=True)
    ex.prepare_data()
    return ex


def lr_candidates(task: str) -> list[float]:
    """R3v2: the paper's learning rate of ``task`` (paper.yaml) x ``LR_FACTORS``, to 3 significant digits."""
    paper = paper_task_settings(task)["lr"]
    return [float(f"{paper * f:.3g}") for f in LR_FACTORS]


def choose_lr(rows: list[dict[str, float]]) -> float:
    """R3v2: the lowest validation main loss; within 1% of it, the larger rate."""
    best = min(r["val_main"] for r in rows)
    return max(r["lr"] for r in rows if r["val_main"] <= best * 1.01)


def _short_run_overrides(task: str, lr: float, steps: int) -> dict[str, Any]:
    return {f"tasks.{task}.train.lr": lr, f"tasks.{task}.train.epochs": 1, f"tasks.{task}.train.steps_per_epoch": steps,
            f"tasks.{task}.train.warmup_steps": max(1, steps // 10), f"tasks.{task}.validate_at_steps": [0, steps],
            f"tasks.{task}.snapshot_steps": []}


@STAGES.register("r3v2")
def stage_r3v2(ctx: StageContext) -> dict[str, Any]:
    out = dict(ctx.outcome.get("r3v2") or {})
    for task in ctx.tasks:
        if task in out:
            continue
        rows = []
        for lr in lr_candidates(task):
            ex = experiment(_short_run_overrides(task, lr, R3_STEPS), f"r3v2_{task}_lr{lr:g}")
            spec = ex.spec(task, ex.task_cfg(task)["ablation_lambda"], None, seed=0)
            ex.train(spec)
            curve = read_json(ex.run_path(spec) / "curve.json")
            timing = read_json(ex.run_path(spec) / "timing.json")
            rows.append({"lr": lr, "val_main_step0": curve[0]["val_main"], "val_main": curve[-1]["val_main"],
                         "val_rate": curve[-1]["val_rate"], "val_task": curve[-1]["val_task"],
                         "seconds_per_step": _step_seconds(timing) / R3_STEPS})
            ctx.log(task, rows[-1])
        out[task] = {"rows": rows, "lr": choose_lr(rows),
                     "improves_on_start": min(r["val_main"] for r in rows) < rows[0]["val_main_step0"]}
    return out


def _seconds_per_step(ex, spec, steps: int) -> float:
    ex.train(spec)
    t = read_json(ex.run_path(spec) / "timing.json")
    return _step_seconds(t) / steps


def _step_seconds(timing: dict[str, float]) -> float:
    """Seconds of the training steps of a run: its loop minus the validations and snapshots inside it."""
    return timing["loop_seconds"] - timing["validation_seconds"] - timing.get("snapshot_seconds", 0.0)


@STAGES.register("costs")
def stage_costs(ctx: StageContext) -> dict[str, Any]:
    out = dict(ctx.outcome.get("costs") or {})
    steps = 10
    for task in ctx.tasks:
        if task in out:
            continue
        lr = ctx.outcome["r3v2"][task]["lr"]
        ex = experiment({**_short_run_overrides(task, lr, steps), f"tasks.{task}.aux_warm_start.epochs": 1,
                         f"tasks.{task}.aux_warm_start.steps_per_epoch": steps}, f"costs_{task}")
        lam = ex.task_cfg(task)["ablation_lambda"]
        t0 = time.time()
        ex.warm_aux_branch(task, "enc", 0)  # the real pre-training job, timed from outside as the logged rows were
        branch_step = (time.time() - t0) / steps  # includes loading its models and one validation pass: an upper bound
        row = {
            "wo_aux": _seconds_per_step(ex, ex.spec(task, lam, None, seed=0), steps),
            "aux_enc": _seconds_per_step(ex, ex.spec(task, lam, "enc", aux_init="warm", seed=0), steps),
            "mse": _seconds_per_step(ex, ex.spec(task, ex.cfg["codec"]["lambda_mse"], None, seed=0, objective="mse"),
                                     steps),  # the MSE arm at the start codec's lambda
            "branch": branch_step,
        }
        curve = read_json(ex.run_path(ex.spec(task, lam, None, seed=0)) / "curve.json")
        row["validation"] = sum(p["seconds"] for p in curve) / len(curve)
        out[task] = row
        ctx.log(task, row)
    return out


def fund_parts(outcome: dict[str, Any], time_budget_seconds: float) -> dict[str, Any]:
    """R2v2: parts (a)-(d) in order; a part is funded whole or cut. Steps of (a)/(d) curves: the largest of (1000, 600,
    300) that fits; (a) runs at 300 steps even when that does not fit (the protocol's floor; the overrun is logged);
    (c): the largest of (S_a, 300, 200, 100). Evaluation and fixed costs are estimated from v1's measurements (README)
    and logged as assumptions. A task whose costs were not measured (its selection not run) is not funded."""
    c = outcome["costs"]
    fixed = 120.0  # kernels, world generation, figures (v1: ~2 min outside training and evaluation)
    eval_per_model = 96 * 0.35  # v1: ~0.35 s per test image (bitstream, decode first, 2 workers)
    branch_steps = 1000  # R6v2's cap (the competent and the control branch): an upper bound
    cos_batches, cos_branch = 80, 3
    spent = fixed
    plan: dict[str, Any] = {"budget_seconds": time_budget_seconds}

    def curves(task: str, s: int) -> float:
        k = c[task]
        val = 5 * k["validation"]
        return (4 * s * k["wo_aux"] + 4 * s * k["aux_enc"] + 2 * s * k["aux_enc"] + 10 * val
                + 2 * branch_steps * k["branch"])

    def bd(task: str, s: int, s_a: int) -> float:
        k = c[task]
        lam_models = 2 if s == s_a else 3
        return (4 * lam_models * s * (k["wo_aux"] + k["aux_enc"]) + 12 * s * k["mse"]
                + (4 * 3 * 2 + 12) * eval_per_model)

    for part, task in CURVE_PARTS:
        if part != "a" and spent >= time_budget_seconds:
            plan[part] = {"task": task, "funded": False, "why": "no budget left after the parts before it"}
            break
        if task not in c:
            plan[part] = {"task": task, "funded": False, "why": "its costs were not measured"}
            break
        s_a = next((s for s in (1000, 600, 300) if spent + curves(task, s) <= time_budget_seconds), None)
        if s_a is None and part == "a":
            s_a = 300
            plan["overrun"] = True
        if s_a is None:
            plan[part] = {"task": task, "funded": False, "needs": curves(task, 300),
                          "left": time_budget_seconds - spent}
            break
        spent += curves(task, s_a)
        if part == "a":
            cost_b = cos_batches * cos_branch * 1.5 * c[task]["aux_enc"]
            spent += cost_b
            plan["b"] = {"funded": True, "seconds": cost_b}
        s_c = next((s for s in (s_a, 300, 200, 100) if s <= s_a and spent + bd(task, s, s_a) <= time_budget_seconds),
                   None)
        plan[part] = {"task": task, "funded": True, "curve_steps": s_a, "bd_steps": s_c,
                      "bd_funded": s_c is not None}
        if s_c is not None:
            spent += bd(task, s_c, s_a)
    plan["modelled_seconds"] = spent
    plan["profile_settings"] = profile_settings(outcome.get("r3v2") or {}, plan)
    return plan


@STAGES.register("r2v2")
def stage_r2v2(ctx: StageContext) -> dict[str, Any] | None:
    """``fund_parts`` within the time budget, once: a logged plan is kept (None: nothing to write)."""
    if "r2v2" in ctx.outcome:
        ctx.log(f"r2v2: logged already (delete it from {ctx.outcome_path} to redo)")
        return None
    return fund_parts(ctx.outcome, ctx.time_budget_seconds)


def profile_settings(r3v2: dict[str, Any], plan: dict[str, Any]) -> dict[str, Any]:
    """The study profile's values that the rules decided (``tests/test_select_settings.py`` checks the profile holds
    them): per funded task its lr (R3v2), steps (epochs of 50), warm-up (10%, at least 10) and checkpoints; a task
    whose curves are not funded gets no checkpoints (notebook 11 skips it)."""
    out: dict[str, Any] = {}
    for part, _ in CURVE_PARTS:
        p = plan.get(part) or {}
        task = p.get("task")
        if not task:
            continue
        if not p.get("funded"):
            out[f"tasks.{task}.validate_at_steps"] = []
            continue
        steps = int(p["curve_steps"])
        if task in r3v2:
            out[f"tasks.{task}.train.lr"] = r3v2[task]["lr"]
        out[f"tasks.{task}.train.epochs"] = steps // 50
        out[f"tasks.{task}.train.steps_per_epoch"] = 50
        out[f"tasks.{task}.train.warmup_steps"] = max(10, steps // 10)
        out[f"tasks.{task}.validate_at_steps"] = [n for n in (0, 10, 30, 100, 300, 1000) if n <= steps]
    return out


def main(argv: list[str] | None = None) -> int:
    tasks = profile_tasks(PROFILE)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all", choices=(*STAGES.names(), "all"))
    ap.add_argument("--smoke-seconds", type=float, required=True, help="this machine's smoke run of notebooks 01-07")
    ap.add_argument("--budget-factor", type=float, default=15.0,
                    help="time budget as a multiple of the smoke run (protocol v2: make study <= 15x the smoke run)")
    ap.add_argument("--tasks", nargs="+", default=tasks, choices=tasks,
                    help="tasks to select for (r3v2, costs); the budget funds detection first")
    args = ap.parse_args(argv)
    outcome = read_json(OUTCOME) if OUTCOME.exists() else {"protocol": "docs/protocol_v2.md"}
    outcome["smoke_seconds"] = args.smoke_seconds
    ctx = StageContext(profile=PROFILE, args=args, outcome=outcome, outcome_path=OUTCOME, tasks=args.tasks,
                       budget_factor=args.budget_factor, smoke_seconds=args.smoke_seconds,
                       log=functools.partial(print, flush=True))
    for stage in STAGES.names() if args.stage == "all" else (args.stage,):
        result = STAGES.run(stage, ctx)
        if result is None:
            continue
        ctx.outcome[stage] = result
        ctx.save()
        print(stage, "->", result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
