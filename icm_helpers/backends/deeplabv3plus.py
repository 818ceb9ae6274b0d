"""DeepLabV3+ R101-D8 for Pascal-Context-59 in plain PyTorch, laid out like MMSegmentation's model.

The network is the one MMSegmentation 1.x builds from
``configs/deeplabv3plus/deeplabv3plus_r101-d8_4xb4-80k_pascal-context-59-480x480.py``:

* backbone ``ResNetV1c`` depth 101 (blocks 3, 4, 23, 3): deep stem of three 3x3 convs (3->32 stride 2, 32->32,
  32->64) each followed by BN + ReLU, then 3x3 max-pool stride 2; bottleneck blocks in ``pytorch`` style (the stride
  sits on the 3x3 conv); stage strides (1, 2, 1, 1), dilations (1, 1, 2, 4) with ``contract_dilation`` (the first
  block of a dilated stage uses half the dilation: 1 in layer3, 2 in layer4); the first block of every stage has a
  1x1 conv + BN projection shortcut. Output stride 8.
* ``decode_head`` = ``DepthwiseSeparableASPPHead`` on layer4 (2048 ch): image pooling branch (global average pool,
  1x1 conv 2048->512 + BN + ReLU, bilinear back to the feature size), a 1x1 ConvModule and three depthwise-separable
  3x3 ConvModules with dilations 12/24/36 (depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU), concatenated
  (5 x 512) -> 3x3 ``bottleneck`` 2560->512; layer1 features (256 ch) -> ``c1_bottleneck`` 1x1 256->48; the ASPP
  output is resized bilinearly to the layer1 size and concatenated (560 ch) -> two depthwise-separable 3x3
  ConvModules (``sep_bottleneck``) -> Dropout2d(0.1) -> ``conv_seg`` 1x1 512->59 (with bias).
* ``auxiliary_head`` = ``FCNHead`` on layer3 (1024 ch): one 3x3 ConvModule 1024->256, Dropout2d(0.1), ``conv_seg``
  1x1 256->59. Used only for training in MMSeg; kept here so that MMSeg checkpoints load key-for-key (strict).

Every ConvModule is conv (no bias) + ``bn`` + ReLU, so the parameter names are MMSeg's (``backbone.stem.0.weight``,
``backbone.layer1.0.bn1.weight``, ``decode_head.aspp_modules.1.depthwise_conv.conv.weight``,
``auxiliary_head.convs.0.bn.running_var``, ...). The normalisation constants are non-persistent buffers, as in
MMSeg's ``SegDataPreProcessor``, so the state dict holds exactly MMSeg's keys.

Inference (``forward``) reproduces ``SegDataPreProcessor`` + ``EncoderDecoder.encode_decode``: images RGB in [0, 1]
-> x255 -> (x - mean) / std with the RGB mean/std of the config (MMSeg reads BGR images and its preprocessor swaps
them to RGB with ``bgr_to_rgb=True``; our input is already RGB, so no swap) -> backbone -> decode head -> bilinear
resize (``align_corners=False``) of the 1/4-resolution logits to the input size. The config's test mode
``slide`` (480x480 crops, stride 320) is available as ``inference="slide"``; the default is ``whole``.

Checkpoints: ``load_checkpoint_file`` reads MMSeg/MMCV/mmengine checkpoint files with
``torch.load(weights_only=True)`` and an explicit allow-list of the numpy globals that their ``meta`` holds (never an
unrestricted unpickler).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights import resolve_weights

#: Official MMSegmentation checkpoint of deeplabv3plus_r101-d8_4xb4-80k_pascal-context-59-480x480 (mIoU 53.2),
#: as listed in the installed mmseg's ``.mim/configs/deeplabv3plus/metafile.yaml``.
OFFICIAL_URL = ("https://download.openmmlab.com/mmsegmentation/v0.5/deeplabv3plus/"
                "deeplabv3plus_r101-d8_480x480_80k_pascal_context_59/"
                "deeplabv3plus_r101-d8_480x480_80k_pascal_context_59_20210416_111127-7ca0331d.pth")
#: SegDataPreProcessor of the config (RGB order, 0-255 scale).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
NUM_CLASSES = 59
#: ``test_cfg`` of the Pascal-Context-59 config (``mode='slide'``).
SLIDE_CROP = (480, 480)
SLIDE_STRIDE = (320, 320)
STAGE_CHANNELS = {"conv2": 256, "conv3": 512, "conv4": 1024, "conv5": 2048}


# ----------------------------------------------------------------------------------------------------------------
# checkpoint loading (weights_only + explicit numpy allow-list)
# ----------------------------------------------------------------------------------------------------------------
def _numpy_safe_globals() -> list[Any]:
    """The numpy globals that MMSeg / mmengine checkpoint ``meta`` dicts need (numpy scalars such as the seed,
    numpy arrays such as palettes), each registered under the numpy-1.x (``numpy.core``) and numpy-2.x
    (``numpy._core``) module path, so files written with either numpy load under either."""

    core = getattr(np, "_core", None)
    if core is None or not hasattr(core, "multiarray"):
        core = np.core
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    allowed: list[Any] = [np.ndarray, np.dtype]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(reconstruct, f"{mod}._reconstruct"), (scalar, f"{mod}.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: dtype instances are of these classes (needed for BUILD)
    if dtypes is not None:
        for name in ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType", "UInt16DType",
                     "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType", "LongDoubleDType",
                     "Complex64DType", "Complex128DType", "StrDType", "BytesDType"):
            cls = getattr(dtypes, name, None)
            if cls is not None:
                allowed.append(cls)
    return allowed


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The object in a checkpoint file, read with ``weights_only=True`` (tensors, containers, primitive types and
    the allow-listed numpy globals only; anything else, e.g. a pickled custom class, is refused)."""
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for disallowed globals; keep the cause visible
            raise RuntimeError(f"refusing to load checkpoint {path}: it is not loadable with weights_only=True and "
                               f"the numpy allow-list ({type(e).__name__}: {str(e)[:800]})") from e


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """``checkpoint['state_dict']`` (MMSeg/mmengine), or the raw dict when it is already a state dict; a leading
    ``module.`` (DataParallel) prefix on every key is removed, as mmengine's loader does."""
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError("the checkpoint holds neither a 'state_dict' nor a mapping of names to tensors")
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with an error that names the missing and unexpected keys
    and shape mismatches (e.g. a checkpoint of another architecture or with another number of classes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")
        raise RuntimeError(
            f"{source} does not match the model architecture ({type(model).__name__}, strict loading): "
            f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]; "
            f"shape mismatches [{show(shapes)}]")
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# building blocks (MMCV ConvModule / DepthwiseSeparableConvModule naming)
# ----------------------------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
    """conv (no bias) -> ``bn`` -> ReLU; submodule names ``conv`` / ``bn`` / ``activate`` like MMCV's ConvModule."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SepConvBNReLU(nn.Module):
    """Depthwise 3x3 ConvBNReLU then pointwise 1x1 ConvBNReLU (MMCV's DepthwiseSeparableConvModule)."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.depthwise_conv = ConvBNReLU(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin)
        self.pointwise_conv = ConvBNReLU(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck, ``pytorch`` style (stride on conv2), names conv1/bn1/conv2/bn2/conv3/bn3/downsample."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        width, out = planes, planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNetV1c(nn.Module):
    """ResNet-V1c backbone (deep stem, no avg-down), dilated; returns the four stage outputs (layer1..layer4)."""

    depths = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

    def __init__(self, depth: int = 101, strides: Iterable[int] = (1, 2, 1, 1),
                 dilations: Iterable[int] = (1, 1, 2, 4), contract_dilation: bool = True,
                 stem_channels: int = 64, base_channels: int = 64):
        super().__init__()
        half = stem_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, stem_channels, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_channels
        for i, (n, stride, dilation) in enumerate(zip(self.depths[depth], strides, dilations)):
            planes = base_channels * 2 ** i
            out = planes * Bottleneck.expansion
            downsample = None
            if stride != 1 or inplanes != out:
                downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            first = dilation // 2 if (contract_dilation and dilation > 1) else dilation
            blocks = [Bottleneck(inplanes, planes, stride, first, downsample)]
            blocks += [Bottleneck(out, planes, 1, dilation) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.stem(x))
        outs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            outs.append(x)
        return tuple(outs)


class DepthwiseSeparableASPPHead(nn.Module):
    """DeepLabV3+ decoder (MMSeg's DepthwiseSeparableASPPHead with c1 decoder)."""

    def __init__(self, in_channels: int = 2048, channels: int = 512, dilations: Iterable[int] = (1, 12, 24, 36),
                 c1_in_channels: int = 256, c1_channels: int = 48, num_classes: int = NUM_CLASSES,
                 dropout_ratio: float = 0.1, in_index: int = 3, align_corners: bool = False):
        super().__init__()
        dilations = tuple(dilations)
        self.in_index, self.align_corners = in_index, align_corners
        # registration order = MMSeg's (BaseDecodeHead first creates conv_seg and dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1) if d == 1 else SepConvBNReLU(in_channels, channels, d)
            for d in dilations)
        self.bottleneck = ConvBNReLU((len(dilations) + 1) * channels, channels, 3, padding=1)
        self.c1_bottleneck = ConvBNReLU(c1_in_channels, c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(SepConvBNReLU(channels + c1_channels, channels),
                                            SepConvBNReLU(channels, channels))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = inputs[self.in_index]
        pooled = F.interpolate(self.image_pool(x), size=x.shape[2:], mode="bilinear",
                               align_corners=self.align_corners)
        y = self.bottleneck(torch.cat([pooled] + [m(x) for m in self.aspp_modules], dim=1))
        c1 = self.c1_bottleneck(inputs[0])
        y = F.interpolate(y, size=c1.shape[2:], mode="bilinear", align_corners=self.align_corners)
        y = self.sep_bottleneck(torch.cat([y, c1], dim=1))
        if self.dropout is not None:
            y = self.dropout(y)
        return self.conv_seg(y)


class FCNHead(nn.Module):
    """MMSeg's FCNHead with ``concat_input=False`` (the auxiliary head of the config)."""

    def __init__(self, in_channels: int = 1024, channels: int = 256, num_convs: int = 1,
                 num_classes: int = NUM_CLASSES, dropout_ratio: float = 0.1, in_index: int = 2):
        super().__init__()
        self.in_index = in_index
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        self.convs = nn.Sequential(*[ConvBNReLU(in_channels if i == 0 else channels, channels, 3, padding=1)
                                     for i in range(num_convs)])

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        y = self.convs(inputs[self.in_index])
        if self.dropout is not None:
            y = self.dropout(y)
        return self.conv_seg(y)


# ----------------------------------------------------------------------------------------------------------------
# the segmenter
# ----------------------------------------------------------------------------------------------------------------
class MMSegContract(nn.Module):
    """The backend contract shared by our port and the MMSeg adapter: MMSeg's SegDataPreProcessor normalisation
    and the ResNet stage names. Subclasses call ``_register_normalization()`` and define ``resnet``."""

    resnet: nn.Module

    def _register_normalization(self) -> None:
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def stage_modules(self) -> dict[str, nn.Module]:
        b = self.resnet
        return {"conv2": b.layer1, "conv3": b.layer2, "conv4": b.layer3, "conv5": b.layer4}

    def stage_channels(self) -> dict[str, int]:
        return dict(STAGE_CHANNELS)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """SegDataPreProcessor: 0-255 RGB, (x - mean) / std (input already RGB, so no channel swap)."""
        return (images * 255.0 - self.mean) / self.std


class DeepLabV3PlusR101(MMSegContract):
    """DeepLabV3+ R101-D8 (MMSeg layout). ``forward(images)``: RGB in [0, 1], (B, 3, H, W) -> logits
    (B, num_classes, H, W). ``inference``: ``"whole"`` (default, = ``encode_decode`` on the full image) or
    ``"slide"`` (MMSeg's slide inference with the config's 480x480 crops, stride 320)."""

    def __init__(self, num_classes: int = NUM_CLASSES, inference: str = "whole",
                 slide_crop: tuple[int, int] = SLIDE_CROP, slide_stride: tuple[int, int] = SLIDE_STRIDE):
        super().__init__()
        if inference not in ("whole", "slide"):
            raise ValueError(f"inference must be 'whole' or 'slide', not {inference!r}")
        self.num_outputs = int(num_classes)
        self.inference = inference
        self.slide_crop, self.slide_stride = tuple(slide_crop), tuple(slide_stride)
        self._register_normalization()
        self.backbone = ResNetV1c(101)
        self.decode_head = DepthwiseSeparableASPPHead(num_classes=num_classes)
        self.auxiliary_head = FCNHead(num_classes=num_classes)
        self.align_corners = False

    @property
    def resnet(self) -> nn.Module:
        return self.backbone

    def encode_decode(self, inputs: torch.Tensor) -> torch.Tensor:
        """MMSeg's ``EncoderDecoder.encode_decode`` on normalised inputs: decode-head logits resized (bilinear,
        ``align_corners=False``) to the input size."""
        logits = self.decode_head(self.backbone(inputs))
        return F.interpolate(logits, size=inputs.shape[2:], mode="bilinear", align_corners=self.align_corners)

    def slide_inference(self, inputs: torch.Tensor) -> torch.Tensor:
        """MMSeg's ``EncoderDecoder.slide_inference``: overlapping crops, logits summed and divided by the count."""
        (h_stride, w_stride), (h_crop, w_crop) = self.slide_stride, self.slide_crop
        b, _, h, w = inputs.shape
        h_grids = max(h - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = inputs.new_zeros((b, self.num_outputs, h, w))
        count = inputs.new_zeros((b, 1, h, w))
        for hi in range(h_grids):
            for wi in range(w_grids):
                y2, x2 = min(hi * h_stride + h_crop, h), min(wi * w_stride + w_crop, w)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                crop = self.encode_decode(inputs[:, :, y1:y2, x1:x2])
                preds = preds + F.pad(crop, (x1, w - x2, y1, h - y2))
                count[:, :, y1:y2, x1:x2] += 1
        return preds / count

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        return self.slide_inference(x) if self.inference == "slide" else self.encode_decode(x)

    def forward_aux(self, images: torch.Tensor) -> torch.Tensor:
        """Auxiliary FCN head logits (layer3), resized to the input size (training-time head in MMSeg)."""
        x = self.normalize(images)
        logits = self.auxiliary_head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)

    def init_weights(self) -> "DeepLabV3PlusR101":
        """Random initialisation in MMSeg's spirit: Kaiming (fan_out, ReLU) convs, BN weight 1 / bias 0,
        ``conv_seg`` Normal(0, 0.01) with bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for head in (self.decode_head, self.auxiliary_head):
            nn.init.normal_(head.conv_seg.weight, 0.0, 0.01)
            nn.init.zeros_(head.conv_seg.bias)
        return self

    def load_checkpoint(self, path: str | Path) -> "DeepLabV3PlusR101":
        load_state_dict_strict(self, extract_state_dict(load_checkpoint_file(path)), source=f"checkpoint {path}")
        return self


def build_deeplabv3plus(weights: str | None = None, download: bool = False, num_classes: int = NUM_CLASSES,
                        pretrained: bool = True, inference: str = "whole") -> DeepLabV3PlusR101:
    """DeepLabV3+ R101-D8 (Pascal-Context-59), in eval mode.

    ``weights``: None / ``"official"`` = the MMSeg model-zoo checkpoint (``OFFICIAL_URL``, looked up in the torch
    hub cache; fetched only with ``download=True``), or a path to an MMSeg-format checkpoint. ``pretrained=False``:
    random initialisation, no file needed. Loading is strict: every key and shape must match."""
    model = DeepLabV3PlusR101(num_classes=num_classes, inference=inference)
    if not pretrained:
        model.init_weights()
    else:
        path = resolve_weights(weights, OFFICIAL_URL, download=download,
                               what="DeepLabV3+ R101-D8 Pascal-Context-59 (MMSeg)")
        model.load_checkpoint(path)
    return model.eval()
