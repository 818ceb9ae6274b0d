"""``torchvision`` detection backend: Faster R-CNN models built from torchvision parts (pip-only default).

Architectures (``arch``):

``resnet50_fpn_v2``
    torchvision's ``fasterrcnn_resnet50_fpn_v2`` (Li et al. 2021 recipe; BatchNorm in backbone, FPN and box head;
    2-conv RPN head, 4-conv + 1-FC box head). Official COCO weights: ``FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1``
    (box AP 46.7 on COCO val2017).
``resnext101_32x8d_fpn``
    A classic Faster R-CNN (1-conv RPN head, TwoMLPHead box head, as torchvision's ``fasterrcnn_resnet50_fpn``)
    on a ResNeXt-101 32x8d FPN backbone with frozen BatchNorm -- the architecture of the paper's detectron2
    ``faster_rcnn_X_101_32x8d_FPN_3x``, rebuilt from torchvision modules. torchvision ships no COCO detection
    weights for it: ``weights`` must be a local checkpoint (a state dict of this module's ``detector``, or a dict
    holding one under "model" / "state_dict"); ``pretrained=False`` gives random weights.

The wrapper calls the backbone, RPN and RoI heads itself: torchvision's ``GeneralizedRCNNTransform`` (which
would resize the image to min_size=800 and rescale the boxes back) is never used. Normalisation happens inside
with the transform's own ImageNet mean/std on RGB in [0, 1], exactly as torchvision's transform normalises.

Labels: torchvision's COCO models predict the 91-entry COCO index (0 = background, 1..90 = COCO category ids,
the ten unused ids are "N/A" entries), so dataset category ids are used directly as labels in both directions;
no mapping is needed (``num_classes=91`` counts the background and the gaps).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.misc import FrozenBatchNorm2d

from .weights import resolve_weights

ARCHS = ("resnet50_fpn_v2", "resnext101_32x8d_fpn")
STAGES = {"conv2": "layer1", "conv3": "layer2", "conv4": "layer3", "conv5": "layer4"}
STAGE_CHANNELS = {"conv2": 256, "conv3": 512, "conv4": 1024, "conv5": 2048}


def official_weights_url(arch: str = "resnet50_fpn_v2") -> str:
    """URL of torchvision's official COCO checkpoint of ``arch`` (only ``resnet50_fpn_v2`` has one)."""
    if arch != "resnet50_fpn_v2":
        raise ValueError(f"torchvision ships no COCO detection weights for {arch!r}")

    return FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url


class TorchvisionDetector(nn.Module):
    """A torchvision ``FasterRCNN`` (``self.detector``, whose state dict is the checkpoint format) run without its
    resizing transform, behind the suite's detection contract (see ``icm_helpers.backends``)."""

    def __init__(self, detector: nn.Module, arch: str):
        super().__init__()
        self.detector = detector
        self.arch = arch
        self.num_outputs = detector.roi_heads.box_predictor.cls_score.out_features
        transform = detector.transform
        self.register_buffer("pixel_mean", torch.tensor(transform.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(transform.image_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    # ------------------------------------------------------------------ contract
    def stage_modules(self) -> dict[str, nn.Module]:
        body = self.detector.backbone.body  # IntermediateLayerGetter over the torchvision ResNet
        return {name: getattr(body, layer) for name, layer in STAGES.items()}

    def stage_channels(self) -> dict[str, int]:
        return dict(STAGE_CHANNELS)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if self.training:
            if targets is None:
                raise ValueError("the torchvision detector needs targets in training mode (it returns losses)")
            targets = [_check_target(t, images.shape[-2:]) for t in targets]
            if len(targets) != images.shape[0]:
                raise ValueError(f"{len(targets)} targets for {images.shape[0]} images")
        else:
            targets = None
        size = (int(images.shape[-2]), int(images.shape[-1]))
        image_list = ImageList(self.normalize(images), [size] * images.shape[0])
        features = self.detector.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, rpn_losses = self.detector.rpn(image_list, features, targets)
        detections, roi_losses = self.detector.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return [], {**rpn_losses, **roi_losses}
        return detections, {}


def _check_target(target: dict[str, torch.Tensor], size) -> dict[str, torch.Tensor]:
    boxes = torch.as_tensor(target["boxes"]).float().reshape(-1, 4)
    labels = torch.as_tensor(target["labels"]).long().reshape(-1).to(boxes.device)
    if len(labels) != len(boxes):
        raise ValueError(f"target has {len(boxes)} boxes but {len(labels)} labels")
    if len(boxes) and bool(((boxes[:, 2:] <= boxes[:, :2]).any())):
        raise ValueError("target boxes must be xyxy with positive width and height")
    return {"boxes": boxes, "labels": labels}


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("detector."): v for k, v in obj.items()}


def _load_checkpoint(detector: nn.Module, path: Path, arch: str) -> None:
    state = _state_dict_from(torch.load(path, map_location="cpu", weights_only=True), path)
    own = detector.state_dict()
    # FrozenBatchNorm2d has no num_batches_tracked: accept checkpoints written from either BatchNorm flavour.
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    try:
        detector.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a checkpoint of the torchvision {arch} Faster R-CNN: {exc}") from exc


def _build_architecture(arch: str, num_classes: int, score_thresh: float, detections_per_img: int) -> nn.Module:
    kwargs = dict(num_classes=num_classes, box_score_thresh=score_thresh, box_detections_per_img=detections_per_img)
    if arch == "resnet50_fpn_v2":
        return fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **kwargs)

    backbone = resnet_fpn_backbone(backbone_name="resnext101_32x8d", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=5)
    return FasterRCNN(backbone, **kwargs)


def build_torchvision_detector(arch: str = "resnet50_fpn_v2", weights: str | None = None, download: bool = False,
                               pretrained: bool = True, num_classes: int = 91, score_thresh: float = 0.05,
                               detections_per_img: int = 100) -> TorchvisionDetector:
    """Faster R-CNN of ``arch`` (see the module docstring) behind the suite's detection contract.

    ``pretrained=True``: load ``weights`` -- None / "official" = torchvision's COCO checkpoint (found in the torch
    hub cache, downloaded only with ``download=True``), or a local file path (loaded with ``weights_only=True``).
    ``pretrained=False``: random initialisation, no file is read (``weights`` must then be None)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown torchvision detector arch {arch!r}; valid: {', '.join(ARCHS)}")
    official = weights in (None, "official")
    if not pretrained and not official:
        raise ValueError(f"pretrained=False builds random weights; drop weights={weights!r} or set pretrained=True")
    if pretrained and official and arch != "resnet50_fpn_v2":
        raise ValueError(f"torchvision ships no COCO detection weights for {arch!r}: pass weights=/path/to/checkpoint "
                         f"(a state dict of this Faster R-CNN) or pretrained=False for random weights")
    if pretrained and official and num_classes != 91:
        raise ValueError(f"the official COCO weights have 91 classes (background + COCO ids 1..90), "
                         f"got num_classes={num_classes}")
    path = None
    if pretrained:  # find the file first: a missing checkpoint fails before the (slow) model construction
        url = official_weights_url(arch) if official else ""
        path = resolve_weights(weights, url, download=download, what=f"torchvision {arch} detector")
    detector = _build_architecture(arch, int(num_classes), float(score_thresh), int(detections_per_img))
    if path is not None:
        _load_checkpoint(detector, path, arch)
    return TorchvisionDetector(detector, arch).eval()
