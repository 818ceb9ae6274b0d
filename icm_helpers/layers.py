"""Small layer modules shared by the recognizers and the auxiliary branches (CompressAI style: models are built
from these pieces, not re-written per model).

- ``BasicBlock`` (ResNet, He et al. 2016) and ``ResNeXtBottleneck`` (Xie et al. 2017, cardinality C).
- ``make_stage``: a ResNet stage with stride or dilation.
- ``FasterRCNNHeads``: FPN + torchvision's RPN and RoI heads (Faster R-CNN, Ren et al. 2015) on any feature
  pyramid whose strides are relative to the image.
- ``DeepLabV3PlusHead``: depthwise-separable ASPP + decoder with low-level features (Chen et al. 2018), as
  MMSegmentation's ``DepthwiseSeparableASPPHead`` builds it.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


def conv_bn_relu(
    cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: [3x3, C; 3x3, C] (Table 2's auxiliary-branch stages)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride, dilation)
        self.conv2 = conv_bn_relu(cout, cout, 3, 1, dilation, relu=False)
        self.skip = None if (cin == cout and stride == 1) else conv_bn_relu(cin, cout, 1, stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.skip is None else self.skip(x)
        return F.relu(self.conv2(self.conv1(x)) + idt)


def cardinality(channels: int, target: int = 32) -> int:
    """Group count for a ResNeXt 3x3 conv: C=32 (Table 1) when it divides the width, else the largest divisor."""
    return math.gcd(channels, target)


class ResNeXtBottleneck(nn.Module):
    """ResNeXt block: [1x1, W; 3x3, W, C groups; 1x1, Cout] (Table 1's auxiliary-branch stages)."""

    def __init__(
        self, cin: int, cout: int, stride: int = 1, dilation: int = 1, width: int | None = None, groups: int = 32
    ):
        super().__init__()
        width = width or cout
        g = cardinality(width, groups)
        self.conv1 = conv_bn_relu(cin, width, 1)
        self.conv2 = conv_bn_relu(width, width, 3, stride, dilation, groups=g)
        self.conv3 = conv_bn_relu(width, cout, 1, relu=False)
        self.skip = None if (cin == cout and stride == 1) else conv_bn_relu(cin, cout, 1, stride, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.skip is None else self.skip(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + idt)


def make_stage(block: str, cin: int, cout: int, depth: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    cls = {"basic": BasicBlock, "resnext": ResNeXtBottleneck}[block]
    blocks = [cls(cin, cout, stride=stride, dilation=dilation)]
    blocks += [cls(cout, cout, dilation=dilation) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class StagedBackbone(nn.Module):
    """A stem followed by named stages ``conv2..conv5``; returns every stage's output (an OrderedDict)."""

    def __init__(self, stem: nn.Module, stages: "OrderedDict[str, nn.Module]", channels: Sequence[int]):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleDict(stages)
        self.out_channels = list(channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.stem(x)
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, stage in self.stages.items():
            x = stage(x)
            feats[name] = x
        return feats


def build_stages(block: str, cin: int, channels: Sequence[int], depths: Sequence[int], strides: Sequence[int],
                 dilations: Sequence[int] | None = None) -> "OrderedDict[str, nn.Module]":
    dilations = dilations or [1] * len(channels)
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (c, d, s, dil) in enumerate(zip(channels, depths, strides, dilations)):
        stages[f"conv{i + 2}"] = make_stage(block, cin, c, d, s, dil)
        cin = c
    return stages


class FasterRCNNHeads(nn.Module):
    """FPN + RPN + RoI box head of Faster R-CNN (torchvision's modules), on a feature pyramid.

    ``forward(features, image_sizes, padded_size, targets)`` returns (detections, losses): the losses dict
    (RPN objectness/box, RoI classifier/box) when the module is in training mode and targets are given,
    detections (boxes xyxy in image pixels, labels, scores) in eval mode.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        fpn_channels: int = 256,
        representation: int = 1024,
        anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
        rpn_pre_nms: tuple[int, int] = (2000, 1000),
        rpn_post_nms: tuple[int, int] = (2000, 1000),
        box_batch_per_image: int = 512,
        score_thresh: float = 0.05,
        detections_per_img: int = 100,
    ):
        super().__init__()

        self.fpn = FeaturePyramidNetwork(list(in_channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        n_levels = len(in_channels) + 1
        if len(anchor_sizes) != n_levels:
            raise ValueError(f"need one anchor size per FPN level ({n_levels}), got {list(anchor_sizes)}")
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * n_levels)
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n=dict(training=rpn_pre_nms[0], testing=rpn_pre_nms[1]),
            post_nms_top_n=dict(training=rpn_post_nms[0], testing=rpn_post_nms[1]), nms_thresh=0.7)
        level_names = [str(i) for i in range(len(in_channels))]
        self.roi_heads = RoIHeads(
            MultiScaleRoIAlign(level_names, 7, 2), TwoMLPHead(fpn_channels * 49, representation),
            FastRCNNPredictor(representation, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=box_batch_per_image, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=score_thresh, nms_thresh=0.5, detections_per_img=detections_per_img)

    def forward(self, features: "OrderedDict[str, torch.Tensor]", image_sizes: list[tuple[int, int]],
                padded_size: tuple[int, int], targets: list[dict[str, torch.Tensor]] | None = None):
        feats = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features.values())))
        any_feat = next(iter(feats.values()))
        # The RPN only reads the padded image size, dtype and device from ImageList.tensors.
        shell = any_feat.new_empty((any_feat.shape[0], 0, *padded_size))
        images = ImageList(shell, image_sizes)
        proposals, rpn_losses = self.rpn(images, feats, targets)
        detections, roi_losses = self.roi_heads(feats, proposals, image_sizes, targets)
        return detections, {**rpn_losses, **roi_losses}


class DepthwiseSeparableConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__(conv_bn_relu(cin, cin, 3, dilation=dilation, groups=cin), conv_bn_relu(cin, cout, 1))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ head: depthwise-separable ASPP on the deepest features (image pooling, 1x1, atrous 3x3s),
    a decoder that fuses the stride-4 low-level features (projected to ``low_channels``), and a classifier.
    Returns logits at the low-level resolution (callers upsample to the image)."""

    def __init__(self, in_channels: int, low_in_channels: int, num_classes: int, channels: int = 512,
                 low_channels: int = 48, dilations: Sequence[int] = (1, 12, 24, 36), dropout: float = 0.1):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels, 1))
        self.aspp = nn.ModuleList(
            [
                conv_bn_relu(in_channels, channels, 1) if d == 1 else DepthwiseSeparableConv(in_channels, channels, d)
                for d in dilations
            ]
        )
        self.bottleneck = conv_bn_relu(channels * (len(dilations) + 1), channels, 3)
        self.c1 = conv_bn_relu(low_in_channels, low_channels, 1)
        self.sep_bottleneck = nn.Sequential(DepthwiseSeparableConv(channels + low_channels, channels),
                                            DepthwiseSeparableConv(channels, channels))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, deep: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.image_pool(deep), size=deep.shape[-2:], mode="bilinear", align_corners=False)
        x = self.bottleneck(torch.cat([pooled] + [b(deep) for b in self.aspp], 1))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.sep_bottleneck(torch.cat([x, self.c1(low)], 1))
        return self.classifier(self.dropout(x))


def batchnorm_eval(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode (frozen statistics)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
