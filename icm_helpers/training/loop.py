"""THE training loop (``fit``): steps, callbacks, atomic checkpoints, bit-exact resume.

Every model of the suite trains through ``fit`` (the jobs in ``training.jobs`` give it a ``step_fn``). A checkpoint is
written atomically at the end of every epoch with the modules, optimizers, schedulers and RNG states; a rerun of the
same job resumes from the last complete epoch and ends bit-identical (on CPU) to an uninterrupted run, because each
epoch's data order and crops come from generators seeded by (seed, epoch). Per-step logs stay on the device
(``_StepLogs``); a non-finite value stops the run before that epoch's checkpoint. Everything else a run does
(validation, early stopping, learning-rate scales, measurements, snapshots) is a ``Callback`` (``training.callbacks``,
``training.stopping``), called at fixed points of the loop, as the hooks of detectron2's ``TrainerBase``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .. import distributed as dist_lib
from ..codec import load_state
from ..io import atomic_torch_save, remove_stale_temps
from ..progress import progress


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    seconds: float = 0.0
    hook_seconds: dict[str, float] = field(default_factory=dict)  # time the job's hooks took inside ``seconds``


class _StepLogs:
    """Per-step logs accumulated WITHOUT host-device syncs: tensor values stay on their device (summed in float64,
    so the epoch means equal the float sums the loop always made), the first non-finite step of each key is tracked
    on the device too; ``check`` (at ``log_every`` and at the end of the epoch) is the only sync. Python floats are
    checked at once (they cost no sync)."""

    def __init__(self, collective: bool = False):
        self.collective = collective  # reduce over the ranks of a distributed job (every rank calls check/means)
        self.sums: dict[str, Any] = {}
        self.first_bad: dict[str, Any] = {}
        self.bad_value: dict[str, Any] = {}
        self.last: dict[str, Any] = {}

    def add(self, logs: dict[str, Any], step: int, epoch: int, checkpoint_path: Path) -> None:
        bad_now = []
        for k, v in logs.items():
            if isinstance(v, torch.Tensor):
                v = v.detach()
                acc = v.to(torch.float64 if v.device.type != "mps" else torch.float32)
                self.sums[k] = acc if k not in self.sums else self.sums[k] + acc
                bad = ~torch.isfinite(v)
                if k not in self.first_bad:
                    self.first_bad[k] = torch.full((), -1, dtype=torch.int64, device=v.device)
                    self.bad_value[k] = torch.zeros((), dtype=v.dtype, device=v.device)
                new = bad & (self.first_bad[k] < 0)
                self.first_bad[k] = torch.where(new, torch.full_like(self.first_bad[k], step), self.first_bad[k])
                self.bad_value[k] = torch.where(new, v.to(self.bad_value[k].dtype), self.bad_value[k])
            else:
                v = float(v)
                self.sums[k] = self.sums.get(k, 0.0) + v
                if not math.isfinite(v):
                    bad_now.append(k)
            self.last[k] = v
        if bad_now:  # the loss, and e.g. the quantile loss
            shown = {k: (float(v) if isinstance(v, float) else v) for k, v in logs.items()}
            raise NonFiniteLossError(f"non-finite {', '.join(bad_now)} ({shown}) at epoch {epoch}, step {step}; "
                                     f"nothing was saved for this epoch; last good checkpoint: {checkpoint_path}")

    def check(self, epoch: int, checkpoint_path: Path) -> None:
        """Raise ``NonFiniteLossError`` naming the first non-finite step (of any rank); one sync (+ one collective)."""
        if not self.first_bad:
            return
        keys = sorted(self.first_bad)
        big = torch.iinfo(torch.int64).max
        steps = torch.stack(
            [
                torch.where(self.first_bad[k] < 0, torch.full_like(self.first_bad[k], big), self.first_bad[k])
                for k in keys
            ]
        )
        steps = (dist_lib.all_reduce(steps, "min") if self.collective else steps).tolist()
        bad = [(s, k) for s, k in zip(steps, keys) if s != big]
        if bad:
            step = min(s for s, _ in bad)
            names = [k for s, k in bad if s == step]
            values = {k: float(self.bad_value[k]) for k in names if int(self.first_bad[k]) == step}
            raise NonFiniteLossError(
                f"non-finite {', '.join(names)} ({values or 'on another rank'}) at epoch {epoch}, step {step}; "
                f"nothing was saved for this epoch; last good checkpoint: {checkpoint_path}"
            )

    def last_floats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.last.items()}

    def means(self, n: int) -> dict[str, float]:
        """Epoch means, averaged over ranks when distributed (every rank runs the same number of steps)."""
        keys = list(self.sums)
        tensors = [k for k in keys if isinstance(self.sums[k], torch.Tensor)]
        out = {k: self.sums[k] for k in keys if k not in tensors}
        if tensors:
            stacked = torch.stack([self.sums[k].to(self.sums[tensors[0]].dtype) for k in tensors])
            out.update(zip(tensors, (dist_lib.all_reduce(stacked, "mean") if self.collective else stacked).tolist()))
        if self.collective and len(out) > len(tensors):
            floats = [k for k in keys if k not in tensors]
            out.update(
                zip(
                    floats,
                    dist_lib.all_reduce(torch.tensor([out[k] for k in floats], dtype=torch.float64), "mean").tolist(),
                )
            )
        return {k: out[k] / max(1, n) for k in keys}


@dataclass
class FitState:
    """What the callbacks of ``fit`` see of its run, and may change (``set_lr_scale``).

    ``epoch``: the current epoch, 0-based (in ``before_train``: the first one this run trains, i.e. the resumed
    checkpoint's epoch); ``history``: one record per finished epoch (in ``after_epoch`` the current one's is the last);
    ``epochs``: the epoch this run ends at; ``main``: this process writes files (rank 0 of a distributed job)."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    meta: dict[str, Any]
    epochs: int
    steps_per_epoch: int
    main: bool = True
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    lr_scale: float = 1.0  # the multiplier of ``lr_lambda`` in the schedulers

    def set_lr_scale(self, scale: float) -> None:
        """Multiply ``lr_lambda`` by ``scale`` from the current step on: the optimizers' rates are set at once (in
        ``before_epoch``: the rate of the epoch's first step, before any scheduler step)."""
        self.lr_scale = float(scale)
        for s in self.schedulers.values():
            for group, base, fn in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
                group["lr"] = base * fn(s.last_epoch)


class Callback:
    """A hook into ``fit``'s run (as detectron2's ``HookBase``); every method here does nothing. ``fit`` calls the
    callbacks in the order of its list, at these points of a run:

    - ``before_train(state)``: after the checkpoint (if any) was resumed, before the first epoch;
    - ``before_epoch(state)``: before the epoch's first step (e.g. its learning-rate scale, ``state.set_lr_scale``);
    - ``after_step(state, step, logs)``: after each step (``step``: 0-based, counted over the run) with ``step_fn``'s
      logs as returned (tensors still on their device);
    - ``after_epoch(state, record)``: after the epoch's steps and their non-finite check, BEFORE the epoch's
      checkpoint, so a run killed in between redoes the epoch and the hook; may add entries to ``record`` (the
      epoch's entry of the history; ``Validation`` adds ``val_*``);
    - ``should_stop(state)``: asked after each epoch's checkpoint and, on a resume with a history, before the first
      epoch; True from any callback ends the run there (early stopping);
    - ``after_train(state)``: after the last epoch (not when the run raised).
    """

    def before_train(self, state: FitState) -> None:
        pass

    def before_epoch(self, state: FitState) -> None:
        pass

    def after_step(self, state: FitState, step: int, logs: dict[str, Any]) -> None:
        pass

    def after_epoch(self, state: FitState, record: dict[str, Any]) -> None:
        pass

    def should_stop(self, state: FitState) -> bool:
        return False

    def after_train(self, state: FitState) -> None:
        pass


class _ProgressBar(Callback):
    """The run's progress bar (``icm_helpers.progress``), one tick per step; ``fit`` gives it to rank 0 only."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def before_train(self, state: FitState) -> None:
        self.bar = progress(total=state.epochs * state.steps_per_epoch, initial=state.epoch * state.steps_per_epoch,
                            desc=self.desc, unit="step")

    def after_step(self, state: FitState, step: int, logs: dict[str, Any]) -> None:
        self.bar.update()

    def after_train(self, state: FitState) -> None:
        self.bar.close()


def _resume(checkpoint_path: Path, state: FitState, world: int, rank: int, log: Callable[[str], None] | None) -> int:
    """Load ``checkpoint_path`` (when it exists) into ``state``: modules, optimizers, schedulers, this rank's RNG
    states and the history. Returns its epoch (0 without a checkpoint)."""
    if state.main:
        stale = remove_stale_temps(checkpoint_path)  # temp files of a write that was killed (never the final name)
        if stale and log:
            log(f"removed {stale} temp file(s) left by an interrupted checkpoint write")
    if not checkpoint_path.exists():
        return 0
    try:
        ckpt = load_state(checkpoint_path)
    except ValueError as exc:  # truncated / corrupt: never start over silently (that would discard finished epochs)
        raise ValueError(f"cannot resume from the checkpoint {checkpoint_path}: it is truncated or corrupt "
                         f"({exc.__cause__ or exc}); delete it to start this training over from epoch 0") from exc
    if ckpt.get("meta") != state.meta:
        raise FileExistsError(f"{checkpoint_path} belongs to another job (its meta {ckpt.get('meta')} != "
                              f"{state.meta}); delete it or choose another output directory")
    for name, parts in (("modules", state.modules), ("optimizers", state.optimizers),
                        ("schedulers", state.schedulers)):
        for k, part in parts.items():
            part.load_state_dict(ckpt[name][k])
    ranks_rng = ckpt.get("rng_ranks")
    torch.set_rng_state(ranks_rng[rank] if ranks_rng and len(ranks_rng) == world else ckpt["rng"])
    if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
        cuda_rng = ckpt["cuda_rng"]
        if len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
    state.history = list(ckpt["history"])
    state.epoch = int(ckpt["epoch"])
    if log and state.main and state.epoch < state.epochs:
        log(f"resuming {checkpoint_path.parent.name} from epoch {state.epoch}/{state.epochs}")
    return state.epoch


def _checkpoint(state: FitState, world: int) -> dict[str, Any]:
    """The checkpoint after epoch ``state.epoch``; every rank builds it (it gathers every rank's RNG state)."""
    ckpt = {"meta": state.meta, "epoch": state.epoch + 1, "history": state.history, "rng": torch.get_rng_state(),
            "modules": {k: m.state_dict() for k, m in state.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in state.schedulers.items()}}
    if world > 1:
        ckpt["rng_ranks"] = dist_lib.all_gather_object(torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        ckpt["cuda_rng"] = torch.cuda.get_rng_state_all()
    return ckpt


def _call(callbacks: Sequence[Callback], hook: str, *args: Any) -> None:
    for callback in callbacks:
        getattr(callback, hook)(*args)


def fit(
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    step_fn: Callable[[dict, int], dict[str, Any]],
    loader_fn: Callable[[int], Iterable[dict]],
    epochs: int,
    steps_per_epoch: int,
    lr_lambda: Callable[[int], float],
    checkpoint_path: str | Path,
    meta: dict[str, Any],
    callbacks: Sequence[Callback] = (),
    log: Callable[[str], None] | None = print,
    log_every: int = 0,
    distributed: bool = False,
    desc: str = "",
) -> FitResult:
    """Run ``epochs`` epochs of ``step_fn(batch, global_step)``; checkpoint after each epoch; resume if possible.

    ``step_fn`` does forward, backward and optimizer steps and returns its logs (must contain ``"loss"``): 0-dim
    tensors (kept on the device: no host-device sync per step; they are read every ``log_every`` steps and at the
    end of the epoch, where a non-finite value stops the run naming its first step, BEFORE that epoch's checkpoint
    is written) or floats (checked at once). ``lr_lambda(step)``: the learning-rate factor of each step
    (``LambdaLR``), times ``FitState.lr_scale``.
    ``meta`` identifies the job: a checkpoint written for other meta is never resumed (error instead).
    ``callbacks``: ``Callback`` objects called in their order (validation, early stopping, learning-rate scales,
    measurements, snapshots: ``training.callbacks``, ``training.stopping``). ``desc``: the progress bar's label
    (``icm_helpers.progress``; rank 0 only; default: ``meta["job"]``).
    ``distributed=True`` (under ``torchrun``, see ``icm_helpers.distributed``): every rank runs this loop in step;
    logs are averaged over ranks and the checkpoint holds every rank's RNG state. Only rank 0 ever writes it.
    """
    checkpoint_path = Path(checkpoint_path)
    world, rank = (dist_lib.world_size(), dist_lib.rank()) if distributed else (1, 0)
    state = FitState(modules, optimizers, meta, epochs, steps_per_epoch, main=dist_lib.is_main())
    state.schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_lambda(step) * state.lr_scale)
                        for k, o in optimizers.items()}
    callbacks = [*callbacks, _ProgressBar(desc or str(meta.get("job", "")))] if state.main else list(callbacks)
    result = FitResult(resumed_from_epoch=_resume(checkpoint_path, state, world, rank, log))
    if state.history and any(c.should_stop(state) for c in callbacks):
        state.epochs = state.epoch  # a resumed run that had already stopped: nothing more to do
    t0 = time.time()
    _call(callbacks, "before_train", state)
    for epoch in range(state.epoch, state.epochs):
        state.epoch = epoch
        _call(callbacks, "before_epoch", state)
        for m in modules.values():
            m.train()
        logs_acc, n = _StepLogs(collective=world > 1), 0
        for i, batch in enumerate(loader_fn(epoch)):
            if i >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + i
            logs = step_fn(batch, step)
            logs_acc.add(logs, step, epoch, checkpoint_path)
            _call(callbacks, "after_step", state, step, logs)
            n += 1
            for s in state.schedulers.values():
                s.step()
            if log_every and (step + 1) % log_every == 0:
                logs_acc.check(epoch, checkpoint_path)
                if log and state.main:
                    log(f"  step {step + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs_acc.last_floats().items()))
        logs_acc.check(epoch, checkpoint_path)  # before the callbacks and before this epoch's checkpoint
        record = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in logs_acc.means(n).items()},
                  "lr": next(iter(optimizers.values())).param_groups[0]["lr"]}
        state.history.append(record)
        _call(callbacks, "after_epoch", state, record)
        checkpoint = _checkpoint(state, world)
        if state.main:
            atomic_torch_save(checkpoint, checkpoint_path)
            if log:
                log(f"epoch {epoch + 1}/{state.epochs}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        if any(c.should_stop(state) for c in callbacks):
            if log and state.main:
                log(f"stopping after epoch {epoch + 1}: the stopping rule is met")
            break
    _call(callbacks, "after_train", state)
    for m in modules.values():
        m.eval()
    result.history, result.seconds = state.history, time.time() - t0
    return result
