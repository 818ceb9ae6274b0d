"""The paper's objective, Eq. 4-6, on one batch: what an ICM run is (``IcmSpec``) and the terms of its loss.

    Eq. 4 (w/o aux)        L = R + lambda E(y, y_hat)
    Eq. 5 (w/ aux)         L = R + lambda { E(y, y_hat) + alpha E(y, y_hat_aux) }
    Eq. 6 (segmentation)   L = R + lambda { E(y, y_hat) + alpha E(y, y_hat_aux) + MSE(x, x_hat) }

y = the frozen recognizer's output on the ORIGINAL image (pseudo-labels), y_hat = its output on the decoded image,
y_hat_aux = the auxiliary branch's output on the codec's latent (aux-enc), decoder feature (aux-dec) or the
recognizer's own features of x_hat (aux-task). The terms come from ``losses.icm_loss``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..adaptive_alpha import check_alpha_mode
from ..aux_branches import (
    check_aux_labels,
    check_aux_position,
    keep_random_stream,
    own_random_stream,
    shuffle_labels,
)
from ..codec import codec_forward, crop_to, pad_to_multiple
from ..losses import check_lambda_alpha, human_rd_loss, icm_loss, rate_bpp
from ..methods import icm_method_id
from ..registry import check_task
from .batching import equal_size_batches

AUX_INITS = ("cold", "warm")
# what the codec is fine-tuned for: the recognizer's task (Eq. 4-6) or MSE (Eq. 2: the positive control of protocol v2,
# the start codec fine-tuned for human vision for the same steps; lambda_ is then Eq. 2's lambda)
OBJECTIVES = ("task", "mse")


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
    # alone on the start codec's latents with the same pseudo-labels first: ``train_aux_branch``, profile
    # aux_warm_start)
    aux_init: str = "cold"
    aux_labels: str = "pseudo"  # "pseudo" (the paper) | "shuffled" (the control branch, protocol v2)
    objective: str = "task"  # "task" (Eq. 4-6) | "mse" (Eq. 2, the positive control)

    def __post_init__(self) -> None:
        check_task(self.task)
        check_lambda_alpha(self.lambda_, self.alpha)
        object.__setattr__(self, "aux_position", check_aux_position(self.aux_position))
        check_alpha_mode(self.alpha_mode)
        if self.aux_init not in AUX_INITS:
            raise ValueError(f"unknown aux_init {self.aux_init!r}; valid: {', '.join(AUX_INITS)}")
        if self.aux_position is None and self.aux_init != "cold":
            raise ValueError("aux_init='warm' pre-trains an auxiliary branch, but aux_position=None has none")
        check_aux_labels(self.aux_labels)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.objective == "mse" and self.aux_position is not None:
            raise ValueError("objective='mse' (Eq. 2) fine-tunes the codec alone: it takes no auxiliary branch")
        if self.aux_position is None and self.aux_labels != "pseudo":
            raise ValueError("aux_labels='shuffled' sets the branch's labels, but aux_position=None has no branch")
        if self.aux_position is None and self.alpha_mode != "fixed":
            raise ValueError(
                f"alpha_mode={self.alpha_mode!r} weights the auxiliary loss, but aux_position=None has none; "
                "use alpha_mode='fixed' for the w/o-aux baseline (Experiment.spec does this for you)"
            )

    @property
    def method(self) -> str:
        return icm_method_id(self.aux_position, self.alpha_mode, self.aux_init, self.aux_labels, self.objective)

    # fields added after the paper's runs existed: left out of the identity at these defaults, so earlier runs keep
    # the identity (and resumable checkpoints) they had
    LATER_DEFAULTS = {"alpha_mode": "fixed", "aux_init": "cold", "aux_labels": "pseudo", "objective": "task"}

    def as_dict(self) -> dict[str, Any]:
        """The fields that identify the run (checkpoint meta, stored spec), the ``LATER_DEFAULTS`` only when set."""
        return {k: v for k, v in asdict(self).items() if self.LATER_DEFAULTS.get(k, object()) != v}

    def later_fields(self) -> dict[str, Any]:
        """The ``LATER_DEFAULTS`` fields that differ from their default (what a result record adds for this run)."""
        return {k: getattr(self, k) for k, d in self.LATER_DEFAULTS.items() if getattr(self, k) != d}

    @property
    def run_name(self) -> str:
        return f"{self.method}_lambda{self.lambda_:g}"


def icm_terms(spec: IcmSpec, codec: nn.Module, recognizer, aux_branch: nn.Module | None, x: torch.Tensor,
              labels: Any = None, labels_of: Callable[[torch.Tensor], Any] | None = None) -> dict[str, torch.Tensor]:
    """All loss terms of one batch (Eq. 4-6). Pseudo-labels come from the recognizer on the ORIGINAL x (``labels``:
    given when they were computed beforehand on the same x; ``labels_of``: what computes them, default
    ``recognizer.pseudo_labels``, e.g. a ``label_cache.PseudoLabelCache``).

    Images of any size: the codec codes x padded to a multiple of 64 (``pad_to_multiple``, the evaluation's rule,
    Sec. 4.1); the recognizer sees x_hat cropped back to x's size; the rate is counted over x's pixels, as in the
    evaluation. A branch on the codec's latent (aux-enc, aux-dec) sees the padded frame, so its labels are moved
    there (``recognizer.pad_labels``); aux-task reads the recognizer's features of the cropped x_hat."""
    if spec.objective == "mse":
        return _mse_terms(spec, codec, x)
    if labels is None:
        labels = (labels_of or recognizer.pseudo_labels)(x)
    xp, pad = pad_to_multiple(x)
    out = codec_forward(codec, xp)
    x_hat = crop_to(out["x_hat"], pad)
    rate = rate_bpp(out["likelihoods"], x.shape[-2] * x.shape[-1])
    aux_labels = shuffle_labels(labels) if spec.aux_labels == "shuffled" else labels
    if aux_branch is not None and spec.aux_position == "task":
        # aux-task (Sec. 4.2): the branch reads the recognizer's own backbone features of x_hat, recorded during
        # the task-loss forward (one backbone pass; the aux gradient flows back through the frozen stages)
        with recognizer.capture_features(aux_branch.inputs) as features:
            task = recognizer.task_loss(x_hat, labels)
        with own_random_stream(aux_branch):
            aux = aux_branch.loss(features, aux_labels, tuple(x.shape[-2:]))
    else:
        task = recognizer.task_loss(x_hat, labels)
        aux = None
        if aux_branch is not None:
            with own_random_stream(aux_branch):  # the branch's draws never shift the codec's or recognizer's (V7)
                aux = aux_branch.loss(out[spec.aux_position], recognizer.pad_labels(aux_labels, pad),
                                      tuple(xp.shape[-2:]))
    mse = F.mse_loss(x_hat, x) if spec.add_mse else None
    return icm_loss(rate, task, spec.lambda_, aux, spec.alpha, mse)


def _mse_terms(spec: IcmSpec, codec: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 2 (MSE on the 0-255 scale, CompressAI's convention) on x padded as every ICM run pads it: the positive
    control's loss. ``main`` is the same loss (it has no auxiliary term)."""
    xp, pad = pad_to_multiple(x)
    out = codec_forward(codec, xp)
    x_hat = crop_to(out["x_hat"], pad)
    rate = rate_bpp(out["likelihoods"], x.shape[-2] * x.shape[-1])
    loss = human_rd_loss(rate, x, x_hat, spec.lambda_)
    return {"loss": loss, "main": loss, "rate": rate, "mse": F.mse_loss(x_hat, x)}


def aux_features(spec_position: str, codec: nn.Module, recognizer, aux_branch: nn.Module, x: torch.Tensor,
                 labels: Any) -> tuple[Any, Any, tuple[int, int]]:
    """What the branch at ``spec_position`` reads for images ``x`` (the codec's y_hat / decoder feature of the padded
    x, or the recognizer's stage features of x_hat), with ``labels`` in that frame and the frame's size (``labels``
    as given: a control branch passes them shuffled)."""
    xp, pad = pad_to_multiple(x)
    out = codec_forward(codec, xp)
    if spec_position == "task":
        with recognizer.capture_features(aux_branch.inputs) as features:
            recognizer.predict(crop_to(out["x_hat"], pad))
        return dict(features), labels, tuple(x.shape[-2:])
    return out[spec_position], recognizer.pad_labels(labels, pad), tuple(xp.shape[-2:])


@torch.no_grad()
def validation_terms(spec: IcmSpec, codec, recognizer, aux_branch, val_set, batch_size: int = 8, seed: int = 0,
                     device: str = "cpu", labels_of: Callable[[torch.Tensor], Any] | None = None) -> dict[str, float]:
    """Mean loss terms on the validation split, codec in eval mode (rounded latents). ``main`` is Eq. 4 (+MSE for
    Eq. 6 runs), the quantity Sec. 4.2 / Figs. 8-9 compare across branch positions. ``labels_of``: as ``icm_terms``."""
    torch.manual_seed(seed)  # the detector's RPN/RoI sampling inside the task loss is random
    sums: dict[str, float] = {}
    n = 0
    for batch in equal_size_batches(val_set, batch_size, seed, device):
        with keep_random_stream(aux_branch):  # the branch's stream continues in training as if never validated
            terms = icm_terms(spec, codec, recognizer, aux_branch, batch["image"], labels_of=labels_of)
        k = batch["image"].shape[0]
        for name, v in terms.items():
            sums[name] = sums.get(name, 0.0) + float(v) * k
        n += k
    return {k: v / n for k, v in sums.items()}
