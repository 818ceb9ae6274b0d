"""Recognition models behind one small protocol, so the ICM training and evaluation code never asks which one.

Every task model implements ``Recognizer``:
- ``predict(images)``: the model's output on an image batch (detections / per-pixel logits), images in [0, 1].
- ``pseudo_labels(images)``: the labels y of Eq. 4-6, i.e. the model's own output on the ORIGINAL image
  (Yamazaki et al. [5]; no ground truth is used for ICM training).
- ``task_loss(images, labels)``: E(y, y_hat) on (decoded) images; gradients flow into ``images`` only.
- frozen: parameters never change during ICM training (Sec. 2.2: "we fixed the parameters of the recognition
  model"); BatchNorm statistics are frozen too.
- ``stage_modules()`` / ``feature_channels()`` / ``capture_features(names)``: the backbone stages conv2..conv5
  (ResNet naming) and a context manager that records their outputs during the next forward passes. The aux-task
  branch position (Sec. 4.2) attaches there: it reads the features the recognizer computes on x_hat inside
  ``task_loss``, so the backbone runs once and the aux loss reaches the codec through the frozen stages.

Backends (``backend=``): ``suite`` = the suite's own small Faster R-CNN-structured detector and DeepLabV3+-structured
segmenter, trained by notebook 01 on the profile's data. The paper profile's pretrained models live in
``icm_helpers.backends``: detection ``detectron2`` (Faster R-CNN X101-32x8d-FPN 3x, paper-exact) and ``torchvision``
(Faster R-CNN R50-FPN v2, pip-only); segmentation ``mmseg`` (DeepLabV3+ R101-D8 Pascal-Context-59, paper-exact) and
``deeplabv3plus`` (our pure-PyTorch port loading MMSeg's checkpoint, pip-only). All speak the same protocol; labels
are always the dataset's category ids.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .backends import build_backend
from .codec import load_state
from .io import atomic_torch_save
from .layers import DeepLabV3PlusHead, FasterRCNNHeads, StagedBackbone, batchnorm_eval, build_stages, conv_bn_relu
from .registry import RECOGNIZERS, check_task

_IDENTITY = ("task", "backend", "num_classes")  # the config keys that are not settings of the model itself

BACKENDS = {"detection": ("suite", "torchvision", "detectron2"), "segmentation": ("suite", "deeplabv3plus", "mmseg")}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255  # label-map value of padded / unlabelled pixels (MMSeg's convention); never a class


@runtime_checkable
class Recognizer(Protocol):
    task: str
    metric_name: str

    def predict(self, images: torch.Tensor) -> Any: ...
    def pseudo_labels(self, images: torch.Tensor) -> Any: ...
    def task_loss(self, images: torch.Tensor, labels: Any) -> torch.Tensor: ...


class Normalize(nn.Module):
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def resnet_stem(width: int) -> nn.Sequential:
    """ResNet conv1 (+ max-pool) equivalent: stride 4 overall."""
    return nn.Sequential(conv_bn_relu(3, width, 3, 2), conv_bn_relu(width, width, 3), nn.MaxPool2d(3, 2, 1))


class SuiteDetector(nn.Module):
    """Faster R-CNN (Ren et al. 2015; torchvision's RPN and RoI heads) on a small ResNet-FPN backbone."""

    def __init__(self, num_classes: int, width: int = 16, depths=(1, 1, 1, 1), fpn_channels: int = 64,
                 representation: int = 256, anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms=(600, 300),
                 rpn_post_nms=(300, 100), box_batch_per_image: int = 128, detections_per_img: int = 50):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.normalize = Normalize()
        self.backbone = StagedBackbone(
            resnet_stem(width), build_stages("basic", width, chans, depths, (1, 2, 2, 2)), chans
        )
        self.heads = FasterRCNNHeads(chans, num_classes, fpn_channels, representation, anchor_sizes, tuple(rpn_pre_nms),
                                     tuple(rpn_post_nms), box_batch_per_image, detections_per_img=detections_per_img)

    def forward(self, images: torch.Tensor, targets=None):
        feats = self.backbone(self.normalize(images))
        size = tuple(images.shape[-2:])
        return self.heads(feats, [size] * images.shape[0], size, targets)


class SuiteSegmenter(nn.Module):
    """DeepLabV3+ (Chen et al. 2018) on a small dilated ResNet (output stride 8, as MMSeg's R101-D8)."""

    def __init__(self, num_classes: int, width: int = 16, depths=(1, 1, 1, 1), head_channels: int = 64,
                 low_channels: int = 16, aspp_dilations=(1, 2, 4, 6)):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.normalize = Normalize()
        self.backbone = StagedBackbone(
            resnet_stem(width), build_stages("basic", width, chans, depths, (1, 2, 1, 1), (1, 1, 2, 4)), chans
        )
        self.head = DeepLabV3PlusHead(chans[-1], chans[0], num_classes, head_channels, low_channels, aspp_dilations)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(self.normalize(images))
        logits = self.head(feats["conv5"], feats["conv2"])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


class _FrozenRecognizer(nn.Module):
    """Shared freezing logic: ``freeze()`` stops gradients into the weights and fixes BatchNorm statistics."""

    task: str
    metric_name: str

    def __init__(self, model: nn.Module, config: dict[str, Any]):
        super().__init__()
        self.model = model
        self.config = dict(config)
        self.frozen = False

    def freeze(self) -> "_FrozenRecognizer":
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True):  # a frozen recognizer stays in eval mode
        return super().train(mode and not self.frozen)

    def stage_modules(self) -> dict[str, nn.Module]:
        """Backbone stages by ResNet name (conv2..conv5). Other backends map their own module names onto these."""
        if hasattr(self.model, "stage_modules"):
            return dict(self.model.stage_modules())
        return dict(self.model.backbone.stages.items())

    def feature_channels(self) -> dict[str, int]:
        if hasattr(self.model, "stage_channels"):
            return dict(self.model.stage_channels())
        return dict(zip(self.stage_modules(), self.model.backbone.out_channels))

    @contextlib.contextmanager
    def capture_features(self, names) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block, ``store[name]`` holds the output of backbone stage ``name`` from the latest forward."""
        stages = self.stage_modules()
        unknown = [n for n in names if n not in stages]
        if unknown:
            raise ValueError(f"unknown backbone stage(s) {unknown}; this recognizer has {list(stages)}")
        store: dict[str, torch.Tensor] = {}
        hooks = [stages[n].register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o)) for n in names]
        try:
            yield store
        finally:
            for h in hooks:
                h.remove()


@RECOGNIZERS.register("detection")
class DetectionRecognizer(_FrozenRecognizer):
    task = "detection"
    metric_name = "mAP"

    def __init__(self, model: SuiteDetector, config: dict[str, Any], score_threshold: float = 0.5):
        super().__init__(model, config)
        self.score_threshold = float(score_threshold)

    @classmethod
    def build(
        cls, model: nn.Module | None, full: dict[str, Any], score_threshold: float = 0.5
    ) -> "DetectionRecognizer":
        """``model``: a paper backend's model, or None for the suite's own detector; ``full``: task, backend,
        num_classes and the model settings (the recognizer's config, saved with it)."""
        if model is None:
            model = SuiteDetector(full["num_classes"], **{k: v for k, v in full.items() if k not in _IDENTITY})
        return cls(model, full, score_threshold)

    def predict(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        was = self.model.training
        self.model.eval()
        try:
            detections, _ = self.model(images)
        finally:
            self.model.train(was)
        return detections

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections on the original image with score >= ``score_threshold`` become the targets (Yamazaki [5])."""
        out = []
        for det in self.predict(images):
            keep = det["scores"] >= self.score_threshold
            out.append({"boxes": det["boxes"][keep].detach(), "labels": det["labels"][keep].detach()})
        return out

    @contextlib.contextmanager
    def _loss_mode(self) -> Iterator[None]:
        """RPN/RoI heads compute their losses only in training mode; BatchNorm stays frozen."""
        was = self.model.training
        self.model.train()
        batchnorm_eval(self.model)
        try:
            yield
        finally:
            self.model.train(was)

    def task_loss(self, images: torch.Tensor, labels: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Faster R-CNN loss (RPN objectness + box, RoI classification + box) of ``images`` against ``labels``.
        Images without pseudo-labels contribute background-only terms, so the loss stays finite."""
        with self._loss_mode():
            _, losses = self.model(images, labels)
        return sum(losses.values())

    @staticmethod
    def pad_labels(
        labels: list[dict[str, torch.Tensor]], pad: tuple[int, int, int, int]
    ) -> list[dict[str, torch.Tensor]]:
        """Labels of the original image in the frame of the image padded by ``codec.pad_to_multiple`` (``pad`` =
        left, right, top, bottom): boxes shifted by (left, top). For branches that read the padded image's latent."""
        left, _, top, _ = pad
        if not (left or top):
            return labels
        out = []
        for lab in labels:
            shift = torch.tensor([left, top, left, top], dtype=lab["boxes"].dtype, device=lab["boxes"].device)
            out.append({**lab, "boxes": lab["boxes"] + shift})
        return out

    def supervised_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Ground-truth training loss (used only to train the suite's own detector in notebook 01)."""
        targets = [{"boxes": b, "labels": c} for b, c in zip(batch["boxes"], batch["labels"])]
        _, losses = self.model(batch["image"], targets)
        return sum(losses.values())


@RECOGNIZERS.register("segmentation")
class SegmentationRecognizer(_FrozenRecognizer):
    task = "segmentation"
    metric_name = "mIoU"

    @classmethod
    def build(
        cls, model: nn.Module | None, full: dict[str, Any], score_threshold: float | None = None
    ) -> "SegmentationRecognizer":
        """``model``: a paper backend's model, or None for the suite's own segmenter (classes + background)."""
        if model is None:
            model = SuiteSegmenter(full["num_classes"] + 1, **{k: v for k, v in full.items() if k not in _IDENTITY})
        return cls(model, full)

    @property
    def num_outputs(self) -> int:
        """Number of logit channels = classes the metric counts (suite: foreground + background; Pascal-Context: 59)."""
        return int(getattr(self.model, "num_outputs", 0) or self.model.head.classifier.out_channels)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel argmax of the model's logits on the original image (Yamazaki [5])."""
        return self.model(images).argmax(1)

    def task_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(images), labels, ignore_index=IGNORE_INDEX)

    @staticmethod
    def pad_labels(labels: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
        """Label maps in the frame of the image padded by ``codec.pad_to_multiple``: padding is ``IGNORE_INDEX``."""
        return F.pad(labels, pad, value=IGNORE_INDEX) if any(pad) else labels

    def supervised_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(self.model(batch["image"]), batch["semantic"], ignore_index=IGNORE_INDEX)


def build_recognizer(task: str, backend: str = "suite", num_classes: int = 3, **config: Any) -> _FrozenRecognizer:
    """Build an (untrained) recognizer. ``num_classes`` counts foreground classes; segmentation adds background."""
    check_task(task)
    if backend not in BACKENDS[task]:
        raise ValueError(f"unknown backend {backend!r} for {task}; valid: {', '.join(BACKENDS[task])}")
    config = dict(config)
    score_threshold = config.pop("score_threshold", 0.5)
    full = {"task": task, "backend": backend, "num_classes": num_classes, **config}
    model = None if backend == "suite" else build_backend(task, backend, **config)  # the paper profile's models
    return RECOGNIZERS[task].build(model, full, score_threshold)


def save_recognizer(path: str | Path, recognizer: _FrozenRecognizer, extra: dict[str, Any] | None = None) -> Path:
    meta = {"kind": "recognizer", **recognizer.config}
    if isinstance(recognizer, DetectionRecognizer):
        meta["score_threshold"] = recognizer.score_threshold
    return atomic_torch_save({"meta": meta, "state_dict": recognizer.model.state_dict(), "extra": extra or {}}, path)


def load_recognizer(path: str | Path, expect_task: str | None = None, freeze: bool = True) -> _FrozenRecognizer:
    ckpt = load_state(path)
    meta = dict(ckpt.get("meta", {})) if isinstance(ckpt, dict) else {}
    if meta.pop("kind", None) != "recognizer":
        hint = (f": it holds a {meta.get('arch')} codec, load it with icm_helpers.codec.load_codec" if meta.get("arch")
                else " (expected a file written by save_recognizer)")
        raise ValueError(f"{path} is not a recognizer checkpoint{hint}")
    if expect_task and meta.get("task") != expect_task:
        raise ValueError(f"{path} holds a {meta.get('task')} recognizer, expected {expect_task}")
    rec = build_recognizer(meta.pop("task"), meta.pop("backend"), meta.pop("num_classes"), **meta)
    try:
        rec.model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path} does not match the recognizer architecture in its own metadata: {exc}") from exc
    return rec.freeze() if freeze else rec
