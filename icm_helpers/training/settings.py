"""``TrainConfig``: the optimisation settings of one training job, as profiles write them."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from .schedule import poly_lr_lambda


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
    warmup_steps: int = 0  # linear learning-rate warm-up over the first iterations (protocol v2, V2); 0 = none
    # ---- speed knobs: they change how fast a job runs, not what it computes (beyond numerical noise for
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
    # pseudo-labels computed once per training / validation image (``label_cache``); needs crop_size null (a random
    # crop is a new image every time); bit-identical training (tests/test_label_cache.py)
    cache_labels: bool = False

    SPEED_FIELDS = (
        "amp",
        "channels_last",
        "compile",
        "num_workers",
        "pin_memory",
        "persistent_workers",
        "cudnn_benchmark",
        "cache_labels",
    )

    LATER_FIELDS = {"warmup_steps": 0}

    def __post_init__(self) -> None:
        if self.amp not in (None, "bf16"):
            raise ValueError(
                f"amp must be null or 'bf16', got {self.amp!r} (fp16 would need a gradient scaler; bf16 does not)"
            )
        if int(self.num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.crop_size is not None and self.crop_size % 64:
            raise ValueError(
                f"crop_size must be a multiple of 64 (cheng2020-attn's latent stride chain), got {self.crop_size}"
            )
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(
                f"need epochs >= 1, batch_size >= 1 and lr > 0, got {self.epochs}, {self.batch_size}, {self.lr}"
            )
        if self.clip_scope not in ("module", "joint"):
            raise ValueError(f"clip_scope must be 'module' or 'joint', got {self.clip_scope!r}")
        if self.cache_labels and self.crop_size is not None:
            raise ValueError(
                f"cache_labels needs crop_size null: with random {self.crop_size}-pixel crops every training image is "
                "new, so a cache would only grow; set cache_labels: false or crop_size: null"
            )
        if int(self.warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.poly_step not in ("iteration", "epoch"):
            raise ValueError(f"poly_step must be 'iteration' or 'epoch', got {self.poly_step!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def job_meta(self) -> dict[str, Any]:
        """The settings that identify the job (checkpoint meta): everything but the speed knobs. A setting added later
        is left out at its default (``warmup_steps`` 0), so jobs trained before it existed keep their identity."""
        meta = {k: v for k, v in asdict(self).items() if k not in self.SPEED_FIELDS}
        for k, default in self.LATER_FIELDS.items():
            if meta[k] == default:
                del meta[k]
        return meta

    @classmethod
    def without_speed_knobs(cls, block: dict[str, Any]) -> dict[str, Any]:
        """A profile's train block as it identifies a job: the speed knobs left out (they change no result)."""
        return {k: v for k, v in block.items() if k not in cls.SPEED_FIELDS}

    def steps(self, n_train: int) -> int:
        return self.steps_per_epoch or max(1, n_train // self.batch_size)

    def lr_lambda(self, steps_per_epoch: int) -> Callable[[int], float]:
        """The learning-rate multiplier per iteration: constant, then polynomial decay per iteration or per epoch."""
        return poly_lr_lambda(self.epochs * steps_per_epoch, self.poly_start_frac, self.poly_power,
                              steps_per_decay=steps_per_epoch if self.poly_step == "epoch" else 1,
                              warmup_steps=self.warmup_steps)
