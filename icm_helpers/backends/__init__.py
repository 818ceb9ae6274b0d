"""Recognition backends of the ``paper`` profile, behind the suite's ``Recognizer`` protocol.

Every backend is built by ``build_backend(task, backend, **config)`` and returns an ``nn.Module`` ("the model")
that ``recognizers.DetectionRecognizer`` / ``SegmentationRecognizer`` wrap. The contract:

Detection model
    ``forward(images, targets=None) -> (detections, losses)``. ``images``: float tensor (B,3,H,W), RGB in [0, 1],
    H and W already as the suite wants them (no internal resizing: the suite resizes and pads). Normalisation
    (mean/std, BGR order, 0-255 scale) happens inside. ``targets``: list of {"boxes": (n,4) xyxy pixels,
    "labels": (n,) int64 DATASET CATEGORY IDS}. In eval mode: detections = list of {"boxes", "labels" (category
    ids), "scores"}, losses = {}. In train mode with targets: losses = dict of scalar tensors (the model's own
    training losses; gradients flow into ``images``), detections may be empty.
Segmentation model
    ``forward(images) -> logits`` (B, C, H, W) at the input resolution, C = the dataset's classes (no extra
    background class for Pascal-Context-59; ignore index 255 in labels).
Both
    ``stage_modules() -> {"conv2": module, ..., "conv5": module}`` (ResNet naming of the backbone stages, for the
    aux-task position and feature capture) and ``stage_channels() -> {"conv2": int, ...}``; attribute
    ``num_outputs`` (segmentation: C).

Weights: ``resolve_weights`` finds a checkpoint: an explicit local path, or the official file in the torch hub
cache; it downloads only when the caller passes ``download=True`` (the user asked for network access).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .deeplabv3plus import build_deeplabv3plus
from .detectron2_det import build_detectron2_detector
from .mmseg_seg import build_mmseg_segmenter
from .torchvision_det import build_torchvision_detector
from .weights import hub_checkpoint_dir, missing_backend_error, resolve_weights

__all__ = ["BUILDERS", "build_backend", "hub_checkpoint_dir", "missing_backend_error", "resolve_weights"]


#: (task, backend) -> the builder of the model behind the suite's recognizer contract (module docstring).
BUILDERS: dict[tuple[str, str], Callable[..., torch.nn.Module]] = {
    ("detection", "torchvision"): build_torchvision_detector,
    ("detection", "detectron2"): build_detectron2_detector,
    ("segmentation", "deeplabv3plus"): build_deeplabv3plus,
    ("segmentation", "mmseg"): build_mmseg_segmenter,
}


def build_backend(task: str, backend: str, **config: Any) -> torch.nn.Module:
    """The model of ``backend`` for ``task`` (see the module docstring for the contract)."""
    if (task, backend) not in BUILDERS:
        valid = ", ".join(f"{t}/{b}" for t, b in BUILDERS)
        raise ValueError(f"no backend {backend!r} for task {task!r}; valid: {valid}")
    return BUILDERS[task, backend](**config)
