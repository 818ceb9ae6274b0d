"""Bit-allocation maps (the paper's Figs. 5-6): where in the image does the codec spend its bits?

``bit_allocation_map`` returns bits per pixel: -log2 likelihood of the latent y summed over channels, spread
evenly over the 16x16 pixel block each latent position codes (so the map's sum over the padded image equals the
estimated bits of y); ``include_hyper=True`` adds the hyper-latent z's bits over their 64x64 blocks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .codec import crop_to, pad_to_multiple


@torch.no_grad()
def bit_allocation_map(codec, image: torch.Tensor, include_hyper: bool = False) -> np.ndarray:
    """HxW map (bits/pixel) for one image (3xHxW or 1x3xHxW in [0,1]), codec in eval mode."""
    x = image if image.dim() == 4 else image[None]
    xp, pad = pad_to_multiple(x)
    was = codec.training
    codec.eval()
    try:
        out = codec(xp)
    finally:
        codec.train(was)
    H, W = xp.shape[-2:]
    total = torch.zeros(1, 1, H, W)
    keys = ("y", "z") if include_hyper else ("y",)
    for key in keys:
        bits = (-torch.log2(out["likelihoods"][key])).sum(1, keepdim=True)  # (1,1,h,w) bits per latent position
        block = H // bits.shape[-2]
        total += F.interpolate(bits, scale_factor=block, mode="nearest") / (block * block)
    return crop_to(total, pad)[0, 0].cpu().numpy()


def inside_fraction(bit_map: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the map's bits that fall inside ``mask`` (e.g. object masks)."""
    total = float(bit_map.sum())
    return float(bit_map[mask.astype(bool)].sum()) / total if total > 0 else float("nan")
