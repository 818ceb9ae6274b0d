"""Auxiliary branches pre-trained alone (``aux_init="warm"``): built, pre-trained once, stored, reused.

A task's pre-training is its profile block ``tasks.<task>.aux_warm_start``: a train block (``TrainConfig``) plus the
keys that are not training settings (:data:`BLOCK_KEYS`): ``plateau`` (stop when the validation loss plateaus,
protocol v2 R6v2; with ``decays``, first divide the rate that many times, R6v2b), ``seed`` (one pre-training shared
by every training seed) and ``name`` (a variant's folder suffix, so that variants live side by side). Its identity
(:func:`warm_config`) is the block without the speed knobs; a stored branch pre-trained with another identity is
refused, never reused (:func:`warm_path`). The branch lives under ``aux_warm/`` (``RunLayout.warm_branch_path``):
``branch.pt`` (state dict, identity, labels, history), ``history.json`` and ``timing.json``.

Every function takes the ``Experiment`` whose profile, layout, start models and datasets it uses;
``Experiment.warm_aux_branch``, ``warm_branch_path`` and ``build_branch`` call them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import codec as codec_lib
from . import distributed as dist_lib
from .assets import install_matching
from .aux_branches import build_aux_branch, seed_random_stream
from .io import atomic_torch_save, atomic_write_json
from .training import LrScale, TrainConfig, stopping, train_aux_branch

#: the keys of an ``aux_warm_start`` block that are not ``TrainConfig`` settings
BLOCK_KEYS = ("plateau", "seed", "name")


@dataclass(frozen=True)
class PretrainingBlock:
    """An ``aux_warm_start`` block split into its training settings and the keys of :data:`BLOCK_KEYS`."""

    train: TrainConfig
    plateau: dict[str, Any] | None
    seed: int | None
    name: str | None

    @classmethod
    def parse(cls, block: dict[str, Any]) -> "PretrainingBlock":
        settings = {k: v for k, v in block.items() if k not in BLOCK_KEYS}
        seed = block.get("seed")
        return cls(TrainConfig.from_dict(settings), block.get("plateau"), None if seed is None else int(seed),
                   block.get("name"))


def warm_block(ex, task: str) -> dict[str, Any]:
    """The profile's ``tasks.<task>.aux_warm_start`` block; an error naming the setting when there is none."""
    block = dict(ex.task_cfg(task).get("aux_warm_start") or {})
    if not block:
        raise ValueError(
            f"aux_init='warm' needs tasks.{task}.aux_warm_start (a train block: epochs, lr, ...) in the profile"
        )
    return block


def warm_config(ex, task: str) -> dict[str, Any]:
    """The identity of a task's branch pre-training: its ``aux_warm_start`` block without the speed knobs."""
    return TrainConfig.without_speed_knobs(dict(ex.task_cfg(task).get("aux_warm_start") or {}))


def warm_path(ex, task: str, position: str, seed: int, labels: str, config: dict[str, Any]) -> Path:
    """Where the pre-trained branch lives (``RunLayout.warm_branch_path``, the variant ``config["name"]`` in its
    folder name); a file pre-trained with other settings is refused, never reused."""
    final = ex.layout.warm_branch_path(task, position, seed, labels, config.get("name"))
    if final.exists():
        stored = codec_lib.load_state(final)
        if stored.get("config") != config:
            raise FileExistsError(
                f"{final} was pre-trained with {stored.get('config')}, not {config}; delete it to redo"
            )
    return final


def branch_path(ex, task: str, position: str, seed: int, labels: str = "pseudo") -> Path:
    """Where :func:`warm_aux_branch` stores the branch of ``position`` pre-trained with ``seed`` (it may not exist)."""
    return warm_path(ex, task, position, seed, labels, warm_config(ex, task))


def build_branch(ex, task: str, position: str | None, seed: int, codec, recognizer):
    """The auxiliary branch of ``position``, initialised from ``seed`` (the same draws for cold and warm starts)."""
    torch.manual_seed(seed)
    aux = build_aux_branch(task, position, codec_lib.codec_N(codec), ex.num_classes(task), recognizer=recognizer,
                           **ex.task_cfg(task).get("aux", {}))
    if aux is None:
        return None
    seed_random_stream(aux, seed)  # its own random stream (protocol v2, V7); reseeded by every job that trains it
    return aux.to(ex.device)


def install_shipped_branch(ex, task: str, position: str, seed: int, final: Path) -> bool:
    """The shipped pre-trained branch (``aux_branch_<task>_<position>``), when the profile's pre-training matches it
    (same seed): its file, plus a ``timing.json`` with no training seconds (nothing was trained here)."""
    block = PretrainingBlock.parse(warm_block(ex, task))
    if block.seed is None or seed != block.seed:
        return False
    if not install_matching(ex.cfg, f"aux_branch_{task}_{position}", ex.provenance("branch", task), final,
                            ex.use_assets, ex.log):
        return False
    history = codec_lib.load_state(final)["history"]
    cfg = block.train
    atomic_write_json(final.parent / "history.json", history)
    atomic_write_json(final.parent / "timing.json", {
        "loop_seconds": 0.0, "epochs": len(history), "shipped": True,
        "steps": len(history) * (cfg.steps_per_epoch or cfg.steps(len(ex.dataset("train", task))))})
    return True


def warm_aux_branch(ex, task: str, position: str, seed: int, labels: str = "pseudo") -> dict[str, Any]:
    """State dict of the ``position`` branch pre-trained alone (``train_aux_branch``) on the START codec's features
    with the training pseudo-labels (``labels="shuffled"``: another image's, the control branch), for training seed
    ``seed``: shared by every lambda of that seed (it does not depend on lambda). Trained once, stored under
    ``aux_warm/``; the block's ``seed`` replaces ``seed``. A control branch trains for as many epochs as the competent
    one of its task, with the competent one's plateau decays at the same epochs; the block's own schedule (warm-up,
    polynomial tail) runs over the control's epochs, so with a polynomial tail it decays within the control's run
    where the competent one, stopped early, may not have reached it."""
    raw = warm_block(ex, task)
    block = PretrainingBlock.parse(raw)
    config = warm_config(ex, task)
    seed = seed if block.seed is None else block.seed
    cfg = block.train
    rule = stopping.plateau("val_aux", **block.plateau) if block.plateau else None
    callbacks = [rule] if rule is not None else []  # stops at the plateau; with decays, also sets the rates
    if labels != "pseudo":  # the control: the competent branch's length and decays, no stopping rule of its own
        warm_aux_branch(ex, task, position, seed, "pseudo")
        history = codec_lib.load_state(warm_path(ex, task, position, seed, "pseudo", config))["history"]
        cfg = PretrainingBlock.parse({**raw, "epochs": len(history)}).train
        callbacks = [LrScale(lambda h: rule.lr_scale(history[:len(h)]))] if rule is not None and rule.decays else []
    final = warm_path(ex, task, position, seed, labels, config)
    if not final.exists() and labels == "pseudo" and dist_lib.is_main():
        install_shipped_branch(ex, task, position, seed, final)
    dist_lib.barrier()
    if final.exists():
        return codec_lib.load_state(final)["state_dict"]
    codec, recognizer = ex.start_codec(), ex.recognizer(task)
    aux = build_branch(ex, task, position, seed, codec, recognizer)
    ex.log(f"warm start: pre-training the {position} branch of {task} (seed {seed}, {labels} labels) on the "
           "start codec's latents")
    steps_per_round = cfg.steps(len(ex.dataset("train", task)))
    res = train_aux_branch(position, aux, codec, recognizer, ex.dataset("train", task), cfg,
                           final.parent / "train_state.pt", val_set=ex.dataset("val", task),
                           seed=seed, log=ex.log, device=ex.device, labels=labels, callbacks=callbacks)
    if dist_lib.is_main():
        atomic_write_json(final.parent / "history.json", res.history)
        atomic_torch_save({"state_dict": aux.state_dict(), "config": config, "labels": labels,
                           "history": res.history}, final)
        atomic_write_json(final.parent / "timing.json", {"loop_seconds": res.seconds, "epochs": len(res.history),
                                                         "steps": len(res.history) * steps_per_round})
    dist_lib.barrier()
    return aux.state_dict()
