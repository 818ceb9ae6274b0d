"""ROI-based bit allocation on a pretrained codec (Ahonen et al. [8], the paper's Sec. 2.2 and 4.1 baseline).

The ROI mask is binarized and resized to the latent grid; latent values OUTSIDE the ROI are divided by the
quantization factor QF (> 1; the paper uses 1.4) before quantization, which shrinks their magnitude and therefore
the bits the entropy model spends on them. Here the scaling is applied to y = g_a(x) (so the hyperprior sees the
scaled latent too, as in an encoder-side modification) and the decoder receives the scaled latent unchanged:
the mask is NOT signalled and costs no bits (decoder reading "as_is"). The ROI method needs the mask at the
encoder during evaluation; segmentation has no ROI (Sec. 4.1).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

LATENT_STRIDE = 16  # cheng2020-attn: y is at 1/16 of the image resolution


def latent_roi_mask(roi: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Binarize a (B,H,W) or (B,1,H,W) mask and resize it to the latent grid: a latent position is ROI when any
    pixel of its receptive block is ROI (adaptive max pooling)."""
    if roi.dim() == 3:
        roi = roi[:, None]
    return F.adaptive_max_pool2d((roi > 0.5).float(), latent_hw) > 0.5


class _LatentScale(nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = scale

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale


@contextlib.contextmanager
def roi_latent_scaling(codec: nn.Module, roi: torch.Tensor, qf: float = 1.4) -> Iterator[None]:
    """Within the block, the codec's analysis transform divides latents outside ``roi`` by ``qf``.

    ``roi`` is the pixel mask of the (padded) image that is coded next. Works for CompressAI's ``forward`` and
    ``compress`` alike, because both start with ``g_a``."""
    if not qf >= 1.0:
        raise ValueError(f"QF must be >= 1 (paper: 1.4), got {qf}")
    g_a = codec.g_a
    h, w = roi.shape[-2:]
    inside = latent_roi_mask(roi, (h // LATENT_STRIDE, w // LATENT_STRIDE))
    scale = torch.where(inside, torch.ones((), device=roi.device), torch.full((), 1.0 / qf, device=roi.device))
    codec.g_a = nn.Sequential(g_a, _LatentScale(scale))
    try:
        yield
    finally:
        codec.g_a = g_a
