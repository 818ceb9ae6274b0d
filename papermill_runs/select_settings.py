#!/usr/bin/env python3
"""Apply the pre-registered rules of docs/protocol.md (R1-R6) to a profile, using the start codec and the w/o-aux arm
on VALIDATION data only, and log every measurement they use.

    .venv/bin/python papermill_runs/select_settings.py --profile demo --stage all [--budget-factor 1.45]

``--budget-factor`` defaults to the budget docs/protocol.md registers for the profile (demo 1.45, study 8.5).

Stages (each writes its outcome into ``docs/protocol_outcomes/<profile>.json``; a finished stage is not redone):

- ``r1``: the start codec's convergence, read from its training history (per-epoch validation loss, Eq. 2).
- ``costs``: measured seconds of one training step per (task, arm), one warm-start step, one evaluated test image
  (bitstream, ``evaluation.decode``, the profile's workers) and one bit-map image, with the profile's models.
- ``r2``: steps per ICM model from the costs and the time budget (``--budget-factor`` x the smoke run's
  ``--smoke-seconds``, minus ``--fixed-seconds``: kernels, world, figures, bootstrap).
- ``r3``: learning rate: w/o aux at the ablation lambda for each candidate; lowest validation main loss.
- ``r4``: lambdas: w/o aux at each ladder lambda; validation bpp and metric; the widest monotone window.
- ``r6``: warm-start length: the branch alone for 8 epochs of 10 steps at R3's lr; the first epoch improving < 5%.
- ``r5``: the test split: the largest multiple of 16 (>= 48) that still fits the budget.

Nothing here trains or evaluates an auxiliary-loss ICM model: the aux branch is only pre-trained alone (R6).
The selection's own runs live in ``runs/<profile>_selection/`` (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
from icm_helpers.data import collate  # noqa: E402
from icm_helpers.evaluation import evaluate  # noqa: E402
from icm_helpers.experiment import Experiment  # noqa: E402
from icm_helpers.io import atomic_write_json  # noqa: E402
from icm_helpers.training import (  # noqa: E402
    TrainConfig,
    aux_features,
    clip_groups,
    codec_optimizers,
    codec_step,
    icm_terms,
    train_aux_branch,
    validation_terms,
)

LADDER_POWERS = (-2, -1, 0, 1, 2)  # R4: the paper's smallest lambda x 4^k
LR_FACTORS = (1, 3, 10)  # R3: the paper's learning rate x these
STEPS_PER_EPOCH = 10  # R2 / R6: epochs of 10 steps
WARM_MAX_EPOCHS = 8  # R6
PAPER = {"detection": {"lambdas": [0.4, 0.8, 1.6, 3.2], "lr": 1e-4, "ablation_lambda": 1.6},
         "segmentation": {"lambdas": [1, 2, 4, 8], "lr": 5e-5, "ablation_lambda": 2}}


def outcome_path(profile: str) -> Path:
    return ROOT / "docs" / "protocol_outcomes" / f"{profile}.json"


def load_outcome(profile: str) -> dict[str, Any]:
    path = outcome_path(profile)
    return json.loads(path.read_text()) if path.exists() else {"profile": profile, "stages": {}}


def save_outcome(profile: str, outcome: dict[str, Any]) -> None:

    atomic_write_json(outcome_path(profile), outcome)


def experiment(profile: str, overrides: dict[str, Any] | None = None, log=print, name: str = "main"):
    """The profile's Experiment in ``runs/<profile>_selection/<name>/``; every such run dir shares one generated world
    (``data`` is a link to the first one's)."""
    root = ROOT / "runs" / f"{profile}_selection"
    ex = Experiment(profile, run_dir=root / name, overrides=overrides or {}, log=log)
    shared = root / "main" / "data"
    if name != "main" and not ex.data_dir.exists():
        experiment(profile, log=None).prepare_data()
        ex.run_dir.mkdir(parents=True, exist_ok=True)
        ex.data_dir.symlink_to(shared, target_is_directory=True)
    ex.prepare_data()
    return ex


# ------------------------------------------------------------------------------------------------------------ R1
def stage_r1(profile: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """Convergence of the shipped start codec: its training history holds the per-epoch validation loss (Eq. 2)."""
    ex = experiment(profile)
    path = asset_dir(ex.cfg) / "codec_start.pt"
    history = load_state(path)["extra"].get("history") or []
    val = [h["val_loss"] for h in history if "val_loss" in h]
    if len(val) < 6:
        raise ValueError(f"{path} has no per-epoch validation loss: regenerate it (python -m icm_helpers.regenerate "
                         f"--profile {profile} --only codec_start)")
    last5 = val[-5:]
    change = (max(last5) - min(last5)) / min(last5)
    return {"epochs": len(val), "val_loss": val, "change_over_last_5_epochs": change, "converged": change < 0.01,
            "rule": "converged iff the validation loss (Eq. 2) over the last 5 epochs changed by less than 1%"}


# ------------------------------------------------------------------------------------------------------------ costs
def stage_costs(profile: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """Seconds per training step (task x arm), warm-start step, evaluated image and bit-map image (medians)."""
    ex = experiment(profile)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "step": {}, "warm_step": {}, "eval_image": {},
                           "bitmap_image": {}, "anchor_image": {}}
    train = ex.dataset("train")
    batch = collate([train[i] for i in range(8)])["image"]
    for task in ex.tasks():
        rec = ex.recognizer(task)
        for arm, pos in (("baseline", None), ("aux_enc", "enc")):
            codec = ex.start_codec().train()
            aux = ex.build_branch(task, pos, 0, codec, rec)
            cfg = TrainConfig.from_dict(ex.task_cfg(task)["train"])
            extra = list(aux.parameters()) if aux is not None else []
            opts = codec_optimizers(codec, extra, cfg)
            spec = ex.spec(task, PAPER[task]["ablation_lambda"], pos)
            times = []
            for _ in range(6):
                t0 = time.perf_counter()
                loss = icm_terms(spec, codec, rec, aux, batch)["loss"]
                codec_step(loss, codec, opts, clip_groups(codec, extra), 1.0)
                times.append(time.perf_counter() - t0)
            out["step"][f"{task}/{arm}"] = statistics.median(times[1:])
        codec = ex.start_codec().train()
        aux = ex.build_branch(task, "enc", 0, codec, rec)
        opt = torch.optim.Adam(aux.parameters(), lr=1e-4)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            with torch.no_grad():
                feats, labels, size = aux_features("enc", codec, rec, aux, batch, rec.pseudo_labels(batch))
            loss = aux.loss(feats, labels, size)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        out["warm_step"][task] = statistics.median(times[1:])
        ec = ex.cfg["evaluation"]
        n = 16
        t0 = time.perf_counter()
        evaluate(ex.start_codec(), rec, ex.dataset("test"), bitstream=True, max_images=n,
                 workers=int(ec.get("workers", 1)),
                 decode=ec.get("decode", "all"))
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
def stage_fixed(profile: str, outcome: dict[str, Any], args) -> dict[str, Any]:
    """The profile's work that does not scale with the steps or the test images (kernels, the world, figures, the
    bootstrap): the wall time of its notebooks with 4 steps per model, 1 warm-start step and 16 test images, minus
    what the measured costs say those steps and images took."""
    tmp = Path(tempfile.mkdtemp(prefix=f"fixed_{profile}_"))
    sets = ["evaluation.max_images=16"]
    for task in ("detection", "segmentation"):
        sets += [f"tasks.{task}.train.epochs=4", f"tasks.{task}.train.steps_per_epoch=1",
                 f"tasks.{task}.aux_warm_start.epochs=1", f"tasks.{task}.aux_warm_start.steps_per_epoch=1"]
    env = {**os.environ, "ICM_RUNS_DIR": str(tmp / "runs"), "ICM_FIGURES_DIR": str(tmp / "figures")}
    cmd = [sys.executable, str(ROOT / "papermill_runs" / "run.py"), "--profile", profile, "--out-dir", str(tmp / "out"),
           "--only", *args.notebooks, "--set", *sets]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"the timing run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    ex = experiment(profile, {k: yaml_value(v) for k, v in (x.split("=", 1) for x in sets)})
    variable = profile_seconds(ex, outcome["stages"]["costs"], 4, 0, 16, 0.0, args.transfer)
    return {"wall_seconds": wall, "modelled_variable_seconds": variable, "fixed_seconds": max(0.0, wall - variable),
            "notebooks": args.notebooks, "overrides": sets}


def yaml_value(text: str) -> Any:

    return yaml.safe_load(text)


# ------------------------------------------------------------------------------------------------------------ R2 / R5
def profile_seconds(ex, costs: dict[str, Any], steps: int, warm_epochs: int, n_test: int, fixed: float,
                    transfer: bool = False) -> float:
    """Estimated wall seconds of the profile's notebooks for ``steps`` per model and ``n_test`` test images
    (``transfer``: notebook 10 evaluates every final model with the other task's recognizer too)."""
    total = fixed
    for task in ex.tasks():
        tc = ex.task_cfg(task)
        lambdas, seeds, inits = len(tc["lambdas"]), len(ex.train_seeds()), ex.aux_inits(task)
        budgets = len(tc.get("budget_fractions") or [])
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
        total += budgets * lambdas * seeds * (1 + len(inits)) * n_test * costs["eval_image"][task]  # snapshots
        total += (1 + lambdas * 2) * n_test * costs["bitmap_image"][task]  # notebook 06's inside-mask table
        anchors = sum(len(default_qualities(a)) for a in ex.anchor_names() if available(a))
        total += anchors * n_test * costs["anchor_image"][task]  # notebook 04's conventional codecs
        if transfer:
            total += lambdas * seeds * (1 + len(inits)) * n_test * costs["eval_image"][task]
    return total


def choose_steps(seconds_by_steps: dict[int, float], budget: float) -> int:
    """R2 with its deviation 2 (docs/protocol.md): a multiple of 4 epochs when one fits, else the largest number of
    epochs that fits, else one epoch (the overrun is then reported, not hidden)."""
    fitting = [s for s, seconds in seconds_by_steps.items() if seconds <= budget]
    by_four = [s for s in fitting if (s // STEPS_PER_EPOCH) % 4 == 0]
    return max(by_four or fitting or [STEPS_PER_EPOCH])


def stage_r2(profile: str, outcome: dict[str, Any], args) -> dict[str, Any]:
    ex = experiment(profile)
    costs = outcome["stages"]["costs"]
    budget = args.budget_factor * args.smoke_seconds
    warm = WARM_MAX_EPOCHS  # R6 comes later: budget the longest warm start
    table = {}
    for epochs in range(1, 41):
        table[epochs * STEPS_PER_EPOCH] = profile_seconds(ex, costs, epochs * STEPS_PER_EPOCH, warm, 48,
                                                          args.fixed_seconds, args.transfer)
    chosen = choose_steps(table, budget)
    return {"budget_seconds": budget, "fixed_seconds": args.fixed_seconds, "estimated_seconds_by_steps": table,
            "steps": chosen, "epochs": chosen // STEPS_PER_EPOCH, "steps_per_epoch": STEPS_PER_EPOCH,
            "fits": table[chosen] <= budget,
            "rule": "largest multiple of 4 epochs of 10 steps within the budget, else the largest number of epochs "
                    "within it, else 1 epoch (48 test images, the longest warm start; protocol deviation 2)"}


def stage_r5(profile: str, outcome: dict[str, Any], args) -> dict[str, Any]:
    st = outcome["stages"]
    overrides = settings_overrides(profile, outcome, upto="r6")
    ex = experiment(profile, overrides)
    budget = args.budget_factor * args.smoke_seconds
    table, chosen = {}, 48
    for n in range(48, 257, 16):
        warm = max(st["r6"][t]["epochs"] for t in ex.tasks())
        table[n] = profile_seconds(ex, st["costs"], st["r2"]["steps"], warm, n,
                                   args.fixed_seconds, args.transfer)
        if table[n] <= budget:
            chosen = n
    return {"test_images": chosen, "estimated_seconds_by_test_images": table, "budget_seconds": budget,
            "rule": "largest multiple of 16 (>= 48) test images within the budget"}


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


def _base_overrides(profile: str, outcome: dict[str, Any]) -> dict[str, Any]:
    r2 = outcome["stages"]["r2"]
    cfg = load_profile(profile)
    out = {}
    for task in ("detection", "segmentation"):
        out[f"tasks.{task}.train.epochs"] = r2["epochs"]
        out[f"tasks.{task}.train.steps_per_epoch"] = r2["steps_per_epoch"]
        if cfg["tasks"][task].get("budget_fractions"):  # a profile with a dose-response (the study)
            out[f"tasks.{task}.budget_fractions"] = budget_fractions(r2["steps"])
    return out


def stage_r3(profile: str, outcome: dict[str, Any]) -> dict[str, Any]:

    out = {}
    for task in ("detection", "segmentation"):
        lam, rows = PAPER[task]["ablation_lambda"], []
        for factor in LR_FACTORS:
            lr = PAPER[task]["lr"] * factor
            ov = {**_base_overrides(profile, outcome), f"tasks.{task}.train.lr": lr}
            ex, final = _train_baseline(profile, ov, task, lam, f"lr{lr:g}")
            codec = load_codec(final).eval()
            terms = validation_terms(ex.spec(task, lam, None), codec, ex.recognizer(task), None,
                                     ex.dataset("val", task), 8, 0)
            rows.append({"lr": lr, "val_main": terms["main"], "val_rate": terms["rate"], "val_task": terms["task"]})
            print(f"R3 {task} lr={lr:g}: validation main loss {terms['main']:.5f}", flush=True)
        best = min(r["val_main"] for r in rows)
        chosen = min(r["lr"] for r in rows if r["val_main"] <= best * 1.01)
        out[task] = {"lambda": lam, "candidates": rows, "lr": chosen,
                     "rule": "lowest validation main loss; within 1% of the lowest, the smaller lr"}
    return out


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


def stage_r4(profile: str, outcome: dict[str, Any], args) -> dict[str, Any]:

    L = args.lambdas
    out = {}
    for task in ("detection", "segmentation"):
        lr = outcome["stages"]["r3"][task]["lr"]
        ladder = [PAPER[task]["lambdas"][0] * 4.0 ** k for k in LADDER_POWERS]
        rows = []
        for lam in ladder:
            ov = {**_base_overrides(profile, outcome), f"tasks.{task}.train.lr": lr}
            ex, final = _train_baseline(profile, ov, task, lam, f"lr{lr:g}")
            val = ex.dataset("val", task)
            ev = evaluate(load_codec(final), ex.recognizer(task), val, bitstream=False,
                          workers=int(ex.cfg["evaluation"].get("workers", 1)))
            rows.append({"lambda": lam, "val_bpp_estimated": ev["bpp_estimated"], "val_metric": ev["metric"],
                         "psnr": ev["psnr"]})
            print(f"R4 {task} lambda={lam:g}: val bpp {ev['bpp_estimated']:.4f}, {ev['metric_name']} "
                  f"{ev['metric']:.4f}", flush=True)
        windows, chosen = choose_window(rows, L, PAPER[task]["lambdas"])
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


def stage_r6(profile: str, outcome: dict[str, Any]) -> dict[str, Any]:

    out = {}
    for task in ("detection", "segmentation"):
        lr = outcome["stages"]["r3"][task]["lr"]
        ex = experiment(profile, log=None)
        codec, rec = ex.start_codec(), ex.recognizer(task)
        aux = ex.build_branch(task, "enc", 0, codec, rec)
        cfg = TrainConfig(epochs=WARM_MAX_EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, batch_size=8, lr=lr, crop_size=None,
                          poly_power=0.0)  # constant lr while the length is measured
        res = train_aux_branch("enc", aux, codec, rec, ex.dataset("train", task), cfg,
                               ex.run_dir / "r6" / f"{task}_warm.pt", val_set=ex.dataset("val", task), seed=0, log=None)
        val = [h["val_aux"] for h in res.history]
        epochs = warm_epochs(val)
        print(f"R6 {task}: branch validation loss per epoch {[round(v, 4) for v in val]} -> {epochs} epochs",
              flush=True)
        out[task] = {"lr": lr, "val_aux_by_epoch": val, "epochs": epochs,
                     "rule": "first epoch whose validation loss improved by < 5% over the previous one; at most 8"}
    return out


# ------------------------------------------------------------------------------------------------------------ all
def settings_overrides(profile: str, outcome: dict[str, Any], upto: str = "r5") -> dict[str, Any]:
    """The profile settings the finished stages decided (what goes into profiles/<profile>.yaml)."""
    st = outcome["stages"]
    ov: dict[str, Any] = {}
    if "r2" in st:
        ov.update(_base_overrides(profile, outcome))
    for task in ("detection", "segmentation"):
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


STAGES = ("r1", "costs", "fixed", "r2", "r3", "r4", "r6", "r5")
#: The time budgets docs/protocol.md registers, as multiples of the smoke run of notebooks 01-07.
PROTOCOL_BUDGET_FACTORS = {"demo": 1.45, "study": 8.5}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--stage", default="all", choices=(*STAGES, "all"))
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
    outcome = load_outcome(args.profile)
    args.fixed_seconds = outcome["stages"].get("fixed", {}).get("fixed_seconds", 0.0)
    outcome["budget"] = {"factor": args.budget_factor, "smoke_seconds": args.smoke_seconds, "notebooks": args.notebooks}
    for stage in STAGES if args.stage == "all" else (args.stage,):
        if stage in outcome["stages"] and not args.redo:
            print(f"{stage}: logged already")
            continue
        t0 = time.time()
        fn = globals()[f"stage_{stage}"]
        result = fn(args.profile, outcome, args) if stage in ("fixed", "r2", "r4", "r5") else fn(args.profile, outcome)
        if stage == "fixed":
            args.fixed_seconds = result["fixed_seconds"]
        outcome["stages"][stage] = {**result, "seconds": round(time.time() - t0, 1)}
        save_outcome(args.profile, outcome)
        shown = {k: v for k, v in result.items() if k not in ("ladder", "windows", "val_loss")}
        print(f"{stage}: {json.dumps(shown)[:600]}")
    outcome["profile_settings"] = settings_overrides(args.profile, outcome)
    save_outcome(args.profile, outcome)
    print(json.dumps(outcome["profile_settings"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
