"""MMSegmentation adapter (paper-exact): DeepLabV3+ R101-D8, Pascal-Context-59, built by MMSeg itself.

The model is MMSeg's ``EncoderDecoder`` built by ``MODELS.build`` from the config file shipped inside the installed
package (``mmseg/.mim/configs/deeplabv3plus/deeplabv3plus_r101-d8_4xb4-80k_pascal-context-59-480x480.py``), the
same steps as ``mmseg.apis.init_model`` (pretrained / backbone ``init_cfg`` / ``train_cfg`` cleared, default scope
``mmseg``), with ``SyncBN`` reverted to ``BatchNorm`` (as MMSeg's inferencer does on CPU). The checkpoint is read by
the suite's own ``weights_only=True`` loader (``deeplabv3plus.load_checkpoint_file``, explicit numpy allow-list),
not by mmengine's ``load_checkpoint`` (whose plain ``torch.load`` fails on the numpy objects in MMSeg checkpoints
under torch >= 2.6), and loaded strictly.

Contract (``icm_helpers.backends``): ``forward(images)`` with RGB images in [0, 1] -> logits (B, 59, H, W):
SegDataPreProcessor normalisation (0-255, RGB mean/std of the config; input already RGB, so no channel swap) and
``EncoderDecoder.encode_decode`` (``inference="whole"``, default) or ``EncoderDecoder.inference`` with the config's
``test_cfg`` (``inference="config"``: slide, 480x480 crops, stride 320).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .weights import missing_backend_error, resolve_weights
from .deeplabv3plus import OFFICIAL_URL, MMSegContract, extract_state_dict, load_checkpoint_file, load_state_dict_strict

CONFIG_NAME = "deeplabv3plus/deeplabv3plus_r101-d8_4xb4-80k_pascal-context-59-480x480.py"
INSTALL = ('pip install ../shared/wheels/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl mmengine==0.10.7 '
           'mmsegmentation==1.2.2 ftfy regex "setuptools<81" "numpy<2" "opencv-python<4.12"  '
           "(mmsegmentation 1.2.2 needs mmcv>=2.0.0rc4,<2.2.0 WITH its compiled ops, so mmcv-lite does not work; "
           "PyPI has only the mmcv 2.1.0 source distribution, whose build against torch 2.14 fails as published: "
           "build a wheel from it with '-std=c++17' changed to '-std=c++20' in its setup.py, then "
           "MAX_JOBS=2 pip wheel --no-build-isolation --no-deps mmcv-2.1.0, and install that wheel as above. "
           "The numpy/opencv pins keep pip from upgrading numpy to 2.x alongside opencv-python)")


def _import_mmseg() -> dict[str, Any]:
    """The mmseg/mmengine entry points, or the suite's ImportError naming the pip command."""
    try:
        import mmseg  # optional dependency: imported only when this backend is used
        import mmseg.models  # noqa: F401  (registers the models; imports the compiled mmcv.ops)
        from mmengine.config import Config  # optional dependency: imported only when this backend is used
        from mmengine.logging import MMLogger  # optional dependency: imported only when this backend is used
        from mmengine.model import revert_sync_batchnorm  # optional dependency: imported only when this backend is used
        from mmengine.registry import init_default_scope  # optional dependency: imported only when this backend is used
        from mmseg.registry import MODELS  # optional dependency: imported only when this backend is used
    except Exception as e:  # ImportError, or an mmcv build without ops / for another torch (OSError, ...)
        raise missing_backend_error("mmsegmentation", INSTALL, "mmseg") from e
    return dict(mmseg=mmseg, Config=Config, MMLogger=MMLogger, revert_sync_batchnorm=revert_sync_batchnorm,
                init_default_scope=init_default_scope, MODELS=MODELS)


def default_config_path() -> Path:
    """The Pascal-Context-59 DeepLabV3+ R101-D8 config inside the installed mmseg package."""
    mm = _import_mmseg()
    path = Path(os.path.dirname(mm["mmseg"].__file__)) / ".mim" / "configs" / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"mmseg config not found in the installed package: {path}")
    return path


def build_mmseg_model(config: str | Path | None = None, num_classes: int | None = None,
                      init_weights: bool = True) -> nn.Module:
    """MMSeg's EncoderDecoder from ``config`` (default: ``default_config_path()``), randomly initialised by MMSeg's
    ``init_weights`` (skipped with ``init_weights=False``, when a checkpoint overwrites every weight anyway),
    SyncBN reverted to BN, eval mode."""
    mm = _import_mmseg()
    cfg = mm["Config"].fromfile(str(config or default_config_path()))
    if num_classes is not None:
        cfg.model.decode_head.num_classes = num_classes
        if cfg.model.get("auxiliary_head") is not None:
            cfg.model.auxiliary_head.num_classes = num_classes
    # as mmseg.apis.init_model: no pretrained backbone download, no train-time config
    cfg.model.pretrained = None
    if "init_cfg" in cfg.model.backbone:
        cfg.model.backbone.init_cfg = None
    cfg.model.train_cfg = None
    mm["init_default_scope"](cfg.get("default_scope", "mmseg"))
    model = mm["MODELS"].build(cfg.model)
    if init_weights:
        logger = mm["MMLogger"].get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)  # init_weights logs one INFO paragraph per parameter
        try:
            model.init_weights()
        finally:
            logger.setLevel(level)
    model = mm["revert_sync_batchnorm"](model)
    model.cfg = cfg
    return model.eval()


class MMSegSegmenter(MMSegContract):
    """Contract wrapper around an MMSeg ``EncoderDecoder`` (``self.model``)."""

    def __init__(self, model: nn.Module, inference: str = "whole"):
        super().__init__()
        if inference not in ("whole", "config"):
            raise ValueError(f"inference must be 'whole' or 'config', not {inference!r}")
        self.model = model
        self.inference = inference
        self.num_outputs = int(model.decode_head.out_channels)
        self._register_normalization()

    @property
    def resnet(self) -> nn.Module:
        return self.model.backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        shape = tuple(int(s) for s in x.shape[2:])
        metas = [dict(img_shape=shape, pad_shape=shape, ori_shape=shape) for _ in range(x.shape[0])]
        if self.inference == "config":
            return self.model.inference(x, metas)
        return self.model.encode_decode(x, metas)


def build_mmseg_segmenter(config: str | Path | None = None, weights: str | None = None, download: bool = False,
                          pretrained: bool = True, inference: str = "whole") -> MMSegSegmenter:
    """The paper's segmenter via MMSeg. ``config``: an MMSeg config file (default: the installed package's
    Pascal-Context-59 DeepLabV3+ R101-D8 80k config). ``weights``: None / ``"official"`` (model-zoo checkpoint in
    the torch hub cache; fetched only with ``download=True``) or a local checkpoint path. ``pretrained=False``:
    MMSeg's random initialisation."""
    model = build_mmseg_model(config, init_weights=not pretrained)
    if pretrained:
        path = resolve_weights(weights, OFFICIAL_URL, download=download,
                               what="DeepLabV3+ R101-D8 Pascal-Context-59 (MMSeg)")
        load_state_dict_strict(model, extract_state_dict(load_checkpoint_file(path)), source=f"checkpoint {path}")
    return MMSegSegmenter(model, inference=inference).eval()
