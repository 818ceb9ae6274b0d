"""Protocol v2's view of the mechanism (docs/protocol_v2.md): learning curves of the validation main loss on paired
seeds (Q1, the paper's Figs. 8-9 at CPU scale) and the cosine between the auxiliary and the main gradient on the
encoder g_a (Q2).

- ``learning_curves``: trains (or reuses) w/o aux, aux-enc with a competent branch and the control branch (same
  branch, shuffled labels) at the task's ``ablation_lambda`` for the profile's ``curve_seeds``, each validated after
  ``validate_at_steps`` steps; returns every curve and the paired differences (same seed) with t-intervals.
- ``gradient_cosines``: cos(G_aux, G_main) over g_a's parameters, per batch and branch, with the codec's noise and
  the recognizer's sampling drawn the same for every branch of a batch.

Arms and branches are keyed by their method id (``icm_helpers.methods``: ``baseline``, ``aux_enc_warm``,
``aux_enc_warm_shuffled``), in the code and in the profile (``curve_arms``, ``curve_seeds``); the display labels of
:data:`CURVE_ARMS` and :data:`COSINE_BRANCHES` ("w/o aux", "aux-enc", "control", "competent", "random") appear only
in figure text, legends and tables (a curve's ``label``, a difference row's ``pair``, a cosine row's ``branch``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from scipy import stats
from torch import nn

from . import codec as codec_lib
from .aux_branches import keep_random_stream, seed_random_stream
from .io import read_json
from .methods import METHODS, short_name
from .training import IcmSpec, equal_size_batches, icm_terms


@dataclass(frozen=True)
class Arm:
    """An arm of the curves or a branch of the cosines: ``method``, its id in ``methods.METHODS`` (which gives its
    aux position, branch start and labels, and its colour), and ``label``, the text figures and tables show."""

    method: str
    label: str

    def spec(self, ex, task: str, lambda_: float, seed: int) -> IcmSpec:
        """The ICM spec of this arm at ``lambda_`` and training seed ``seed``."""
        m = METHODS[self.method]
        spec = ex.spec(task, lambda_, m.aux_position, aux_init=m.aux_init if m.aux_position else None, seed=seed,
                       aux_labels=m.aux_labels)
        if spec.method != self.method:
            raise ValueError(f"arm {self.method!r} makes runs of method {spec.method!r}: check the profile's "
                             f"tasks.{task}.alpha_mode (the curves use the fixed alpha)")
        return spec


#: the arms of the curves (protocol v2, Q1): w/o aux, aux-enc with the competent (pre-trained) branch, the control
CURVE_ARMS = (Arm("baseline", "w/o aux"), Arm("aux_enc_warm", "aux-enc"), Arm("aux_enc_warm_shuffled", "control"))

#: the branches of the gradient cosines (protocol v2, Q2): the competent (pre-trained), a random (initial) and the
#: control branch, all at the encoder
COSINE_BRANCHES = (Arm("aux_enc_warm", "competent"), Arm("aux_enc", "random"),
                   Arm("aux_enc_warm_shuffled", "control"))

#: the paired differences of the curves, (first arm, second arm) by method id: first minus second
CURVE_PAIRS = (("aux_enc_warm", "baseline"), ("aux_enc_warm_shuffled", "baseline"),
               ("aux_enc_warm", "aux_enc_warm_shuffled"))

#: the cosine difference summarised per codec: competent minus control on the same batches
COSINE_PAIR = ("aux_enc_warm", "aux_enc_warm_shuffled")


def arm_label(method_id: str, arms: Iterable[Arm] = CURVE_ARMS) -> str:
    """The display label of the arm ``method_id`` (its method's short name when ``arms`` does not list it)."""
    return next((a.label for a in arms if a.method == method_id), short_name(method_id))


def _check_arm_keys(task: str, setting: str, keys: Iterable[str]) -> None:
    """An error naming the method id to write for each key of ``tasks.<task>.<setting>`` that is no arm's id (a
    display label such as "w/o aux": the arm's id instead)."""
    ids = [a.method for a in CURVE_ARMS]
    by_label = {a.label: a.method for a in CURVE_ARMS}
    bad = [k for k in keys if k not in ids]
    if bad:
        fixes = "; ".join(f"{k!r} -> {by_label[k]!r}" if k in by_label else f"{k!r} is no arm" for k in bad)
        raise ValueError(f"tasks.{task}.{setting}: arms are keyed by method id ({fixes}); valid: {ids}")


def curve_seeds(ex, task: str) -> dict[str, list[int]]:
    """{arm method id: training seeds} of ``task``'s curves: the profile's ``tasks.<task>.curve_seeds`` (keyed by
    method id), each arm it does not name with the profile's ``train_seeds``."""
    seeds = ex.task_cfg(task).get("curve_seeds") or {}
    _check_arm_keys(task, "curve_seeds", seeds)
    return {a.method: [int(s) for s in seeds.get(a.method, ex.train_seeds())] for a in CURVE_ARMS}


def t_interval(values: Iterable[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean with a Student-t interval over independent values (seeds); one value: no interval (NaN bounds)."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    n = v.size
    mean = float(v.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n, "sd": math.nan}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd}


def curve_specs(ex, task: str) -> list[tuple[str, IcmSpec]]:
    """(arm method id, spec) of every curve run of ``task``: the arms of ``CURVE_ARMS`` the profile asks for
    (``tasks.<task>.curve_arms``: method ids, default all), each for its seeds (:func:`curve_seeds`), at the task's
    ``ablation_lambda``."""
    tc = ex.task_cfg(task)
    lam = float(tc["ablation_lambda"])
    wanted = tc.get("curve_arms") or [a.method for a in CURVE_ARMS]
    _check_arm_keys(task, "curve_arms", wanted)
    seeds = curve_seeds(ex, task)
    return [(arm.method, arm.spec(ex, task, lam, seed)) for arm in CURVE_ARMS if arm.method in wanted
            for seed in seeds[arm.method]]


def learning_curves(ex, task: str, train: bool = True) -> dict[str, Any]:
    """Train (``train=True``) or read the curve runs of ``task``; returns {"curves": {arm method id: {seed: [(step,
    val_main)]}}, "labels": {arm method id: its display label}, "differences": rows of the paired differences per
    step, "lambda_": ...}. Paired: the difference of two arms is taken between runs of the SAME seed (same data
    order, codec noise, recognizer sampling: protocol v2, V7)."""
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for arm, spec in curve_specs(ex, task):
        if train:
            ex.train(spec)
        path = ex.run_path(spec) / "curve.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: train {spec.run_name} (seed {spec.seed}) with "
                                    f"tasks.{task}.validate_at_steps set (notebook 11 does)")
        curves.setdefault(arm, {})[spec.seed] = [(int(p["step"]), float(p["val_main"])) for p in read_json(path)]
    return {"task": task, "lambda_": float(ex.task_cfg(task)["ablation_lambda"]), "curves": curves,
            "labels": {arm: arm_label(arm) for arm in curves}, "differences": paired_differences(curves)}


def paired_differences(curves: dict[str, dict[int, list[tuple[int, float]]]],
                       pairs: Iterable[tuple[str, str]] = CURVE_PAIRS,
                       min_seeds: int = 3) -> list[dict[str, Any]]:
    """Per step and pair of arms (method ids, :data:`CURVE_PAIRS`): the differences (first minus second) over the
    seeds both arms have, with the mean and its 95% t-interval when at least ``min_seeds`` seeds have both (protocol
    v2 section 6: the 2-seed control is reported by its values, no interval claimed; NaN bounds). A row names its
    arms by id (``arms``) and by label (``pair``, "aux-enc - w/o aux")."""
    rows = []
    for a, b in pairs:
        if a not in curves or b not in curves:
            continue
        seeds = sorted(set(curves[a]) & set(curves[b]))
        if not seeds:
            continue
        steps = sorted(set.intersection(*[{s for s, _ in curves[a][k]} & {s for s, _ in curves[b][k]} for k in seeds]))
        for step in steps:
            diffs = [dict(curves[a][k])[step] - dict(curves[b][k])[step] for k in seeds]
            stats_ = t_interval(diffs)
            if len(diffs) < min_seeds:
                stats_.update(low=math.nan, high=math.nan)
            rows.append({"pair": f"{arm_label(a)} - {arm_label(b)}", "arms": [a, b], "step": step, "seeds": seeds,
                         "values": diffs, **stats_})
    return rows


def flat_cosine(g1: list[torch.Tensor | None], g2: list[torch.Tensor | None]) -> tuple[float, float, float]:
    """cos of two gradients over all parameters flattened into one vector (a parameter one of them does not reach
    counts as zero there); also their norms."""
    a = torch.cat([(x if x is not None else torch.zeros_like(y)).flatten() for x, y in zip(g1, g2)
                   if x is not None or y is not None])
    b = torch.cat([(y if y is not None else torch.zeros_like(x)).flatten() for x, y in zip(g1, g2)
                   if x is not None or y is not None])
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan
    return cos, na, nb


def gradient_cosines(codec: nn.Module, recognizer, branches: dict[str, tuple[nn.Module, IcmSpec]],
                     batches: list[torch.Tensor], base_seed: int = 0) -> list[dict[str, Any]]:
    """Per batch and branch: cos(G_aux, G_main) on g_a's parameters (protocol v2 section 5), G_main = grad of the main
    loss (Eq. 4; Eq. 6 without aux), G_aux = grad of lambda alpha E(y, y_hat_aux), codec in training mode. Every
    branch of batch i sees the same codec noise and recognizer sampling (global streams seeded base_seed + i) and the
    same branch stream; nothing is updated (the branch's stream is kept)."""
    params = [p for p in codec.g_a.parameters() if p.requires_grad]
    codec.train()
    rows = []
    for i, x in enumerate(batches):
        labels = recognizer.pseudo_labels(x)
        for name, (branch, spec) in branches.items():
            with keep_random_stream(branch), torch.random.fork_rng():
                torch.manual_seed(base_seed + i)
                seed_random_stream(branch, base_seed + i)
                terms = icm_terms(spec, codec, recognizer, branch, x, labels)
                g_main = torch.autograd.grad(terms["main"], params, retain_graph=True, allow_unused=True)
                g_aux = torch.autograd.grad(spec.lambda_ * spec.alpha * terms["aux"], params, allow_unused=True)
            cos, n_aux, n_main = flat_cosine(list(g_aux), list(g_main))
            rows.append({"batch": i, "branch": name, "cos": cos, "norm_main": n_main, "norm_aux": n_aux})
    codec.zero_grad(set_to_none=True)
    return rows


def cosine_study(ex, task: str, batches_start: int = 40, batches_per_seed: int = 10) -> dict[str, Any]:
    """Q2 of protocol v2 for ``task``: the cosines at the start codec (``batches_start`` fixed training batches) and
    at the w/o-aux codec after the profile's first ``snapshot_steps`` step of each curve seed (``batches_per_seed``
    batches each, other batches per seed), for the competent (warm), random (initial) and control branches."""
    tc = ex.task_cfg(task)
    lam = float(tc["ablation_lambda"])
    seeds = curve_seeds(ex, task)["baseline"]
    recognizer = ex.recognizer(task)
    batch_size = int(tc["train"].get("batch_size", 8))
    need = batches_start + batches_per_seed * len(seeds)
    batches = []
    for b in equal_size_batches(ex.dataset("train", task), batch_size, ex.seed, ex.device):
        batches.append(b["image"])
        if len(batches) == need:
            break
    if len(batches) < need:  # a small training split (smoke): half the batches for the start codec, half for the seeds
        batches_start = len(batches) // 2
        batches_per_seed = max(1, (len(batches) - batches_start) // max(1, len(seeds)))
    seed0 = ex.train_seeds()[0]
    branches = _cosine_branches(ex, task, lam, seed0)
    rows = [{**r, "codec": "start", "seed": None}
            for r in _labelled(gradient_cosines(ex.start_codec(), recognizer, branches, batches[:batches_start]))]
    snapshots = sorted(ex.budget_steps(task).items())  # (fraction, step): the first one is the cosines' codec
    if snapshots:
        fraction, step = snapshots[0]
        for k, seed in enumerate(seeds):
            spec = ex.spec(task, lam, None, seed=int(seed))
            ex.train(spec)
            codec = codec_lib.load_codec(ex.snapshot_path(spec, fraction)).to(ex.device)
            part = batches[batches_start + k * batches_per_seed: batches_start + (k + 1) * batches_per_seed]
            rows += [{**r, "codec": f"w/o aux after {step} steps", "seed": int(seed)}
                     for r in _labelled(gradient_cosines(codec, recognizer, branches, part, base_seed=1000 * (k + 1)))]
    return {"task": task, "lambda_": lam, "rows": rows, "summary": summarise_cosines(rows),
            "batches": {"start": batches_start, "per_seed": batches_per_seed}}


def _labelled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cosine rows of branches keyed by method id: ``branch`` their display label, ``method`` the id."""
    return [{**r, "branch": arm_label(r["branch"], COSINE_BRANCHES), "method": r["branch"]} for r in rows]


def _cosine_branches(ex, task: str, lam: float, seed: int) -> dict[str, tuple[nn.Module, IcmSpec]]:
    """{method id: (branch, spec)} of :data:`COSINE_BRANCHES`: each built from ``seed``, the warm ones pre-trained."""
    codec, recognizer = ex.start_codec(), ex.recognizer(task)
    out = {}
    for arm in COSINE_BRANCHES:
        spec = arm.spec(ex, task, lam, seed)
        branch = ex.build_branch(task, spec.aux_position, seed, codec, recognizer)
        if spec.aux_init == "warm":
            branch.load_state_dict(ex.warm_aux_branch(task, spec.aux_position, seed, spec.aux_labels))
        for p in branch.parameters():
            p.requires_grad_(True)
        out[arm.method] = (branch.train(), spec)
    return out


#: protocol v2, R6v2: the competent branch's validation loss must be below this fraction of the control branch's
COMPETENCE_RATIO = 0.8


def branch_competence(ex, task: str, position: str = "enc", train: bool = True) -> dict[str, Any]:
    """R6v2's competence test of the pre-trained ``position`` branch of ``task`` (profile ``aux_warm_start``): the
    competent branch's final validation loss on the true pseudo-labels against the control branch's (trained as many
    rounds at the same rates on another image's labels: the chance level of this branch). Passes iff the ratio is
    below ``COMPETENCE_RATIO``. ``train=False`` only reads stored branches (FileNotFoundError naming the fix)."""
    wc = ex.task_cfg(task).get("aux_warm_start") or {}
    seed = int(wc.get("seed", ex.train_seeds()[0]))
    out: dict[str, Any] = {"task": task, "position": position, "seed": seed, "variant": wc.get("name") or "",
                           "threshold": COMPETENCE_RATIO}
    for arm, labels in (("competent", "pseudo"), ("control", "shuffled")):
        path = ex.warm_branch_path(task, position, seed, labels)
        if train:
            ex.warm_aux_branch(task, position, seed, labels)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: pre-train it (notebook 11, or branch_competence(train=True))")
        history = codec_lib.load_state(path)["history"]
        timing = read_json(path.parent / "timing.json") if (path.parent / "timing.json").exists() else {}
        out[arm] = {"val_loss": float(history[-1]["val_aux"]), "best_val_loss": min(h["val_aux"] for h in history),
                    "rounds": len(history), "steps": timing.get("steps"), "seconds": timing.get("loop_seconds"),
                    "lr": [float(h["lr"]) for h in history],
                    "val_curve": [float(h["val_aux"]) for h in history]}
    out["ratio"] = out["competent"]["val_loss"] / out["control"]["val_loss"]
    out["passes"] = bool(out["ratio"] < COMPETENCE_RATIO)
    return out


def summarise_cosines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean cosine per (codec, branch) with a 95% t-interval: over the per-seed means where the codec has seeds,
    over batches for the start codec; and the paired difference of :data:`COSINE_PAIR` (competent minus control) on
    the same batches. Branches are told apart by their ``method`` id; each summary row has the branch's label
    (``branch``) and its ids (``methods``: one, or the two of a difference)."""
    out = []
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    for codec_name in codecs:
        part = [r for r in rows if r["codec"] == codec_name]
        seeded = part[0]["seed"] is not None
        by_id: dict[str, list[dict[str, Any]]] = {}
        for r in part:
            by_id.setdefault(r["method"], []).append(r)
        series = {m: (rs[0]["branch"], [m], _unit_means(rs, seeded)) for m, rs in by_id.items()}
        a, b = COSINE_PAIR
        if a in series and b in series:
            series[f"{a} - {b}"] = (f"{series[a][0]} - {series[b][0]}", [a, b],
                                    [x - y for x, y in zip(series[a][2], series[b][2])])
        for label, methods, values in series.values():
            out.append({"codec": codec_name, "branch": label, "methods": methods, "unit": "seed" if seeded else "batch",
                        **t_interval(values)})
    return out


def _unit_means(rows: list[dict[str, Any]], by_seed: bool) -> list[float]:
    if not by_seed:
        return [r["cos"] for r in sorted(rows, key=lambda r: r["batch"])]
    seeds = sorted({r["seed"] for r in rows})
    return [float(np.mean([r["cos"] for r in rows if r["seed"] == s])) for s in seeds]


def time_breakdown(ex, notebook_seconds: dict[str, float], wall_seconds: float | None = None) -> dict[str, Any]:
    """Where a profile's wall time went (protocol v2, V1): ICM training steps (each run's loop minus the validations
    and snapshots inside it), those validations and snapshots, the validations before training, branch pre-training,
    and everything else (evaluation, figures, kernels) as the rest of the notebooks' seconds (``notebook_seconds``,
    e.g. the runner's ``run_status.json``; ``wall_seconds`` instead when the run was interrupted and resumed, since a
    resumed notebook's record counts only its last attempt). Reads the ``timing.json`` files of the run directory."""
    parts = {"icm_training_steps": 0.0, "validation_in_training": 0.0, "validation_before_training": 0.0,
             "snapshots": 0.0, "branch_pretraining": 0.0}
    runs = 0
    for path in sorted(ex.layout.icm_root.glob("*/*/timing.json")):
        t = read_json(path)
        runs += 1
        parts["icm_training_steps"] += t["loop_seconds"] - t["validation_seconds"] - t.get("snapshot_seconds", 0.0)
        parts["validation_in_training"] += t["validation_seconds"]
        parts["snapshots"] += t.get("snapshot_seconds", 0.0)
        parts["validation_before_training"] += t.get("validation_before_training_seconds", 0.0)
    for path in sorted(ex.layout.aux_warm_root.glob("*/*/timing.json")):
        parts["branch_pretraining"] += read_json(path)["loop_seconds"]
    total = float(sum(notebook_seconds.values()) if wall_seconds is None else wall_seconds)
    parts["everything_else"] = total - sum(parts.values())
    return {"total_seconds": total, "icm_runs": runs, "seconds": parts,
            "share": {k: (v / total if total else math.nan) for k, v in parts.items()}}
