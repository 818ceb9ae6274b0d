"""Loss functions of the paper, Eq. 1-6.

R is always the rate estimated by the entropy model in bits per pixel (sum of -log2 likelihoods of y and z over
the number of image pixels), as in CompressAI's ``RateDistortionLoss``.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from .codec import bits_from_likelihoods


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_lambda_alpha(lambda_: float, alpha: float = 0.0) -> None:
    if not (_real(lambda_) and lambda_ > 0):
        raise ValueError(
            "lambda_ must be a positive finite number (paper: detection {0.4, 0.8, 1.6, 3.2}, segmentation "
            f"{{1, 2, 4, 8}}), got {lambda_!r}"
        )
    if not (_real(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0 (paper: 0.5), got {alpha!r}")


def rate_bpp(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """R of Eq. 1: estimated bits per pixel, averaged over the batch."""
    return bits_from_likelihoods(likelihoods).mean() / num_pixels


def rd_loss(rate: torch.Tensor, distortion: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Eq. 1: L = R + lambda * D."""
    return rate + lambda_ * distortion


def human_rd_loss(rate: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Eq. 2 with D = MSE on the 0-255 scale, CompressAI's convention (lambda 0.0130 ~ quality 4 of cheng2020-attn).
    Used to train the codec start point (the paper starts from CompressAI's MSE-pretrained model)."""
    return rd_loss(rate, 255.0 ** 2 * F.mse_loss(x_hat, x), lambda_)


def feature_distillation(features: Sequence[torch.Tensor], features_hat: Sequence[torch.Tensor]) -> torch.Tensor:
    """D of Eq. 3: sum_i MSE(f_i, f_hat_i) over chosen recognizer layers (Harell et al. [4])."""
    if len(features) != len(features_hat) or not features:
        raise ValueError("feature_distillation needs two equally long, non-empty feature lists")
    return sum(F.mse_loss(fh, f) for f, fh in zip(features, features_hat))


def icm_loss(rate: torch.Tensor, task_loss: torch.Tensor, lambda_: float, aux_loss: torch.Tensor | None = None,
             alpha: float = 0.5, mse: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The ICM training loss.

    - Eq. 4: L = R + lambda * E(y, y_hat)                              (aux_loss=None, mse=None)
    - Eq. 5: L = R + lambda * {E(y, y_hat) + alpha * E(y, y_hat_aux)}   (detection, w/ aux)
    - Eq. 6: L = R + lambda * {E(y, y_hat) + alpha * E(y, y_hat_aux) + MSE(x, x_hat)}  (segmentation)

    Returns the total and each term; ``main`` = R + lambda * E(y, y_hat) (+ lambda*MSE), i.e. the loss without the
    auxiliary term, which Sec. 4.2 compares across branch positions.
    """
    check_lambda_alpha(lambda_, alpha)
    inner = task_loss if mse is None else task_loss + mse
    main = rate + lambda_ * inner
    total = main if aux_loss is None else main + lambda_ * alpha * aux_loss
    terms = {"loss": total, "main": main, "rate": rate, "task": task_loss}
    if aux_loss is not None:
        terms["aux"] = aux_loss
    if mse is not None:
        terms["mse"] = mse
    return terms
