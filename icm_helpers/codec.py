"""The learned codec: CompressAI's ``Cheng2020Attention`` (cheng2020-attn, the paper's ICM model, Sec. 4.1).

Everything here wraps CompressAI's own modules; nothing of the architecture is re-implemented:
- ``build_codec``: a Cheng2020Attention with configurable N, or CompressAI's pretrained zoo model.
- ``codec_forward``: CompressAI's forward (likelihoods, x_hat) plus the intermediate tensors the auxiliary
  branches attach to (``y_hat`` = the latent the decoder receives -> aux-enc; the input of the decoder's final
  layer -> aux-dec), captured with forward pre-hooks so CompressAI's forward runs unchanged.
- ``pad_to_multiple`` / ``crop_to``: images are padded to a multiple of 64 (Sec. 4.1) and cropped back.
- ``compress_image`` / ``decompress_image`` (and ``compress_batch`` / ``decompress_batch``): real bitstreams through
  CompressAI's rANS coder, the latent coded by the wavefront coder (``icm_helpers.wavefront``, default) or by
  CompressAI's own position-by-position ``compress`` / ``decompress`` (``coder="compressai"``).
- checkpoints that refuse to load into another architecture or N.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from compressai.models import Cheng2020Attention
from compressai.models.utils import remap_old_keys
from compressai.zoo.image import model_urls
from compressai.zoo.pretrained import load_pretrained
from torch import nn

from . import wavefront
from .backends import resolve_weights
from .io import atomic_torch_save

PAD_MULTIPLE = 64  # Sec. 4.1: "padded them to a multiple of 64"
ARCH = "cheng2020-attn"


def build_codec(N: int = 128, pretrained: bool = False, quality: int | None = None, weights: str | None = None,
                download: bool = False) -> nn.Module:
    """Cheng2020Attention with ``N`` channels, or the pretrained CompressAI zoo model for ``quality``.

    ``pretrained=True``: CompressAI's MSE-trained weights (qualities 1-6; N=128 for 1-3, N=192 for 4-6), read from
    the zoo's file in the torch hub cache (``<torch hub dir>/checkpoints/cheng2020_attn-mse-<q>-*.pth.tar``, where
    CompressAI itself keeps it); missing, it is downloaded only with ``download=True`` (profile ``codec.download``),
    else the error names the file, its URL and the folder. ``weights``: a local CompressAI checkpoint file instead.
    Every file is read with ``weights_only=True`` (CompressAI's own zoo loader unpickles with ``weights_only=False``,
    so it is not used), keys renamed as CompressAI's ``load_pretrained`` does, N taken from the file.
    """

    if pretrained and not weights:
        if quality not in (1, 2, 3, 4, 5, 6):
            raise ValueError(f"pretrained=True needs quality in 1..6 (CompressAI cheng2020-attn zoo), got {quality!r}")


        weights = resolve_weights(None, model_urls["cheng2020-attn"]["mse"][quality], download=download,
                                  what=f"CompressAI cheng2020-attn (mse, quality {quality})", setting="codec.download")
    if weights:
        state = load_state(weights)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not any(k.endswith("g_a.0.conv1.weight") for k in state):
            raise ValueError(
                f"{weights} is not a cheng2020-attn checkpoint (no g_a.0.conv1.weight); expected CompressAI's "
                "zoo file or a state_dict of Cheng2020Attention"
            )
        # the zoo's files use older names for the entropy bottleneck's parameters: CompressAI's two renaming steps
        state = remap_old_keys("entropy_bottleneck", load_pretrained(state))
        model = Cheng2020Attention(N=int(state["g_a.0.conv1.weight"].shape[0]))
        load_codec_state(model, state, source=str(weights))
        return model
    if N < 8:
        raise ValueError(f"codec N must be >= 8, got {N}")
    return Cheng2020Attention(N=N)


def codec_N(model: nn.Module) -> int:
    return int(model.g_a[0].conv1.out_channels)


@contextlib.contextmanager
def capture_features(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the decoder's input (``"enc"``: y_hat, the aux-enc attachment point) and the input of the
    decoder's final layer (``"dec"``: the aux-dec attachment point, Sec. 4.2 / Fig. 7)."""
    store: dict[str, torch.Tensor] = {}
    hooks = [
        model.g_s.register_forward_pre_hook(lambda m, inp: store.__setitem__("enc", inp[0])),
        model.g_s[-1].register_forward_pre_hook(lambda m, inp: store.__setitem__("dec", inp[0])),
    ]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def codec_forward(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """CompressAI forward + captured features. Returns x_hat, likelihoods {"y","z"}, "enc" (y_hat), "dec".

    In training mode y_hat is y plus uniform noise (CompressAI's quantization proxy); in eval mode it is rounded.

    Under ``torch.autocast`` (mixed precision, ``TrainConfig.amp``) or for a codec prepared by ``torch.compile``
    (``compile_codec``), the forward runs step by step (``mixed_forward``): the analysis and synthesis transforms
    g_a / g_s in the autocast dtype, everything that makes the rate (hyper transforms, entropy bottleneck, context
    model, entropy parameters, Gaussian conditional) in fp32 with autocast off, so likelihoods and rate are fp32.
    Without either, it is CompressAI's own forward, unchanged (bit-identical results). ``model`` may be a
    ``distributed.DistributedView`` (DDP): the forward then runs through DDP (gradients are all-reduced).
    """
    inner = model.unwrap() if hasattr(model, "unwrap") else model
    amp_device = x.device.type if torch.is_autocast_enabled(x.device.type) else None
    if (amp_device is not None or getattr(inner, "_icm_explicit_forward", False)) and _is_joint_autoregressive(inner):
        run = getattr(model, "run", None)
        return run(mixed_forward, x) if run is not None else mixed_forward(inner, x)
    if amp_device is not None:  # another architecture: no step-by-step forward known -> plain fp32
        with torch.autocast(amp_device, enabled=False):
            return codec_forward(model, x.float())
    with capture_features(model) as feats:
        out = model(x)
    out.update(feats)
    return out


def _is_joint_autoregressive(model: nn.Module) -> bool:
    names = (
        "g_a",
        "g_s",
        "h_a",
        "h_s",
        "entropy_bottleneck",
        "gaussian_conditional",
        "context_prediction",
        "entropy_parameters",
    )
    return all(hasattr(model, n) for n in names) and isinstance(model.g_s, nn.Sequential)


def mixed_forward(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """CompressAI's ``JointAutoregressiveHierarchicalPriors.forward`` (cheng2020-attn), step by step, with the rate
    path in fp32 (autocast off) and g_a / g_s under the caller's autocast (if any). Without autocast it computes
    exactly what CompressAI's forward computes (same ops, same order). Also returns "enc" (y_hat) and "dec" (the
    input of g_s's last layer) without hooks (hooks would defeat torch.compile)."""
    likelihoods, y_hat = latent_rate(model, model.g_a(x))
    dec = y_hat
    for layer in list(model.g_s)[:-1]:
        dec = layer(dec)
    x_hat = model.g_s[-1](dec)
    return {"x_hat": x_hat.float(), "likelihoods": likelihoods, "enc": y_hat, "dec": dec}


def latent_rate(model: nn.Module, y: torch.Tensor, z: torch.Tensor | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The rate part of CompressAI's ``JointAutoregressiveHierarchicalPriors.forward`` from the latent y = g_a(x)
    (and z = h_a(y) when already computed), in fp32 with autocast off: the likelihoods {"y", "z"} and y_hat (y with
    noise in training mode, round(y) in eval mode: the latent the forward's g_s receives). The same ops in the same
    order as CompressAI's forward, so the same bits; without g_s."""
    with torch.autocast(y.device.type, enabled=False):
        y = y.float()
        z = model.h_a(y) if z is None else z
        z_hat, z_likelihoods = model.entropy_bottleneck(z)
        params = model.h_s(z_hat)
        y_hat = model.gaussian_conditional.quantize(y, "noise" if model.training else "dequantize")
        ctx_params = model.context_prediction(y_hat)
        gaussian_params = model.entropy_parameters(torch.cat((params, ctx_params), dim=1))
        scales_hat, means_hat = gaussian_params.chunk(2, 1)
        _, y_likelihoods = model.gaussian_conditional(y, scales_hat, means=means_hat)
    return {"y": y_likelihoods, "z": z_likelihoods}, y_hat


def compile_codec(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """``torch.compile`` the codec's analysis / synthesis transforms in place (each layer of g_s separately, so the
    aux-dec feature stays reachable without hooks); ``codec_forward`` then uses ``mixed_forward``. The entropy
    models stay eager (their CDF bookkeeping is not worth compiling). State dict keys are unchanged."""
    model.g_a.compile(**compile_kwargs)
    for layer in model.g_s:
        layer.compile(**compile_kwargs)
    model._icm_explicit_forward = True
    return model


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pad (left/right, top/bottom split as in CompressAI's evaluation) to a multiple of ``multiple``.

    THE padding rule wherever an image meets the codec (training, validation, evaluation, bit maps, ROI, the widget;
    Sec. 4.1: "padded them to a multiple of 64 so that they could be input into the ICM model"). Returns ``(padded,
    pad)`` with ``pad = (left, right, top, bottom)`` for ``crop_to``; ``x`` itself when its size is already a
    multiple."""
    h, w = x.shape[-2:]
    H, W = padded_size(h, w, multiple)
    if (H, W) == (h, w):
        return x, (0, 0, 0, 0)
    left, top = (W - w) // 2, (H - h) // 2
    pad = (left, W - w - left, top, H - h - top)
    return F.pad(x, pad, mode="constant", value=0.0), pad


def padded_size(height: int, width: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int]:
    """The size ``pad_to_multiple`` pads an image of ``height`` x ``width`` to."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def crop_to(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    left, right, top, bottom = pad
    h, w = x.shape[-2:]
    return x[..., top: h - bottom, left: w - right]


def bits_from_likelihoods(likelihoods: dict[str, torch.Tensor]) -> torch.Tensor:
    """Total estimated bits per image (sum of -log2 likelihood over y and z), shape (B,)."""
    total = 0
    for lik in likelihoods.values():
        total = total + (-torch.log2(lik)).flatten(1).sum(1)
    return total


def converge_quantiles(model: nn.Module, steps: int = 1000, lr: float = 0.05, tol: float = 0.05) -> float:
    """Fit the entropy bottleneck's quantiles (CompressAI's ``aux_loss``; unrelated to the paper's auxiliary loss).

    The quantiles only bound the CDF tables of the range coder; CompressAI trains them alongside the network
    with a small learning rate over millions of steps. Short runs leave them far from converged, which
    inflates the real bitstream (symbols outside the tables are escape-coded). Since the quantile loss depends
    on the entropy bottleneck's density alone (not on data), it is minimised here directly, with the network
    frozen, until it stops improving. Returns the final loss."""
    quantiles = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    opt = torch.optim.Adam(quantiles, lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=50)
    loss = float("inf")
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        q = model.aux_loss()
        q.backward()
        opt.step()
        loss = float(q.detach())
        sched.step(loss)
        if loss < tol:
            break
    return loss


def update_entropy_tables(model: nn.Module) -> None:
    """Recompute the CDF tables the range coder needs (after training / loading)."""
    model.update(force=True)


CODERS = ("wavefront", "compressai")  # the latent coders of compress_image / decompress_image; the first is the default


def _check_coder(coder: str) -> None:
    if coder not in CODERS:
        raise ValueError(f"unknown coder {coder!r}; valid coders: {', '.join(map(repr, CODERS))}")


def _coder_of(enc: dict[str, Any], coder: str | None) -> str:
    """The coder that decodes ``enc``: the one named in it (``enc["coder"]``); ``coder``, when given, must agree."""
    if coder is not None:
        _check_coder(coder)
    made = enc.get("coder")
    if made is None:
        if coder is None:
            raise ValueError(f"the bitstream does not name the coder that made it (no 'coder' key): pass coder= one of "
                             f"{', '.join(map(repr, CODERS))}")
        return coder
    _check_coder(made)
    if coder is not None and coder != made:
        raise ValueError(f"this bitstream was made by the {made!r} coder; the {coder!r} coder cannot decode it (the "
                         f"two write the latent's symbols in different orders): decode it with coder={made!r}")
    return made


def _num_bytes(enc: dict[str, Any]) -> int:
    return sum(len(s) for strings in enc["strings"] for s in strings)


@torch.no_grad()
def compress_image(model: nn.Module, x: torch.Tensor, reconstruct: bool = False, coder: str = "wavefront"
                   ) -> dict[str, Any]:
    """Real bitstream for ONE image (1x3xHxW, already padded). Returns {"strings": [[y string], [z string]], "shape",
    "coder", "num_bytes"} (CompressAI's dict, plus the name of the coder that made it and its size).

    ``coder`` (one of ``CODERS``): "wavefront" (default) codes the latent with ``icm_helpers.wavefront`` (all
    positions of a wavefront at once, the same model and rANS tables; about the same size), "compressai" with
    CompressAI's ``compress`` (position by position in raster order; any CompressAI model). A bitstream decodes only
    with the coder that made it.

    ``reconstruct=True`` (cheng2020-attn and its autoregressive relatives): also ``"x_hat"``, the image the decoder
    will rebuild from these strings, computed on the encoder side. Both coders quantise every latent position around
    the mean predicted from the positions already coded and keep the dequantised latent; the decoder repeats exactly
    these computations from the bitstream, so on the same machine g_s of that latent is ``decompress_image``'s image
    bit for bit, at a fraction of the cost of running the decoder (``evaluate`` verifies it on the first image it
    codes)."""
    _check_coder(coder)
    if x.shape[0] != 1:
        raise ValueError("compress_image codes one image at a time (batch of 1); compress_batch codes several")
    if coder == "wavefront":
        return compress_batch(model, x, reconstruct=reconstruct, coder=coder)[0]
    if not reconstruct:
        enc = model.compress(x)
    elif not _is_joint_autoregressive(model):
        raise ValueError(
            f"reconstruct=True needs an autoregressive CompressAI model (cheng2020-attn), got {type(model).__name__}"
        )
    else:
        y = model.g_a(x)
        z = model.h_a(y)
        z_strings = model.entropy_bottleneck.compress(z)
        params = model.h_s(model.entropy_bottleneck.decompress(z_strings, z.size()[-2:]))
        kernel = model.context_prediction.weight.shape[-1]  # 5: the masked context convolution of cheng2020
        pad = (kernel - 1) // 2
        y_hat = F.pad(y, (pad, pad, pad, pad))  # filled in place by the coder with the dequantised latent
        y_string = model._compress_ar(y_hat, params, 4 * z.size(2), 4 * z.size(3), kernel, pad)
        enc = {"strings": [[y_string], z_strings], "shape": z.size()[-2:],
               "x_hat": model.g_s(F.pad(y_hat, (-pad, -pad, -pad, -pad))).clamp_(0, 1)}
    enc["coder"] = coder
    enc["num_bytes"] = _num_bytes(enc)
    return enc


@torch.no_grad()
def compress_batch(model: nn.Module, x: torch.Tensor, reconstruct: bool = False, coder: str = "wavefront"
                   ) -> list[dict[str, Any]]:
    """``compress_image`` for a batch of padded images of one size (Bx3xHxW): one dict per image, each decodable
    alone by ``decompress_image`` (or together by ``decompress_batch``). The wavefront coder codes the batch's
    latents together (one pass over the wavefronts) and gives the same strings as one image at a time; "compressai"
    codes the images one after the other."""
    _check_coder(coder)
    if coder == "compressai":
        return [compress_image(model, x[i: i + 1], reconstruct=reconstruct, coder=coder) for i in range(x.shape[0])]
    if not _is_joint_autoregressive(model):
        raise ValueError(f"the wavefront coder needs a joint autoregressive CompressAI model (cheng2020-attn), got "
                         f"{type(model).__name__}: use coder='compressai'")
    return compress_latent(model, *wavefront.analyse(model, x), reconstruct=reconstruct)


@torch.no_grad()
def compress_latent(model: nn.Module, y: torch.Tensor, z: torch.Tensor, reconstruct: bool = False
                    ) -> list[dict[str, Any]]:
    """``compress_batch`` (wavefront coder) from the latents y = g_a(x) and z = h_a(y) already computed (the
    analysis transform is not run again): the same strings, and with ``reconstruct`` the same ``"x_hat"``, as
    ``compress_batch(model, x)`` when y and z are the outputs of ``model.g_a`` / ``model.h_a`` for x."""
    if not _is_joint_autoregressive(model):
        raise ValueError(f"the wavefront coder needs a joint autoregressive CompressAI model (cheng2020-attn), got "
                         f"{type(model).__name__}: use coder='compressai'")
    out = wavefront.compress_latent(model, y, z)
    encs = []
    for i, (y_string, z_string) in enumerate(zip(*out["strings"])):
        enc: dict[str, Any] = {"strings": [[y_string], [z_string]], "shape": out["shape"], "coder": "wavefront"}
        if reconstruct:  # g_s image by image, as decompress_batch does: the same shapes, the same bits
            enc["x_hat"] = model.g_s(out["y_hat"][i: i + 1]).clamp_(0, 1)
        enc["num_bytes"] = _num_bytes(enc)
        encs.append(enc)
    return encs


@torch.no_grad()
def decompress_image(model: nn.Module, enc: dict[str, Any], coder: str | None = None) -> torch.Tensor:
    """The decoded image (1x3xHxW) of ``compress_image``'s bitstream, by the coder named in it (``enc["coder"]``).
    ``coder``: to insist on one; a bitstream of the other coder is refused. A dict without the name (e.g.
    CompressAI's own ``compress``) needs ``coder``."""
    if _coder_of(enc, coder) == "compressai":
        return model.decompress(enc["strings"], enc["shape"])["x_hat"].clamp_(0, 1)
    return decompress_batch(model, [enc], coder)


@torch.no_grad()
def decompress_batch(model: nn.Module, encs: list[dict[str, Any]], coder: str | None = None) -> torch.Tensor:
    """The decoded images (Bx3xHxW) of several bitstreams of images of one (padded) size, e.g. ``compress_batch``'s;
    the wavefront coder decodes their latents together."""
    coders = {_coder_of(enc, coder) for enc in encs}
    if len(coders) != 1:
        raise ValueError(f"decompress_batch needs bitstreams of one coder, got {sorted(coders)}")
    if coders == {"compressai"}:
        return torch.cat([decompress_image(model, enc, "compressai") for enc in encs])
    shapes = {tuple(int(s) for s in enc["shape"]) for enc in encs}
    if len(shapes) != 1:
        raise ValueError(f"decompress_batch needs images of one padded size, got latent shapes {sorted(shapes)}")
    if any(len(strings) != 1 for enc in encs for strings in enc["strings"]):
        raise ValueError("every bitstream must hold one image (one y string and one z string)")
    strings = [[enc["strings"][0][0] for enc in encs], [enc["strings"][1][0] for enc in encs]]
    y_hat = wavefront.decompress(model, strings, shapes.pop())
    return torch.cat([model.g_s(y_hat[i: i + 1]).clamp_(0, 1) for i in range(len(encs))])


# ---------------------------------------------------------------- checkpoints
def codec_meta(model: nn.Module) -> dict[str, Any]:
    return {"arch": ARCH, "N": codec_N(model)}


def save_codec(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    return atomic_torch_save({"meta": codec_meta(model), "state_dict": model.state_dict(), "extra": extra or {}}, path)


def load_state(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``; a truncated/corrupt file raises a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read checkpoint {path}: truncated or corrupt file? delete it and re-run the step that writes it "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def load_codec(path: str | Path) -> nn.Module:
    """Load a codec saved by ``save_codec``; refuses checkpoints of another architecture."""
    ckpt = load_state(path)
    meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
    if meta.get("arch") != ARCH:
        if meta.get("kind") == "recognizer":
            hint = f"it holds a {meta.get('task')} recognizer: load it with icm_helpers.recognizers.load_recognizer"
        elif (
            not meta
            and isinstance(ckpt, dict)
            and ("g_a.0.conv1.weight" in ckpt or "g_a.0.conv1.weight" in (ckpt.get("state_dict") or {}))
        ):
            hint = "it is a bare CompressAI state_dict (e.g. a zoo file): load it with build_codec(weights=path)"
        else:
            hint = f"its meta says {meta or 'nothing'}; expected a file written by save_codec"
        raise ValueError(f"{path} is not a {ARCH} codec checkpoint: {hint}")
    model = build_codec(N=int(meta["N"]))
    load_codec_state(model, ckpt["state_dict"], source=str(path))
    return model


def load_codec_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load weights, with a clear message when the checkpoint is of another N / architecture.

    CompressAI's entropy-model buffers (CDF tables) change size with ``update()``, so they are resized first
    (this is what ``CompressionModel.load_state_dict`` does, which we call)."""
    params = dict(model.named_parameters())  # the entropy coder's buffers legitimately change size
    bad = [k for k, v in state_dict.items() if k in params and params[k].shape != v.shape]
    missing = [k for k in params if k not in state_dict]
    if bad or missing:
        detail = f"shape mismatch in {bad[:3]}" if bad else f"missing keys {missing[:3]}"
        raise ValueError(f"{source} does not fit a {ARCH} codec with N={codec_N(model)}: {detail}. "
                         "Was it saved from another architecture or N?")
    model.load_state_dict(state_dict)
    update_entropy_tables(model)
