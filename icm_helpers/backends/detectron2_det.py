"""``detectron2`` detection backend: the paper's Faster R-CNN X101-FPN (detectron2 model zoo), paper-exact.

The default config ``COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml`` (box AP 43.0 on COCO val2017) is built
with detectron2's own ``build_model``; its official checkpoint ``model_final_68b088.pkl`` (URL from
``detectron2.model_zoo.get_checkpoint_url``) is found with ``resolve_weights`` (hub cache; download only when asked).

Calling convention. The suite's images are RGB in [0, 1], already resized and padded by the suite. The wrapper
converts them to what the config says the model reads (``cfg.INPUT.FORMAT``: BGR for the model zoo, 0-255 scale)
and calls the ``GeneralizedRCNN`` module directly with list-of-dict inputs whose "height"/"width" equal the input
size, so neither detectron2's test-time resize augmentation (``DefaultPredictor`` / ``ResizeShortestEdge``) nor
its output rescaling ever happens. Normalisation with ``cfg.MODEL.PIXEL_MEAN/STD`` is done by the model itself.
detectron2 still zero-pads (after normalisation) the batch to a multiple of the FPN's size divisibility (32) as it
always does; boxes are clipped to the given image size.

Labels. detectron2's COCO models predict contiguous class indices 0..79; the suite speaks COCO category ids (the 80
ids in 1..90). ``COCO_CATEGORY_IDS`` maps index -> id (sorted ids, detectron2's COCO metadata order), both for
detections (index -> id) and for targets (id -> ``gt_classes`` index).

Checkpoint loading never runs an unrestricted unpickler. detectron2's own ``DetectionCheckpointer`` opens ``.pkl``
files with ``pickle.load`` (which can execute arbitrary code from a crafted file) and other files with a plain
``torch.load``. Here ``.pkl`` files go through ``load_numpy_pickle``, a ``pickle.Unpickler`` whose ``find_class``
resolves only the handful of globals a pickled dict of numpy arrays needs (numpy's array reconstructors
``_reconstruct`` / ``_frombuffer``, the ``ndarray`` and ``dtype`` types, numpy ``scalar``, ``collections.OrderedDict``
and ``_codecs.encode`` for Python-2 byte strings; none of them can run code of the file's choosing) and refuses every
other global and persistent id; the result must be a dict of non-object arrays. Every other file is read with
``torch.load(..., weights_only=True)``. Both plug into a ``DetectionCheckpointer`` subclass so detectron2's own
name-matching heuristics and ndarray -> tensor conversion still apply.
"""
from __future__ import annotations

import _codecs
import collections
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .weights import missing_backend_error, resolve_weights

DEFAULT_CONFIG = "COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml"
INSTALL_HINT = ("pip install 'git+https://github.com/facebookresearch/detectron2.git'  "
                "(needs a C++ compiler; see detectron2's INSTALL.md)")
STAGES = {"conv2": "res2", "conv3": "res3", "conv4": "res4", "conv5": "res5"}
STAGE_CHANNELS = {"conv2": 256, "conv3": 512, "conv4": 1024, "conv5": 2048}
# The 80 COCO category ids in detectron2's contiguous order (index i <-> COCO_CATEGORY_IDS[i]).
COCO_CATEGORY_IDS = (list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) + list(range(46, 66))
                     + [67, 70] + list(range(72, 83)) + list(range(84, 91)))
assert len(COCO_CATEGORY_IDS) == 80


def import_detectron2():
    """The ``detectron2`` package, or the suite's ImportError with the install command."""
    try:
        import detectron2  # noqa: F401
        from detectron2 import model_zoo  # noqa: F401
    except ImportError as exc:
        raise missing_backend_error("detectron2", INSTALL_HINT, "detectron2") from exc
    return detectron2


# ----------------------------------------------------------------------------------------------- safe .pkl loading
def _numpy_attr(*candidates: str):
    """First attribute found among 'module:name' candidates (numpy 1 vs numpy 2 module layout)."""
    for cand in candidates:
        module, name = cand.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_attr("numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct")
    scalar = _numpy_attr("numpy._core.multiarray:scalar", "numpy.core.multiarray:scalar")
    frombuffer = _numpy_attr("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): _codecs.encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol-5 pickles of arrays
        allowed[(module, "_frombuffer")] = frombuffer
    return {k: v for k, v in allowed.items() if v is not None}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed for (nested dicts of) numpy arrays."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if _NumpyOnlyUnpickler._allowed is None:
            _NumpyOnlyUnpickler._allowed = _allowed_globals()
        try:
            return _NumpyOnlyUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed in a checkpoint .pkl"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids in a checkpoint .pkl")


def _check_numeric(obj: Any, where: str = "checkpoint") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_numeric(v, f"{where}[{k!r}]")
    elif isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise pickle.UnpicklingError(f"{where}: object arrays are not allowed in a checkpoint .pkl")


def load_numpy_pickle(path: str | Path) -> dict[str, Any]:
    """Read a detectron2 / Detectron1 model-zoo ``.pkl`` (a pickled dict of numpy arrays) WITHOUT executing any
    code from the file: see the module docstring. Raises ``pickle.UnpicklingError`` for anything else."""
    with open(path, "rb") as f:
        data = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    if not isinstance(data, dict):
        raise pickle.UnpicklingError(f"{path}: expected a dict at the top of the checkpoint, got {type(data).__name__}")
    _check_numeric(data)
    return data


def _checkpoint_dict_from_pkl(data: dict[str, Any]) -> dict[str, Any]:
    """detectron2's own interpretation of a .pkl checkpoint (model zoo format, or Caffe2/Detectron1 blobs)."""
    if "model" in data and "__author__" in data:
        return data
    if "blobs" in data:
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


def _safe_checkpointer_class():
    from detectron2.checkpoint import (
        DetectionCheckpointer,  # optional dependency: imported only when this backend is used
    )

    class SafeDetectionCheckpointer(DetectionCheckpointer):
        """DetectionCheckpointer whose file reading never unpickles arbitrary objects."""

        last_incompatible = None

        def _load_file(self, filename):
            if str(filename).endswith(".pkl"):
                return _checkpoint_dict_from_pkl(load_numpy_pickle(filename))
            loaded = torch.load(filename, map_location="cpu", weights_only=True)
            if str(filename).endswith(".pyth"):  # pycls
                state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
                return {"model": state, "__author__": "pycls", "matching_heuristics": True}
            if not isinstance(loaded, dict) or "model" not in loaded:
                loaded = {"model": loaded}
            return loaded

        def _load_model(self, checkpoint):
            incompatible = super()._load_model(checkpoint)
            self.last_incompatible = incompatible
            return incompatible

    return SafeDetectionCheckpointer


# ----------------------------------------------------------------------------------------------- the model wrapper
def category_ids_to_contiguous(labels: torch.Tensor) -> torch.Tensor:
    """COCO category ids -> detectron2's contiguous indices 0..79 (ValueError for ids that are not COCO classes)."""
    labels = torch.as_tensor(labels).long()
    lut = torch.full((max(COCO_CATEGORY_IDS) + 1,), -1, dtype=torch.long, device=labels.device)
    lut[torch.tensor(COCO_CATEGORY_IDS, device=labels.device)] = torch.arange(
        len(COCO_CATEGORY_IDS), device=labels.device
    )
    bad = (labels < 0) | (labels >= len(lut))
    out = lut[labels.clamp(0, len(lut) - 1)]
    bad |= out < 0
    if bool(bad.any()):
        raise ValueError(f"labels {sorted(set(labels[bad].tolist()))} are not COCO category ids")
    return out


def contiguous_to_category_ids(classes: torch.Tensor) -> torch.Tensor:
    """detectron2's contiguous indices 0..79 -> COCO category ids."""
    classes = torch.as_tensor(classes).long()
    return torch.tensor(COCO_CATEGORY_IDS, dtype=torch.long, device=classes.device)[classes]


class Detectron2Detector(nn.Module):
    """A detectron2 ``GeneralizedRCNN`` (``self.model``) behind the suite's detection contract."""

    def __init__(self, model: nn.Module, cfg: Any):
        super().__init__()
        self.model = model
        self.input_format = str(cfg.INPUT.FORMAT)
        if self.input_format not in ("BGR", "RGB"):
            raise ValueError(f"unsupported detectron2 INPUT.FORMAT {self.input_format!r} (BGR or RGB expected)")
        self.num_outputs = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        if self.num_outputs != len(COCO_CATEGORY_IDS):
            raise ValueError(f"the COCO category mapping needs an 80-class model, got {self.num_outputs} classes")

    def stage_modules(self) -> dict[str, nn.Module]:
        bottom_up = self.model.backbone.bottom_up
        return {name: getattr(bottom_up, res) for name, res in STAGES.items()}

    def stage_channels(self) -> dict[str, int]:
        return dict(STAGE_CHANNELS)

    def to_model_input(self, image: torch.Tensor) -> torch.Tensor:
        """One RGB [0, 1] (3, H, W) image -> the model's input format, 0-255 scale (differentiable)."""
        image = image * 255.0
        return image.flip(0) if self.input_format == "BGR" else image

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        from detectron2.structures import (  # optional dependency: imported only when this backend is used
            Boxes,
            Instances,
        )

        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = int(images.shape[-2]), int(images.shape[-1])
        inputs = [{"image": self.to_model_input(img), "height": h, "width": w} for img in images]
        if not self.training:
            outputs = self.model(inputs)
            detections = []
            for out in outputs:
                inst = out["instances"]
                detections.append(
                    {
                        "boxes": inst.pred_boxes.tensor,
                        "labels": contiguous_to_category_ids(inst.pred_classes),
                        "scores": inst.scores,
                    }
                )
            return detections, {}
        if targets is None:
            raise ValueError("the detectron2 detector needs targets in training mode (it returns losses)")
        if len(targets) != len(inputs):
            raise ValueError(f"{len(targets)} targets for {len(inputs)} images")
        for item, target in zip(inputs, targets):
            boxes = torch.as_tensor(target["boxes"], device=images.device).float().reshape(-1, 4)
            labels = torch.as_tensor(target["labels"], device=images.device).reshape(-1)
            if len(boxes) != len(labels):
                raise ValueError(f"target has {len(boxes)} boxes but {len(labels)} labels")
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = category_ids_to_contiguous(labels)
            item["instances"] = inst
        from detectron2.utils.events import (  # optional dependency: imported only when this backend is used
            EventStorage,
            get_event_storage,
        )

        try:  # reuse a caller's EventStorage (inside a detectron2 training loop), else open one for this call
            get_event_storage()
            have_storage = True
        except AssertionError:
            have_storage = False
        if have_storage:
            losses = self.model(inputs)
        else:
            with EventStorage(0):
                losses = self.model(inputs)
        return [], dict(losses)


def official_checkpoint_url(config: str = DEFAULT_CONFIG) -> str:
    import_detectron2()
    from detectron2 import model_zoo  # optional dependency: imported only when this backend is used

    return model_zoo.get_checkpoint_url(config)


def build_detectron2_detector(config: str = DEFAULT_CONFIG, weights: str | None = None, download: bool = False,
                              pretrained: bool = True, score_thresh: float = 0.05, device: str = "cpu",
                              detections_per_img: int = 100) -> Detectron2Detector:
    """detectron2 model-zoo detector ``config`` behind the suite's detection contract.

    ``pretrained=True``: ``weights`` None / "official" = the model zoo's final checkpoint of ``config`` (hub cache;
    downloaded only with ``download=True``), or a local ``.pkl`` / ``.pth`` file; loaded safely (module docstring).
    ``pretrained=False``: detectron2's random initialisation, no file is read."""
    import_detectron2()
    from detectron2 import model_zoo  # optional dependency: imported only when this backend is used
    from detectron2.config import get_cfg  # optional dependency: imported only when this backend is used
    from detectron2.modeling import build_model  # optional dependency: imported only when this backend is used

    official = weights in (None, "official")
    if not pretrained and not official:
        raise ValueError(f"pretrained=False builds random weights; drop weights={weights!r} or set pretrained=True")
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(config))
    cfg.MODEL.DEVICE = str(device)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_thresh)
    cfg.TEST.DETECTIONS_PER_IMAGE = int(detections_per_img)
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
        raise ValueError(f"{config} is not a box-only GeneralizedRCNN detector config")
    cfg.freeze()
    path = None
    if pretrained:  # find the file first: a missing checkpoint fails before the (slow) model construction
        url = model_zoo.get_checkpoint_url(config) if official else ""
        path = resolve_weights(weights, url, download=download, what=f"detectron2 {config}")
    model = build_model(cfg)
    if path is not None:
        checkpointer = _safe_checkpointer_class()(model)
        checkpointer.load(str(path))
        incompatible = checkpointer.last_incompatible
        missing = [
            k for k in (incompatible.missing_keys if incompatible else []) if k not in ("pixel_mean", "pixel_std")
        ]
        if missing:
            raise ValueError(f"{path} does not fit {config}: {len(missing)} parameters missing or mis-shaped, "
                             f"e.g. {missing[:5]}")
    return Detectron2Detector(model, cfg).eval()
