"""Speed knobs that change how fast training and evaluation run, not what they compute: bf16 autocast with an fp32 rate
path and fp32 detection heads, channels_last (CUDA only), cudnn autotuning, torch.compile."""
from __future__ import annotations

import contextlib
import functools
import types
import warnings
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from .codec import compile_codec

if TYPE_CHECKING:  # annotations only: the training package imports this module
    from .training.settings import TrainConfig


def channels_last_applies(cfg: TrainConfig, device: str) -> bool:
    """``channels_last`` is used on CUDA only. On the CPU it is ignored: with PyTorch 2.14.1 the oneDNN weight
    gradient of a 1x1 stride-2 convolution in channels_last corrupts the heap (``corrupted size vs. prev_size`` /
    segmentation faults after a few steps; cheng2020's strided residual blocks and ResNet downsampling have such
    convolutions; minimal reproducer: ``Conv2d(3, 16, 1, stride=2)`` on a channels_last input, ``backward()`` in a
    loop), and NHWC is a tensor-core (GPU) optimisation in the first place."""
    return bool(cfg.channels_last) and torch.device(device).type == "cuda"


def apply_speed_knobs(
    cfg: TrainConfig,
    device: str,
    codec: nn.Module | None = None,
    aux_branch: nn.Module | None = None,
    recognizer: nn.Module | None = None,
    compile_recognizer: bool = True,
) -> None:
    """cudnn autotuning, channels_last and torch.compile as ``cfg`` asks (in place; no-ops with the defaults).
    ``compile_recognizer=False`` when hooks are put on the recognizer's stages each step (aux-task)."""
    if str(device).startswith("cuda") and cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if channels_last_applies(cfg, device):
        for m in (codec, aux_branch, recognizer):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    if cfg.amp:
        fp32_detection_heads(aux_branch, recognizer)
    if cfg.compile:
        if codec is not None and not getattr(codec, "_icm_explicit_forward", False):
            compile_codec(codec)
        if aux_branch is not None and hasattr(aux_branch, "backbone"):
            aux_branch.backbone.compile()
        backbone = getattr(getattr(recognizer, "model", None), "backbone", None)
        if compile_recognizer and backbone is not None:
            backbone.compile()


def _fp32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return x.__class__((k, _fp32(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return x.__class__(_fp32(v) for v in x)
    return x


def fp32_detection_heads(*modules: nn.Module | None) -> int:
    """Under autocast, run every Faster R-CNN RPN / RoI head inside ``modules`` in fp32 (autocast off, inputs cast to
    fp32): box decoding, proposals, NMS, sampling and the box losses keep full precision (in bf16 a box coordinate
    near 200 px has a 1 px step, and torchvision rejects bf16 targets); the backbones stay in bf16. In place, once
    per module (an instance-level ``forward``; state dicts unchanged). Returns how many heads were wrapped."""
    n = 0
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if isinstance(m, (RegionProposalNetwork, RoIHeads)) and not getattr(m, "_icm_fp32", False):
                m.forward = types.MethodType(_fp32_forward, m)  # a bound method: deepcopy rebinds it to the copy
                m._icm_fp32 = True
                n += 1
    return n


def _fp32_forward(self, *args, **kwargs):
    devices = {a.device.type for a in _tensors(args)} or {"cpu"}
    with contextlib.ExitStack() as stack:
        for d in devices:
            stack.enter_context(torch.autocast(d, enabled=False))
        return type(self).forward(self, *_fp32(args), **_fp32(kwargs))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif hasattr(x, "tensors"):  # torchvision ImageList
        yield x.tensors


@functools.lru_cache(maxsize=1)
def slow_cpu_bf16() -> bool:
    """True when oneDNN has no fast bf16 kernels for this CPU (its own check: AVX-512 or newer). There bf16 autocast
    runs reference kernels: on a 2-core AMD EPYC with AVX2, g_a of cheng2020-attn N=192 on a 128x128 image took 49 s
    under bf16 autocast and 0.2 s in fp32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return check is not None and not check()
    except RuntimeError:  # a build without oneDNN: nothing to say
        return False


def warn_if_slow_bf16(amp: str | None, device: str) -> None:
    """A warning (once per call site) when ``amp`` asks for bf16 on a CPU without fast bf16 kernels: training
    (``with_autocast``) and evaluation (``evaluation.EvalOptions``) both call it."""
    if amp and torch.device(device).type == "cpu" and slow_cpu_bf16():
        warnings.warn(f"amp={amp!r} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no fast bf16 kernels) "
                      f"runs ~100x slower than fp32; set amp: null for CPU runs (amp is a GPU speed knob)",
                      RuntimeWarning, stacklevel=3)


def with_autocast(fn: Callable | None, amp: str | None, device: str) -> Callable | None:
    """``fn`` run under ``torch.autocast`` in ``amp``'s dtype (None: ``fn`` itself). Backward and the optimizer
    steps in ``codec_step`` leave autocast; ``codec_forward`` keeps the rate path fp32."""
    if fn is None or not amp:
        return fn
    dtype = {"bf16": torch.bfloat16}[amp]
    device_type = torch.device(device).type
    warn_if_slow_bf16(amp, device)

    def wrapped(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return fn(*args, **kwargs)

    return wrapped
