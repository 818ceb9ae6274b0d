"""Auxiliary branches: small recognition nets attached inside the ICM model, used ONLY in training (Sec. 3).

Positions (Sec. 4.2, Fig. 7), named by ``aux_position``:
- ``"enc"`` (aux-enc, proposed): on the latent y_hat just before the decoder. Its loss reaches the analysis
  transform g_a only: the decoder never sees it. (With CompressAI's quantization proxies, additive noise in
  training or round-with-straight-through, y_hat does not depend on the hyperprior / context / entropy-parameter
  networks, so those receive no auxiliary gradient either; they follow the encoder through the rate term R.)
- ``"dec"`` (aux-dec): on the input of the decoder's final layer; conv1 becomes [RB 128 down2, RB 128, RB 128]
  (Table 3), so the loss also reaches the decoder's earlier layers.
- ``"task"`` (aux-task): inside the frozen recognizer's backbone, on features it computes from x_hat. Detection:
  between conv2 and conv3 (the branch is Table 1 after its conv1: the ResNeXt stages, FPN and heads, fed the
  recognizer's conv2 output); segmentation: between conv3 and conv4, head only, as MMSegmentation attaches its
  auxiliary heads (the branch is Table 2's DeepLabV3+ head on the recognizer's conv3 output with conv2 as its
  low-level input; ``task_head="fcn"`` gives MMSeg's own FCNHead instead). Its loss passes through the frozen
  recognizer stages, the whole decoder and the encoder: it reaches the whole codec.
- ``None``: no auxiliary branch (the "w/o aux" baseline).

Note on MMSegmentation: its DeepLabV3+ configs put the auxiliary FCNHead on ``in_index=2`` (the output of
ResNet's layer3 = conv4). The paper writes "between conv3 and conv4"; we follow the paper, and ``task_layer``
(detection) / ``task_layers`` (segmentation, (low-level, high-level)) let a user move it.

Architectures, with a width multiplier ``width`` (1.0 = the paper's widths) for small profiles:
- detection (Table 1): conv1 = [RB 128 up2, RB 128, RB 128 up2] (stride 16 -> 4), then ResNeXt stages
  128/256/256/512 (one block each, cardinality C=32), FPN and Faster R-CNN heads.
- segmentation (Table 2): same conv1, basic-block stages 128/256/256/512 (one block each; output stride 8 with
  dilations 2 and 4 as MMSeg's D8 backbones), DeepLabV3+ head.
RB is the residual block of CompressAI's Cheng2020 / Liu et al. [16] models.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from compressai.layers import ResidualBlock, ResidualBlockUpsample, ResidualBlockWithStride
from torch import nn

from .layers import DeepLabV3PlusHead, FasterRCNNHeads, StagedBackbone, build_stages, conv_bn_relu
from .recognizers import IGNORE_INDEX
from .registry import AUX_BRANCHES, check_task

AUX_POSITIONS = ("enc", "dec", "task", None)
STAGE_CHANNELS = (128, 256, 256, 512)  # Tables 1 and 2, auxiliary-branch column
TASK_LAYERS = {"detection": ("conv2",), "segmentation": ("conv2", "conv3")}  # Sec. 4.2 aux-task insertion points
TASK_KEYS = ("task_layer", "task_head", "task_layers")  # settings of the aux-task position only


AUX_LABELS = ("pseudo", "shuffled")  # what the branch is trained on: its image's pseudo-labels, or another image's
RNG_STATE = "rng_state"  # the branch's own random stream (a buffer: it travels in its state dict and checkpoints)


def check_aux_labels(kind: str) -> str:
    if kind not in AUX_LABELS:
        raise ValueError(f"unknown aux_labels {kind!r}; valid: 'pseudo' (the recognizer's labels of the same image, "
                         "the paper) or 'shuffled' (another image's labels: the control branch of protocol v2)")
    return kind


def shuffle_labels(labels: Any) -> Any:
    """The control branch's labels (protocol v2, section 3): image i of the batch gets the labels of image i+1 mod B,
    so the branch has the same loss scale and label distribution but no information about its own image. Detection
    labels are a list of per-image dicts, segmentation labels a (B, H, W) tensor."""
    n = len(labels)
    if n < 2:
        raise ValueError("aux_labels='shuffled' gives each image another image's labels: it needs batches of >= 2")
    if isinstance(labels, torch.Tensor):
        return torch.roll(labels, shifts=-1, dims=0)
    return list(labels[1:]) + [labels[0]]


def seed_random_stream(branch: nn.Module, seed: int) -> None:
    """Give ``branch`` its own random stream, seeded by ``seed`` (a CPU generator state held as the buffer
    ``rng_state``). Every random draw of the branch's forward (RPN / RoI sampling, dropout) then comes from this
    stream (``own_random_stream``), so the arms of one training seed see the same codec noise, recognizer sampling
    and data order whether or not they have a branch (protocol v2, V7)."""
    state = torch.Generator().manual_seed(int(seed) + 7_919).get_state()
    if hasattr(branch, RNG_STATE):
        getattr(branch, RNG_STATE).copy_(state)
    else:
        branch.register_buffer(RNG_STATE, state)


@contextlib.contextmanager
def own_random_stream(branch: nn.Module | None) -> Iterator[None]:
    """Run the block on ``branch``'s own random stream (``seed_random_stream``) and leave the global streams as they
    were; the advanced state is stored back in the branch. CUDA draws come from a seed taken from the branch's
    stream. A branch without a stream (or None) runs on the global streams, as before."""
    state = getattr(branch, RNG_STATE, None) if branch is not None else None
    if state is None:
        yield
        return
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(state.detach().cpu())
        if cuda:
            torch.cuda.manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
        yield
        state.copy_(torch.get_rng_state().to(state.device))


@contextlib.contextmanager
def keep_random_stream(branch: nn.Module | None) -> Iterator[None]:
    """The branch's own stream is the same after the block as before (validation draws, measurements): a run
    validated at some steps trains exactly as one that is not."""
    state = getattr(branch, RNG_STATE, None) if branch is not None else None
    saved = None if state is None else state.clone()
    try:
        yield
    finally:
        if saved is not None:
            state.copy_(saved)


def check_aux_position(position: str | None) -> str | None:
    if position in ("none", "None", ""):
        position = None
    if position not in AUX_POSITIONS:
        raise ValueError(f"unknown aux_position {position!r}; valid: 'enc' (proposed), 'dec', 'task', None (w/o aux)")
    return position


def scaled(channels: int, width: float) -> int:
    return max(8, int(round(channels * width / 8)) * 8)


def aux_stem(position: str, cin: int, c: int) -> nn.Sequential:
    """conv1 of the branch: aux-enc upsamples y_hat (stride 16) to stride 4 (Table 1); aux-dec downsamples the
    stride-2 decoder feature to stride 4 (Table 3)."""

    if position == "enc":
        return nn.Sequential(ResidualBlockUpsample(cin, c, 2), ResidualBlock(c, c), ResidualBlockUpsample(c, c, 2))
    if position == "dec":
        return nn.Sequential(ResidualBlockWithStride(cin, c, 2), ResidualBlock(c, c), ResidualBlock(c, c))
    raise ValueError(f"no stem for aux_position {position!r}")


def _pick(features: torch.Tensor | Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if isinstance(features, Mapping):
        if name not in features:
            raise KeyError(f"the aux-task branch needs recognizer feature {name!r}; got {list(features)}")
        return features[name]
    return features


class AuxDetectionBranch(nn.Module):
    """Table 1 branch: RB stem + ResNeXt stages + FPN + Faster R-CNN heads; ``loss`` = Faster R-CNN loss.

    ``position="task"``: no stem (Table 1 after conv1); the first ResNeXt stage takes the recognizer's
    ``task_layer`` feature (stride 4, ``in_channels`` = that stage's width)."""

    def __init__(self, in_channels: int, num_classes: int, position: str = "enc", width: float = 1.0,
                 anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512), fpn_channels: int | None = None,
                 representation: int | None = None, rpn_pre_nms=(2000, 1000), rpn_post_nms=(2000, 1000),
                 box_batch_per_image: int = 512, task_layer: str = TASK_LAYERS["detection"][0]):
        super().__init__()
        chans = [scaled(c, width) for c in STAGE_CHANNELS]
        self.position = position
        self.inputs = (task_layer,) if position == "task" else (position,)
        stem = nn.Identity() if position == "task" else aux_stem(position, in_channels, chans[0])
        stage_in = in_channels if position == "task" else chans[0]
        self.backbone = StagedBackbone(
            stem, build_stages("resnext", stage_in, chans, (1, 1, 1, 1), (1, 2, 2, 2)), chans
        )
        self.heads = FasterRCNNHeads(
            chans,
            num_classes,
            fpn_channels or scaled(256, width),
            representation or scaled(1024, width),
            anchor_sizes,
            tuple(rpn_pre_nms),
            tuple(rpn_post_nms),
            box_batch_per_image,
        )

    def loss(self, feature: torch.Tensor | Mapping[str, torch.Tensor], labels: list[dict[str, torch.Tensor]],
             image_size: tuple[int, int]) -> torch.Tensor:
        """``feature``: the tensor at the branch's position, or a dict of features holding ``self.inputs``."""
        feature = _pick(feature, self.inputs[0])
        was = self.heads.training
        self.heads.train()  # RPN/RoI heads compute losses only in training mode (the backbone keeps its own mode)
        try:
            _, losses = self.heads(
                self.backbone(feature), [tuple(image_size)] * feature.shape[0], tuple(image_size), labels
            )
        finally:
            self.heads.train(was)
        return sum(losses.values())


class AuxSegmentationBranch(nn.Module):
    """Table 2 branch: RB stem + basic-block stages + DeepLabV3+ head; ``loss`` = pixel cross-entropy."""

    def __init__(self, in_channels: int, num_classes: int, position: str = "enc", width: float = 1.0,
                 head_channels: int | None = None, low_channels: int | None = None, aspp_dilations=(1, 12, 24, 36)):
        super().__init__()
        chans = [scaled(c, width) for c in STAGE_CHANNELS]
        self.position = position
        self.inputs = (position,)
        self.backbone = StagedBackbone(
            aux_stem(position, in_channels, chans[0]),
            build_stages("basic", chans[0], chans, (1, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 4)),
            chans,
        )
        self.head = DeepLabV3PlusHead(chans[-1], chans[0], num_classes + 1, head_channels or scaled(512, width),
                                      low_channels or scaled(48, width), aspp_dilations)

    def logits(self, feature: torch.Tensor | Mapping[str, torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        feats = self.backbone(_pick(feature, self.inputs[0]))
        return F.interpolate(
            self.head(feats["conv5"], feats["conv2"]), size=tuple(image_size), mode="bilinear", align_corners=False
        )

    def loss(
        self, feature: torch.Tensor | Mapping[str, torch.Tensor], labels: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        return F.cross_entropy(self.logits(feature, image_size), labels, ignore_index=IGNORE_INDEX)


class FCNAuxHead(nn.Module):
    """MMSegmentation's auxiliary ``FCNHead`` (num_convs=1): 3x3 conv-BN-ReLU, dropout 0.1, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, deep: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(deep)))


class AuxTaskSegmentationHead(nn.Module):
    """aux-task for segmentation (Sec. 4.2): a head only, on the frozen recognizer's features from x_hat.

    ``task_head="deeplabv3plus"`` (default): Table 2's DeepLabV3+ head, ASPP on ``task_layers[1]`` (conv3) and
    the decoder's low-level input from ``task_layers[0]`` (conv2); ``"fcn"``: MMSeg's FCNHead on conv3."""

    def __init__(
        self,
        channels: Mapping[str, int],
        num_classes: int,
        width: float = 1.0,
        head_channels: int | None = None,
        low_channels: int | None = None,
        aspp_dilations=(1, 12, 24, 36),
        task_head: str = "deeplabv3plus",
        task_layers: Sequence[str] = TASK_LAYERS["segmentation"],
    ):
        super().__init__()
        self.position = "task"
        low, deep = tuple(task_layers)
        self.inputs = (low, deep)
        missing = [n for n in self.inputs if n not in channels]
        if missing:
            raise ValueError(f"the recognizer has no backbone stage(s) {missing}; it has {list(channels)}")
        if task_head == "deeplabv3plus":
            self.head = DeepLabV3PlusHead(
                channels[deep],
                channels[low],
                num_classes + 1,
                head_channels or scaled(512, width),
                low_channels or scaled(48, width),
                aspp_dilations,
            )
        elif task_head == "fcn":
            self.head = FCNAuxHead(channels[deep], num_classes + 1, head_channels or scaled(256, width))
        else:
            raise ValueError(
                f"unknown task_head {task_head!r}; valid: 'deeplabv3plus' (Table 2's head), 'fcn' (MMSeg FCNHead)"
            )

    def logits(self, features: Mapping[str, torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        low, deep = (_pick(features, n) for n in self.inputs)
        return F.interpolate(self.head(deep, low), size=tuple(image_size), mode="bilinear", align_corners=False)

    def loss(
        self, features: Mapping[str, torch.Tensor], labels: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        if not isinstance(features, Mapping):
            raise TypeError("the aux-task head takes the dict of recognizer features (recognizer.capture_features)")
        return F.cross_entropy(self.logits(features, image_size), labels, ignore_index=IGNORE_INDEX)


@AUX_BRANCHES.register("detection")
def _detection_branch(
    position: str, codec_N: int, num_classes: int, recognizer: Any, config: dict[str, Any]
) -> nn.Module:
    """Table 1's branch; aux-task: after its conv1, on the recognizer's ``task_layer`` stage."""
    if position != "task":
        return AuxDetectionBranch(codec_N, num_classes, position, **config)
    channels = recognizer.feature_channels()
    layer = config.get("task_layer", TASK_LAYERS["detection"][0])
    if layer not in channels:
        raise ValueError(f"task_layer {layer!r} is not a backbone stage of the recognizer ({list(channels)})")
    return AuxDetectionBranch(channels[layer], num_classes, "task", **config)


@AUX_BRANCHES.register("segmentation")
def _segmentation_branch(position: str, codec_N: int, num_classes: int, recognizer: Any,
                         config: dict[str, Any]) -> nn.Module:
    """Table 2's branch; aux-task: a head only, on the recognizer's ``task_layers`` stages."""
    if position == "task":
        return AuxTaskSegmentationHead(recognizer.feature_channels(), num_classes, **config)
    return AuxSegmentationBranch(
        codec_N, num_classes, position, **{k: v for k, v in config.items() if k not in TASK_KEYS}
    )


def build_aux_branch(task: str, position: str | None, codec_N: int, num_classes: int, recognizer: Any = None,
                     **config: Any) -> nn.Module | None:
    """The auxiliary branch for ``task`` at ``position`` (None -> no branch; ``registry.AUX_BRANCHES``). Input
    channels: the codec's N (y_hat for aux-enc; the decoder feature before its final layer for aux-dec, also N
    channels in cheng2020-attn); for aux-task, the widths of the ``recognizer``'s backbone stages
    (``recognizer.feature_channels()``)."""
    position = check_aux_position(position)
    if position is None:
        return None
    build = AUX_BRANCHES[check_task(task)]
    if position == "task" and (recognizer is None or not hasattr(recognizer, "feature_channels")):
        raise ValueError(
            "aux_position='task' attaches inside the recognizer: pass recognizer= (one with feature_channels())"
        )
    return build(position, codec_N, num_classes, recognizer, dict(config))
