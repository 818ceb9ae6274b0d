#!/usr/bin/env python3
"""Apply the pre-registered rules of docs/protocol.md (R1-R6) to a profile, using the start codec and the w/o-aux arm
on VALIDATION data only, and log every measurement they use.

    .venv/bin/python papermill_runs/select_settings.py --profile demo --stage all [--budget-factor 1.45]

``--budget-factor`` defaults to the time budget docs/protocol.md registers for the profile (demo 1.45, study 8.5).

Stages, registered in ``STAGES`` in the order ``--stage all`` runs them; each gets one ``StageContext`` (profile,
command line, outcome, the profile's tasks, the time budget) and writes its outcome into
``docs/protocol_outcomes/<profile>.json``; a finished stage is not redone:

- ``r1``: the start codec's convergence, read from its training history (per-epoch validation loss, Eq. 2).
- ``costs``: measured seconds of one training step per (task, arm), one warm-start step (the real job,
  ``Experiment.warm_aux_branch``), one evaluated test image (bitstream, ``evaluation.decode``, the profile's workers)
  and one bit-map image, with the profile's models.
- ``fixed``: the seconds of the profile's run that do not scale with the steps or the test images.
- ``r2``: steps per ICM model from the costs and the time budget (``--budget-factor`` x the smoke run's
  ``--smoke-seconds``; stage ``fixed``'s seconds included: kernels, world, figures, bootstrap).
- ``r3``: learning rate: w/o aux at the ablation lambda for each candidate; lowest validation main loss.
- ``r4``: lambdas: w/o aux at each ladder lambda; validation bpp and metric; the widest monotone window.
- ``r6``: warm-start length: the branch alone for 8 epochs of 10 steps at R3's lr; the first epoch improving < 5%.
- ``r5``: the test split: the largest multiple of 16 (>= 48) that still fits the budget.

Nothing here trains or evaluates an auxiliary-loss ICM model: the aux branch is only pre-trained alone (R6).
The selection's own runs live in ``runs/<profile>_selection/`` (git-ignored). The paper's learning rates and lambdas
are read from ``icm_helpers/profiles/paper.yaml``.
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

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # started as a script: the repository's icm_helpers, not an installed copy

from icm_helpers.anchors import available, build_anchor, default_qualities  # noqa: E402
from icm_helpers.assets import asset_dir  # noqa: E402
from icm_helpers.bitmaps import compute_bit_maps  # noqa: E402
from icm_helpers.codec import load_codec, load_state  # noqa: E402
from icm_helpers.config import load_profile  # noqa: E402
from icm_helpers.evaluation import EvalOptions, evaluate  # noqa: E402
from icm_helpers.experiment import Experiment  # noqa: E402
from icm_helpers.io import read_json  # noqa: E402
from icm_helpers.training import (  # noqa: E402
    TrainConfig,
    train_aux_branch,
    validation_terms,
)
from papermill_runs.selection import StageContext, StageTable, paper_task_settings, profile_tasks  # noqa: E402

LADDER_POWERS = (-2, -1, 0, 1, 2)  # R4: the paper's smallest lambda x 4^k
LR_FACTORS = (1, 3, 10)  # R3: the paper's learning rate x these
STEPS_PER_EPOCH = 10  # R2 / R6: epochs of 10 steps
WARM_MAX_EPOCHS = 8  # R6
TEST_IMAGES = range(48, 257, 16)  # R5: the test splits it considers; the smallest is taken when none fits
WARM_TIMING_STEPS = (1, 21)  # costs: the real warm-start job is run for 1 epoch of each; see warm_step_seconds
ICM_TIMING_STEPS = (1, 11)  # costs: the real ICM job likewise; see icm_step_seconds
STAGES = StageTable()


def outcome_path(profile: str) -> Path:
    return ROOT / "docs" / "protocol_outcomes" / f"{profile}.json"


def load_outcome(profile: str) -> dict[str, Any]:
    path = outcome_path(profile)
    return json.loads(path.read_text()) if path.exists() else {"profile": profile, "stages": {}}


def selection_root(profile: str) -> Path:
    return ROOT / "runs" / f"{profile}_selection"


def experiment(profile: str, overrides: dict[str, Any] | None = None, log=print, name: str = "main",
               root: Path | None = None):
    """The profile's Experiment in ``<root>/<name>/`` (``root``: ``runs/<profile>_selection/``); every such run dir
    shares one generated world (``data`` is a link to ``runs/<profile>_selection/main/data``)."""
    main = selection_root(profile) / "main"
    ex = Experiment(profile, run_dir=(root or selection_root(profile)) / name, overrides=overrides or {}, log=log)
    if ex.run_dir != main and not ex.data_dir.exists():
        experiment(profile, log=None).prepare_data()
        ex.run_dir.mkdir(parents=True, exist_ok=True)
        ex.data_dir.symlink_to(main / "data", target_is_directory=True)
    ex.prepare_data()
    return ex


def fixed_seconds(ctx: StageContext) -> float:
    """Stage ``fixed``'s seconds of the profile's run that do not scale with the steps or the test images (0 before it
    ran)."""
    return ctx.outcome["stages"].get("fixed", {}).get("fixed_seconds", 0.0)


# ------------------------------------------------------------------------------------------------------------ R1
def convergence(val: list[float]) -> dict[str, Any]:
    """R1: the change of the validation loss over its last 5 epochs, (max - min) / min; converged iff below 1%."""
    last5 = val[-5:]
    change = (max(last5) - min(last5)) / min(last5)
    return {"change_over_last_5_epochs": change, "converged": change < 0.01}


@STAGES.register("r1")
def stage_r1(ctx: StageContext) -> dict[str, Any]:
    """Convergence of the shipped start codec: its training history holds the per-epoch validation loss (Eq. 2)."""
    ex = experiment(ctx.profile)
    path = asset_dir(ex.cfg) / "codec_start.pt"
    history = load_state(path)["extra"].get("history") or []
    val = [h["val_loss"] for h in history if "val_loss" in h]
    if len(val) < 6:
        raise ValueError(f"{path} has no per-epoch validation loss: regenerate it (python -m icm_helpers.regenerate "
                         f"--profile {ctx.profile} --only codec_start)")
    return {"epochs": len(val), "val_loss": val, **convergence(val),
            "rule": "converged iff the validation loss (Eq. 2) over the last 5 epochs changed by less than 1%"}


# ------------------------------------------------------------------------------------------------------------ costs
def step_seconds_between(short: dict[str, Any], long: dict[str, Any]) -> float:
    """Seconds per step from the ``timing.json`` of two runs of one job that differ only in their number of steps: the
    difference of their training loops (``loop_seconds``) over the difference of their ``steps``. What both runs do
    once (the first step, the epoch's validation pass) cancels."""
    return (long["loop_seconds"] - short["loop_seconds"]) / (long["steps"] - short["steps"])


def warm_step_seconds(profile: str, task: str, root: Path) -> float:
    """Seconds of one warm-start step as the profile's run makes them: the real job (``Experiment.warm_aux_branch``,
    the enc branch, seed 0, the profile's ``aux_warm_start`` block) for 1 epoch of each of ``WARM_TIMING_STEPS`` steps,
    side by side (named variants) in the run dir ``root/timing``; ``step_seconds_between`` their ``timing.json``."""
    block = load_profile(profile)["tasks"][task]["aux_warm_start"]
    timings = []
    for steps in WARM_TIMING_STEPS:
        job = {**block, "epochs": 1, "steps_per_epoch": steps, "name": f"timing{steps}"}
        ex = experiment(profile, {f"tasks.{task}.aux_warm_start": job}, log=None, name="timing", root=root)
        batches = len(ex.dataset("train", task)) // int(job["batch_size"])
        if batches < steps:  # an epoch ends with the split: the job would run fewer steps than timing.json says
            raise ValueError(f"{profile}'s training split has {batches} batches of {job['batch_size']}, fewer than "
                             f"the {steps} steps of a timing epoch")
        ex.warm_aux_branch(task, "enc", 0)
        timings.append(read_json(ex.warm_branch_path(task, "enc", 0).parent / "timing.json"))
    return step_seconds_between(*timings)


def icm_step_seconds(profile: str, task: str, position: str | None, root: Path) -> float:
    """Seconds of one ICM training step as the profile's run makes them: the real job (``Experiment.train``: w/o aux
    for ``position`` None, else a cold branch at ``position``, the paper's ablation lambda, seed 0, the profile's
    train block) for 1 epoch of each of ``ICM_TIMING_STEPS`` steps, no validation or snapshots, side by side in the
    run dir ``root/icm_timing``; ``step_seconds_between`` their ``timing.json``."""
    cfg = load_profile(profile)
    block = cfg["tasks"][task]["train"]
    quiet = {f"tasks.{task}.{k}": [] for k in ("validate_at_steps", "budget_fractions", "snapshot_steps")
             if k in cfg["tasks"][task]}  # nothing but training steps inside the loop
    if "validate_every_epoch" in cfg:
        quiet["validate_every_epoch"] = False
    timings = []
    for steps in ICM_TIMING_STEPS:
        over = {f"tasks.{task}.train": {**block, "epochs": 1, "steps_per_epoch": steps}, **quiet}
        ex = experiment(profile, over, log=None, name=f"icm_timing{steps}", root=root)
        batches = len(ex.dataset("train", task)) // int(block["batch_size"])
        if batches < steps:  # an epoch ends with the split: the job would run fewer steps than timing.json says
            raise ValueError(f"{profile}'s training split has {batches} batches of {block['batch_size']}, fewer than "
                             f"the {steps} steps of a timing epoch")
        spec = ex.spec(task, paper_task_settings(task)["ablation_lambda"], position, aux_init="cold")
        ex.train(spec)
        timings.append(read_json(ex.run_path(spec) / "timing.json"))
    return step_seconds_between(*timings)


@STAGES.register("costs")
def stage_costs(ctx: StageContext) -> dict[str, Any]:
    """Seconds per ICM training step (task x arm, the real job), warm-start step (the real job), evaluated image and
    bit-map image."""
    return measure_costs(ctx)


def measure_costs(ctx: StageContext, root: Path | None = None, warm_starts: bool = True) -> dict[str, Any]:
    """``stage_costs`` with the run dir of its Experiment under ``root`` (default: the profile's selection dir) and,
    with ``warm_starts`` False (a profile whose pre-trained branch is shipped), no warm-start step timed (0 s)."""
    ex = experiment(ctx.profile, root=root)
    warm_job = (f"Experiment.warm_aux_branch (enc, seed 0), 1 epoch of each of {list(WARM_TIMING_STEPS)} steps: loop "
                "seconds difference / steps difference" if warm_starts else
                "not timed: the profile installs its shipped pre-trained branch (no pre-training steps)")
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "step": {}, "warm_step": {}, "eval_image": {},
                           "bitmap_image": {}, "anchor_image": {},
                           "step_job": f"Experiment.train (seed 0, cold branch), 1 epoch of each of "
                                       f"{list(ICM_TIMING_STEPS)} steps: loop seconds difference / steps difference",
                           "warm_step_job": warm_job}
    for task in ctx.tasks:
        rec = ex.recognizer(task)
        with tempfile.TemporaryDirectory(prefix=f"icm_timing_{ctx.profile}_") as tmp:
            for arm, pos in (("baseline", None), ("aux_enc", "enc")):
                out["step"][f"{task}/{arm}"] = icm_step_seconds(ctx.profile, task, pos, Path(tmp))
        out["warm_step"][task] = 0.0
        if warm_starts:
            with tempfile.TemporaryDirectory(prefix=f"warm_timing_{ctx.profile}_") as tmp:
                out["warm_step"][task] = warm_step_seconds(ctx.profile, task, Path(tmp))
        ec = ex.cfg["evaluation"]
        n = 16
        t0 = time.perf_counter()
        evaluate(ex.start_codec(), rec, ex.dataset("test"), EvalOptions.from_profile(ec, ex.device, max_images=n))
        out["eval_image"][task] = (time.perf_counter() - t0) / n
        codec = ex.start_codec().eval()
        test = ex.dataset("test")
        t0 = time.perf_counter()
        for i in range(n):
            compute_bit_maps(codec, test[i]["image"])
        out["bitmap_image"][task] = (time.perf_counter() - t0) / n

        t0 = time.perf_counter()
        evaluate(build_anchor("jpeg", 50), rec, ex.dataset("test"), max_images=n, workers=int(ec.get("workers", 1)))
        out["anchor_image"][task] = (time.perf_counter() - t0) / n
    return out


# ------------------------------------------------------------------------------------------------------------ fixed
@STAGES.register("fixed")
def stage_fixed(ctx: StageContext) -> dict[str, Any]:
    """The profile's work that does not scale with the steps or the test images (kernels, the world, figures, the
    bootstrap): the wall time of its notebooks with 4 steps per model, 1 warm-start step and 16 test images, minus
    what the measured costs say those steps and images took."""
    args = ctx.args
    tmp = Path(tempfile.mkdtemp(prefix=f"fixed_{ctx.profile}_"))
    sets = ["evaluation.max_images=16"]
    for task in ctx.tasks:
        sets += [f"tasks.{task}.train.epochs=4", f"tasks.{task}.train.steps_per_epoch=1",
                 f"tasks.{task}.aux_warm_start.epochs=1", f"tasks.{task}.aux_warm_start.steps_per_epoch=1"]
    env = {**os.environ, "ICM_RUNS_DIR": str(tmp / "runs"), "ICM_FIGURES_DIR": str(tmp / "figures")}
    cmd = [sys.executable, str(ROOT / "papermill_runs" / "run.py"), "--profile", ctx.profile, "--out-dir",
           str(tmp / "out"), "--only", *args.notebooks, "--set", *sets]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"the timing run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    ex = experiment(ctx.profile, {k: yaml_value(v) for k, v in (x.split("=", 1) for x in sets)})
    variable = profile_seconds(ex, ctx.outcome["stages"]["costs"], 4, 0, 16, 0.0, args.transfer)
    return {"wall_seconds": wall, "modelled_variable_seconds": variable, "fixed_seconds": max(0.0, wall - variable),
            "notebooks": args.notebooks, "overrides": sets}


def yaml_value(text: str) -> Any:

    return yaml.safe_load(text)


# ------------------------------------------------------------------------------------------------------- cost model
def profile_seconds(ex, costs: dict[str, Any], steps: int, warm_epochs: int, n_test: int, fixed: float,
                    transfer: bool = False) -> float:
    """Estimated wall seconds of the profile's notebooks for ``steps`` per model and ``n_test`` test images
    (``transfer``: notebook 10 evaluates every final model with the other task's recognizer too)."""
    total = fixed
    for task in ex.tasks():
        tc = ex.task_cfg(task)
        lambdas, seeds, inits = len(tc["lambdas"]), len(ex.train_seeds()), ex.aux_inits(task)
        snapshot_fractions = len(tc.get("budget_fractions") or [])  # dose-response snapshots: fractions of the steps
        ablation = [p for p in ex.cfg["ablation"]["positions"] if p in ("dec", "task")]
        models = lambdas * seeds * (1 + len(inits)) + len(ablation) * seeds
        step = (costs["step"][f"{task}/baseline"] + len(inits) * costs["step"][f"{task}/aux_enc"]) / (1 + len(inits))
        total += models * steps * step
        if "warm" in inits:
            total += seeds * warm_epochs * STEPS_PER_EPOCH * costs["warm_step"][task]
        # start, reference, every final model, lambdas more (as budgeted for the demo); ROI on every seed's w/o-aux
        # models (detection)
        evaluations = 2 + models + lambdas + lambdas * seeds * (tc.get("roi_qf") is not None)
        total += evaluations * n_test * costs["eval_image"][task]
        total += snapshot_fractions * lambdas * seeds * (1 + len(inits)) * n_test * costs["eval_image"][task]
        total += (1 + lambdas * 2) * n_test * costs["bitmap_image"][task]  # notebook 06's inside-mask table
        anchors = sum(len(default_qualities(a)) for a in ex.anchor_names() if available(a))
        total += anchors * n_test * costs["anchor_image"][task]  # notebook 04's conventional codecs
        if transfer:
            total += lambdas * seeds * (1 + len(inits)) * n_test * costs["eval_image"][task]
    return total


def choose_steps(seconds_by_steps: dict[int, float], time_budget_seconds: float) -> int:
    """R2 with its deviation 2 (docs/protocol.md): a multiple of 4 epochs when one fits, else the largest number of
    epochs that fits, else one epoch (the overrun is then reported, not hidden)."""
    fitting = [s for s, seconds in seconds_by_steps.items() if seconds <= time_budget_seconds]
    by_four = [s for s in fitting if (s // STEPS_PER_EPOCH) % 4 == 0]
    return max(by_four or fitting or [STEPS_PER_EPOCH])


def choose_test_images(seconds_by_test_images: dict[int, float], time_budget_seconds: float) -> int:
    """R5: the largest test split that fits the time budget; the smallest considered (48) when none does."""
    fitting = [n for n, seconds in seconds_by_test_images.items() if seconds <= time_budget_seconds]
    return max(fitting, default=TEST_IMAGES[0])


# ------------------------------------------------------------------------------------------------------------ R2
@STAGES.register("r2")
def stage_r2(ctx: StageContext) -> dict[str, Any]:
    ex = experiment(ctx.profile)
    costs, fixed = ctx.outcome["stages"]["costs"], fixed_seconds(ctx)
    warm = WARM_MAX_EPOCHS  # R6 comes later: budget the longest warm start
    table = {}
    for epochs in range(1, 41):
        table[epochs * STEPS_PER_EPOCH] = profile_seconds(ex, costs, epochs * STEPS_PER_EPOCH, warm, 48, fixed,
                                                          ctx.args.transfer)
    chosen = choose_steps(table, ctx.time_budget_seconds)
    return {"budget_seconds": ctx.time_budget_seconds, "fixed_seconds": fixed, "estimated_seconds_by_steps": table,
            "steps": chosen, "epochs": chosen // STEPS_PER_EPOCH, "steps_per_epoch": STEPS_PER_EPOCH,
            "fits": table[chosen] <= ctx.time_budget_seconds,
            "rule": "largest multiple of 4 epochs of 10 steps within the budget, else the largest number of epochs "
                    "within it, else 1 epoch (48 test images, the longest warm start; protocol deviation 2)"}


# ------------------------------------------------------------------------------------------------------------ R3 / R4
def _train_baseline(profile: str, overrides: dict[str, Any], task: str, lam: float, name: str) -> tuple[Any, Any]:
    """A w/o-aux model (seed 0) in the run dir ``name`` of its learning rate: R4's model at R3's lambda and chosen lr is
    R3's model (the same job, reused because its settings are identical)."""
    ex = experiment(profile, overrides, log=None, name=name)
    return ex, ex.train(ex.spec(task, lam, None, seed=0))


def budget_fractions(steps: int) -> list[float]:
    """Protocol deviation 5: the dose-response snapshots after the whole steps nearest 1/4 and 1/2 of ``steps``
    (halves rounded up, at least 1 step, distinct, fewer than ``steps``), as fractions of ``steps``."""
    quarter = max(1, int(steps / 4 + 0.5))
    half = max(quarter + 1, int(steps / 2 + 0.5))
    return [round(k / steps, 12) for k in (quarter, half) if k < steps]


def _base_overrides(ctx: StageContext) -> dict[str, Any]:
    r2 = ctx.outcome["stages"]["r2"]
    cfg = load_profile(ctx.profile)
    out = {}
    for task in ctx.tasks:
        out[f"tasks.{task}.train.epochs"] = r2["epochs"]
        out[f"tasks.{task}.train.steps_per_epoch"] = r2["steps_per_epoch"]
        if cfg["tasks"][task].get("budget_fractions"):  # a profile with a dose-response (the study)
            out[f"tasks.{task}.budget_fractions"] = budget_fractions(r2["steps"])
    return out


def lr_candidates(task: str) -> list[float]:
    """R3: the paper's learning rate of ``task`` (paper.yaml) x ``LR_FACTORS``."""
    return [paper_task_settings(task)["lr"] * factor for factor in LR_FACTORS]


def choose_lr(rows: list[dict[str, float]]) -> float:
    """R3: the lowest validation main loss; within 1% of it, the smaller rate."""
    best = min(r["val_main"] for r in rows)
    return min(r["lr"] for r in rows if r["val_main"] <= best * 1.01)


@STAGES.register("r3")
def stage_r3(ctx: StageContext) -> dict[str, Any]:

    out = {}
    for task in ctx.tasks:
        lam, rows = paper_task_settings(task)["ablation_lambda"], []
        for lr in lr_candidates(task):
            ov = {**_base_overrides(ctx), f"tasks.{task}.train.lr": lr}
            ex, final = _train_baseline(ctx.profile, ov, task, lam, f"lr{lr:g}")
            codec = load_codec(final).eval()
            terms = validation_terms(ex.spec(task, lam, None), codec, ex.recognizer(task), None,
                                     ex.dataset("val", task), 8, 0)
            rows.append({"lr": lr, "val_main": terms["main"], "val_rate": terms["rate"], "val_task": terms["task"]})
            ctx.log(f"R3 {task} lr={lr:g}: validation main loss {terms['main']:.5f}")
        out[task] = {"lambda": lam, "candidates": rows, "lr": choose_lr(rows),
                     "rule": "lowest validation main loss; within 1% of the lowest, the smaller lr"}
    return out


def lambda_ladder(task: str) -> list[float]:
    """R4: the paper's smallest lambda of ``task`` (paper.yaml) x 4^k, k in ``LADDER_POWERS``."""
    return [paper_task_settings(task)["lambdas"][0] * 4.0 ** k for k in LADDER_POWERS]


def choose_window(rows: list[dict[str, float]], L: int, paper_lambdas: list[float]) -> tuple[list[dict], dict]:
    """R4: of the windows of ``L`` consecutive ladder rows, those whose validation metric does not decrease with
    lambda; among them (or among all when none is) the widest bpp span; ties: more of the paper's lambdas."""
    windows = []
    for i in range(len(rows) - L + 1):
        w = rows[i: i + L]
        monotone = all(b["val_metric"] >= a["val_metric"] for a, b in zip(w, w[1:]))
        bpps = [r["val_bpp_estimated"] for r in w]
        paper = sum(any(abs(r["lambda"] - p) < 1e-9 for p in paper_lambdas) for r in w)
        windows.append({"lambdas": [r["lambda"] for r in w], "monotone": monotone, "bpp_span": max(bpps) / min(bpps),
                        "paper_lambdas": paper})
    pool = [w for w in windows if w["monotone"]] or windows
    return windows, max(pool, key=lambda w: (round(w["bpp_span"], 9), w["paper_lambdas"]))


@STAGES.register("r4")
def stage_r4(ctx: StageContext) -> dict[str, Any]:

    L = ctx.args.lambdas
    out = {}
    for task in ctx.tasks:
        lr = ctx.outcome["stages"]["r3"][task]["lr"]
        rows = []
        for lam in lambda_ladder(task):
            ov = {**_base_overrides(ctx), f"tasks.{task}.train.lr": lr}
            ex, final = _train_baseline(ctx.profile, ov, task, lam, f"lr{lr:g}")
            val = ex.dataset("val", task)
            ev = evaluate(load_codec(final), ex.recognizer(task), val, bitstream=False,
                          workers=int(ex.cfg["evaluation"].get("workers", 1)))
            rows.append({"lambda": lam, "val_bpp_estimated": ev["bpp_estimated"], "val_metric": ev["metric"],
                         "psnr": ev["psnr"]})
            ctx.log(f"R4 {task} lambda={lam:g}: val bpp {ev['bpp_estimated']:.4f}, {ev['metric_name']} "
                    f"{ev['metric']:.4f}")
        windows, chosen = choose_window(rows, L, paper_task_settings(task)["lambdas"])
        out[task] = {"lr": lr, "ladder": rows, "windows": windows, "lambdas": chosen["lambdas"],
                     "any_monotone_window": any(w["monotone"] for w in windows),
                     "rule": f"{L} consecutive ladder values, metric non-decreasing, widest bpp span; ties: more "
                             "paper lambdas"}
    return out


# ------------------------------------------------------------------------------------------------------------ R6
def warm_epochs(val: list[float]) -> int:
    """R6: the first epoch whose validation loss improved by less than 5% over the previous one; at most 8."""
    for e in range(1, len(val)):
        if (val[e - 1] - val[e]) / val[e - 1] < 0.05:
            return e + 1
    return WARM_MAX_EPOCHS


@STAGES.register("r6")
def stage_r6(ctx: StageContext) -> dict[str, Any]:

    out = {}
    for task in ctx.tasks:
        lr = ctx.outcome["stages"]["r3"][task]["lr"]
        ex = experiment(ctx.profile, log=None)
        codec, rec = ex.start_codec(), ex.recognizer(task)
        aux = ex.build_branch(task, "enc", 0, codec, rec)
        cfg = TrainConfig(epochs=WARM_MAX_EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, batch_size=8, lr=lr, crop_size=None,
                          poly_power=0.0)  # constant lr while the length is measured
        res = train_aux_branch("enc", aux, codec, rec, ex.dataset("train", task), cfg,
                               ex.run_dir / "r6" / f"{task}_warm.pt", val_set=ex.dataset("val", task), seed=0, log=None)
        val = [h["val_aux"] for h in res.history]
        epochs = warm_epochs(val)
        ctx.log(f"R6 {task}: branch validation loss per epoch {[round(v, 4) for v in val]} -> {epochs} epochs")
        out[task] = {"lr": lr, "val_aux_by_epoch": val, "epochs": epochs,
                     "rule": "first epoch whose validation loss improved by < 5% over the previous one; at most 8"}
    return out


# ------------------------------------------------------------------------------------------------------------ R5
@STAGES.register("r5")
def stage_r5(ctx: StageContext) -> dict[str, Any]:
    st = ctx.outcome["stages"]
    ex = experiment(ctx.profile, settings_overrides(ctx, upto="r6"))
    warm = max(st["r6"][t]["epochs"] for t in ctx.tasks)
    table = {n: profile_seconds(ex, st["costs"], st["r2"]["steps"], warm, n, fixed_seconds(ctx), ctx.args.transfer)
             for n in TEST_IMAGES}
    return {"test_images": choose_test_images(table, ctx.time_budget_seconds),
            "estimated_seconds_by_test_images": table, "budget_seconds": ctx.time_budget_seconds,
            "rule": "largest multiple of 16 (>= 48) test images within the budget"}


# ------------------------------------------------------------------------------------------------------------ all
def settings_overrides(ctx: StageContext, upto: str = "r5") -> dict[str, Any]:
    """The profile settings the finished stages decided (what goes into profiles/<profile>.yaml)."""
    st = ctx.outcome["stages"]
    ov: dict[str, Any] = {}
    if "r2" in st:
        ov.update(_base_overrides(ctx))
    for task in ctx.tasks:
        if "r3" in st:
            ov[f"tasks.{task}.train.lr"] = st["r3"][task]["lr"]
        if "r4" in st:
            ov[f"tasks.{task}.lambdas"] = st["r4"][task]["lambdas"]
        if "r6" in st:
            ov[f"tasks.{task}.aux_warm_start.epochs"] = st["r6"][task]["epochs"]
            ov[f"tasks.{task}.aux_warm_start.lr"] = st["r6"][task]["lr"]
    if "r5" in st and upto == "r5":
        ov["evaluation.max_images"] = st["r5"]["test_images"]
    return ov


#: The time budgets docs/protocol.md registers, as multiples of the smoke run of notebooks 01-07.
PROTOCOL_BUDGET_FACTORS = {"demo": 1.45, "study": 8.5}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--stage", default="all", choices=(*STAGES.names(), "all"))
    ap.add_argument("--budget-factor", type=float, default=None,
                    help="time budget as a multiple of the smoke run (default: the protocol's for the profile: "
                         + ", ".join(f"{k} {v}" for k, v in PROTOCOL_BUDGET_FACTORS.items()) + ")")
    ap.add_argument("--smoke-seconds", type=float, default=230.0,
                    help="the smoke run of notebooks 01-07 on this machine")
    ap.add_argument("--notebooks", nargs="+", default=["01", "02", "03", "04", "05", "06", "07"],
                    help="the notebooks of the profile's run (for the timing of its fixed work)")
    ap.add_argument("--lambdas", type=int, default=3, help="R4's number of lambdas (demo 3, study 4)")
    ap.add_argument("--redo", action="store_true", help="redo the selected stage even if logged")
    ap.add_argument("--transfer", action="store_true", help="the profile's run includes notebook 10 (transfer)")
    args = ap.parse_args(argv)
    if args.budget_factor is None:
        if args.profile not in PROTOCOL_BUDGET_FACTORS:
            ap.error(f"--budget-factor is needed for profile {args.profile!r}: the protocol registers a budget only "
                     f"for {', '.join(PROTOCOL_BUDGET_FACTORS)}; give one as a multiple of the smoke run, e.g. 1.45")
        args.budget_factor = PROTOCOL_BUDGET_FACTORS[args.profile]
    ctx = StageContext(profile=args.profile, args=args, outcome=load_outcome(args.profile),
                       outcome_path=outcome_path(args.profile), tasks=profile_tasks(args.profile),
                       budget_factor=args.budget_factor, smoke_seconds=args.smoke_seconds,
                       log=functools.partial(print, flush=True))
    # the time budget, under the key the logged outcomes use
    ctx.outcome["budget"] = {"factor": args.budget_factor, "smoke_seconds": args.smoke_seconds,
                             "notebooks": args.notebooks}
    STAGES.run_logged(args.stage, ctx, args.redo, hidden=("ladder", "windows", "val_loss"))
    ctx.outcome["profile_settings"] = settings_overrides(ctx)
    ctx.save()
    print(json.dumps(ctx.outcome["profile_settings"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
