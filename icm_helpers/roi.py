"""ROI-based bit allocation on a pretrained codec (Ahonen et al. [8], the paper's Sec. 2.2 and 4.1 baseline).

The ROI mask (ground-truth instance masks: COCO polygons/RLE in the paper profile, the generated masks in
smoke/demo) is binarized and resized to the latent grid; latent values OUTSIDE the ROI are divided by the
quantization factor QF (> 1; the paper uses 1.4) before quantization, which shrinks their magnitude and therefore
the bits the entropy model spends on them. The scaling is applied to y = g_a(x), so the hyperprior and the context
model see the scaled latent too, as an encoder-side modification of a pretrained model must.

What the decoder does with the scaled latents is not fixed by the paper's description, so it is a parameter:

- ``decoder="as_is"`` (default): the decoder is the unmodified pretrained decoder and receives the scaled latents
  as they are. The mask is NOT signalled and costs no bits; only the encoder needs it. Background latents are
  smaller than the decoder expects (a darker / flatter background); the task model must cope with that.
- ``decoder="rescale"``: the decoder multiplies the latents outside the ROI by QF again before synthesis, i.e.
  QF acts as a coarser quantization step outside the ROI (dequantization). The decoder must then know the mask,
  so the latent-grid mask is signalled: it is coded losslessly (``encode_latent_mask``: bit-packed, deflated when
  that is shorter) and its bytes are ADDED to both bpp_estimated and bpp_bitstream (``side_bits``).

Either way the ROI method needs the mask at the encoder during evaluation (the overhead the paper's method
avoids), and segmentation has no ROI: Pascal-Context labels every pixel (Sec. 4.1).
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LATENT_STRIDE = 16  # cheng2020-attn: y is at 1/16 of the image resolution
ROI_DECODERS = ("as_is", "rescale")


def check_roi(qf: float, decoder: str = "as_is") -> None:
    if not (isinstance(qf, (int, float)) and not isinstance(qf, bool) and 1.0 <= qf < float("inf")):
        raise ValueError(f"QF must be a finite number >= 1 (paper: 1.4), got {qf!r}")
    if decoder not in ROI_DECODERS:
        raise ValueError(
            f"unknown ROI decoder {decoder!r}; valid: 'as_is' (mask not signalled), 'rescale' (mask signalled, "
            f"latents outside the ROI multiplied by QF at the decoder)"
        )


def latent_roi_mask(roi: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Binarize a (B,H,W) or (B,1,H,W) mask and resize it to the latent grid: a latent position is ROI when any
    pixel of its receptive block is ROI (adaptive max pooling)."""
    if roi.dim() == 3:
        roi = roi[:, None]
    return F.adaptive_max_pool2d((roi > 0.5).float(), latent_hw) > 0.5


def encode_latent_mask(inside: torch.Tensor) -> bytes:
    """Lossless code of a binary latent-grid mask (the side information of ``decoder="rescale"``): one flag
    byte, then the bit-packed mask, raw (flag 0) or deflated (flag 1), whichever is shorter. The grid size is
    known to the decoder from the latent shape it already receives."""
    packed = np.packbits(inside.detach().cpu().numpy().astype(bool).ravel()).tobytes()
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = comp.compress(packed) + comp.flush()
    return b"\x01" + deflated if len(deflated) < len(packed) else b"\x00" + packed


def decode_latent_mask(data: bytes, latent_hw: tuple[int, int]) -> torch.Tensor:
    flag, payload = data[0], data[1:]
    if flag == 1:
        payload = zlib.decompress(payload, -15)
    elif flag != 0:
        raise ValueError(f"corrupt ROI mask stream (flag byte {flag})")
    h, w = latent_hw
    bits = np.unpackbits(np.frombuffer(payload, np.uint8))[: h * w]
    if bits.size != h * w:
        raise ValueError(f"corrupt ROI mask stream: {bits.size} bits for a {h}x{w} grid")
    return torch.from_numpy(bits.reshape(h, w).astype(bool))


class _LatentScale(nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = scale

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale


@contextlib.contextmanager
def roi_latent_scaling(
    codec: nn.Module, roi: torch.Tensor, qf: float = 1.4, decoder: str = "as_is"
) -> Iterator[dict[str, Any]]:
    """Within the block, the codec's analysis transform divides latents outside ``roi`` by ``qf`` (and, with
    ``decoder="rescale"``, its synthesis transform multiplies them back).

    ``roi`` is the pixel mask (1,H,W) or (1,1,H,W) of the (padded) image coded next. Works for CompressAI's
    ``forward`` and ``compress``/``decompress`` alike, because they start with ``g_a`` / end with ``g_s``.
    Yields {"side_bits": bits of the signalled mask (0 for "as_is"), "inside_fraction": ROI share of the grid}."""
    check_roi(qf, decoder)
    g_a, g_s = codec.g_a, codec.g_s
    h, w = roi.shape[-2:]
    if h % LATENT_STRIDE or w % LATENT_STRIDE:
        raise ValueError(f"the ROI mask must match the padded image (a multiple of {LATENT_STRIDE}), got {h}x{w}")
    inside = latent_roi_mask(roi, (h // LATENT_STRIDE, w // LATENT_STRIDE))
    one = torch.ones((), device=roi.device)
    scale = torch.where(inside, one, one / qf)
    info = {"side_bits": 0, "inside_fraction": float(inside.float().mean())}
    codec.g_a = nn.Sequential(g_a, _LatentScale(scale))
    if decoder == "rescale":
        codec.g_s = nn.Sequential(_LatentScale(torch.where(inside, one, one * qf)), g_s)
        info["side_bits"] = 8 * len(encode_latent_mask(inside[0, 0]))
    try:
        yield info
    finally:
        codec.g_a, codec.g_s = g_a, g_s
