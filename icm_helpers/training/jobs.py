"""The training jobs, each a ``step_fn`` and callbacks (``training.callbacks``) given to the one loop
(``training.loop.fit``).

- ``train_recognizer``: the suite's own recognizers on ground truth (notebook 01; frozen afterwards);
- ``train_start_codec``: the codec start point, Eq. 2 with MSE (the paper starts from CompressAI's MSE-pretrained
  cheng2020-attn);
- ``train_aux_branch``: the warm start of an auxiliary branch, alone, on the frozen start codec;
- ``train_icm``: ICM fine-tuning with Eq. 4 (w/o aux), Eq. 5 (w/ aux) or Eq. 6 (+ MSE, segmentation).

Adam on the network parameters, CompressAI's own Adam on the entropy bottleneck's quantiles, the gradient norms of the
codec and of the branch clipped separately (``clip_groups``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import adaptive_alpha
from .. import distributed as dist_lib
from ..aux_branches import keep_random_stream, own_random_stream, seed_random_stream, shuffle_labels
from ..codec import converge_quantiles, update_entropy_tables
from ..losses import human_rd_loss, rate_bpp
from ..precision import apply_speed_knobs, channels_last_applies, with_autocast
from .batching import EpochLoader, equal_size_batches
from .callbacks import CodecSnapshots, StepCurve, Validation
from .label_cache import PseudoLabelCache, label_source
from .loop import Callback, FitResult, fit
from .objective import IcmSpec, aux_features, icm_terms, validation_terms
from .settings import TrainConfig


def codec_optimizers(
    codec: nn.Module, extra: list[nn.Parameter], cfg: TrainConfig
) -> dict[str, torch.optim.Optimizer]:
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


def codec_step(loss: torch.Tensor, codec: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
               groups: list[list[nn.Parameter]], clip: float) -> torch.Tensor:
    """The codec's update from ``loss`` (optimizers from ``codec_optimizers``): backward, Adam step with each group's
    gradient norm clipped to ``clip`` on its own (``clip_groups``), then CompressAI's quantile step. Returns the
    quantile loss as a 0-dim tensor (no host-device sync). Runs outside autocast (the quantile loss is fp32, as the
    entropy model's)."""
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


def train_loader(
    train_set, cfg: TrainConfig, seed: int, device: str, steps: int, distributed: bool = False
) -> EpochLoader:
    """The training batches of a job: ``cfg``'s workers / pinning / channels_last; with ``distributed`` this rank's
    slice of each global batch."""
    return EpochLoader(
        train_set,
        cfg.batch_size,
        seed,
        cfg.crop_size,
        device=device,
        num_workers=int(cfg.num_workers),
        pin_memory=cfg.pin_memory,
        persistent_workers=cfg.persistent_workers,
        rank=dist_lib.rank() if distributed else 0,
        world_size=dist_lib.world_size() if distributed else 1,
        max_batches=steps,
        channels_last=channels_last_applies(cfg, device),
    )


def _fit_job(cfg: TrainConfig, train_set, seed: int, device: str, steps: int, distributed: bool = False,
             **fit_args: Any) -> FitResult:
    """``fit`` with what every job takes from its ``TrainConfig``: the seeded epoch loader, the epochs, the steps per
    epoch, the lr schedule and the logging interval."""
    return fit(loader_fn=train_loader(train_set, cfg, seed, device, steps, distributed), epochs=cfg.epochs,
               steps_per_epoch=steps, lr_lambda=cfg.lr_lambda(steps), log_every=cfg.log_every,
               distributed=distributed, **fit_args)


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

    return _fit_job(
        cfg, train_set, seed, device, steps,
        modules={"recognizer": recognizer},
        optimizers=opt,
        step_fn=step_fn,
        checkpoint_path=checkpoint_path,
        meta={"job": "recognizer", "task": recognizer.task, "seed": seed, **cfg.job_meta()},
        log=log,
    )


def train_start_codec(
    codec: nn.Module,
    train_set,
    cfg: TrainConfig,
    lambda_mse: float,
    checkpoint_path: str | Path,
    seed: int = 0,
    log=print,
    device: str = "cpu",
    val_set=None,
) -> FitResult:
    """Codec start point: Eq. 2 with MSE (CompressAI's 255^2 convention). ``val_set``: the mean Eq. 2 loss on it
    (codec in eval mode: rounded latents, the quantity that decides convergence) is logged per epoch."""
    torch.manual_seed(seed)
    opts = codec_optimizers(codec, [], cfg)
    groups = clip_groups(codec, [])
    steps = cfg.steps(len(train_set))

    def step_fn(batch, step):
        x = batch["image"]
        out = codec(x)
        rate = rate_bpp(out["likelihoods"], x.shape[-2] * x.shape[-1])
        loss = human_rd_loss(rate, x, out["x_hat"], lambda_mse)
        q = codec_step(loss, codec, opts, groups, cfg.clip_max_norm)
        return {
            "loss": loss.detach(),
            "bpp": rate.detach(),
            "mse": F.mse_loss(out["x_hat"].detach(), x),
            "quantile_loss": q,
        }

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

    res = _fit_job(
        cfg, train_set, seed, device, steps,
        modules={"codec": codec},
        optimizers=opts,
        step_fn=step_fn,
        checkpoint_path=checkpoint_path,
        meta={"job": "start_codec", "lambda_mse": lambda_mse, "seed": seed, **cfg.job_meta()},
        callbacks=[Validation(validate)] if validate is not None else [],
        log=log,
    )
    converge_quantiles(codec)
    update_entropy_tables(codec)
    return res


@torch.no_grad()
def branch_val_loss(position: str, aux_branch: nn.Module, codec: nn.Module, recognizer, val_set, batch_size: int,
                    seed: int, device: str = "cpu", labels_of=None) -> float:
    """The branch's mean loss over ``val_set`` against the TRUE pseudo-labels, the codec and the branch in eval mode
    (what ``train_aux_branch`` logs as ``val_aux`` after each round); leaves the codec in eval mode, the branch in
    its mode."""
    labels_of = labels_of or label_source(recognizer, None)
    codec.eval()
    branch_was = aux_branch.training
    aux_branch.eval()
    torch.manual_seed(seed)
    total, n = 0.0, 0
    try:
        for batch in equal_size_batches(val_set, batch_size, seed, device):
            x = batch["image"]
            targets = labels_of(x)
            with keep_random_stream(aux_branch):  # as a training step computes it (train_aux_branch's branch_loss)
                feats, targets, size = aux_features(position, codec, recognizer, aux_branch, x, targets)
                with own_random_stream(aux_branch):
                    total += float(aux_branch.loss(feats, targets, size)) * x.shape[0]
            n += x.shape[0]
    finally:
        aux_branch.train(branch_was)
    return total / max(1, n)


def train_aux_branch(position: str, aux_branch: nn.Module, codec: nn.Module, recognizer, train_set, cfg: TrainConfig,
                     checkpoint_path: str | Path, val_set=None, seed: int = 0, log=print, device: str = "cpu",
                     labels: str = "pseudo", callbacks: Sequence[Callback] = ()) -> FitResult:
    """Warm start (design option ``aux.warm_start``): pre-train the auxiliary branch ALONE on the frozen codec's
    features with the recognizer's pseudo-labels, so that it is already competent when ICM training begins (in the
    paper it trains jointly for ~590k steps, competent for almost all of them; at a budget 10^4 times smaller a cold
    branch is still learning when training ends). The codec runs in training mode (y_hat = y + uniform noise, what the
    branch sees during ICM training) under ``no_grad``: nothing but the branch changes. Same clipping and Adam as
    ICM training; ``val_set``: the branch's mean loss on it (codec in eval mode) is logged per epoch, always against
    the TRUE pseudo-labels (for a control branch, ``labels="shuffled"``, that is its chance level: it learns the
    labels of other images). ``callbacks``: more callbacks of ``fit``, after the validation (e.g. the plateau rule,
    ``training.stopping``, which stops the pre-training and, with decays, scales its learning rate: R6v2b)."""
    torch.manual_seed(seed)
    seed_random_stream(aux_branch, seed)
    params = list(aux_branch.parameters())
    opt = {"main": torch.optim.Adam(params, lr=cfg.lr)}
    steps = cfg.steps(len(train_set))
    codec_was = codec.training
    labels_of = label_source(recognizer, PseudoLabelCache() if cfg.cache_labels else None)

    def branch_loss(x: torch.Tensor, targets: Any) -> torch.Tensor:
        with torch.no_grad():
            feats, targets, size = aux_features(position, codec, recognizer, aux_branch, x, targets)
        with own_random_stream(aux_branch):
            return aux_branch.loss(feats, targets, size)

    def step_fn(batch, step):
        codec.train()
        x = batch["image"]
        targets = labels_of(x)
        loss = branch_loss(x, shuffle_labels(targets) if labels == "shuffled" else targets)
        opt["main"].zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_max_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_max_norm)
        opt["main"].step()
        return {"loss": loss.detach()}

    validate = None
    if val_set is not None:
        def validate(epoch):
            return {"aux": branch_val_loss(position, aux_branch, codec, recognizer, val_set, cfg.batch_size, seed,
                                           device, labels_of)}

    try:
        return _fit_job(
            cfg, train_set, seed, device, steps,
            modules={"aux_branch": aux_branch},
            optimizers=opt,
            step_fn=step_fn,
            checkpoint_path=checkpoint_path,
            meta={"job": "aux_warm_start", "position": position, "seed": seed, **cfg.job_meta(),
                  **({"labels": labels} if labels != "pseudo" else {})},
            callbacks=[*([Validation(validate)] if validate is not None else []), *callbacks],
            log=log,
        )
    finally:
        codec.train(codec_was)


def train_icm(spec: IcmSpec, codec: nn.Module, recognizer, aux_branch: nn.Module | None, train_set, cfg: TrainConfig,
              checkpoint_path: str | Path, val_set=None, log=print, device: str = "cpu",
              callbacks: Sequence[Callback] = (), snapshots: dict[int, Path] | None = None,
              meta_extra: dict[str, Any] | None = None, val_steps: list[int] | None = None,
              curve_path: str | Path | None = None, epoch_validation: bool = True) -> FitResult:
    """Fine-tune ``codec`` (and the auxiliary branch) for ``spec``; the recognizer stays frozen.

    ``cfg``'s speed knobs (amp, channels_last, compile, workers) apply here; under ``torchrun`` the codec and the
    branch train with DistributedDataParallel on this rank's slice of every global batch (``icm_helpers.distributed``).
    ``callbacks``: more callbacks of ``fit``, called after the job's own (e.g. the benchmark's step timer).
    ``snapshots``: {n: path}: the codec as it is after n training steps (quantiles fitted, tables built, as the final
    one) is saved there, for the budget study (dose-response, ``CodecSnapshots``); the run goes on as without it.
    ``meta_extra``: more fields of the job's identity (checkpoint meta), e.g. how a warm-started branch was
    pre-trained. ``val_steps`` + ``curve_path``: the validation terms on ``val_set`` after each of these numbers of
    steps (0 = before the first), written to ``curve_path`` (JSON list) as they come (``StepCurve``); measuring draws
    nothing from the training streams. ``epoch_validation``: also after every epoch (``history``), when ``val_set`` is
    given.
    The branch draws its random numbers from its own stream, seeded by the run's seed (``seed_random_stream``)."""
    if not getattr(recognizer, "frozen", False):
        raise ValueError("the recognizer must be frozen (recognizer.freeze()) before ICM training")
    if aux_branch is not None:
        seed_random_stream(aux_branch, spec.seed)
    torch.manual_seed(spec.seed)
    extra = list(aux_branch.parameters()) if aux_branch is not None else []
    opts = codec_optimizers(codec, extra, cfg)
    params = [p for g in opts["main"].param_groups for p in g["params"]]
    groups = clip_groups(codec, extra, cfg.clip_scope)
    steps = cfg.steps(len(train_set))
    modules = {"codec": codec} if aux_branch is None else {"codec": codec, "aux_branch": aux_branch}
    plain_codec = codec
    # speed knobs and torchrun; from here on codec / aux_branch may be DDP views of the modules above
    distributed = dist_lib.is_distributed()
    apply_speed_knobs(cfg, device, codec, aux_branch, recognizer, compile_recognizer=spec.aux_position != "task")
    if distributed:
        torch.manual_seed(spec.seed + 1_000_003 * dist_lib.rank())  # own noise / sampling stream per rank
        codec, aux_branch = dist_lib.wrap_trainables(codec, aux_branch, device)

    labels_of = label_source(recognizer, PseudoLabelCache() if cfg.cache_labels else None)

    def step_fn(batch, step):
        terms = icm_terms(spec, codec, recognizer, aux_branch, batch["image"], labels_of=labels_of)
        # alpha_mode (adaptive_alpha.py): "fixed" returns terms["loss"] and terms unchanged (the paper's step)
        loss, terms = adaptive_alpha.training_loss(spec, terms, step, cfg.epochs * steps, params)
        q = codec_step(loss, codec, opts, groups, cfg.clip_max_norm)
        return {
            **{k: v.detach() for k, v in terms.items()},
            "quantile_loss": q,
        }  # tensors: no per-step sync (fit reads them)

    def measure() -> dict[str, float]:
        return validation_terms(spec, codec, recognizer, aux_branch, val_set, cfg.batch_size, spec.seed, device,
                                labels_of=labels_of)

    validate = (lambda epoch: measure()) if val_set is not None and epoch_validation else None
    hooks: list[Callback] = [Validation(with_autocast(validate, cfg.amp, device))] if validate is not None else []
    snapshot = CodecSnapshots(plain_codec, snapshots, spec.as_dict(), cfg.epochs * steps) if snapshots else None
    curve = None
    if val_steps:
        if val_set is None or curve_path is None:
            raise ValueError("val_steps needs val_set and curve_path")
        curve = StepCurve(curve_path, val_steps, with_autocast(measure, cfg.amp, device), list(modules.values()))
        curve.measure_at(0)  # the weights before training, before fit resumes a checkpoint
    hooks += [h for h in (snapshot, curve) if h is not None]

    res = _fit_job(
        cfg, train_set, spec.seed, device, steps,
        modules=modules,
        optimizers=opts,
        step_fn=with_autocast(step_fn, cfg.amp, device),
        checkpoint_path=checkpoint_path,
        meta={"job": "icm", **spec.as_dict(), **cfg.job_meta(), **(meta_extra or {})},
        callbacks=[*hooks, *callbacks],
        log=log,
        distributed=distributed,
        desc=f"{spec.task}/{spec.run_name} (seed {spec.seed})",
    )
    measured = curve.measured if curve else {}
    res.hook_seconds = {"snapshots": snapshot.seconds if snapshot else 0.0,
                        "validation": sum(v for k, v in measured.items() if k > 0),
                        "validation_before_training": measured.get(0, 0.0)}
    converge_quantiles(codec)
    update_entropy_tables(codec)
    return res
