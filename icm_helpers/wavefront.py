"""Wavefront-parallel entropy coding of the latent of a joint autoregressive codec (cheng2020-attn, mbt2018).

CompressAI's ``JointAutoregressiveHierarchicalPriors._compress_ar`` / ``_decompress_ar`` code the latent y one
position at a time in raster order: at every position a 5x5 convolution on a crop, the entropy-parameter network,
and (decoder) one call into the rANS decoder. This module codes the same latent with the same model, the same
Gaussian conditional tables and the same rANS coder, but processes all positions of a *wavefront* at once.

Dependencies. The context model is a masked 5x5 convolution of type A (PixelCNN, van den Oord et al. 2016; used
by Minnen et al. 2018 and Cheng et al. 2020): the prediction at (h, w) reads the already-coded positions

    (h, w-1), (h, w-2)                  (same row, to the left)
    (h-1, w-2 .. w+2), (h-2, w-2 .. w+2)  (two rows above, two columns either side)

i.e. the taps (dy, dx) with dy = -1, -2 and |dx| <= 2, and dy = 0 with dx = -1, -2.

Slope. Number the positions by t = a*h + w and code all positions with equal t together, in increasing t. This is
a valid order iff every tap lies on an earlier wavefront: a*dy + dx < 0 for every tap. For the taps above:
dy = 0: dx < 0 holds for any a; dy = -1: a > dx for dx <= 2, so a > 2; dy = -2: 2a > dx, so a > 1. The binding tap is
(h-1, w+2), the upper-right neighbour: the smallest integer slope is a = 3. With a = 2 that neighbour has the same
t as (h, w), so both would be predicted at once and (h, w) would be predicted without it (a wrong order; the tests
show that the coded latents then differ from the model's). a = 3 is also the fastest possible order: the chain
(0,0) -> (0,1) -> (0,2) -> (1,0) -> (1,1) -> (1,2) -> (2,0) -> ... -> (H-1, 2) -> (H-1, 3) -> ... -> (H-1, W-1) of
positions each of which needs the one before it has 3(H-1) + W positions (W >= 3), exactly the number of
wavefronts of a = 3, so no schedule has fewer sequential steps (a real slope between 2 and 3 is valid too, but
has more distinct values of t). ``wavefront_slope`` derives a from the model's mask rather than assuming it.

Arithmetic. Encoder and decoder run the SAME batched computation on the same inputs: a latent buffer that holds
only the values already coded (zeros elsewhere; the encoder does not keep y there, unlike CompressAI's in-place
``_compress_ar``), so the means and scales, hence the symbols' CDFs, are bit-identical on both sides. Per
wavefront: gather the causal taps of every position (for all images of the batch), the masked context convolution
as matmuls (one per image, so a batch computes what single images do), ``entropy_parameters`` (1x1
convolutions, i.e. matmuls) on the concatenation with the hyperprior's parameters at those positions, scales ->
indexes as ``gaussian_conditional.build_indexes`` gives them (one ``searchsorted``: ``_Tables.indexes``),
symbols = round(y - means) (``quantize(..., "symbols", means)``), y_hat = symbols + means (``dequantize``). Every
image of a batch is computed with the same shapes as it would be alone (images are never folded into one matrix
dimension, and g_a, h_a, h_s run image by image), so a batch gives the same strings and latents as one image at a
time.

Bitstream. One rANS string per image (``compressai.ans.BufferedRansEncoder`` / ``RansDecoder``), symbols in
wavefront order (positions of a wavefront by increasing row, channels innermost), coded with the model's own tables
(``gaussian_conditional.quantized_cdf``, ``cdf_length``, ``offset``). The hyperprior z is coded by CompressAI's
``entropy_bottleneck`` as in ``compress``/``decompress``. The strings are not interchangeable with CompressAI's
(another symbol order); their size is the same up to the coder's rounding.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Sequence

import torch
from compressai.ans import BufferedRansEncoder, RansDecoder
from torch import nn


def context_taps(mask: torch.Tensor) -> list[tuple[int, int]]:
    """The taps (dy, dx) relative to the centre that the masked context convolution reads (from its mask)."""
    kh, kw = mask.shape[-2:]
    used = mask.reshape(-1, kh, kw).ne(0).any(0)
    return [(ky - kh // 2, kx - kw // 2) for ky in range(kh) for kx in range(kw) if used[ky, kx]]


def wavefront_slope(mask: torch.Tensor) -> int:
    """The smallest integer slope a >= 0 such that every tap (dy, dx) of the mask satisfies a*dy + dx < 0, i.e. lies
    on an earlier wavefront t = a*h + w. For CompressAI's 5x5 type-A mask this is 3 (see the module docstring)."""
    taps = context_taps(mask)
    if any(dy > 0 or (dy == 0 and dx >= 0) for dy, dx in taps):
        raise ValueError(f"the context mask reads positions not yet coded in raster order: taps {taps}")
    # a*dy + dx < 0 with dy < 0  <=>  a > dx / (-dy)  <=>  a >= floor(dx / (-dy)) + 1
    return max([0] + [dx // -dy + 1 for dy, dx in taps if dy < 0])


def wavefronts(height: int, width: int, slope: int) -> list[tuple[list[int], list[int]]]:
    """The positions (rows, columns) of every wavefront t = slope*h + w, t = 0, 1, ..., rows increasing."""
    fronts = []
    for t in range(slope * (height - 1) + width):
        hs = [h for h in range(height) if 0 <= t - slope * h < width]
        fronts.append((hs, [t - slope * h for h in hs]))
    return fronts


_CDF_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cdf_tables(gc: nn.Module) -> tuple[list[list[int]], list[int], list[int]]:
    """The Gaussian conditional's rANS tables as lists (CDF rows cut to their lengths: the rANS coder reads no
    further, and the bindings convert the tables on every call, so short rows make the decoder's calls cheap).
    Cached per module while its table tensors are the same objects, unmodified (``update()`` replaces them)."""
    tensors = (gc._quantized_cdf, gc._cdf_length, gc._offset)
    key = tuple((t, t._version) for t in tensors)  # holding the tensors keeps their identity unambiguous
    cached = _CDF_CACHE.get(gc)
    if cached is not None and all(a is b and va == vb for (a, va), (b, vb) in zip(cached[0], key)):
        return cached[1]
    gc._check_cdf_size()
    lengths = gc.cdf_length.tolist()
    tables = ([row[:n] for row, n in zip(gc.quantized_cdf.tolist(), lengths)], lengths, gc.offset.tolist())
    _CDF_CACHE[gc] = (key, tables)
    return tables


@functools.lru_cache(maxsize=16)
def _front_indexes(height: int, width: int, slope: int, taps: tuple[tuple[int, int], ...], pad: int
                   ) -> list[dict[str, torch.Tensor]]:
    """Index tensors (CPU, shared: never written) per wavefront: ``pos`` into the (H*W) latent, ``buf`` into the
    padded (H+2p)*(W+2p) buffer, ``taps`` (n*T,) into the buffer at every position's taps."""
    wp = width + 2 * pad
    dy = torch.tensor([d for d, _ in taps])
    dx = torch.tensor([d for _, d in taps])
    out = []
    for hs, ws in wavefronts(height, width, slope):
        h = torch.tensor(hs)
        w = torch.tensor(ws)
        index = (h[:, None] + pad + dy) * wp + (w[:, None] + pad + dx)
        out.append({"pos": h * width + w, "buf": (h + pad) * wp + w + pad, "taps": index.reshape(-1)})
    return out


class _Tables:
    """What the wavefront coder needs from a model, prepared once per call: the context convolution as a matrix over
    its taps, ``entropy_parameters`` as a list of matmuls and activations, the rANS tables."""

    def __init__(self, model: nn.Module):
        ctx = model.context_prediction
        if ctx.stride != (1, 1) or ctx.dilation != (1, 1) or ctx.groups != 1:
            raise ValueError("the wavefront coder needs a stride-1, undilated, ungrouped context convolution")
        mask = ctx.mask if hasattr(ctx, "mask") else torch.ones_like(ctx.weight)
        self.taps = context_taps(mask)
        self.slope = wavefront_slope(mask)
        self.pad = max(ctx.kernel_size) // 2
        kh, kw = ctx.kernel_size
        ky = [dy + kh // 2 for dy, _ in self.taps]
        kx = [dx + kw // 2 for _, dx in self.taps]
        weight = (ctx.weight * mask)[:, :, ky, kx]  # (2M, M, T): the masked kernel at its taps
        self.M = int(weight.shape[1])
        # row (tap, channel) of the patch matrix meets column out of the weight matrix: (T*M, 2M)
        self.ctx_weight = weight.permute(2, 1, 0).reshape(len(self.taps) * self.M, -1).contiguous()
        self.ctx_bias = ctx.bias
        self.layers: list[Any] = []
        for layer in model.entropy_parameters:
            if isinstance(layer, nn.Conv2d):
                if layer.kernel_size != (1, 1) or layer.stride != (1, 1) or layer.groups != 1:
                    raise ValueError(f"entropy_parameters must consist of 1x1 convolutions, got {layer}")
                self.layers.append((layer.weight.reshape(layer.out_channels, -1).t().contiguous(), layer.bias))
            elif any(True for _ in layer.parameters()):
                raise ValueError(f"entropy_parameters: unsupported layer with parameters {layer}")
            else:
                self.layers.append(layer)  # an elementwise activation (LeakyReLU), channel order does not matter
        self.gc = model.gaussian_conditional
        self.cdf, self.cdf_lengths, self.offsets = _cdf_tables(self.gc)
        bounds = self.gc.scale_table[:-1]
        self.scale_bounds = bounds.contiguous() if bool((bounds[1:] > bounds[:-1]).all()) else None

    def indexes(self, scales: torch.Tensor) -> torch.Tensor:
        """``gaussian_conditional.build_indexes(scales)`` bit for bit, as one search instead of a loop over the scale
        table (~190 small kernels per wavefront, most of a GPU's time here). CompressAI starts every index at L - 1
        (L table entries) and subtracts 1 for each entry s of table[:-1] with scale <= s: index = #{s < scale}, which
        for an increasing table is ``searchsorted(table[:-1], scale)`` (left side), the same float32 comparisons. A NaN
        scale compares false everywhere there (index L - 1); the search would put it first, so it is kept apart."""
        if self.scale_bounds is None:  # a table not strictly increasing: CompressAI's loop
            return self.gc.build_indexes(scales)
        scales = self.gc.lower_bound_scale(scales)
        index = torch.searchsorted(self.scale_bounds, scales.contiguous()).int()
        return index.masked_fill_(scales.isnan(), self.scale_bounds.numel())

    def fronts(self, height: int, width: int, slope: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        fronts = _front_indexes(height, width, slope, tuple(self.taps), self.pad)
        return fronts if device.type == "cpu" else [{k: v.to(device) for k, v in f.items()} for f in fronts]

    def gaussian_params(self, buf: torch.Tensor, params: torch.Tensor, front: dict[str, torch.Tensor]):
        """Scales and means (B, n, M) at the wavefront's positions, from the coded values in ``buf`` (B, L, M) and
        the hyperprior's parameters ``params`` (B, H*W, 2M), channels last."""
        B, n = buf.shape[0], front["pos"].numel()
        patches = buf.index_select(1, front["taps"]).reshape(B, n, -1)  # (B, n, T*M)
        # the masked 5x5 convolution at n positions: one matmul per image
        ctx = _per_image_matmul(patches, self.ctx_weight)
        if self.ctx_bias is not None:
            ctx = ctx + self.ctx_bias
        h = torch.cat((params.index_select(1, front["pos"]), ctx), dim=-1)  # (params, ctx) as in CompressAI
        for layer in self.layers:
            if isinstance(layer, tuple):
                weight, bias = layer
                h = _per_image_matmul(h, weight)
                h = h + bias if bias is not None else h
            else:
                h = layer(h)
        scales, means = h.chunk(2, dim=-1)
        return scales, means


def _per_image_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, n, k) @ (k, m) as B separate single-image matmuls: a multi-threaded batched matmul may block its sums
    differently for B images than for one, and the decoder of ONE image must recompute its encoder's means and
    scales bit for bit, whatever batch the encoder coded it in."""
    return torch.cat([torch.bmm(x[i: i + 1], weight[None]) for i in range(x.shape[0])])


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]).contiguous()


def _from_buffer(buf: torch.Tensor, height: int, width: int, pad: int) -> torch.Tensor:
    """The latent (B, M, H, W) inside the padded channels-last buffer (B, (H+2p)*(W+2p), M)."""
    B, _, M = buf.shape
    grid = buf.reshape(B, height + 2 * pad, width + 2 * pad, M)[:, pad: pad + height, pad: pad + width]
    return grid.permute(0, 3, 1, 2).contiguous()


def _hyper_params(model: nn.Module, z_hat: torch.Tensor) -> torch.Tensor:
    """h_s(z_hat), image by image (the same shapes whatever the batch, so the same bits)."""
    return torch.cat([model.h_s(z_hat[i: i + 1]) for i in range(z_hat.shape[0])])


def analyse(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent y = g_a(x) and the hyper-latent z = h_a(y), image by image (the same shapes whatever the batch)."""
    y = torch.cat([model.g_a(x[i: i + 1]) for i in range(x.shape[0])])
    z = torch.cat([model.h_a(y[i: i + 1]) for i in range(y.shape[0])])
    return y, z


@torch.no_grad()
def _compress(model: nn.Module, x: torch.Tensor, slope: int | None = None) -> dict[str, Any]:
    """Encoder; ``slope`` overrides the model's wavefront slope (tests only: a wrong slope is a wrong order)."""
    return _compress_latent(model, *analyse(model, x), slope=slope)


@torch.no_grad()
def _compress_latent(model: nn.Module, y: torch.Tensor, z: torch.Tensor, slope: int | None = None
                     ) -> dict[str, Any]:
    """Encoder from the latents ``analyse`` gives (y, z); ``slope`` as in ``_compress``."""
    z_strings = model.entropy_bottleneck.compress(z)
    params = _hyper_params(model, model.entropy_bottleneck.decompress(z_strings, z.shape[-2:]))
    tables = _Tables(model)
    B, M, H, W = y.shape
    if params.shape[-2:] != (H, W):
        raise ValueError(f"hyperprior parameters {tuple(params.shape[-2:])} do not match the latent {(H, W)}")
    p = tables.pad
    buf = y.new_zeros(B, (H + 2 * p) * (W + 2 * p), M)  # only coded values; zeros elsewhere, as in the decoder
    y_cl, params_cl = _channels_last(y), _channels_last(params)
    symbols, indexes = [], []
    for front in tables.fronts(H, W, tables.slope if slope is None else slope, y.device):
        scales, means = tables.gaussian_params(buf, params_cl, front)
        idx = tables.indexes(scales)
        sym = tables.gc.quantize(y_cl.index_select(1, front["pos"]), "symbols", means)  # round(y - mean)
        buf.index_copy_(1, front["buf"], tables.gc.dequantize(sym, means))  # y_hat = symbol + mean
        symbols.append(sym.reshape(B, -1))
        indexes.append(idx.reshape(B, -1))
    symbols_all, indexes_all = torch.cat(symbols, 1).tolist(), torch.cat(indexes, 1).tolist()
    y_strings = []
    for i in range(B):
        encoder = BufferedRansEncoder()
        encoder.encode_with_indexes(symbols_all[i], indexes_all[i], tables.cdf, tables.cdf_lengths, tables.offsets)
        y_strings.append(encoder.flush())
    return {"strings": [y_strings, z_strings], "shape": z.shape[-2:], "y_hat": _from_buffer(buf, H, W, p), "y": y}


@torch.no_grad()
def _decompress(model: nn.Module, strings: Sequence[Sequence[bytes]], shape: Sequence[int],
                slope: int | None = None) -> torch.Tensor:
    """Decoder: the latent y_hat (B, M, H, W) from the strings; ``slope`` as in ``_compress``."""
    y_strings, z_strings = strings
    if len(y_strings) != len(z_strings):
        raise ValueError(f"{len(y_strings)} latent strings but {len(z_strings)} hyperprior strings")
    params = _hyper_params(model, model.entropy_bottleneck.decompress(list(z_strings), tuple(shape)))
    tables = _Tables(model)
    B, _, H, W = params.shape  # the latent's size: h_s upsamples z to it
    M, p = tables.M, tables.pad
    buf = params.new_zeros(B, (H + 2 * p) * (W + 2 * p), M)
    params_cl = _channels_last(params)
    decoders = []
    for s in y_strings:
        decoders.append(RansDecoder())
        decoders[-1].set_stream(s)
    for front in tables.fronts(H, W, tables.slope if slope is None else slope, params.device):
        scales, means = tables.gaussian_params(buf, params_cl, front)
        idx = tables.indexes(scales).reshape(B, -1).tolist()
        sym = [dec.decode_stream(idx[i], tables.cdf, tables.cdf_lengths, tables.offsets)
               for i, dec in enumerate(decoders)]
        sym_t = torch.tensor(sym, dtype=torch.int32, device=buf.device).reshape(means.shape)
        buf.index_copy_(1, front["buf"], tables.gc.dequantize(sym_t, means))
    return _from_buffer(buf, H, W, p)


def compress(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Code a batch of images (B, 3, H, W; H, W multiples of the codec's 64) with the wavefront coder.

    Returns {"strings": [y_strings, z_strings] (one string of each per image), "shape": z's (h, w), "y_hat": the
    latent the decoder will rebuild (B, M, H/16, W/16)}."""
    out = _compress(model, x)
    del out["y"]
    return out


def compress_latent(model: nn.Module, y: torch.Tensor, z: torch.Tensor) -> dict[str, Any]:
    """``compress`` from latents already computed: y = g_a(x) and z = h_a(y) of every image (``analyse``, or one
    image's g_a / h_a outputs), e.g. the ones an evaluation has just used for the estimated rate."""
    out = _compress_latent(model, y, z)
    del out["y"]
    return out


def decompress(model: nn.Module, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> torch.Tensor:
    """The latent y_hat (B, M, h, w) of ``compress``'s strings (decode it with the model's g_s)."""
    return _decompress(model, strings, shape)
