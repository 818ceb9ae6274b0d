"""The per-image coders of ``evaluation`` (one analysis transform per image, the same records as the straightforward
sequence forward + compress_image + decompress_image), the options dataclass, the forked workers, and the one mIoU
rule shared by the metric, the bootstrap and the plots."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icm_helpers.codec import (bits_from_likelihoods, build_codec, codec_forward, compress_batch, compress_image,
                               compress_latent, crop_to, decompress_image, pad_to_multiple)
from icm_helpers.data import IcmDataset
from icm_helpers.evaluation import (AnchorCoder, EvalOptions, LearnedCoder, ReferenceCoder, SegmentationMetric,
                                    evaluate, make_coder, make_metric, psnr, without_timing)
from icm_helpers.recognizers import build_recognizer
from icm_helpers.roi import roi_latent_scaling


def _codec(N: int = 48, seed: int = 0):
    """A random cheng2020-attn whose latent has a trained codec's spread (as in test_wavefront)."""
    torch.manual_seed(seed)
    model = build_codec(N=N).eval()
    with torch.no_grad():
        model.g_a[-2].weight.mul_(20)
        model.g_a[-2].bias.mul_(20)
    model.update(force=True)
    return model


@pytest.fixture(scope="module")
def codec():
    return _codec()


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return build_recognizer("segmentation", "suite", 3, width=8, head_channels=16, low_channels=8).freeze()


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8, w // 8, generator=g)
    x = 0.7 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (x + 0.3 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def _roi(h: int, w: int) -> torch.Tensor:
    roi = torch.zeros(h, w)
    roi[h // 4: h // 2, w // 3: w - 4] = 1
    return roi


@torch.no_grad()
def _old_sequence(codec, x, roi=None, roi_qf=None, roi_decoder="as_is", decode="all", amp=None, bitstream=True):
    """What ``evaluate`` computed per image before the coders: the codec's whole forward (estimated rate and, without
    bitstream, the image), then compress_image (g_a again) and decompress_image (g_s again)."""
    xp, pad = pad_to_multiple(x)
    num_pixels = x.shape[-2] * x.shape[-1]
    ctx = (roi_latent_scaling(codec, pad_to_multiple(roi[None, None].float())[0], roi_qf, roi_decoder) if roi_qf
           else contextlib.nullcontext({"side_bits": 0}))
    with ctx as info:
        side_bits = info["side_bits"]
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            out = codec_forward(codec, xp) if amp else codec(xp)
        rec = {"bpp_estimated": (float(bits_from_likelihoods(out["likelihoods"])[0]) + side_bits) / num_pixels}
        if roi_qf:
            rec["bpp_side_info"] = side_bits / num_pixels
            rec["roi_latent_fraction"] = info["inside_fraction"]
        enc = None
        if bitstream:
            with torch.autocast("cpu", enabled=False):
                enc = compress_image(codec, xp, reconstruct=decode == "first")
                x_hat = decompress_image(codec, enc)
            rec["bpp_bitstream"] = (enc["num_bytes"] * 8.0 + side_bits) / num_pixels
        else:
            x_hat = out["x_hat"].clamp(0, 1)
    x_hat = crop_to(x_hat, pad)
    rec["psnr"] = psnr(x_hat, x)
    return rec, x_hat, enc


def _no_timing(fields):
    return {k: v for k, v in fields.items() if not k.endswith("_seconds")}


@pytest.mark.parametrize("size", [(64, 64), (70, 90)], ids=["64x64", "70x90"])
@pytest.mark.parametrize("roi_decoder", [None, "as_is", "rescale"])
@pytest.mark.parametrize("decode", ["all", "first"])
def test_learned_coder_gives_the_records_of_the_old_sequence(codec, size, roi_decoder, decode):
    """Bit for bit: the estimated rate (same float), the bitstream's size, the decoded image and the PSNR."""
    h, w = size
    roi_kw = dict(roi_qf=1.4, roi_decoder=roi_decoder) if roi_decoder else {}
    coder = LearnedCoder(codec, EvalOptions(decode=decode, **roi_kw))
    for seed in (0, 1):  # the second image: decode="first" no longer decodes (the encoder-side image)
        x = _image(h, w, seed)
        item = {"image": x[0], "roi": _roi(h, w)}
        want, want_x_hat, _ = _old_sequence(codec, x, roi=item["roi"], decode=decode, **roi_kw)
        x_hat, fields = coder.code(item, x)
        assert torch.equal(x_hat, want_x_hat)
        got = _no_timing(fields)
        got["psnr"] = psnr(x_hat, x)
        assert got == want
        assert list(got) == list(want)  # the same record layout (key order) as before
        assert ("dec_seconds" in fields) == (decode == "all" or seed == 0)


@pytest.mark.parametrize("size", [(64, 64), (70, 90)], ids=["64x64", "70x90"])
def test_compress_latent_gives_compress_image_strings(codec, size):
    """The strings and the encoder-side image of the shared latents are compress_image's, byte for byte."""
    xp = pad_to_multiple(_image(*size, seed=3))[0]
    want = compress_image(codec, xp, reconstruct=True)
    with torch.no_grad():
        y = codec.g_a(xp)
        got = compress_latent(codec, y, codec.h_a(y), reconstruct=True)[0]
    assert got["strings"] == want["strings"] and got["num_bytes"] == want["num_bytes"]
    assert torch.equal(got["x_hat"], want["x_hat"]) and tuple(got["shape"]) == tuple(want["shape"])
    assert compress_batch(codec, xp)[0]["strings"] == want["strings"]


def test_learned_coder_without_bitstream_is_the_forward(codec):
    x = _image(70, 90, seed=4)
    want, want_x_hat, _ = _old_sequence(codec, x, bitstream=False)
    x_hat, fields = LearnedCoder(codec, EvalOptions(bitstream=False)).code({"image": x[0]}, x)
    assert torch.equal(x_hat, want_x_hat) and {**fields, "psnr": psnr(x_hat, x)} == want


def test_learned_coder_under_amp_gives_the_old_records():
    """amp="bf16": the estimated rate from g_a under autocast (the mixed forward's), the bitstream in fp32: both as
    the old sequence computed them."""
    codec = _codec(N=16)
    x = _image(64, 64, seed=5)
    want, want_x_hat, _ = _old_sequence(codec, x, amp="bf16")
    x_hat, fields = LearnedCoder(codec, EvalOptions(amp="bf16")).code({"image": x[0]}, x)
    assert torch.equal(x_hat, want_x_hat) and {**_no_timing(fields), "psnr": psnr(x_hat, x)} == want


class _Calls:
    """Counts the calls of g_a and g_s (forward hooks on the codec's own transforms; ROI wrappers call them)."""

    def __init__(self, codec):
        self.counts = {"g_a": 0, "g_s": 0}
        self.hooks = [getattr(codec, name).register_forward_hook(self._count(name)) for name in self.counts]

    def _count(self, name):
        def hook(module, inputs, output):
            self.counts[name] += 1
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("bitstream, decode, roi_decoder, g_s_extra", [
    (True, "all", None, 0), (True, "all", "rescale", 0), (True, "first", None, 1), (False, "all", None, 0)])
def test_one_analysis_and_one_synthesis_per_image(world, codec, segmenter, bitstream, decode, roi_decoder, g_s_extra):
    """g_a once per image (the estimated rate and the bitstream share y and z); g_s once per image (the decoder's,
    or the forward's without bitstream); decode="first" also decodes its first image (+1 g_s)."""
    test = IcmDataset(world / "test")
    roi_kw = dict(roi_qf=1.4, roi_decoder=roi_decoder) if roi_decoder else {}
    calls = _Calls(codec)
    try:
        evaluate(codec, segmenter, test, bitstream=bitstream, decode=decode, **roi_kw)
    finally:
        calls.remove()
    assert calls.counts == {"g_a": len(test), "g_s": len(test) + g_s_extra}


@pytest.mark.parametrize("roi_decoder", [None, "rescale"])
def test_evaluate_gives_the_records_of_the_old_loop(world, codec, segmenter, roi_decoder):
    """Every per-image record of ``evaluate`` (rates, PSNR, the metric's per-image values) equals the old loop's:
    forward + compress_image + decompress_image, then the recognizer on that decoded image."""
    test = IcmDataset(world / "test")
    roi_kw = dict(roi_qf=1.4, roi_decoder=roi_decoder) if roi_decoder else {}
    got = evaluate(codec, segmenter, test, **roi_kw)
    metric = make_metric(segmenter, test)
    for i, record in enumerate(got["per_image"]):
        item = test[i]
        x = item["image"][None]
        want, x_hat, _ = _old_sequence(codec, x, roi=item.get("roi"), **roi_kw)
        want.update(metric.update(item["image_id"], segmenter.predict(x_hat), item))
        assert _no_timing(record) == {"image_id": item["image_id"], **want}
    assert got["metrics"] == metric.compute()


def test_coder_is_chosen_once_by_kind(codec):
    from icm_helpers.anchors import build_anchor

    assert isinstance(make_coder(None, EvalOptions()), ReferenceCoder)
    assert isinstance(make_coder(build_anchor("jpeg", 50), EvalOptions()), AnchorCoder)
    assert isinstance(make_coder(codec, EvalOptions()), LearnedCoder)
    with pytest.raises(ValueError, match="ROI"):
        make_coder(build_anchor("jpeg", 50), EvalOptions(roi_qf=1.4))


def test_options_dataclass_and_keywords_agree(world, codec, segmenter):
    test = IcmDataset(world / "test")
    by_keywords = evaluate(codec, segmenter, test, bitstream=False, max_images=2)
    by_options = evaluate(codec, segmenter, test, EvalOptions(bitstream=False, max_images=2))
    overridden = evaluate(codec, segmenter, test, EvalOptions(bitstream=True, max_images=3), bitstream=False,
                          max_images=2)
    for other in (by_options, overridden):
        assert without_timing(other["per_image"]) == without_timing(by_keywords["per_image"])
    with pytest.raises(TypeError):
        evaluate(codec, segmenter, test, bitsream=False)


def test_forked_workers_merge_in_image_order(world, codec, segmenter):
    """workers=2: two forked processes (images 0, 2 and 1, 3), merged back: the single-process records and metric
    (at the workers' one intra-op thread: the PSNR's mean is summed in another order with more threads)."""
    test = IcmDataset(world / "test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = evaluate(codec, segmenter, test)
    finally:
        torch.set_num_threads(threads)
    two = evaluate(codec, segmenter, test, workers=2)
    assert two["workers"] == 2
    assert without_timing(two["per_image"]) == without_timing(one["per_image"])
    assert two["metrics"] == one["metrics"] and two["bpp_bitstream"] == one["bpp_bitstream"]


def test_forked_worker_errors_reach_the_caller(world, codec):
    class Broken:
        task = "segmentation"
        num_outputs = 3

        def predict(self, x):
            raise ArithmeticError("the recognizer failed in a worker")

    test = IcmDataset(world / "test")
    with pytest.raises(ArithmeticError, match="in a worker"):
        evaluate(codec, Broken(), test, bitstream=False, workers=2)


def test_one_miou_rule():
    """The split's mIoU, a bootstrap resample's and an image's in the plots are SegmentationMetric.miou: mean IoU over
    the classes with a non-empty union, 0.0 when no class has one."""
    from icm_helpers.bootstrap import SegmentationResampler
    from icm_helpers.plots import _image_iou

    records = [{"seg_intersection": [3, 0, 1], "seg_union": [4, 0, 2]},
               {"seg_intersection": [0, 0, 0], "seg_union": [0, 0, 0]},  # no labelled pixel
               {"seg_intersection": [0, 5, 0], "seg_union": [2, 5, 1]}]
    assert SegmentationMetric.miou([3, 0, 1], [4, 0, 2]) == pytest.approx((0.75 + 0.5) / 2)
    assert SegmentationMetric.miou([0, 0, 0], [0, 0, 0]) == 0.0
    assert [_image_iou(r) for r in records] == [SegmentationMetric.image_value(r) for r in records]
    assert _image_iou(records[1]) == 0.0
    resampler = SegmentationResampler({"per_image": records})
    for weights in ([1, 1, 1], [0, 3, 0], [2, 0, 1]):
        w = np.asarray(weights, float)
        inter = w @ np.asarray([r["seg_intersection"] for r in records], float)
        union = w @ np.asarray([r["seg_union"] for r in records], float)
        assert resampler(w) == SegmentationMetric.miou(inter, union)
    metric = SegmentationMetric(3)
    metric.confusion = np.array([[3, 1, 0], [0, 5, 0], [0, 0, 0]])
    inter = np.diag(metric.confusion)
    assert metric.compute()["mIoU"] == SegmentationMetric.miou(inter, metric.confusion.sum(0)
                                                              + metric.confusion.sum(1) - inter)
    assert SegmentationMetric(3).compute()["mIoU"] == 0.0


def test_benchmark_of_the_per_image_codec_work(tmp_path, monkeypatch):
    """benchmarks/eval_coder.py times the old sequence and the learned coder on the same images: the same records."""
    import json

    from benchmarks.eval_coder import main

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    try:
        report = main(["--threads", str(threads), "--config", "64x64:16", "--images", "3", "--data",
                       str(tmp_path / "none"), "--batch", "2", "--out", str(tmp_path / "b.json")])
    finally:
        torch.set_num_threads(threads)
    assert report["configs"][0]["all_identical"] and report["configs"][0]["images"] == 3
    assert all(row["grouped"]["seconds"] > 0 for row in report["configs"][0]["per_image"])  # groups of 2 and 1
    assert json.loads((tmp_path / "b.json").read_text())["configs"][0]["mean"]["new"]["seconds"] > 0


class _Sized:
    """A split whose images have several sizes: item i is the base split's item i (mod its length) cut or padded to
    ``sizes[i]`` (image padded by replication, labels with the ignore index, the ROI with zeros)."""

    def __init__(self, base, sizes):
        self.base, self.sizes = base, sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        h, w = self.sizes[i]
        item = dict(self.base[i % len(self.base)])
        for key, mode, value in (("image", "replicate", None), ("roi", "constant", 0), ("semantic", "constant", 255)):
            t = item[key][..., :h, :w]
            grow = (0, w - t.shape[-1], 0, h - t.shape[-2])
            if key == "image":
                t = F.pad(t[None], grow, mode=mode)[0]
            else:
                t = F.pad(t, grow, mode=mode, value=value)
            item[key] = t
        return item

    def __getattr__(self, name):
        if name in ("base", "sizes"):
            raise AttributeError(name)
        return getattr(self.base, name)


# padded sizes 64x64 (64x64, 60x50, 48x40, 40x64) and 128x128 (70x90): groups break where the padded size changes
MIXED_SIZES = [(64, 64), (60, 50), (70, 90), (64, 64), (48, 40), (40, 64), (70, 90), (70, 90), (64, 64)]


def test_images_are_grouped_by_padded_size_in_order(world):
    from icm_helpers.evaluation import _image_groups

    test = _Sized(IcmDataset(world / "test"), MIXED_SIZES)
    groups = list(_image_groups(test, list(range(len(test))), EvalOptions(batch_images=3)))
    assert [[i for i, _ in g] for g in groups] == [[0, 1], [2], [3, 4, 5], [6, 7], [8]]
    assert [[i for i, _ in g] for g in _image_groups(test, [8, 0, 2, 1], EvalOptions(batch_images=8))] == [
        [8, 0], [2], [1]]  # the order asked, never reordered
    assert [len(g) for g in _image_groups(test, list(range(9)), EvalOptions())] == [1] * 9


@pytest.mark.parametrize("decode, roi_decoder, bitstream", [
    ("all", None, True), ("first", None, True), ("all", "rescale", True), ("all", None, False)])
def test_images_coded_together_give_the_records_of_one_at_a_time(world, codec, segmenter, decode, roi_decoder,
                                                                bitstream):
    """batch_images groups consecutive images of one padded size into one wavefront pass (encoder and decoder);
    every record, the metric and the decoded images (through the recognizer's per-image values) are the same bit
    for bit, g_a and g_s still run once per image."""
    test = _Sized(IcmDataset(world / "test"), MIXED_SIZES)
    kw = dict(decode=decode, bitstream=bitstream, **(dict(roi_qf=1.4, roi_decoder=roi_decoder) if roi_decoder else {}))
    one = evaluate(codec, segmenter, test, **kw)
    calls = _Calls(codec)
    try:
        grouped = evaluate(codec, segmenter, test, batch_images=4, **kw)
    finally:
        calls.remove()
    assert without_timing(grouped["per_image"]) == without_timing(one["per_image"])
    assert grouped["metrics"] == one["metrics"]
    assert calls.counts == {"g_a": len(test), "g_s": len(test) + (decode == "first")}


def test_a_group_is_one_wavefront_pass(world, codec, segmenter, monkeypatch):
    """The images of a group are coded and decoded together: one wavefront encoder and one decoder pass per group
    (the test fails if ``code_batch`` fell back to one image at a time)."""
    from icm_helpers import wavefront

    passes = {"encode": [], "decode": []}
    compress, decompress = wavefront._compress_latent, wavefront._decompress

    def counted_compress(model, y, z, **kw):
        passes["encode"].append(y.shape[0])
        return compress(model, y, z, **kw)

    def counted_decompress(model, strings, shape, **kw):
        passes["decode"].append(len(strings[0]))
        return decompress(model, strings, shape, **kw)

    monkeypatch.setattr(wavefront, "_compress_latent", counted_compress)
    monkeypatch.setattr(wavefront, "_decompress", counted_decompress)
    test = _Sized(IcmDataset(world / "test"), MIXED_SIZES)
    n = len(test)
    evaluate(codec, segmenter, test, batch_images=4)
    assert sum(passes["encode"]) == n
    assert passes["encode"] == passes["decode"] == [2, 1, 3, 2, 1]  # the groups of MIXED_SIZES at 4 per group


def test_forked_workers_code_their_images_together(world, codec, segmenter):
    test = _Sized(IcmDataset(world / "test"), MIXED_SIZES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' one intra-op thread (see test_forked_workers_merge_in_image_order)
    try:
        one = evaluate(codec, segmenter, test)
    finally:
        torch.set_num_threads(threads)
    two = evaluate(codec, segmenter, test, workers=2, batch_images=3)
    assert without_timing(two["per_image"]) == without_timing(one["per_image"])
    assert two["metrics"] == one["metrics"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_batch_images_must_be_a_positive_integer(world, codec, segmenter, bad):
    with pytest.raises(ValueError, match="batch_images must be an integer >= 1"):
        evaluate(codec, segmenter, IcmDataset(world / "test"), batch_images=bad)


def test_options_from_a_profile_block():
    ec = {"bitstream": False, "decode": "first", "amp": "bf16", "batch_images": 4, "workers": 2, "max_images": 9}
    opts = EvalOptions.from_profile(ec, "cpu", max_images=3, desc="x")
    assert (opts.bitstream, opts.decode, opts.amp, opts.batch_images, opts.workers, opts.max_images, opts.desc) == (
        False, "first", "bf16", 4, 2, 3, "x")
    assert EvalOptions.from_profile(ec, "cuda").workers == 1  # forked workers are CPU processes
    assert EvalOptions.from_profile(None) == EvalOptions()
