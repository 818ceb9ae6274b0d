"""Auxiliary branches: small recognition nets attached inside the ICM model, used ONLY in training (Sec. 3).

Positions (Sec. 4.2, Fig. 7), named by ``aux_position``:
- ``"enc"`` (aux-enc, proposed): on the latent y_hat just before the decoder. Its loss reaches the analysis
  transform g_a only: the decoder never sees it. (With CompressAI's quantization proxies, additive noise in
  training or round-with-straight-through, y_hat does not depend on the hyperprior / context / entropy-parameter
  networks, so those receive no auxiliary gradient either; they follow the encoder through the rate term R.)
- ``"dec"`` (aux-dec): on the input of the decoder's final layer; conv1 becomes [RB 128 down2, RB 128, RB 128]
  (Table 3), so the loss also reaches the decoder's earlier layers.
- ``None``: no auxiliary branch (the "w/o aux" baseline).

Architectures, with a width multiplier ``width`` (1.0 = the paper's widths) for small profiles:
- detection (Table 1): conv1 = [RB 128 up2, RB 128, RB 128 up2] (stride 16 -> 4), then ResNeXt stages
  128/256/256/512 (one block each, cardinality C=32), FPN and Faster R-CNN heads.
- segmentation (Table 2): same conv1, basic-block stages 128/256/256/512 (one block each; output stride 8 with
  dilations 2 and 4 as MMSeg's D8 backbones), DeepLabV3+ head.
RB is the residual block of CompressAI's Cheng2020 / Liu et al. [16] models.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import DeepLabV3PlusHead, FasterRCNNHeads, StagedBackbone, build_stages

AUX_POSITIONS = ("enc", "dec", None)
PLANNED_POSITIONS = ("task",)
STAGE_CHANNELS = (128, 256, 256, 512)  # Tables 1 and 2, auxiliary-branch column


def check_aux_position(position: str | None) -> str | None:
    if position in ("none", "None", ""):
        position = None
    if position in PLANNED_POSITIONS:
        raise NotImplementedError(f"aux_position={position!r} (inside the recognizer, Sec. 4.2) is not implemented in this "
                                  f"version; available: {AUX_POSITIONS}")
    if position not in AUX_POSITIONS:
        raise ValueError(f"unknown aux_position {position!r}; valid: 'enc' (proposed), 'dec', None (w/o aux)")
    return position


def scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width / 8)) * 8)


def aux_stem(position: str, cin: int, c: int) -> nn.Sequential:
    """conv1 of the branch: aux-enc upsamples y_hat (stride 16) to stride 4 (Table 1); aux-dec downsamples the
    stride-2 decoder feature to stride 4 (Table 3)."""
    from compressai.layers import ResidualBlock, ResidualBlockUpsample, ResidualBlockWithStride

    if position == "enc":
        return nn.Sequential(ResidualBlockUpsample(cin, c, 2), ResidualBlock(c, c), ResidualBlockUpsample(c, c, 2))
    if position == "dec":
        return nn.Sequential(ResidualBlockWithStride(cin, c, 2), ResidualBlock(c, c), ResidualBlock(c, c))
    raise ValueError(f"no stem for aux_position {position!r}")


class AuxDetectionBranch(nn.Module):
    """Table 1 branch: RB stem + ResNeXt stages + FPN + Faster R-CNN heads; ``loss`` = Faster R-CNN loss."""

    def __init__(self, in_channels: int, num_classes: int, position: str = "enc", width: float = 1.0,
                 anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512), fpn_channels: int | None = None,
                 representation: int | None = None, rpn_pre_nms=(2000, 1000), rpn_post_nms=(2000, 1000),
                 box_batch_per_image: int = 512):
        super().__init__()
        chans = [scaled(c, width) for c in STAGE_CHANNELS]
        self.backbone = StagedBackbone(aux_stem(position, in_channels, chans[0]),
                                       build_stages("resnext", chans[0], chans, (1, 1, 1, 1), (1, 2, 2, 2)), chans)
        self.heads = FasterRCNNHeads(chans, num_classes, fpn_channels or scaled(256, width), representation or scaled(1024, width),
                                     anchor_sizes, tuple(rpn_pre_nms), tuple(rpn_post_nms), box_batch_per_image)

    def loss(self, feature: torch.Tensor, labels: list[dict[str, torch.Tensor]], image_size: tuple[int, int]) -> torch.Tensor:
        was = self.heads.training
        self.heads.train()  # RPN/RoI heads compute losses only in training mode (the backbone keeps its own mode)
        try:
            _, losses = self.heads(self.backbone(feature), [tuple(image_size)] * feature.shape[0], tuple(image_size), labels)
        finally:
            self.heads.train(was)
        return sum(losses.values())


class AuxSegmentationBranch(nn.Module):
    """Table 2 branch: RB stem + basic-block stages + DeepLabV3+ head; ``loss`` = pixel cross-entropy."""

    def __init__(self, in_channels: int, num_classes: int, position: str = "enc", width: float = 1.0,
                 head_channels: int | None = None, low_channels: int | None = None, aspp_dilations=(1, 12, 24, 36)):
        super().__init__()
        chans = [scaled(c, width) for c in STAGE_CHANNELS]
        self.backbone = StagedBackbone(aux_stem(position, in_channels, chans[0]),
                                       build_stages("basic", chans[0], chans, (1, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 4)), chans)
        self.head = DeepLabV3PlusHead(chans[-1], chans[0], num_classes + 1, head_channels or scaled(512, width),
                                      low_channels or scaled(48, width), aspp_dilations)

    def logits(self, feature: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        feats = self.backbone(feature)
        return F.interpolate(self.head(feats["conv5"], feats["conv2"]), size=tuple(image_size), mode="bilinear", align_corners=False)

    def loss(self, feature: torch.Tensor, labels: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        return F.cross_entropy(self.logits(feature, image_size), labels)


def build_aux_branch(task: str, position: str | None, codec_N: int, num_classes: int, **config: Any) -> nn.Module | None:
    """The auxiliary branch for ``task`` at ``position`` (None -> no branch). Input channels: the codec's N
    (y_hat for aux-enc; the decoder feature before its final layer for aux-dec, also N channels in cheng2020-attn)."""
    position = check_aux_position(position)
    if position is None:
        return None
    if task == "detection":
        return AuxDetectionBranch(codec_N, num_classes, position, **config)
    if task == "segmentation":
        return AuxSegmentationBranch(codec_N, num_classes, position, **config)
    raise ValueError(f"unknown task {task!r}; valid tasks: detection, segmentation")
