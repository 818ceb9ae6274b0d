"""Conventional-codec anchors: Pillow JPEG/WebP round trips, the BPG/VTM plumbing against fake binaries, the real
binaries when they are on PATH, and the RGB <-> YCbCr conversion."""
import io
import json
import math
import os
import shlex
import sys
import tempfile

import numpy as np
import PIL
import pytest
import torch
from PIL import Image, JpegImagePlugin

from icm_helpers.anchors import (ANCHORS, AnchorUnavailable, ImageCodec, available, bits_per_pixel, build_anchor,
                                 code_image, default_qualities, rgb_to_yuv, to_rgb8, yuv_to_rgb)

H, W = 64, 80  # not multiples of 16 in both directions


def synthetic(height=H, width=W, seed=0):
    """Smooth gradients, a grating, a flat rectangle and mild noise: a small natural-ish RGB image in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    img = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * torch.sin(6 * xx + 4 * yy)])
    img = img + 0.15 * (torch.sin(25 * xx) * torch.cos(17 * yy))[None]
    img[:, height // 4: height // 2, width // 5: width // 2] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    return (img + 0.01 * torch.randn(3, height, width, generator=g)).clamp(0, 1)


def psnr(a, b):
    return -10 * math.log10(((a - b) ** 2).mean().item())


# --- registry and protocol


def test_registry_and_protocol():
    assert sorted(ANCHORS) == ["bpg", "jpeg", "vtm", "webp"]
    codec = build_anchor("jpeg", 50)
    assert isinstance(codec, ImageCodec) and codec.name == "jpeg" and codec.quality == 50
    assert default_qualities("jpeg") == tuple(sorted(default_qualities("jpeg")))
    assert default_qualities("bpg") == tuple(sorted(default_qualities("bpg"), reverse=True))  # QP: fewest bits first
    with pytest.raises(ValueError, match="unknown anchor 'png'"):
        build_anchor("png", 50)
    for name, bad in (("jpeg", 0), ("webp", 101), ("jpeg", 50.5)):
        with pytest.raises(ValueError, match="quality"):
            build_anchor(name, bad)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        codec.encode(torch.rand(1, 3, H, W))
    assert bits_per_pixel(b"x" * 10, 4, 5) == 4.0


# --- Pillow anchors


@pytest.mark.parametrize("name", ["jpeg", "webp"])
def test_pillow_round_trip(name):
    image = synthetic()
    bpps, psnrs = [], []
    for q in default_qualities(name):
        codec = build_anchor(name, q)
        data = codec.encode(image)
        assert codec.encode(image) == data  # deterministic
        decoded = codec.decode(data, H, W)
        assert decoded.shape == (3, H, W) and decoded.dtype == torch.float32
        assert 0 <= decoded.min() and decoded.max() <= 1
        again, bpp = code_image(codec, image)
        assert torch.equal(again, decoded) and bpp == len(data) * 8 / (H * W)
        with Image.open(io.BytesIO(data)) as img:  # a real file that Pillow opens on its own
            assert img.format == name.upper() and img.size == (W, H)
            if name == "jpeg":
                assert JpegImagePlugin.get_sampling(img) == 2  # 4:2:0
        if name == "webp":
            assert data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8 "  # lossy VP8, no extended chunks
        d = codec.describe()
        assert d["codec"] == name and d["quality"] == q and d["chroma_format"] == "4:2:0"
        assert d["library_version"] == PIL.__version__ and d[f"{codec.feature}_version"]
        assert f"quality={q}" in d["encode_call"]
        bpps.append(bpp)
        psnrs.append(psnr(decoded, image))
    assert bpps == sorted(bpps) and len(set(bpps)) == len(bpps), bpps
    assert psnrs == sorted(psnrs), psnrs
    assert psnrs[-1] > 30, psnrs


def test_jpeg_options_are_explicit():
    d = build_anchor("jpeg", 50).describe()
    for option in ("subsampling='4:2:0'", "optimize=False", "progressive=False"):
        assert option in d["encode_call"]
    assert "libjpeg_turbo" in d
    small = build_anchor("jpeg", 50, optimize=True).encode(synthetic())
    assert len(small) < len(build_anchor("jpeg", 50).encode(synthetic()))
    assert "method=4" in build_anchor("webp", 50).describe()["encode_call"]


# --- RGB <-> YCbCr


@pytest.mark.parametrize("matrix", ["bt601", "bt709"])
def test_yuv444_round_trip_within_one_code_value(matrix):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    rgb[0, :8] = [[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]  # the corners of the cube
    planes = rgb_to_yuv(rgb, "444", matrix)
    assert all(p.shape == (H, W) and p.dtype == np.uint8 for p in planes)
    back = yuv_to_rgb(*planes, matrix=matrix)
    assert back.shape == rgb.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 1
    grey = np.full((2, 2, 3), 77, np.uint8)
    assert [int(p[0, 0]) for p in rgb_to_yuv(grey, matrix=matrix)] == [77, 128, 128]


def test_yuv420_shapes_and_smooth_round_trip():
    rgb = to_rgb8(synthetic())
    y, cb, cr = rgb_to_yuv(rgb, "420")
    assert y.shape == (H, W) and cb.shape == cr.shape == (H // 2, W // 2)
    back = yuv_to_rgb(y, cb, cr)
    assert back.shape == (H, W, 3)
    assert np.abs(back.astype(float) - rgb).mean() < 3
    with pytest.raises(ValueError, match="even"):
        rgb_to_yuv(rgb[:63], "420")
    with pytest.raises(ValueError, match="chroma"):
        rgb_to_yuv(rgb, "422")


# --- BPG / VTM plumbing with fake binaries

_FAKE_HEAD = f"""\
#!{sys.executable}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
"""
_FAKE_LOG = """\
with open(os.environ["FAKE_CODEC_LOG"], "a") as log:
    log.write(json.dumps(sys.argv) + "\\n")
if os.environ.get("FAKE_CODEC_FAIL"):
    sys.stderr.write("fake failure: boom\\n")
    sys.exit(3)
def opt(flag):
    return args[args.index(flag) + 1]
"""
FAKES = {
    "bpgenc": """\
if "-h" in args:
    print("BPG Image Encoder version 0.9.8-fake\\nusage: bpgenc [options] infile")
    sys.exit(1)
{log}qp = int(opt("-q"))
Path(opt("-o")).write_bytes(b"FAKEBPG" + bytes([qp]) + b"\\0" * 8 * (51 - qp) + Path(args[-1]).read_bytes())
""",
    "bpgdec": """\
if "-h" in args:
    print("BPG Image Decoder version 0.9.8-fake")
    sys.exit(1)
{log}data = Path(args[-1]).read_bytes()
assert data[:7] == b"FAKEBPG"
Path(opt("-o")).write_bytes(data[8 + 8 * (51 - data[7]):])
""",
    "EncoderAppStatic": """\
if "--help" in args:
    print("\\nVVCSoftware: VTM Encoder Version 23.4-fake [Linux][GCC 12][64 bit]")
    sys.exit(0)
{log}assert Path(opt("-c")).is_file()
w, h, qp = int(opt("-wdt")), int(opt("-hgt")), int(opt("-q"))
fmt = [a.split("=")[1] for a in args if a.startswith("--InputChromaFormat=")][0]
yuv = Path(opt("-i")).read_bytes()
assert len(yuv) == (3 * w * h if fmt == "444" else w * h + 2 * (w // 2) * (h // 2)), (len(yuv), w, h, fmt)
head = json.dumps({"w": w, "h": h, "qp": qp}).encode()
Path(opt("-b")).write_bytes(b"FAKEVVC" + bytes([len(head)]) + head + b"\\0" * 8 * (63 - qp) + yuv)
""",
    "DecoderAppStatic": """\
if "--help" in args:
    print("\\nVVCSoftware: VTM Decoder Version 23.4-fake [Linux][GCC 12][64 bit]")
    sys.exit(0)
{log}assert opt("-d") == "8"
data = Path(opt("-b")).read_bytes()
assert data[:7] == b"FAKEVVC"
head = json.loads(data[8:8 + data[7]])
Path(opt("-o")).write_bytes(data[8 + data[7] + 8 * (63 - head["qp"]):])
""",
}


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Fake codec binaries in a directory prepended to PATH; a fresh temp root; the log of their argv."""
    bin_dir, tmp_root, log = tmp_path / "bin", tmp_path / "tmp", tmp_path / "argv.jsonl"
    bin_dir.mkdir()
    tmp_root.mkdir()
    for binary, body in FAKES.items():
        path = bin_dir / binary
        path.write_text(_FAKE_HEAD + body.replace("{log}", _FAKE_LOG))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_CODEC_LOG", str(log))
    monkeypatch.delenv("FAKE_CODEC_FAIL", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    cfg = tmp_path / "encoder_intra_vtm.cfg"
    cfg.write_text("IntraPeriod : 1\n")
    monkeypatch.setenv("ICM_VTM_CFG", str(cfg))

    def runs():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return {"bin": bin_dir, "tmp": tmp_root, "runs": runs, "cfg": cfg}


def match_template(template, argv):
    """The placeholder values of ``argv`` against a command template; fails where any other token differs."""
    tokens = shlex.split(template)
    assert len(tokens) == len(argv), (tokens, argv)
    values = {}
    for tok, arg in zip(tokens, argv):
        if tok.startswith("{") and tok.endswith("}"):
            assert values.setdefault(tok[1:-1], arg) == arg
        else:
            assert tok == arg, (tok, arg)
    return values


def check_plumbing(codec, fakes, image, max_error):
    height, width = image.shape[1:]
    data = codec.encode(image)
    decoded = codec.decode(data, height, width)
    assert decoded.shape == image.shape and decoded.dtype == torch.float32
    error = (decoded - image).abs()
    assert error.max() <= max_error if max_error else error.mean() < 3 / 255  # 4:2:0: chroma blurs at colour edges
    d = codec.describe()
    assert d["encoder_version"] == "23.4-fake" if codec.name == "vtm" else d["encoder_version"] == "0.9.8-fake"
    assert d["decoder_version"] == d["encoder_version"]
    enc_argv, dec_argv = fakes["runs"]()[-2:]
    assert enc_argv == codec.last_commands["encode"] and dec_argv == codec.last_commands["decode"]
    enc = match_template(d["encode_command"], enc_argv)
    dec = match_template(d["decode_command"], dec_argv)
    assert enc_argv[0] == d["encoder"] == str(fakes["bin"] / os.path.basename(enc_argv[0]))
    assert os.path.basename(dec["bitstream"]) == os.path.basename(enc["bitstream"])
    for path in (enc["input"], enc["bitstream"], dec["bitstream"], dec["output"]):
        assert path.startswith(str(fakes["tmp"])) and not os.path.exists(path)
    assert os.listdir(fakes["tmp"]) == []  # temp dirs removed
    return data, d, enc


def test_bpg_plumbing_with_fake_binaries(fakes):
    assert available("bpg")
    image = synthetic()
    data, d, enc = check_plumbing(build_anchor("bpg", 30), fakes, image, max_error=0.5 / 255 + 1e-6)
    assert enc["input"].endswith(".png") and d["chroma_format"] == "4:4:4" and d["quality"] == 30
    assert d["encode_command"].split()[1:] == ["-o", "{bitstream}", "-q", "30", "-f", "444", "-c", "ycbcr", "-b", "8",
                                               "-e", "x265", "-m", "8", "{input}"]
    assert "-f 420" in build_anchor("bpg", 30, chroma="420").describe()["encode_command"]
    sizes = [len(build_anchor("bpg", qp).encode(image)) for qp in default_qualities("bpg")]
    assert sizes == sorted(sizes)  # the fake grows as QP falls, like a real encoder


@pytest.mark.parametrize("chroma, size", [("444", (H, W)), ("420", (H - 1, W - 1))])
def test_vtm_plumbing_with_fake_binaries(fakes, chroma, size):
    assert available("vtm")
    image = synthetic(*size)
    codec = build_anchor("vtm", 37, chroma=chroma)
    max_error = 1.5 / 255 if chroma == "444" else None
    data, d, enc = check_plumbing(codec, fakes, image, max_error)
    coded = size if chroma == "444" else (H, W)  # 4:2:0: odd sizes padded to even
    assert (enc["height"], enc["width"]) == tuple(str(n) for n in coded)
    assert enc["input"].endswith(".yuv") and d["chroma_format"] == ("4:4:4" if chroma == "444" else "4:2:0")
    assert d["config"] == str(fakes["cfg"].resolve()) and len(d["config_sha256"]) == 64
    assert "BT709" in d["color_conversion"]
    assert f"--ChromaFormatIDC={chroma}" in d["encode_command"] and "-q 37" in d["encode_command"]
    if chroma == "444":
        assert (codec.decode(data, H, W) - image).abs().mean() < 0.5 / 255


def test_binary_failure_is_reported_and_cleaned_up(fakes, monkeypatch):
    codec = build_anchor("bpg", 30)
    monkeypatch.setenv("FAKE_CODEC_FAIL", "1")
    with pytest.raises(RuntimeError, match=r"(?s)bpg encode failed \(exit 3\): .*bpgenc -o .*boom"):
        codec.encode(synthetic())
    assert os.listdir(fakes["tmp"]) == []


def test_missing_binaries_and_config(fakes, monkeypatch, tmp_path):
    (fakes["bin"] / "bpgdec").unlink()
    with pytest.raises(AnchorUnavailable, match=r"'bpgdec' not found on PATH.*BPG decoder.*https://bellard.org/bpg/"):
        build_anchor("bpg", 30)
    assert not available("bpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(AnchorUnavailable, match=r"'bpgenc' not found.*Debian has no package"):
        build_anchor("bpg", 30)
    with pytest.raises(AnchorUnavailable, match=r"'EncoderAppStatic' not found.*VVCSoftware_VTM"):
        build_anchor("vtm", 30)
    assert not available("vtm")
    monkeypatch.setenv("PATH", str(fakes["bin"]))
    monkeypatch.delenv("ICM_VTM_CFG")
    with pytest.raises(AnchorUnavailable, match=r"configuration file .*ICM_VTM_CFG"):
        build_anchor("vtm", 30)
    assert not available("vtm")
    with pytest.raises(AnchorUnavailable, match="nope.cfg' is not a file"):
        build_anchor("vtm", 30, config=tmp_path / "nope.cfg")
    assert available("vtm", config=fakes["cfg"])
    with pytest.raises(ValueError, match="QP"):
        build_anchor("vtm", 64, config=fakes["cfg"])


# --- the real binaries, when installed

REAL = {"bpg": "bpgenc/bpgdec not on PATH (https://bellard.org/bpg/)",
        "vtm": "EncoderAppStatic/DecoderAppStatic not on PATH or $ICM_VTM_CFG unset (VVCSoftware_VTM)"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(not available(n), reason=reason))
                                  for n, reason in REAL.items()])
def test_real_binary_round_trip(name):
    image = synthetic()
    bpps, psnrs = [], []
    for qp in (42, 32, 22):
        codec = build_anchor(name, qp)
        decoded, bpp = code_image(codec, image)
        assert decoded.shape == image.shape and decoded.dtype == torch.float32
        assert codec.describe()["encoder_version"] != "unknown"
        bpps.append(bpp)
        psnrs.append(psnr(decoded, image))
    assert bpps == sorted(bpps) and psnrs == sorted(psnrs), (bpps, psnrs)
    assert psnrs[-1] > 30, psnrs


def test_anchors_go_through_the_one_evaluation_path(tmp_path):
    """Experiment.evaluate_anchors: each quality is a rate point evaluated like every learned codec (the same frozen
    recognizer on the decoded image); the record keeps the codec's description; a missing binary is a reason, not a
    crash."""
    import shutil

    from icm_helpers.experiment import Experiment

    ex = Experiment("smoke", run_dir=tmp_path, log=None, overrides={
        "data.counts": {"train": 8, "val": 2, "test": 4}, "recognizers.segmentation.train.epochs": 1})
    ex.prepare_data()
    records, skipped = ex.evaluate_anchors("segmentation", ["jpeg", "bpg"], {"jpeg": [10, 60]})
    assert [(r["method"], r["lambda_"]) for r in records] == [("jpeg", 10.0), ("jpeg", 60.0)]
    assert records[0]["bpp_bitstream"] < records[1]["bpp_bitstream"] and records[0]["psnr"] < records[1]["psnr"]
    assert (
        records[1]["anchor"]["quality"] == 60 and records[1]["num_images"] == 4 and records[1]["bpp_estimated"] is None
    )
    assert all("enc_seconds" in p and "dec_seconds" in p for p in records[0]["per_image"])
    if shutil.which("bpgenc") is None:
        assert "bpgenc" in skipped["bpg"]
    assert [r["lambda_"] for r in ex.full_records("segmentation", "jpeg")] == [10.0, 60.0]
