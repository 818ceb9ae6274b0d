"""The callbacks of the training jobs (``loop.Callback``): validation after each epoch, a learning-rate scale from the
history, validation after chosen numbers of steps (``StepCurve``) and codec snapshots after chosen numbers of steps.
The stopping rule is ``stopping.PlateauRule``. None of them draws from the training's random streams, so a run is
the same with or without them."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import distributed as dist_lib
from ..codec import converge_quantiles, save_codec, update_entropy_tables
from ..io import atomic_write_json, read_json
from .loop import Callback, FitState


class Validation(Callback):
    """``validate(epoch)`` (0-based) after each epoch's steps, its values added to the epoch's record as ``val_*``;
    the modules in eval mode, under ``torch.random.fork_rng`` (the training's RNG stream goes on as without it)."""

    def __init__(self, validate: Callable[[int], dict[str, float]]):
        self.validate = validate

    def after_epoch(self, state: FitState, record: dict[str, Any]) -> None:
        for m in state.modules.values():
            m.eval()
        with torch.random.fork_rng():
            record.update({f"val_{k}": v for k, v in self.validate(state.epoch).items()})


class LrScale(Callback):
    """Before each epoch, the learning rate's multiplier ``scale(history)`` (e.g. the plateau rule's decays,
    ``stopping.PlateauRule.lr_scale``): a function of the history, so a resumed run gets the same rates."""

    def __init__(self, scale: Callable[[list[dict[str, Any]]], float]):
        self.scale = scale

    def before_epoch(self, state: FitState) -> None:
        state.set_lr_scale(self.scale(state.history))


class StepCurve(Callback):
    """Validation terms after chosen numbers of training steps (protocol v2: log-spaced checkpoints, Figs. 8-9), kept
    in a JSON list at ``path`` (rewritten atomically after each measurement). A resumed run re-measures only the steps
    not yet stored (a step after the resumed epoch is measured again on the same weights and gives the same value).
    Measuring sets the modules to eval mode and back to training mode, under ``torch.random.fork_rng`` (and the
    branch's own stream kept by ``validation_terms``), so the training run is the same with or without it.
    Step 0 (before the first step) is measured by calling ``measure_at(0)`` before ``fit`` resumes any checkpoint."""

    def __init__(self, path: str | Path, steps: list[int], measure: Callable[[], dict[str, float]],
                 modules: list[nn.Module]):
        self.path, self.steps, self.measure, self.modules = Path(path), {int(s) for s in steps}, measure, modules
        self.points = {int(p["step"]): p for p in read_json(self.path)} if self.path.exists() else {}
        self.measured: dict[int, float] = {}  # seconds of the measurements made by this object (this process)

    def measure_at(self, step: int) -> None:
        if step not in self.steps or step in self.points:
            return
        was = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()
        t0 = time.time()
        try:
            with torch.random.fork_rng(), torch.no_grad():
                terms = self.measure()
        finally:
            for m, w in zip(self.modules, was):
                m.train(w)
        self.measured[step] = time.time() - t0
        self.points[step] = {"step": step, **{f"val_{k}": v for k, v in terms.items()}, "seconds": self.measured[step]}
        if dist_lib.is_main():
            atomic_write_json(self.path, [self.points[s] for s in sorted(self.points)])

    def after_step(self, state: FitState, step: int, logs: dict[str, Any]) -> None:
        self.measure_at(step + 1)  # fit's step is 0-based: after it, step + 1 steps are done


class CodecSnapshots(Callback):
    """The codec as it is after chosen numbers of training steps (``paths``: {n: path}), quantiles fitted and tables
    built as the final one, saved by rank 0 with ``{"spec": spec, "step": n, "of_steps": of_steps}`` (the budget
    study's dose-response). Saving works on a copy and draws no random numbers, so the run goes on as without it.
    ``seconds``: the time this hook took."""

    def __init__(self, codec: nn.Module, paths: dict[int, Path], spec: dict[str, Any], of_steps: int):
        self.codec, self.paths, self.spec, self.of_steps = codec, paths, spec, of_steps
        self.seconds = 0.0

    def after_step(self, state: FitState, step: int, logs: dict[str, Any]) -> None:
        t0 = time.time()
        path = self.paths.get(step + 1)
        if path is not None and state.main:
            with torch.random.fork_rng():
                frozen = copy.deepcopy(self.codec).eval()
                converge_quantiles(frozen)
                update_entropy_tables(frozen)
            save_codec(path, frozen, extra={"spec": self.spec, "step": step + 1, "of_steps": self.of_steps})
        self.seconds += time.time() - t0
