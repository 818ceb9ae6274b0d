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

from pathlib import Path
from typing import Any

import torch


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(weights: str | None, url: str, *, download: bool = False, what: str = "weights",
                    setting: str = "recognizers.<task>.model.download") -> Path:
    """Path of a checkpoint file.

    ``weights``: a local file path, or None / "official" for the file at ``url`` (looked up in the torch hub cache,
    ``hub_checkpoint_dir()``). Missing and ``download=False`` -> FileNotFoundError naming the URL, the file name
    and the folder to place it in (``setting``: the profile key that allows the download). ``download=True`` ->
    downloaded there with a progress bar."""
    if weights not in (None, "official"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what}: checkpoint file not found: {path}")
        return path
    name = url.rsplit("/", 1)[-1]
    path = hub_checkpoint_dir() / name
    if path.is_file():
        return path
    if not download:
        raise FileNotFoundError(
            f"{what}: the official checkpoint {name} is not in {path.parent}. Either download it yourself "
            f"(wget -P {path.parent} {url}) or pass download=True (profile: {setting}: true) "
            f"to let the suite fetch it; or give a local file with weights=/path/to/file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=True)
    return path


def missing_backend_error(package: str, install: str, backend: str) -> ImportError:
    return ImportError(f"recognition backend {backend!r} needs the package {package!r}, which is not installed. "
                       f"Install it with: {install}")


def build_backend(task: str, backend: str, **config: Any) -> torch.nn.Module:
    """The model of ``backend`` for ``task`` (see the module docstring for the contract)."""
    if task == "detection" and backend == "torchvision":
        from .torchvision_det import build_torchvision_detector
        return build_torchvision_detector(**config)
    if task == "detection" and backend == "detectron2":
        from .detectron2_det import build_detectron2_detector
        return build_detectron2_detector(**config)
    if task == "segmentation" and backend == "deeplabv3plus":
        from .deeplabv3plus import build_deeplabv3plus
        return build_deeplabv3plus(**config)
    if task == "segmentation" and backend == "mmseg":
        from .mmseg_seg import build_mmseg_segmenter
        return build_mmseg_segmenter(**config)
    raise ValueError(f"no backend {backend!r} for task {task!r}")
