"""THE training loop (``fit``): steps, per-epoch validation and hooks, atomic checkpoints, bit-exact resume.

Every model of the suite trains through ``fit`` (the jobs in ``training.jobs`` give it a ``step_fn``). A checkpoint is
written atomically at the end of every epoch with the modules, optimizers, schedulers and RNG states; a rerun of the
same job resumes from the last complete epoch and ends bit-identical (on CPU) to an uninterrupted run, because each
epoch's data order and crops come from generators seeded by (seed, epoch). Per-step logs stay on the device
(``_StepLogs``); a non-finite value stops the run before that epoch's checkpoint.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

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
    validate_fn: Callable[[int], dict[str, float]] | None = None,
    log: Callable[[str], None] | None = print,
    log_every: int = 0,
    stop_after_epoch: int | None = None,
    distributed: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    stop_when: Callable[[list[dict[str, Any]]], bool] | None = None,
    lr_scale: Callable[[list[dict[str, Any]]], float] | None = None,
    desc: str = "",
) -> FitResult:
    """Run ``epochs`` epochs of ``step_fn(batch, global_step)``; checkpoint after each epoch; resume if possible.

    ``step_fn`` does forward, backward and optimizer steps and returns its logs (must contain ``"loss"``): 0-dim
    tensors (kept on the device: no host-device sync per step; they are read every ``log_every`` steps and at the
    end of the epoch, where a non-finite value stops the run naming its first step, BEFORE that epoch's checkpoint
    is written) or floats (checked at once).
    ``meta`` identifies the job: a checkpoint written for other meta is never resumed (error instead).
    ``stop_after_epoch`` ends early after that epoch (used by tests to simulate an interrupted run).
    ``on_step(step, logs)``: called after every step with its logs as returned (e.g. the benchmark's timer).
    ``on_epoch_end(epoch)`` (1-based): called after validation and BEFORE the epoch's checkpoint, so a run killed in
    between redoes the epoch and the hook (e.g. a snapshot of the weights) runs again. ``desc``: the progress bar's
    label (``icm_helpers.progress``; rank 0 only). ``stop_when(history)``: asked after each epoch's checkpoint (and
    on resume); True ends the run there (early stopping, e.g. a branch pre-trained until its validation loss
    plateaus). ``lr_scale(history)``: a multiplier of ``lr_lambda`` set before each epoch from the history so far
    (e.g. the plateau rule's decays, ``training.stopping``); a resumed run gets the same rates.
    ``distributed=True`` (under ``torchrun``, see ``icm_helpers.distributed``): every rank runs this loop in step;
    logs are averaged over ranks and the checkpoint holds every rank's RNG state. Only rank 0 ever writes it.
    """
    checkpoint_path = Path(checkpoint_path)
    main = dist_lib.is_main()
    world, rank = (dist_lib.world_size(), dist_lib.rank()) if distributed else (1, 0)
    scale = [1.0]  # lr_scale's value for the current epoch

    def scaled_lambda(step: int) -> float:
        return lr_lambda(step) * scale[0]

    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, scaled_lambda) for k, o in optimizers.items()}
    result = FitResult()
    start_epoch = 0
    if main:
        stale = remove_stale_temps(checkpoint_path)  # temp files of a write that was killed (never the final name)
        if stale and log:
            log(f"removed {stale} temp file(s) left by an interrupted checkpoint write")
    if checkpoint_path.exists():
        try:
            ckpt = load_state(checkpoint_path)
        except ValueError as exc:  # truncated / corrupt: never start over silently (that would discard finished epochs)
            raise ValueError(f"cannot resume from the checkpoint {checkpoint_path}: it is truncated or corrupt "
                             f"({exc.__cause__ or exc}); delete it to start this training over from epoch 0") from exc
        if ckpt.get("meta") != meta:
            raise FileExistsError(f"{checkpoint_path} belongs to another job (its meta {ckpt.get('meta')} != {meta}); "
                                  "delete it or choose another output directory")
        for k, m in modules.items():
            m.load_state_dict(ckpt["modules"][k])
        for k, o in optimizers.items():
            o.load_state_dict(ckpt["optimizers"][k])
        for k, s in schedulers.items():
            s.load_state_dict(ckpt["schedulers"][k])
        ranks_rng = ckpt.get("rng_ranks")
        torch.set_rng_state(ranks_rng[rank] if ranks_rng and len(ranks_rng) == world else ckpt["rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            cuda_rng = ckpt["cuda_rng"]
            if len(cuda_rng) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_rng)
        result.history = list(ckpt["history"])
        start_epoch = result.resumed_from_epoch = int(ckpt["epoch"])
        if log and main and start_epoch < epochs:
            log(f"resuming {checkpoint_path.parent.name} from epoch {start_epoch}/{epochs}")
    if stop_when is not None and result.history and stop_when(result.history):
        epochs = start_epoch  # a resumed run that had already stopped: nothing more to do
    t0 = time.time()
    bar = (
        progress(
            total=epochs * steps_per_epoch,
            initial=start_epoch * steps_per_epoch,
            desc=desc or str(meta.get("job", "")),
            unit="step",
        )
        if main
        else None
    )
    for epoch in range(start_epoch, epochs):
        if lr_scale is not None:
            scale[0] = float(lr_scale(result.history))
            for s in schedulers.values():  # the rate of the epoch's first step, before any scheduler step
                for group, base in zip(s.optimizer.param_groups, s.base_lrs):
                    group["lr"] = base * scaled_lambda(s.last_epoch)
        for m in modules.values():
            m.train()
        logs_acc = _StepLogs(collective=world > 1)
        n = 0
        for i, batch in enumerate(loader_fn(epoch)):
            if i >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + i
            logs = step_fn(batch, step)
            logs_acc.add(logs, step, epoch, checkpoint_path)
            if on_step is not None:
                on_step(step, logs)
            n += 1
            if bar is not None:
                bar.update()
            for s in schedulers.values():
                s.step()
            if log_every and (step + 1) % log_every == 0:
                logs_acc.check(epoch, checkpoint_path)
                if log and main:
                    log(f"  step {step + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs_acc.last_floats().items()))
        logs_acc.check(epoch, checkpoint_path)  # before validation and before this epoch's checkpoint
        record = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in logs_acc.means(n).items()},
                  "lr": next(iter(optimizers.values())).param_groups[0]["lr"]}
        if validate_fn is not None:
            for m in modules.values():
                m.eval()
            with torch.random.fork_rng():
                record.update({f"val_{k}": v for k, v in validate_fn(epoch).items()})
        result.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
        state = {"meta": meta, "epoch": epoch + 1, "history": result.history, "rng": torch.get_rng_state(),
                 "modules": {k: m.state_dict() for k, m in modules.items()},
                 "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                 "schedulers": {k: s.state_dict() for k, s in schedulers.items()}}
        if world > 1:
            state["rng_ranks"] = dist_lib.all_gather_object(torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if main:
            atomic_torch_save(state, checkpoint_path)
        if log and main:
            log(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
        if stop_when is not None and stop_when(result.history):
            if log and main:
                log(f"stopping after epoch {epoch + 1}: the stopping rule is met")
            break
    if bar is not None:
        bar.close()
    for m in modules.values():
        m.eval()
    result.seconds = time.time() - t0
    return result
