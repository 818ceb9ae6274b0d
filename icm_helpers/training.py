"""Training: ONE loop (``fit``) with checkpoint + resume, used for every model the suite trains.

- ``train_recognizer``: the suite's own recognizers on ground truth (notebook 01; frozen afterwards).
- ``train_start_codec``: the codec start point, Eq. 2 with MSE (the paper starts from CompressAI's
  MSE-pretrained cheng2020-attn).
- ``train_icm``: ICM fine-tuning with Eq. 4 (w/o aux), Eq. 5 (w/ aux) or Eq. 6 (+ MSE, segmentation).

Schedule (Sec. 4.1): Adam; the learning rate is constant, then decays polynomially over the last
``poly_start_frac`` of the iterations (detection: the last 40 of 80 epochs -> 0.5; segmentation: "polynomial
decay in each epoch" -> 0.0, decay from the start). Decay is applied per iteration with power ``poly_power``
(0.9, MMSegmentation's default; the paper does not give the power).

Checkpoints are written atomically at the end of every epoch with the model, optimizer, scheduler and RNG
states; a rerun of the same job resumes from the last complete epoch and ends bit-identical (on CPU) to an
uninterrupted run, because each epoch's data order and crops come from generators seeded by (seed, epoch).
"""
from __future__ import annotations

import contextlib
import math
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import adaptive_alpha
from .codec import codec_forward, converge_quantiles, crop_to, load_state, pad_to_multiple, update_entropy_tables
from .data import collate, crop_at, crop_item_at, crop_window, to_device
from .io import atomic_torch_save, remove_stale_temps
from .losses import check_lambda_alpha, human_rd_loss, icm_loss, rate_bpp
from .progress import progress


class NonFiniteLossError(FloatingPointError):
    pass


def poly_lr_lambda(total_steps: int, start_frac: float, power: float = 0.9, min_factor: float = 0.0,
                   steps_per_decay: int = 1) -> Callable[[int], float]:
    """Multiplier of the initial learning rate at iteration ``step`` (constant, then polynomial decay).

    ``steps_per_decay``: 1 = decay at every iteration; the number of iterations per epoch = decay once per epoch
    (the paper's segmentation setting: "polynomial decay in each epoch", Sec. 4.1)."""
    if not 0.0 <= start_frac < 1.0:
        raise ValueError(f"poly_start_frac must be in [0, 1), got {start_frac}")
    if steps_per_decay < 1:
        raise ValueError(f"steps_per_decay must be >= 1, got {steps_per_decay}")
    total_steps = max(1, total_steps // steps_per_decay)
    start = int(round(start_frac * total_steps))

    def factor(step: int) -> float:
        step //= steps_per_decay
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        return max(min_factor, (1.0 - progress) ** power)

    return factor


def _item_size(dataset, j: int) -> tuple[int, int]:
    """(h, w) of item ``j`` without decoding it when the dataset can say (``image_size(j)``, ``InMemory``, ``Subset``);
    otherwise the item is loaded."""
    if hasattr(dataset, "image_size"):
        h, w = dataset.image_size(j)
        return int(h), int(w)
    if isinstance(dataset, InMemory):
        return tuple(dataset.items[j]["image"].shape[-2:])
    if isinstance(dataset, torch.utils.data.Subset):
        return _item_size(dataset.dataset, dataset.indices[j])
    return tuple(dataset[j]["image"].shape[-2:])


def _batch_windows(shapes: list[tuple[int, int]], crop_size: int | None, g: torch.Generator):
    """The crop of one global batch, drawn from ``g`` exactly as ``epoch_loader`` always did: ("batch", window) = one
    window for the whole batch (equal image sizes), ("items", [window per item]) = one window per item (mixed sizes,
    e.g. COCO; padded to the crop first), ("none", None) = no crop."""
    if not crop_size:
        return "none", None
    if len(set(shapes)) > 1:
        return "items", [crop_window(max(h, crop_size), max(w, crop_size), crop_size, g) for h, w in shapes]
    h, w = shapes[0]
    return "batch", crop_window(h, w, crop_size, g)


def _make_batch(items: list[dict], crop_size: int | None, mode: str, windows) -> dict:
    if mode == "none" and len({tuple(it["image"].shape[-2:]) for it in items}) > 1:
        sizes = sorted({tuple(it["image"].shape[-2:]) for it in items})
        raise ValueError(f"a training batch holds images of different sizes {sizes[:3]} and crop_size is null: set the task's "
                         "train.crop_size (the paper: 256 for COCO) or resize the dataset's images to one size (Pascal-Context: "
                         "520x520)")
    if mode == "items":
        return collate([crop_item_at(it, crop_size, win) for it, win in zip(items, windows)])
    batch = collate(items)
    return crop_at(batch, crop_size, windows) if mode == "batch" else batch


def _identity(batch):
    return batch


class _PlannedBatches(torch.utils.data.Dataset):
    """Materialises one planned batch (indices + crop windows) of one rank: what a DataLoader worker runs."""

    def __init__(self, dataset, crop_size: int | None):
        self.dataset, self.crop_size = dataset, crop_size

    def __getitem__(self, entry) -> dict:
        indices, mode, windows = entry
        return _make_batch([self.dataset[j] for j in indices], self.crop_size, mode, windows)


class _PlanSampler(torch.utils.data.Sampler):
    """Yields the plan entries of the current epoch (set by ``EpochLoader``) to the DataLoader's workers."""

    def __init__(self):
        self.entries: list = []

    def __iter__(self):
        return iter(list(self.entries))

    def __len__(self) -> int:
        return len(self.entries)


class EpochLoader:
    """``loader(epoch)``: the batches of one epoch, a deterministic function of (seed, epoch) only.

    The order (``randperm``) and the crop windows are drawn from one generator seeded by (seed, epoch), in the same
    sequence as always, so the batches are bit-identical whatever ``num_workers`` is and however many ranks share
    the work: with ``world_size`` ranks each global batch of ``batch_size`` images is split into ``world_size``
    contiguous slices of ``batch_size // world_size`` and rank ``r`` gets slice ``r`` (same windows as the single
    process). ``num_workers > 0``: the plan is computed in this process (image sizes from ``image_size(j)`` /
    in-memory items, else by loading the item), the images are loaded, cropped and collated by DataLoader workers
    (``persistent_workers`` keeps them across epochs). ``pin_memory``/``channels_last`` apply on CUDA devices /
    to the image tensor. ``max_batches``: at most this many batches per epoch (the steps per epoch)."""

    def __init__(self, dataset, batch_size: int, seed: int, crop_size: int | None = None, drop_last: bool = True,
                 device: str = "cpu", num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = True,
                 rank: int = 0, world_size: int = 1, max_batches: int | None = None, channels_last: bool = False,
                 prefetch_factor: int = 2):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(f"the global batch_size {batch_size} must be divisible by the number of ranks {world_size} "
                             f"(each rank trains on batch_size // world_size images per step)")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.batch_size, self.seed, self.crop_size = dataset, batch_size, seed, crop_size
        self.drop_last, self.device, self.rank, self.world_size = drop_last, device, rank, world_size
        self.max_batches, self.channels_last, self.num_workers = max_batches, channels_last, num_workers
        self.pin_memory = bool(pin_memory) and str(device).startswith("cuda")
        self._loader = None
        if num_workers:
            self._sampler = _PlanSampler()
            self._loader = torch.utils.data.DataLoader(
                _PlannedBatches(dataset, crop_size), batch_size=None, sampler=self._sampler, num_workers=num_workers,
                collate_fn=_identity, pin_memory=self.pin_memory, persistent_workers=bool(persistent_workers),
                prefetch_factor=prefetch_factor,
                # the workers' base seed from a generator of its own, not from the global RNG (which drives the
                # quantisation noise and RoI sampling): the training draws stay the same for any num_workers
                generator=torch.Generator().manual_seed(seed))

    def _order(self, epoch: int) -> tuple[torch.Generator, list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        n = len(order) // self.batch_size * self.batch_size if self.drop_last else len(order)
        if n == 0:
            raise ValueError(f"dataset of {len(self.dataset)} images is smaller than batch_size {self.batch_size}")
        return g, order[:n]

    def num_batches(self) -> int:
        n = len(self.dataset) // self.batch_size if self.drop_last else -(-len(self.dataset) // self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def plan(self, epoch: int) -> list[tuple[list[int], str, Any]]:
        """This rank's entries (indices, crop mode, windows) of ``epoch``, computed without loading images where
        the dataset gives their sizes."""
        g, order = self._order(epoch)
        entries = []
        for i in range(0, len(order), self.batch_size):
            if self.max_batches is not None and len(entries) >= self.max_batches:
                break
            idx = order[i: i + self.batch_size]
            shapes = [_item_size(self.dataset, j) for j in idx] if self.crop_size else []
            mode, windows = _batch_windows(shapes, self.crop_size, g)
            b = len(idx) // self.world_size
            lo, hi = (self.rank * b, (self.rank + 1) * b) if self.world_size > 1 else (0, len(idx))
            entries.append((idx[lo:hi], mode, windows[lo:hi] if mode == "items" else windows))
        return entries

    def _stream(self, epoch: int) -> Iterator[dict]:
        """Single process, no workers: load each batch, then draw its crop (no image is loaded twice)."""
        g, order = self._order(epoch)
        for k, i in enumerate(range(0, len(order), self.batch_size)):
            if self.max_batches is not None and k >= self.max_batches:
                break
            items = [self.dataset[j] for j in order[i: i + self.batch_size]]
            shapes = [tuple(it["image"].shape[-2:]) for it in items] if self.crop_size else []
            mode, windows = _batch_windows(shapes, self.crop_size, g)
            yield _make_batch(items, self.crop_size, mode, windows)

    def _finish(self, batch: dict) -> dict:
        batch = to_device(batch, self.device)
        if self.channels_last and batch["image"].dim() == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def __call__(self, epoch: int) -> Iterator[dict]:
        if self._loader is not None:
            self._sampler.entries = self.plan(epoch)
            source = iter(self._loader)
        elif self.world_size > 1:
            dataset, crop = self.dataset, self.crop_size
            source = (_make_batch([dataset[j] for j in idx], crop, mode, win) for idx, mode, win in self.plan(epoch))
        else:
            source = self._stream(epoch)
        for batch in source:
            yield self._finish(batch)


def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, crop_size: int | None = None, drop_last: bool = True,
                 device: str = "cpu", **kw) -> Iterable[dict]:
    """Shuffled batches for one epoch; order and crops depend only on (seed, epoch) (see ``EpochLoader`` for
    ``num_workers``, ``rank``/``world_size``, ``pin_memory``, ``channels_last``, ``max_batches``)."""
    return EpochLoader(dataset, batch_size, seed, crop_size, drop_last, device, **kw)(epoch)


class InMemory(torch.utils.data.Dataset):
    """Cache a (small) dataset's items in memory."""

    def __init__(self, dataset):
        self.items = [dataset[i] for i in range(len(dataset))]
        self.base = dataset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    seconds: float = 0.0


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
        from . import distributed as dist_lib

        keys = sorted(self.first_bad)
        big = torch.iinfo(torch.int64).max
        steps = torch.stack([torch.where(self.first_bad[k] < 0, torch.full_like(self.first_bad[k], big), self.first_bad[k]) for k in keys])
        steps = (dist_lib.all_reduce(steps, "min") if self.collective else steps).tolist()
        bad = [(s, k) for s, k in zip(steps, keys) if s != big]
        if bad:
            step = min(s for s, _ in bad)
            names = [k for s, k in bad if s == step]
            values = {k: float(self.bad_value[k]) for k in names if int(self.first_bad[k]) == step}
            raise NonFiniteLossError(f"non-finite {', '.join(names)} ({values or 'on another rank'}) at epoch {epoch}, step {step}; "
                                     f"nothing was saved for this epoch; last good checkpoint: {checkpoint_path}")

    def last_floats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.last.items()}

    def means(self, n: int) -> dict[str, float]:
        """Epoch means, averaged over ranks when distributed (every rank runs the same number of steps)."""
        from . import distributed as dist_lib

        keys = list(self.sums)
        tensors = [k for k in keys if isinstance(self.sums[k], torch.Tensor)]
        out = {k: self.sums[k] for k in keys if k not in tensors}
        if tensors:
            stacked = torch.stack([self.sums[k].to(self.sums[tensors[0]].dtype) for k in tensors])
            out.update(zip(tensors, (dist_lib.all_reduce(stacked, "mean") if self.collective else stacked).tolist()))
        if self.collective and len(out) > len(tensors):
            floats = [k for k in keys if k not in tensors]
            out.update(zip(floats, dist_lib.all_reduce(torch.tensor([out[k] for k in floats], dtype=torch.float64), "mean").tolist()))
        return {k: out[k] / max(1, n) for k in keys}


def fit(*, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], step_fn: Callable[[dict, int], dict[str, Any]],
        loader_fn: Callable[[int], Iterable[dict]], epochs: int, steps_per_epoch: int, lr_lambda: Callable[[int], float],
        checkpoint_path: str | Path, meta: dict[str, Any], validate_fn: Callable[[int], dict[str, float]] | None = None,
        log: Callable[[str], None] | None = print, log_every: int = 0, stop_after_epoch: int | None = None,
        distributed: bool = False, on_step: Callable[[int, dict[str, Any]], None] | None = None,
        on_epoch_end: Callable[[int], None] | None = None, desc: str = "") -> FitResult:
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
    label (``icm_helpers.progress``; rank 0 only).
    ``distributed=True`` (under ``torchrun``, see ``icm_helpers.distributed``): every rank runs this loop in step;
    logs are averaged over ranks and the checkpoint holds every rank's RNG state. Only rank 0 ever writes it.
    """
    from . import distributed as dist_lib

    checkpoint_path = Path(checkpoint_path)
    main = dist_lib.is_main()
    world, rank = (dist_lib.world_size(), dist_lib.rank()) if distributed else (1, 0)
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for k, o in optimizers.items()}
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
    t0 = time.time()
    bar = progress(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=desc or str(meta.get("job", "")),
                   unit="step") if main else None
    for epoch in range(start_epoch, epochs):
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
    if bar is not None:
        bar.close()
    for m in modules.values():
        m.eval()
    result.seconds = time.time() - t0
    return result


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one job (profiles set them; the paper's values are in profiles/paper.yaml)."""

    epochs: int = 80
    batch_size: int = 16
    lr: float = 1e-4
    crop_size: int | None = 256
    poly_start_frac: float = 0.5
    poly_power: float = 0.9
    steps_per_epoch: int | None = None  # None: one pass over the training split
    clip_max_norm: float = 1.0
    # "module": the codec's and the auxiliary branch's gradient norms are clipped separately (``clip_groups``), so the
    # codec's update follows one rule with and without a branch; "joint": one norm over both (CompressAI's example)
    clip_scope: str = "module"
    quantile_lr: float = 1e-3  # CompressAI's separate optimizer for the entropy bottleneck's quantiles
    log_every: int = 0
    poly_step: str = "iteration"  # "iteration" or "epoch" (Sec. 4.1, segmentation: "polynomial decay in each epoch")
    # ---- speed knobs (issue 7): they change how fast a job runs, not what it computes (beyond numerical noise for
    # amp); defaults = the plain fp32 single-process loop. They are NOT part of the job's identity (``job_meta``),
    # so a run can be resumed with other knobs (e.g. more workers, or on a GPU).
    amp: str | None = None  # None | "bf16": autocast for the codec's g_a/g_s, the aux branch and the recognizer;
    #                         the entropy models, likelihoods, rate and CompressAI's quantile loss stay fp32
    channels_last: bool = False  # NHWC memory format for the codec, aux branch, recognizer and input batch (CUDA only)
    compile: bool = False  # torch.compile the codec transforms / aux backbone / recognizer backbone (experimental)
    num_workers: int = 0  # DataLoader workers (same batches for any number: see EpochLoader)
    pin_memory: bool = False  # pinned host memory for the batches (CUDA only)
    persistent_workers: bool = True  # keep the workers across epochs (with num_workers > 0)
    cudnn_benchmark: bool = False  # cudnn autotuning (CUDA only; fixed crop sizes make it pay off)

    SPEED_FIELDS = ("amp", "channels_last", "compile", "num_workers", "pin_memory", "persistent_workers", "cudnn_benchmark")

    def __post_init__(self) -> None:
        if self.amp not in (None, "bf16"):
            raise ValueError(f"amp must be null or 'bf16', got {self.amp!r} (fp16 would need a gradient scaler; bf16 does not)")
        if int(self.num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.crop_size is not None and self.crop_size % 64:
            raise ValueError(f"crop_size must be a multiple of 64 (cheng2020-attn's latent stride chain), got {self.crop_size}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {self.epochs}, {self.batch_size}, {self.lr}")
        if self.clip_scope not in ("module", "joint"):
            raise ValueError(f"clip_scope must be 'module' or 'joint', got {self.clip_scope!r}")
        if self.poly_step not in ("iteration", "epoch"):
            raise ValueError(f"poly_step must be 'iteration' or 'epoch', got {self.poly_step!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def job_meta(self) -> dict[str, Any]:
        """The settings that identify the job (checkpoint meta): everything but the speed knobs."""
        return {k: v for k, v in asdict(self).items() if k not in self.SPEED_FIELDS}

    def steps(self, n_train: int) -> int:
        return self.steps_per_epoch or max(1, n_train // self.batch_size)

    def lr_lambda(self, steps_per_epoch: int) -> Callable[[int], float]:
        """The learning-rate multiplier per iteration: constant, then polynomial decay per iteration or per epoch."""
        return poly_lr_lambda(self.epochs * steps_per_epoch, self.poly_start_frac, self.poly_power,
                              steps_per_decay=steps_per_epoch if self.poly_step == "epoch" else 1)


def _codec_optimizers(codec: nn.Module, extra: list[nn.Parameter], cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    """Adam on the network parameters; a separate Adam on the entropy bottleneck's quantiles (CompressAI)."""
    main = [p for n, p in codec.named_parameters() if not n.endswith(".quantiles") and p.requires_grad] + extra
    quant = [p for n, p in codec.named_parameters() if n.endswith(".quantiles")]
    return {"main": torch.optim.Adam(main, lr=cfg.lr), "quantiles": torch.optim.Adam(quant, lr=cfg.quantile_lr)}


def clip_groups(codec: nn.Module, extra: list[nn.Parameter], scope: str = "module") -> list[list[nn.Parameter]]:
    """The parameter groups whose gradient norms are clipped on their own. ``scope="module"``: the codec (without
    CompressAI's quantiles, which have their own optimizer) and, when there is one, the auxiliary branch; the codec's
    update then follows the same rule with and without an auxiliary branch (a joint norm would rescale the codec's
    gradient by the branch's size in the aux arm only). ``"joint"``: one group of both."""
    codec_params = [p for n, p in codec.named_parameters() if not n.endswith(".quantiles") and p.requires_grad]
    if scope == "joint":
        return [codec_params + list(extra)]
    return [codec_params] + ([list(extra)] if extra else [])


def _codec_step(loss: torch.Tensor, codec: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                groups: list[list[nn.Parameter]], clip: float) -> torch.Tensor:
    """Backward + Adam step with each group's gradient norm clipped to ``clip`` on its own (``clip_groups``), then
    CompressAI's quantile step. Returns the quantile loss as a 0-dim tensor (no host-device sync). Runs outside
    autocast (the quantile loss is fp32, as the entropy model's)."""
    with torch.autocast(loss.device.type, enabled=False):
        optimizers["main"].zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            for group in groups:
                torch.nn.utils.clip_grad_norm_(group, clip)
        optimizers["main"].step()
        optimizers["quantiles"].zero_grad(set_to_none=True)
        q = codec.aux_loss()  # CompressAI's entropy-bottleneck quantile loss (NOT the paper's auxiliary loss)
        q.backward()
        optimizers["quantiles"].step()
    return q.detach()


def channels_last_applies(cfg: TrainConfig, device: str) -> bool:
    """``channels_last`` is used on CUDA only. On the CPU it is ignored: with PyTorch 2.14.1 the oneDNN weight
    gradient of a 1x1 stride-2 convolution in channels_last corrupts the heap (``corrupted size vs. prev_size`` /
    segmentation faults after a few steps; cheng2020's strided residual blocks and ResNet downsampling have such
    convolutions; minimal reproducer: ``Conv2d(3, 16, 1, stride=2)`` on a channels_last input, ``backward()`` in a
    loop), and NHWC is a tensor-core (GPU) optimisation in the first place."""
    return bool(cfg.channels_last) and torch.device(device).type == "cuda"


def apply_speed_knobs(cfg: TrainConfig, device: str, codec: nn.Module | None = None, aux_branch: nn.Module | None = None,
                      recognizer: nn.Module | None = None, compile_recognizer: bool = True) -> None:
    """cudnn autotuning, channels_last and torch.compile as ``cfg`` asks (in place; no-ops with the defaults).
    ``compile_recognizer=False`` when hooks are put on the recognizer's stages each step (aux-task)."""
    from .codec import compile_codec

    if str(device).startswith("cuda") and cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if channels_last_applies(cfg, device):
        for m in (codec, aux_branch, recognizer):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    if cfg.amp:
        fp32_detection_heads(aux_branch, recognizer)
    if cfg.compile:
        if codec is not None and not getattr(codec, "_icm_explicit_forward", False):
            compile_codec(codec)
        if aux_branch is not None and hasattr(aux_branch, "backbone"):
            aux_branch.backbone.compile()
        backbone = getattr(getattr(recognizer, "model", None), "backbone", None)
        if compile_recognizer and backbone is not None:
            backbone.compile()


def _fp32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return x.__class__((k, _fp32(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return x.__class__(_fp32(v) for v in x)
    return x


def fp32_detection_heads(*modules: nn.Module | None) -> int:
    """Under autocast, run every Faster R-CNN RPN / RoI head inside ``modules`` in fp32 (autocast off, inputs cast to
    fp32): box decoding, proposals, NMS, sampling and the box losses keep full precision (in bf16 a box coordinate
    near 200 px has a 1 px step, and torchvision rejects bf16 targets); the backbones stay in bf16. In place, once
    per module (an instance-level ``forward``; state dicts unchanged). Returns how many heads were wrapped."""
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    n = 0
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if isinstance(m, (RegionProposalNetwork, RoIHeads)) and not getattr(m, "_icm_fp32", False):
                m.forward = types.MethodType(_fp32_forward, m)  # a bound method: deepcopy rebinds it to the copy
                m._icm_fp32 = True
                n += 1
    return n


def _fp32_forward(self, *args, **kwargs):
    devices = {a.device.type for a in _tensors(args)} or {"cpu"}
    with contextlib.ExitStack() as stack:
        for d in devices:
            stack.enter_context(torch.autocast(d, enabled=False))
        return type(self).forward(self, *_fp32(args), **_fp32(kwargs))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "tensors"):  # torchvision ImageList
        yield x.tensors


def with_autocast(fn: Callable | None, amp: str | None, device: str) -> Callable | None:
    """``fn`` run under ``torch.autocast`` in ``amp``'s dtype (None: ``fn`` itself). Backward and the optimizer
    steps in ``_codec_step`` leave autocast; ``codec_forward`` keeps the rate path fp32."""
    if fn is None or not amp:
        return fn
    dtype = {"bf16": torch.bfloat16}[amp]
    device_type = torch.device(device).type

    def wrapped(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args, **kwargs)

    return wrapped


def train_loader(train_set, cfg: TrainConfig, seed: int, device: str, steps: int, distributed: bool = False) -> EpochLoader:
    """The training batches of a job: ``cfg``'s workers / pinning / channels_last; with ``distributed`` this rank's
    slice of each global batch."""
    from . import distributed as dist_lib

    return EpochLoader(train_set, cfg.batch_size, seed, cfg.crop_size, device=device, num_workers=int(cfg.num_workers),
                       pin_memory=cfg.pin_memory, persistent_workers=cfg.persistent_workers,
                       rank=dist_lib.rank() if distributed else 0, world_size=dist_lib.world_size() if distributed else 1,
                       max_batches=steps, channels_last=channels_last_applies(cfg, device))


def train_recognizer(recognizer, train_set, cfg: TrainConfig, checkpoint_path: str | Path, seed: int = 0, log=print,
                     device: str = "cpu") -> FitResult:
    """Train a suite recognizer on ground truth (its ``supervised_loss``)."""
    torch.manual_seed(seed)
    opt = {"main": torch.optim.Adam([p for p in recognizer.parameters() if p.requires_grad], lr=cfg.lr)}
    steps = cfg.steps(len(train_set))

    def step_fn(batch, step):
        loss = recognizer.supervised_loss(batch)
        opt["main"].zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_max_norm:
            torch.nn.utils.clip_grad_norm_(recognizer.parameters(), cfg.clip_max_norm)
        opt["main"].step()
        return {"loss": loss.detach()}

    return fit(modules={"recognizer": recognizer}, optimizers=opt, step_fn=step_fn,
               loader_fn=train_loader(train_set, cfg, seed, device, steps), epochs=cfg.epochs,
               steps_per_epoch=steps, lr_lambda=cfg.lr_lambda(steps),
               checkpoint_path=checkpoint_path, meta={"job": "recognizer", "task": recognizer.task, "seed": seed, **cfg.job_meta()},
               log=log, log_every=cfg.log_every)


def train_start_codec(codec: nn.Module, train_set, cfg: TrainConfig, lambda_mse: float, checkpoint_path: str | Path, seed: int = 0,
                      log=print, device: str = "cpu", val_set=None) -> FitResult:
    """Codec start point: Eq. 2 with MSE (CompressAI's 255^2 convention). ``val_set``: the mean Eq. 2 loss on it
    (codec in eval mode: rounded latents, the quantity that decides convergence) is logged per epoch."""
    torch.manual_seed(seed)
    opts = _codec_optimizers(codec, [], cfg)
    groups = clip_groups(codec, [])
    steps = cfg.steps(len(train_set))

    def step_fn(batch, step):
        x = batch["image"]
        out = codec(x)
        rate = rate_bpp(out["likelihoods"], x.shape[-2] * x.shape[-1])
        loss = human_rd_loss(rate, x, out["x_hat"], lambda_mse)
        q = _codec_step(loss, codec, opts, groups, cfg.clip_max_norm)
        return {"loss": loss.detach(), "bpp": rate.detach(), "mse": F.mse_loss(out["x_hat"].detach(), x), "quantile_loss": q}

    validate = None
    if val_set is not None:
        @torch.no_grad()
        def validate(epoch):
            sums, n = {"loss": 0.0, "bpp": 0.0, "mse": 0.0}, 0
            for batch in equal_size_batches(val_set, cfg.batch_size, seed, device):
                x = batch["image"]
                out = codec(x)
                rate = rate_bpp(out["likelihoods"], x.shape[-2] * x.shape[-1])
                for k, v in (("loss", human_rd_loss(rate, x, out["x_hat"], lambda_mse)), ("bpp", rate),
                             ("mse", F.mse_loss(out["x_hat"], x))):
                    sums[k] += float(v) * x.shape[0]
                n += x.shape[0]
            return {k: v / max(1, n) for k, v in sums.items()}

    res = fit(modules={"codec": codec}, optimizers=opts, step_fn=step_fn,
              loader_fn=train_loader(train_set, cfg, seed, device, steps), epochs=cfg.epochs,
              steps_per_epoch=steps, lr_lambda=cfg.lr_lambda(steps),
              checkpoint_path=checkpoint_path, meta={"job": "start_codec", "lambda_mse": lambda_mse, "seed": seed, **cfg.job_meta()},
              validate_fn=validate, log=log, log_every=cfg.log_every)
    converge_quantiles(codec)
    update_entropy_tables(codec)
    return res


AUX_INITS = ("cold", "warm")


@dataclass(frozen=True)
class IcmSpec:
    """What identifies one ICM training run (its results are stored under ``run_name``)."""

    task: str
    lambda_: float
    aux_position: str | None = "enc"
    alpha: float = 0.5
    add_mse: bool = False  # Eq. 6 (the paper's segmentation setting)
    seed: int = 0
    alpha_mode: str = "fixed"  # beyond the paper: "fixed" (Eq. 5) | "gradient_similarity" | "decay" (adaptive_alpha.py)
    # how the auxiliary branch starts: "cold" (random, trained jointly from step 0: the paper) | "warm" (pre-trained
    # alone on the start codec's latents with the same pseudo-labels first: ``train_aux_branch``, profile aux.warm_start)
    aux_init: str = "cold"

    def __post_init__(self) -> None:
        from .adaptive_alpha import check_alpha_mode
        from .aux_branches import check_aux_position
        from .recognizers import check_task

        check_task(self.task)
        check_lambda_alpha(self.lambda_, self.alpha)
        object.__setattr__(self, "aux_position", check_aux_position(self.aux_position))
        check_alpha_mode(self.alpha_mode)
        if self.aux_init not in AUX_INITS:
            raise ValueError(f"unknown aux_init {self.aux_init!r}; valid: {', '.join(AUX_INITS)}")
        if self.aux_position is None and self.aux_init != "cold":
            raise ValueError("aux_init='warm' pre-trains an auxiliary branch, but aux_position=None has none")
        if self.aux_position is None and self.alpha_mode != "fixed":
            raise ValueError(f"alpha_mode={self.alpha_mode!r} weights the auxiliary loss, but aux_position=None has none; "
                             "use alpha_mode='fixed' for the w/o-aux baseline (Experiment.spec does this for you)")

    @property
    def method(self) -> str:
        from .adaptive_alpha import mode_suffix

        if self.aux_position is None:
            return "baseline"
        return f"aux_{self.aux_position}{mode_suffix(self.alpha_mode)}{'_warm' if self.aux_init == 'warm' else ''}"

    def as_dict(self) -> dict[str, Any]:
        """The fields that identify the run (checkpoint meta, stored spec); ``alpha_mode`` only when not "fixed", so
        the paper's runs keep the identity (and resumable checkpoints) they had before alpha_mode existed."""
        d = asdict(self)
        if d["alpha_mode"] == "fixed":
            del d["alpha_mode"]
        if d["aux_init"] == "cold":
            del d["aux_init"]
        return d

    @property
    def run_name(self) -> str:
        return f"{self.method}_lambda{self.lambda_:g}"


def icm_terms(spec: IcmSpec, codec: nn.Module, recognizer, aux_branch: nn.Module | None, x: torch.Tensor,
              labels: Any = None) -> dict[str, torch.Tensor]:
    """All loss terms of one batch (Eq. 4-6). Pseudo-labels come from the recognizer on the ORIGINAL x (``labels``:
    given when they were computed beforehand on the same x).

    Images of any size: the codec codes x padded to a multiple of 64 (``pad_to_multiple``, the evaluation's rule,
    Sec. 4.1); the recognizer sees x_hat cropped back to x's size; the rate is counted over x's pixels, as in the
    evaluation. A branch on the codec's latent (aux-enc, aux-dec) sees the padded frame, so its labels are moved
    there (``recognizer.pad_labels``); aux-task reads the recognizer's features of the cropped x_hat."""
    labels = recognizer.pseudo_labels(x) if labels is None else labels
    xp, pad = pad_to_multiple(x)
    out = codec_forward(codec, xp)
    x_hat = crop_to(out["x_hat"], pad)
    rate = rate_bpp(out["likelihoods"], x.shape[-2] * x.shape[-1])
    if aux_branch is not None and spec.aux_position == "task":
        # aux-task (Sec. 4.2): the branch reads the recognizer's own backbone features of x_hat, recorded during
        # the task-loss forward (one backbone pass; the aux gradient flows back through the frozen stages)
        with recognizer.capture_features(aux_branch.inputs) as features:
            task = recognizer.task_loss(x_hat, labels)
        aux = aux_branch.loss(features, labels, tuple(x.shape[-2:]))
    else:
        task = recognizer.task_loss(x_hat, labels)
        aux = (aux_branch.loss(out[spec.aux_position], recognizer.pad_labels(labels, pad), tuple(xp.shape[-2:]))
               if aux_branch is not None else None)
    mse = F.mse_loss(x_hat, x) if spec.add_mse else None
    return icm_loss(rate, task, spec.lambda_, aux, spec.alpha, mse)


def equal_size_batches(dataset, batch_size: int, seed: int = 0, device: str = "cpu") -> Iterator[dict]:
    """Every item of ``dataset`` once, in the (seed, epoch 0) order of ``EpochLoader``, in batches of at most
    ``batch_size`` consecutive items of one image size (evaluation splits such as COCO's at shorter edge 800 mix
    sizes; equal-size splits give exactly ``EpochLoader``'s batches)."""
    loader = EpochLoader(dataset, min(batch_size, len(dataset)), seed, drop_last=False, device=device)
    _, order = loader._order(0)
    group: list[dict] = []
    for j in order:
        item = dataset[j]
        if group and (len(group) == batch_size or item["image"].shape[-2:] != group[-1]["image"].shape[-2:]):
            yield loader._finish(collate(group))
            group = []
        group.append(item)
    if group:
        yield loader._finish(collate(group))


def aux_features(spec_position: str, codec: nn.Module, recognizer, aux_branch: nn.Module, x: torch.Tensor,
                 labels: Any) -> tuple[Any, Any, tuple[int, int]]:
    """What the branch at ``spec_position`` reads for images ``x`` (the codec's y_hat / decoder feature of the padded
    x, or the recognizer's stage features of x_hat), with ``labels`` in that frame and the frame's size."""
    xp, pad = pad_to_multiple(x)
    out = codec_forward(codec, xp)
    if spec_position == "task":
        with recognizer.capture_features(aux_branch.inputs) as features:
            recognizer.predict(crop_to(out["x_hat"], pad))
        return dict(features), labels, tuple(x.shape[-2:])
    return out[spec_position], recognizer.pad_labels(labels, pad), tuple(xp.shape[-2:])


def train_aux_branch(position: str, aux_branch: nn.Module, codec: nn.Module, recognizer, train_set, cfg: TrainConfig,
                     checkpoint_path: str | Path, val_set=None,
                     seed: int = 0, log=print, device: str = "cpu") -> FitResult:
    """Warm start (design option ``aux.warm_start``): pre-train the auxiliary branch ALONE on the frozen codec's
    features with the recognizer's pseudo-labels, so that it is already competent when ICM training begins (in the
    paper it trains jointly for ~590k steps, competent for almost all of them; at a budget 10^4 times smaller a cold
    branch is still learning when training ends). The codec runs in training mode (y_hat = y + uniform noise, what the
    branch sees during ICM training) under ``no_grad``: nothing but the branch changes. Same clipping and Adam as
    ICM training; ``val_set``: the branch's mean loss on it (codec in eval mode) is logged per epoch."""
    torch.manual_seed(seed)
    params = list(aux_branch.parameters())
    opt = {"main": torch.optim.Adam(params, lr=cfg.lr)}
    steps = cfg.steps(len(train_set))
    codec_was = codec.training

    def branch_loss(x: torch.Tensor, labels: Any) -> torch.Tensor:
        with torch.no_grad():
            feats, labels, size = aux_features(position, codec, recognizer, aux_branch, x, labels)
        return aux_branch.loss(feats, labels, size)

    def step_fn(batch, step):
        codec.train()
        x = batch["image"]
        loss = branch_loss(x, recognizer.pseudo_labels(x))
        opt["main"].zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_max_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_max_norm)
        opt["main"].step()
        return {"loss": loss.detach()}

    validate = None
    if val_set is not None:
        @torch.no_grad()
        def validate(epoch):
            codec.eval()
            torch.manual_seed(seed)
            total, n = 0.0, 0
            for batch in equal_size_batches(val_set, cfg.batch_size, seed, device):
                x = batch["image"]
                total += float(branch_loss(x, recognizer.pseudo_labels(x))) * x.shape[0]
                n += x.shape[0]
            return {"aux": total / max(1, n)}

    try:
        return fit(modules={"aux_branch": aux_branch}, optimizers=opt, step_fn=step_fn,
                   loader_fn=train_loader(train_set, cfg, seed, device, steps), epochs=cfg.epochs, steps_per_epoch=steps,
                   lr_lambda=cfg.lr_lambda(steps), checkpoint_path=checkpoint_path,
                   meta={"job": "aux_warm_start", "position": position, "seed": seed, **cfg.job_meta()},
                   validate_fn=validate, log=log, log_every=cfg.log_every)
    finally:
        codec.train(codec_was)


@torch.no_grad()
def validation_terms(spec: IcmSpec, codec, recognizer, aux_branch, val_set, batch_size: int = 8, seed: int = 0,
                     device: str = "cpu") -> dict[str, float]:
    """Mean loss terms on the validation split, codec in eval mode (rounded latents). ``main`` is Eq. 4 (+MSE for
    Eq. 6 runs), the quantity Sec. 4.2 / Figs. 8-9 compare across branch positions."""
    torch.manual_seed(seed)  # the detector's RPN/RoI sampling inside the task loss is random
    sums: dict[str, float] = {}
    n = 0
    for batch in equal_size_batches(val_set, batch_size, seed, device):
        terms = icm_terms(spec, codec, recognizer, aux_branch, batch["image"])
        k = batch["image"].shape[0]
        for name, v in terms.items():
            sums[name] = sums.get(name, 0.0) + float(v) * k
        n += k
    return {k: v / n for k, v in sums.items()}


def train_icm(spec: IcmSpec, codec: nn.Module, recognizer, aux_branch: nn.Module | None, train_set, cfg: TrainConfig,
              checkpoint_path: str | Path, val_set=None, log=print, device: str = "cpu",
              on_step: Callable[[int, dict[str, Any]], None] | None = None, snapshots: dict[int, Path] | None = None,
              meta_extra: dict[str, Any] | None = None) -> FitResult:
    """Fine-tune ``codec`` (and the auxiliary branch) for ``spec``; the recognizer stays frozen.

    ``cfg``'s speed knobs (amp, channels_last, compile, workers) apply here; under ``torchrun`` the codec and the
    branch train with DistributedDataParallel on this rank's slice of every global batch (``icm_helpers.distributed``).
    ``on_step(step, logs)``: see ``fit``. ``snapshots``:
    {epoch: path}: the codec as it is after that epoch (quantiles fitted, tables built, as the final one) is saved
    there, for the budget study (dose-response). ``meta_extra``: more fields of the job's identity (checkpoint meta),
    e.g. how a warm-started branch was pre-trained."""
    if not getattr(recognizer, "frozen", False):
        raise ValueError("the recognizer must be frozen (recognizer.freeze()) before ICM training")
    torch.manual_seed(spec.seed)
    extra = list(aux_branch.parameters()) if aux_branch is not None else []
    opts = _codec_optimizers(codec, extra, cfg)
    params = [p for g in opts["main"].param_groups for p in g["params"]]
    groups = clip_groups(codec, extra, cfg.clip_scope)
    steps = cfg.steps(len(train_set))
    modules = {"codec": codec} if aux_branch is None else {"codec": codec, "aux_branch": aux_branch}
    plain_codec = codec
    # speed knobs and torchrun (issue 7); from here on codec / aux_branch may be DDP views of the modules above
    from . import distributed as dist_lib

    distributed = dist_lib.is_distributed()
    apply_speed_knobs(cfg, device, codec, aux_branch, recognizer, compile_recognizer=spec.aux_position != "task")
    if distributed:
        torch.manual_seed(spec.seed + 1_000_003 * dist_lib.rank())  # own noise / sampling stream per rank
        codec, aux_branch = dist_lib.wrap_trainables(codec, aux_branch, device)

    def step_fn(batch, step):
        terms = icm_terms(spec, codec, recognizer, aux_branch, batch["image"])
        # alpha_mode (adaptive_alpha.py): "fixed" returns terms["loss"] and terms unchanged (the paper's step)
        loss, terms = adaptive_alpha.training_loss(spec, terms, step, cfg.epochs * steps, params)
        q = _codec_step(loss, codec, opts, groups, cfg.clip_max_norm)
        return {**{k: v.detach() for k, v in terms.items()}, "quantile_loss": q}  # tensors: no per-step sync (fit reads them)

    validate = None
    if val_set is not None:
        def validate(epoch):
            return validation_terms(spec, codec, recognizer, aux_branch, val_set, cfg.batch_size, spec.seed, device)

    def snapshot(epoch: int) -> None:
        path = (snapshots or {}).get(epoch)
        if path is None or not dist_lib.is_main():
            return
        import copy

        from .codec import save_codec

        frozen = copy.deepcopy(plain_codec).eval()
        converge_quantiles(frozen)
        update_entropy_tables(frozen)
        save_codec(path, frozen, extra={"spec": spec.as_dict(), "epoch": epoch, "of_epochs": cfg.epochs})

    res = fit(modules=modules, optimizers=opts, step_fn=with_autocast(step_fn, cfg.amp, device),
              loader_fn=train_loader(train_set, cfg, spec.seed, device, steps, distributed), epochs=cfg.epochs,
              steps_per_epoch=steps, lr_lambda=cfg.lr_lambda(steps),
              checkpoint_path=checkpoint_path, meta={"job": "icm", **spec.as_dict(), **cfg.job_meta(), **(meta_extra or {})},
              validate_fn=with_autocast(validate, cfg.amp, device), log=log, log_every=cfg.log_every, distributed=distributed,
              on_step=on_step, on_epoch_end=snapshot if snapshots else None, desc=f"{spec.task}/{spec.run_name} (seed {spec.seed})")
    converge_quantiles(codec)
    update_entropy_tables(codec)
    return res
