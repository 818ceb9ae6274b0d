"""The wavefront coder (icm_helpers.wavefront) against the model and CompressAI's position-by-position coder.

On a GPU: ``ICM_TEST_DEVICE=cuda pytest tests/test_wavefront.py`` runs the same checks with the codecs and images on
that device (encoder and decoder on the same device; the rANS coder on the CPU), TF32 off so that the checks' own
reference (a full convolution) computes in fp32 as the coder's matmuls do.

The codecs are random-initialised cheng2020-attn (seeded, ``update(force=True)``) whose analysis transform's last
convolution is scaled up so that the latent has the spread of a trained codec's (std of a few units instead of ~0.2):
many distinct symbols, scales and escape codes occur, and a wrong context changes many symbols.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from icm_helpers import wavefront
from icm_helpers.codec import (
    CODERS,
    build_codec,
    compress_batch,
    compress_image,
    decompress_batch,
    decompress_image,
    pad_to_multiple,
)

COCO = Path(os.environ.get("ICM_TEST_COCO", "/work/shared/data/coco_tiny/val2017"))  # a folder of COCO .jpg
DEVICE = torch.device(os.environ.get("ICM_TEST_DEVICE", "cpu"))
# 20 sizes (multiples of 64, square and not) for the random images
SIZES = [(64, 64), (64, 128), (128, 64), (128, 128), (64, 256), (256, 64), (192, 128), (128, 192), (192, 192),
         (256, 128), (128, 256), (64, 192), (192, 64), (256, 192), (192, 256), (256, 256), (64, 64), (128, 128),
         (192, 128), (128, 64)]
# latents that differ from the model's quantisation by more than float noise, as a share of all latents: the full
# convolution and the per-wavefront matmul sum in different orders, so a value within a few ulp of a rounding
# boundary may round the other way (none on the machines tried; max difference 1e-6); a wrong order changes ~70%
MAX_MISMATCH = 1e-4


def _codec(N: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_codec(N=N).eval()
    with torch.no_grad():  # spread the latent to a trained codec's magnitude (see the module docstring)
        model.g_a[-2].weight.mul_(20)
        model.g_a[-2].bias.mul_(20)
    model.update(force=True)
    return model.to(DEVICE)


@pytest.fixture(scope="module", autouse=True)
def _fp32_convolutions():
    """TF32 off on a GPU (the default lets cuDNN convolve in TF32: ~1e-3 relative, more than the checks' margin)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module", params=[48, 192], ids=["N48", "N192"])
def codec(request):
    return _codec(request.param)


@pytest.fixture(scope="module")
def codec48():
    return _codec(48)


def _random_image(h: int, w: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, h // 8, w // 8, generator=g)  # smooth structure + noise, values in [0, 1]
    x = 0.7 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (x + 0.3 * torch.rand(batch, 3, h, w, generator=g)).clamp(0, 1).to(DEVICE)


def _coco_images(n: int = 5, short_side: int = 128) -> list[torch.Tensor]:
    from PIL import Image

    out = []
    for path in sorted(COCO.glob("*.jpg"))[:n]:
        img = Image.open(path).convert("RGB")
        scale = short_side / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3)
        out.append(pad_to_multiple(x.permute(2, 0, 1)[None].float().to(DEVICE) / 255)[0])
    return out


def _model_latents(model, y: torch.Tensor, z_strings, shape, y_hat: torch.Tensor) -> torch.Tensor:
    """The model's own quantisation of y: round(y - mean) + mean, with the means of CompressAI's forward (the full
    masked convolution over ``y_hat``, whose causal part at every position is final once all is coded)."""
    params = torch.cat([model.h_s(z) for z in model.entropy_bottleneck.decompress(z_strings, shape).split(1)])
    ctx = model.context_prediction
    ctx_params = F.conv2d(y_hat, ctx.weight * ctx.mask, ctx.bias, padding=ctx.padding)
    _, means = model.entropy_parameters(torch.cat((params, ctx_params), dim=1)).chunk(2, 1)
    return model.gaussian_conditional.quantize(y, "dequantize", means)


@torch.no_grad()
def _check_round_trip(model, x: torch.Tensor, slope: int | None = None) -> dict:
    """Code ``x`` and decode it with the wavefront coder in the order of ``slope`` (None: the model's) and check
    (1) the decoder's latents equal the encoder's bit for bit and (2) they are the model's quantisation of y."""
    enc = wavefront._compress(model, x, slope)
    y_dec = wavefront._decompress(model, enc["strings"], enc["shape"], slope)
    assert torch.equal(y_dec, enc["y_hat"]), "the decoded latents differ from the encoder's"
    expected = _model_latents(model, enc["y"], enc["strings"][1], enc["shape"], y_dec)
    wrong = int(((expected - y_dec).abs() > 1e-3).sum())
    assert wrong <= MAX_MISMATCH * y_dec.numel(), (
        f"{wrong} of {y_dec.numel()} latents differ from the model's quantisation (a context from a wrong order?)"
    )
    return enc


def test_slope_derived_from_the_mask(codec48):
    mask = codec48.context_prediction.mask
    taps = wavefront.context_taps(mask)
    assert sorted(taps) == sorted([(dy, dx) for dy in (-2, -1) for dx in range(-2, 3)] + [(0, -2), (0, -1)])
    assert wavefront.wavefront_slope(mask) == 3
    assert wavefront.wavefront_slope(torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]])) == 2  # 3x3 type A
    with pytest.raises(ValueError, match="not yet coded"):
        wavefront.wavefront_slope(torch.ones(5, 5))
    for slope, valid in ((3, True), (2, False)):
        fronts = wavefront.wavefronts(7, 9, slope)
        assert len(fronts) == slope * 6 + 9
        front_of = {(h, w): t for t, (hs, ws) in enumerate(fronts) for h, w in zip(hs, ws)}
        assert sorted(front_of) == [(h, w) for h in range(7) for w in range(9)]  # every position exactly once
        earlier = all(front_of[h + dy, w + dx] < t for (h, w), t in front_of.items() for dy, dx in taps
                      if (h + dy, w + dx) in front_of)
        assert earlier == valid


@pytest.mark.parametrize("start", [0, 10], ids=["images0-9", "images10-19"])
def test_round_trip_random_images(codec, start):
    """Decoded latents = encoder's latents exactly = the model's quantisation; decoded image = reconstruction."""
    for i, (h, w) in enumerate(SIZES[start: start + 10], start):
        x = _random_image(h, w, seed=i)
        _check_round_trip(codec, x)
        if i % 4 == 0:  # the image through the public API on a quarter of the images (g_s is the costly part)
            enc = compress_image(codec, x, reconstruct=True)
            assert enc["coder"] == "wavefront" and enc["num_bytes"] == sum(map(len, sum(enc["strings"], [])))
            assert torch.equal(decompress_image(codec, enc), enc["x_hat"])


@pytest.mark.skipif(not COCO.is_dir(), reason=f"COCO images not found at {COCO} (the shared data folder)")
def test_round_trip_coco_images(codec):
    images = _coco_images()
    assert len(images) == 5
    for x in images:
        _check_round_trip(codec, x)
    enc = compress_image(codec, images[0], reconstruct=True)
    assert torch.equal(decompress_image(codec, enc), enc["x_hat"])


def _compressai_latents(model, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
    """CompressAI's own coder on one image: its string and the latent it codes (its in-place y_hat)."""
    y = model.g_a(x)
    z = model.h_a(y)
    params = model.h_s(model.entropy_bottleneck.decompress(model.entropy_bottleneck.compress(z), z.shape[-2:]))
    y_hat = F.pad(y, (2, 2, 2, 2))
    string = model._compress_ar(y_hat, params, y.shape[2], y.shape[3], 5, 2)
    return string, y_hat[..., 2:-2, 2:-2]


@torch.no_grad()
def test_same_latents_and_size_as_compressai(codec):
    images = [_random_image(256, 192, seed=100), _random_image(128, 256, seed=101)]
    if COCO.is_dir():
        images.append(_coco_images(1, short_side=192)[0])
    for x in images:
        ours = compress_image(codec, x)
        ref = compress_image(codec, x, coder="compressai")
        assert ref["coder"] == "compressai" and ours["strings"][1] == ref["strings"][1]  # the same z string
        diff = (ours["num_bytes"] - ref["num_bytes"]) / ref["num_bytes"]
        assert abs(diff) < 0.005, (ours["num_bytes"], ref["num_bytes"])
        ref_string, ref_latents = _compressai_latents(codec, x)
        assert ref_string == ref["strings"][0][0]
        latents = wavefront.compress(codec, x)["y_hat"]
        assert int(((latents - ref_latents).abs() > 1e-3).sum()) <= MAX_MISMATCH * latents.numel()


def test_batch_gives_the_same_strings_as_one_at_a_time(codec):
    x = _random_image(128, 192, seed=7, batch=3)
    batch = compress_batch(codec, x, reconstruct=True)
    single = [compress_image(codec, x[i: i + 1], reconstruct=True) for i in range(3)]
    assert len(batch) == 3
    for b, s in zip(batch, single):
        assert b["strings"] == s["strings"] and b["num_bytes"] == s["num_bytes"]
        assert torch.equal(b["x_hat"], s["x_hat"])
    decoded = decompress_batch(codec, batch)
    assert decoded.shape == x.shape
    assert torch.equal(decoded, torch.cat([e["x_hat"] for e in batch]))
    assert torch.equal(decompress_image(codec, batch[1]), decoded[1:2])  # an image of a batch decodes alone
    assert torch.equal(wavefront.compress(codec, x)["y_hat"][2:], wavefront.compress(codec, x[2:])["y_hat"])
    with pytest.raises(ValueError, match="one padded size"):
        decompress_batch(codec, [batch[0], compress_image(codec, _random_image(64, 64, seed=8))])


@torch.no_grad()
def test_indexes_are_compressais(codec48):
    """``_Tables.indexes`` (one searchsorted) = ``GaussianConditional.build_indexes`` (CompressAI's loop) exactly, also
    on the table's own values and one float step either side of them, where a right-side search (or ``<`` for
    ``<=``) would be off by one, and on 0, negative, huge, inf and NaN scales."""
    tables = wavefront._Tables(codec48)
    table = codec48.gaussian_conditional.scale_table.to(DEVICE)
    g = torch.Generator().manual_seed(0)
    random = torch.exp(torch.empty(100_000).uniform_(-9, 7, generator=g)).to(DEVICE)
    edges = torch.cat([table, torch.nextafter(table, table + 1), torch.nextafter(table, table - 1)])
    special = torch.tensor([0.0, -1.0, 1e30, float("inf"), -float("inf"), float("nan")], device=DEVICE)
    for scales in (random.reshape(10, 100, 100), edges, special):
        assert torch.equal(tables.indexes(scales), codec48.gaussian_conditional.build_indexes(scales))
    assert tables.scale_bounds is not None  # the search was used, not the fallback
    off = torch.searchsorted(tables.scale_bounds, codec48.gaussian_conditional.lower_bound_scale(edges), right=True)
    assert not torch.equal(off.int(), codec48.gaussian_conditional.build_indexes(edges))  # the ties matter


@torch.no_grad()
def test_wrong_order_is_caught(codec48):
    """Negative control: with slope 2 the upper-right neighbour (h-1, w+2) is on the same wavefront as (h, w).
    Encoder and decoder share the order and the zero-filled buffer, so they still agree with each other; but the
    latents are no longer the model's (each was predicted without that neighbour), and the round-trip check fails."""
    x = _random_image(128, 192, seed=3)
    with pytest.raises(AssertionError, match="differ from the model's quantisation"):
        _check_round_trip(codec48, x, slope=2)
    wrong = wavefront._compress(codec48, x, slope=2)
    assert torch.equal(wavefront._decompress(codec48, wrong["strings"], wrong["shape"], slope=2), wrong["y_hat"])
    right = _check_round_trip(codec48, x, slope=3)
    diff = (wrong["y_hat"] - right["y_hat"]).abs()
    assert (diff > 1e-3).float().mean() > 0.5  # most latents are quantised around other means (~80% here) ...
    assert (diff > 0.5).any()  # ... and some symbols differ (~2% here)
    assert (diff[..., 0, :] < 1e-4).all()  # row 0 has no upper neighbours: the same up to float noise


def test_coder_names_and_cross_decoding(codec48):
    x = _random_image(64, 128, seed=5)
    assert CODERS == ("wavefront", "compressai")
    for call in (lambda: compress_image(codec48, x, coder="raster"), lambda: compress_batch(codec48, x, coder="rast"),
                 lambda: decompress_image(codec48, compress_image(codec48, x), coder="raster")):
        with pytest.raises(ValueError, match="unknown coder .*'wavefront', 'compressai'"):
            call()
    ours, ref = compress_image(codec48, x), compress_image(codec48, x, coder="compressai")
    assert (ours["coder"], ref["coder"]) == ("wavefront", "compressai")
    with pytest.raises(ValueError, match="made by the 'compressai' coder.*coder='compressai'"):
        decompress_image(codec48, ref, coder="wavefront")
    with pytest.raises(ValueError, match="made by the 'wavefront' coder.*coder='wavefront'"):
        decompress_image(codec48, ours, coder="compressai")
    with pytest.raises(ValueError, match="one coder"):
        decompress_batch(codec48, [ours, ref])
    untagged = codec48.compress(x)  # CompressAI's own dict names no coder
    with pytest.raises(ValueError, match="does not name the coder"):
        decompress_image(codec48, untagged)
    assert torch.equal(decompress_image(codec48, untagged, coder="compressai"), decompress_image(codec48, ref))


@torch.no_grad()
def test_compressai_coder_is_compressai(codec48):
    """coder="compressai" is CompressAI's compress / decompress, unchanged."""
    x = _random_image(128, 128, seed=9)
    enc = compress_image(codec48, x, coder="compressai", reconstruct=True)
    assert enc["strings"] == codec48.compress(x)["strings"]
    assert torch.equal(enc["x_hat"], decompress_image(codec48, enc))
    reference = codec48.decompress(enc["strings"], enc["shape"])["x_hat"].clamp(0, 1)
    assert torch.equal(decompress_image(codec48, enc), reference)


def test_benchmark_cli_runs(tmp_path, monkeypatch):
    """benchmarks/coder.py end to end on a tiny configuration (JSON written, both coders timed, sizes equal)."""
    import json

    from benchmarks import coder as bench

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    threads = torch.get_num_threads()
    try:
        bench.main(["--threads", str(threads), "--config", "64x128:16", "--images", "2", "--out",
                    str(tmp_path / "b.json"), "--data", str(tmp_path / "no-images")])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "b.json").read_text())["configs"][0]
    assert result["source"] == "random" and len(result["per_image"]) == 2
    assert result["wavefront_batch"]["same_strings_as_single"]
    assert abs(result["summary"]["bytes_diff_percent"]) < 0.5
    assert all(r[c]["compress_s"] > 0 for r in result["per_image"] for c in ("wavefront", "compressai"))
