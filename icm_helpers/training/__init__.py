"""Training, one concept per module:

- ``objective``: the paper's objective, Eq. 4-6 (``IcmSpec``, ``icm_terms``, ``validation_terms``);
- ``loop``: THE training loop ``fit`` (checkpoints, resume, non-finite checks) and its ``Callback`` hooks;
- ``callbacks``: validation, learning-rate scales, step curves and snapshots as callbacks; ``stopping``: the plateau
  rule (early stopping);
- ``jobs``: what is trained with it (recognizers, the start codec, a warm-started auxiliary branch, ICM fine-tuning);
- ``batching``: the batches of an epoch as a function of (seed, epoch);
- ``settings``: ``TrainConfig``, the optimisation settings of a job; ``schedule``: its learning-rate schedule;
- ``precision``: speed knobs (bf16 autocast with an fp32 rate path, channels_last, compile).

The names below are the package's API (``from icm_helpers.training import train_icm``).
"""
from ..data import InMemory
from ..precision import apply_speed_knobs, channels_last_applies, fp32_detection_heads, with_autocast
from .batching import EpochLoader, epoch_loader, equal_size_batches
from .callbacks import CodecSnapshots, LrScale, StepCurve, Validation
from .jobs import (
    clip_groups,
    codec_optimizers,
    codec_step,
    train_aux_branch,
    train_icm,
    train_loader,
    train_recognizer,
    train_start_codec,
)
from .loop import Callback, FitResult, FitState, NonFiniteLossError, fit
from .loop import _StepLogs as _StepLogs
from .objective import AUX_INITS, IcmSpec, aux_features, icm_terms, validation_terms
from .schedule import poly_lr_lambda
from .settings import TrainConfig

__all__ = ["AUX_INITS", "Callback", "CodecSnapshots", "EpochLoader", "FitResult", "FitState", "IcmSpec", "InMemory",
           "LrScale", "NonFiniteLossError", "StepCurve", "TrainConfig", "Validation", "apply_speed_knobs",
           "aux_features", "channels_last_applies", "clip_groups", "codec_optimizers", "codec_step", "epoch_loader",
           "equal_size_batches", "fit", "fp32_detection_heads", "icm_terms", "poly_lr_lambda", "train_aux_branch",
           "train_icm", "train_loader", "train_recognizer", "train_start_codec", "validation_terms", "with_autocast"]
