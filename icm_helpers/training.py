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

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .codec import codec_forward, converge_quantiles, load_state, update_entropy_tables
from .data import collate, crop_item, random_crop, to_device
from .io import atomic_torch_save, remove_stale_temps
from .losses import check_lambda_alpha, human_rd_loss, icm_loss, rate_bpp


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


def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, crop_size: int | None = None, drop_last: bool = True,
                 device: str = "cpu") -> Iterable[dict]:
    """Shuffled batches for one epoch; order and crops depend only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(dataset), generator=g).tolist()
    n = len(order) // batch_size * batch_size if drop_last else len(order)
    if n == 0:
        raise ValueError(f"dataset of {len(dataset)} images is smaller than batch_size {batch_size}")
    for i in range(0, n, batch_size):
        items = [dataset[j] for j in order[i: i + batch_size]]
        if crop_size and len({tuple(it["image"].shape[-2:]) for it in items}) > 1:
            # images of different sizes (COCO): one random window per image, zero-padded when smaller than the crop
            yield to_device(collate([crop_item(it, crop_size, g) for it in items]), device)
        else:
            batch = collate(items)
            yield to_device(random_crop(batch, crop_size, g) if crop_size else batch, device)


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


def fit(*, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], step_fn: Callable[[dict, int], dict[str, float]],
        loader_fn: Callable[[int], Iterable[dict]], epochs: int, steps_per_epoch: int, lr_lambda: Callable[[int], float],
        checkpoint_path: str | Path, meta: dict[str, Any], validate_fn: Callable[[int], dict[str, float]] | None = None,
        log: Callable[[str], None] | None = print, log_every: int = 0, stop_after_epoch: int | None = None) -> FitResult:
    """Run ``epochs`` epochs of ``step_fn(batch, global_step)``; checkpoint after each epoch; resume if possible.

    ``step_fn`` does forward, backward and optimizer steps and returns float logs (must contain ``"loss"``).
    ``meta`` identifies the job: a checkpoint written for other meta is never resumed (error instead).
    ``stop_after_epoch`` ends early after that epoch (used by tests to simulate an interrupted run).
    """
    checkpoint_path = Path(checkpoint_path)
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for k, o in optimizers.items()}
    result = FitResult()
    start_epoch = 0
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
        torch.set_rng_state(ckpt["rng"])
        result.history = list(ckpt["history"])
        start_epoch = result.resumed_from_epoch = int(ckpt["epoch"])
        if log and start_epoch < epochs:
            log(f"resuming {checkpoint_path.parent.name} from epoch {start_epoch}/{epochs}")
    t0 = time.time()
    for epoch in range(start_epoch, epochs):
        for m in modules.values():
            m.train()
        sums: dict[str, float] = {}
        n = 0
        for i, batch in enumerate(loader_fn(epoch)):
            if i >= steps_per_epoch:
                break
            step = epoch * steps_per_epoch + i
            logs = step_fn(batch, step)
            bad = [k for k, v in logs.items() if not math.isfinite(float(v))]  # the loss, and e.g. the quantile loss
            if bad:
                raise NonFiniteLossError(f"non-finite {', '.join(bad)} ({logs}) at epoch {epoch}, step {step}; "
                                         f"nothing was saved for this epoch; last good checkpoint: {checkpoint_path}")
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            for s in schedulers.values():
                s.step()
            if log and log_every and (step + 1) % log_every == 0:
                log(f"  step {step + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        record = {"epoch": epoch + 1, **{f"train_{k}": v / max(1, n) for k, v in sums.items()},
                  "lr": next(iter(optimizers.values())).param_groups[0]["lr"]}
        if validate_fn is not None:
            for m in modules.values():
                m.eval()
            with torch.random.fork_rng():
                record.update({f"val_{k}": v for k, v in validate_fn(epoch).items()})
        result.history.append(record)
        atomic_torch_save({"meta": meta, "epoch": epoch + 1, "history": result.history, "rng": torch.get_rng_state(),
                           "modules": {k: m.state_dict() for k, m in modules.items()},
                           "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                           "schedulers": {k: s.state_dict() for k, s in schedulers.items()}}, checkpoint_path)
        if log:
            log(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
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
    quantile_lr: float = 1e-3  # CompressAI's separate optimizer for the entropy bottleneck's quantiles
    log_every: int = 0
    poly_step: str = "iteration"  # "iteration" or "epoch" (Sec. 4.1, segmentation: "polynomial decay in each epoch")

    def __post_init__(self) -> None:
        if self.crop_size is not None and self.crop_size % 64:
            raise ValueError(f"crop_size must be a multiple of 64 (cheng2020-attn's latent stride chain), got {self.crop_size}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0, got {self.epochs}, {self.batch_size}, {self.lr}")
        if self.poly_step not in ("iteration", "epoch"):
            raise ValueError(f"poly_step must be 'iteration' or 'epoch', got {self.poly_step!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

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


def _codec_step(loss: torch.Tensor, codec: nn.Module, optimizers: dict[str, torch.optim.Optimizer], params: list[nn.Parameter],
                clip: float) -> float:
    optimizers["main"].zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizers["main"].step()
    optimizers["quantiles"].zero_grad(set_to_none=True)
    q = codec.aux_loss()  # CompressAI's entropy-bottleneck quantile loss (NOT the paper's auxiliary loss)
    q.backward()
    optimizers["quantiles"].step()
    return float(q.detach())


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
        return {"loss": float(loss.detach())}

    return fit(modules={"recognizer": recognizer}, optimizers=opt, step_fn=step_fn,
               loader_fn=lambda e: epoch_loader(train_set, cfg.batch_size, seed, e, cfg.crop_size, device=device), epochs=cfg.epochs,
               steps_per_epoch=steps, lr_lambda=cfg.lr_lambda(steps),
               checkpoint_path=checkpoint_path, meta={"job": "recognizer", "task": recognizer.task, "seed": seed, **asdict(cfg)},
               log=log, log_every=cfg.log_every)


def train_start_codec(codec: nn.Module, train_set, cfg: TrainConfig, lambda_mse: float, checkpoint_path: str | Path, seed: int = 0,
                      log=print, device: str = "cpu") -> FitResult:
    """Codec start point: Eq. 2 with MSE (CompressAI's 255^2 convention)."""
    torch.manual_seed(seed)
    opts = _codec_optimizers(codec, [], cfg)
    params = [p for g in opts["main"].param_groups for p in g["params"]]
    steps = cfg.steps(len(train_set))

    def step_fn(batch, step):
        x = batch["image"]
        out = codec(x)
        rate = rate_bpp(out["likelihoods"], x.shape[-2] * x.shape[-1])
        loss = human_rd_loss(rate, x, out["x_hat"], lambda_mse)
        q = _codec_step(loss, codec, opts, params, cfg.clip_max_norm)
        return {"loss": float(loss.detach()), "bpp": float(rate.detach()), "mse": float(F.mse_loss(out["x_hat"].detach(), x)), "quantile_loss": q}

    res = fit(modules={"codec": codec}, optimizers=opts, step_fn=step_fn,
              loader_fn=lambda e: epoch_loader(train_set, cfg.batch_size, seed, e, cfg.crop_size, device=device), epochs=cfg.epochs,
              steps_per_epoch=steps, lr_lambda=cfg.lr_lambda(steps),
              checkpoint_path=checkpoint_path, meta={"job": "start_codec", "lambda_mse": lambda_mse, "seed": seed, **asdict(cfg)},
              log=log, log_every=cfg.log_every)
    converge_quantiles(codec)
    update_entropy_tables(codec)
    return res


@dataclass(frozen=True)
class IcmSpec:
    """What identifies one ICM training run (its results are stored under ``run_name``)."""

    task: str
    lambda_: float
    aux_position: str | None = "enc"
    alpha: float = 0.5
    add_mse: bool = False  # Eq. 6 (the paper's segmentation setting)
    seed: int = 0

    def __post_init__(self) -> None:
        from .aux_branches import check_aux_position
        from .recognizers import check_task

        check_task(self.task)
        check_lambda_alpha(self.lambda_, self.alpha)
        object.__setattr__(self, "aux_position", check_aux_position(self.aux_position))

    @property
    def method(self) -> str:
        return "baseline" if self.aux_position is None else f"aux_{self.aux_position}"

    @property
    def run_name(self) -> str:
        return f"{self.method}_lambda{self.lambda_:g}"


def icm_terms(spec: IcmSpec, codec: nn.Module, recognizer, aux_branch: nn.Module | None, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """All loss terms of one batch (Eq. 4-6). Pseudo-labels come from the recognizer on the ORIGINAL x."""
    labels = recognizer.pseudo_labels(x)
    out = codec_forward(codec, x)
    rate = rate_bpp(out["likelihoods"], x.shape[-2] * x.shape[-1])
    if aux_branch is not None and spec.aux_position == "task":
        # aux-task (Sec. 4.2): the branch reads the recognizer's own backbone features of x_hat, recorded during
        # the task-loss forward (one backbone pass; the aux gradient flows back through the frozen stages)
        with recognizer.capture_features(aux_branch.inputs) as features:
            task = recognizer.task_loss(out["x_hat"], labels)
        aux = aux_branch.loss(features, labels, tuple(x.shape[-2:]))
    else:
        task = recognizer.task_loss(out["x_hat"], labels)
        aux = aux_branch.loss(out[spec.aux_position], labels, tuple(x.shape[-2:])) if aux_branch is not None else None
    mse = F.mse_loss(out["x_hat"], x) if spec.add_mse else None
    return icm_loss(rate, task, spec.lambda_, aux, spec.alpha, mse)


@torch.no_grad()
def validation_terms(spec: IcmSpec, codec, recognizer, aux_branch, val_set, batch_size: int = 8, seed: int = 0,
                     device: str = "cpu") -> dict[str, float]:
    """Mean loss terms on the validation split, codec in eval mode (rounded latents). ``main`` is Eq. 4 (+MSE for
    Eq. 6 runs), the quantity Sec. 4.2 / Figs. 8-9 compare across branch positions."""
    torch.manual_seed(seed)  # the detector's RPN/RoI sampling inside the task loss is random
    sums: dict[str, float] = {}
    n = 0
    for batch in epoch_loader(val_set, min(batch_size, len(val_set)), seed, 0, drop_last=False, device=device):
        terms = icm_terms(spec, codec, recognizer, aux_branch, batch["image"])
        k = batch["image"].shape[0]
        for name, v in terms.items():
            sums[name] = sums.get(name, 0.0) + float(v) * k
        n += k
    return {k: v / n for k, v in sums.items()}


def train_icm(spec: IcmSpec, codec: nn.Module, recognizer, aux_branch: nn.Module | None, train_set, cfg: TrainConfig,
              checkpoint_path: str | Path, val_set=None, log=print, device: str = "cpu") -> FitResult:
    """Fine-tune ``codec`` (and the auxiliary branch) for ``spec``; the recognizer stays frozen."""
    if not getattr(recognizer, "frozen", False):
        raise ValueError("the recognizer must be frozen (recognizer.freeze()) before ICM training")
    torch.manual_seed(spec.seed)
    extra = list(aux_branch.parameters()) if aux_branch is not None else []
    opts = _codec_optimizers(codec, extra, cfg)
    params = [p for g in opts["main"].param_groups for p in g["params"]]
    steps = cfg.steps(len(train_set))
    modules = {"codec": codec} if aux_branch is None else {"codec": codec, "aux_branch": aux_branch}

    def step_fn(batch, step):
        terms = icm_terms(spec, codec, recognizer, aux_branch, batch["image"])
        q = _codec_step(terms["loss"], codec, opts, params, cfg.clip_max_norm)
        return {**{k: float(v.detach()) for k, v in terms.items()}, "quantile_loss": q}

    validate = None
    if val_set is not None:
        def validate(epoch):
            return validation_terms(spec, codec, recognizer, aux_branch, val_set, cfg.batch_size, spec.seed, device)

    res = fit(modules=modules, optimizers=opts, step_fn=step_fn,
              loader_fn=lambda e: epoch_loader(train_set, cfg.batch_size, spec.seed, e, cfg.crop_size, device=device), epochs=cfg.epochs,
              steps_per_epoch=steps, lr_lambda=cfg.lr_lambda(steps),
              checkpoint_path=checkpoint_path, meta={"job": "icm", **asdict(spec), **asdict(cfg)}, validate_fn=validate,
              log=log, log_every=cfg.log_every)
    converge_quantiles(codec)
    update_entropy_tables(codec)
    return res
