"""Conventional-codec anchors (JPEG, WebP, BPG, VTM) behind one small codec protocol.

Every anchor is an object with ``name``, ``quality``, ``encode(image) -> bytes``, ``decode(data, height, width)
-> image`` and ``describe() -> dict``, so one evaluation path can code an image with a learned codec or with a
conventional one. Images are torch float tensors ``(3, H, W)`` in ``[0, 1]``, RGB; they enter every anchor as
8-bit RGB (``round(clamp(x, 0, 1) * 255)``) and come back as float32 in ``[0, 1]``.

Rate: ``bits_per_pixel(data, h, w) = len(data) * 8 / (h * w)`` counts the whole file each anchor writes (JPEG/JFIF,
RIFF/WebP, BPG file, VVC bitstream), headers included. At 128x128 a baseline JPEG header (quantisation and
Huffman tables, about 600 bytes, ~0.3 bpp) is a large share of the bits: that is the honest file size.

- ``jpeg``, ``webp``: Pillow (libjpeg(-turbo), libwebp), 4:2:0 chroma set explicitly in the save call.
- ``bpg``: Fabrice Bellard's ``bpgenc`` / ``bpgdec`` binaries (PNG in, PNG out), when on PATH.
- ``vtm``: the VVC reference software ``EncoderAppStatic`` / ``DecoderAppStatic``, when on PATH, with an encoder
  configuration file (``config=`` or ``$ICM_VTM_CFG``); raw planar 8-bit YCbCr in and out, converted here
  (full range, BT.709 by default, 4:4:4 by default or 4:2:0).

``ANCHORS`` maps names to classes; ``build_anchor(name, quality, **options)`` builds one, ``default_qualities(name)``
gives its rate sweep, ``available(name)`` tells whether it can run here (binaries, config).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image, features

__all__ = ["ANCHORS", "AnchorUnavailable", "BpgCodec", "ImageCodec", "JpegCodec", "VtmCodec", "WebpCodec",
           "available", "bits_per_pixel", "build_anchor", "code_image", "default_qualities", "from_rgb8",
           "register_anchor", "rgb_to_yuv", "to_rgb8", "yuv_to_rgb"]

VTM_CFG_ENV = "ICM_VTM_CFG"


class AnchorUnavailable(RuntimeError):
    """A codec's binary, library plugin or configuration file is missing on this machine."""


@runtime_checkable
class ImageCodec(Protocol):
    """What the evaluation path needs from a codec (learned or conventional)."""

    name: str
    quality: int

    def encode(self, image: torch.Tensor) -> bytes: ...

    def decode(self, data: bytes, height: int, width: int) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


def bits_per_pixel(data: bytes, height: int, width: int) -> float:
    """``len(data) * 8 / (height * width)``: the whole file, headers included."""
    return len(data) * 8.0 / (height * width)


def code_image(codec: ImageCodec, image: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Encode and decode ``image`` (3, H, W); returns the decoded image and its bits per pixel."""
    height, width = image.shape[-2:]
    data = codec.encode(image)
    return codec.decode(data, height, width), bits_per_pixel(data, height, width)


# --- images <-> 8-bit arrays


def to_rgb8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) uint8, ``round(clamp(x, 0, 1) * 255)``."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected an RGB image tensor of shape (3, H, W), got {got}")
    if not image.is_floating_point():
        raise ValueError(f"expected a float image in [0, 1], got dtype {image.dtype}")
    rgb = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(rgb.permute(1, 2, 0).numpy())


def from_rgb8(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 tensor in [0, 1]."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)


def _read_image_bytes(data: bytes, fmt: str, height: int, width: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if img.format != fmt:
            raise ValueError(f"expected a {fmt} file, got {img.format}")
        if img.size != (width, height):
            raise ValueError(f"decoded {fmt} is {img.size[0]}x{img.size[1]}, expected {width}x{height}")
        return np.asarray(img.convert("RGB"))


# --- full-range RGB <-> YCbCr (8-bit code values) for the raw YUV files of VTM

MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}  # (Kr, Kb)


def _matrix(matrix: str) -> tuple[float, float]:
    if matrix not in MATRICES:
        raise ValueError(f"matrix must be one of {sorted(MATRICES)}, got {matrix!r}")
    return MATRICES[matrix]


def rgb_to_yuv(rgb: np.ndarray, chroma: str = "444", matrix: str = "bt709") -> tuple[np.ndarray, ...]:
    """(H, W, 3) uint8 RGB -> (Y, Cb, Cr) uint8 planes, full range (Y 0-255, chroma centred on 128).

    ``chroma="420"`` averages each 2x2 block of Cb and Cr (chroma sited at the block centre); H and W must be even.
    """
    kr, kb = _matrix(matrix)
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = kr * r + (1 - kr - kb) * g + kb * b
    cb = (b - y) / (2 * (1 - kb)) + 128
    cr = (r - y) / (2 * (1 - kr)) + 128
    if chroma == "420":
        if rgb.shape[0] % 2 or rgb.shape[1] % 2:
            raise ValueError(f"4:2:0 needs an even height and width, got {rgb.shape[0]}x{rgb.shape[1]}")
        cb, cr = (c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2).mean(axis=(1, 3)) for c in (cb, cr))
    elif chroma != "444":
        raise ValueError(f"chroma must be '444' or '420', got {chroma!r}")
    return tuple(np.clip(np.round(p), 0, 255).astype(np.uint8) for p in (y, cb, cr))


def yuv_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray, matrix: str = "bt709") -> np.ndarray:
    """Full-range (Y, Cb, Cr) uint8 planes -> (H, W, 3) uint8 RGB; 4:2:0 chroma is upsampled bilinearly
    (centre-sited, ``align_corners=False``) to the luma size."""
    kr, kb = _matrix(matrix)
    if cb.shape != y.shape:
        up = F.interpolate(torch.from_numpy(np.stack([cb, cr])).double()[None], size=y.shape, mode="bilinear",
                           align_corners=False)[0].numpy()
        cb, cr = up[0], up[1]
    yf, cbf, crf = y.astype(np.float64), cb.astype(np.float64) - 128, cr.astype(np.float64) - 128
    r = yf + 2 * (1 - kr) * crf
    b = yf + 2 * (1 - kb) * cbf
    g = (yf - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.round(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def _yuv_plane_shapes(height: int, width: int, chroma: str) -> list[tuple[int, int]]:
    c = (height, width) if chroma == "444" else (height // 2, width // 2)
    return [(height, width), c, c]


def _read_yuv(data: bytes, height: int, width: int, chroma: str) -> tuple[np.ndarray, ...]:
    shapes = _yuv_plane_shapes(height, width, chroma)
    expected = sum(h * w for h, w in shapes)
    if len(data) != expected:
        raise ValueError(f"raw YUV {chroma} 8-bit {width}x{height} should be {expected} bytes, got {len(data)}")
    flat, planes, at = np.frombuffer(data, dtype=np.uint8), [], 0
    for h, w in shapes:
        planes.append(flat[at:at + h * w].reshape(h, w))
        at += h * w
    return tuple(planes)


# --- registry

ANCHORS: dict[str, type] = {}


def register_anchor(name: str) -> Callable[[type], type]:
    """Class decorator: ``ANCHORS[name] = cls``."""
    def add(cls: type) -> type:
        cls.name = name
        ANCHORS[name] = cls
        return cls
    return add


def _anchor_class(name: str) -> type:
    if name not in ANCHORS:
        raise ValueError(f"unknown anchor {name!r}; known: {sorted(ANCHORS)}")
    return ANCHORS[name]


def build_anchor(name: str, quality: int, **options: Any) -> ImageCodec:
    """The anchor ``name`` at rate parameter ``quality`` (JPEG/WebP quality, BPG/VTM QP)."""
    return _anchor_class(name)(quality, **options)


def default_qualities(name: str) -> tuple[int, ...]:
    """The rate sweep of ``name``, from the fewest to the most bits (about 0.1-2 bpp on small images)."""
    return tuple(_anchor_class(name).default_qualities)


def available(name: str, **options: Any) -> bool:
    """Whether ``build_anchor(name, q, **options)`` can run here (library plugin, binaries, config file)."""
    cls = _anchor_class(name)
    try:
        cls(cls.default_qualities[0], **options)
    except AnchorUnavailable:
        return False
    return True


def _check_int(value: int, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


# --- Pillow anchors


class _PillowCodec:
    """Encode/decode through Pillow with every save option spelled out (nothing left to Pillow's defaults)."""

    name: str
    quality_kind = "quality"  # higher = more bits
    fmt: str
    feature: str  # PIL.features name of the codec library

    def __init__(self, quality: int) -> None:
        self.quality = _check_int(quality, 1, 100, f"{self.fmt} quality")
        if not features.check(self.feature):
            raise AnchorUnavailable(f"this Pillow was built without {self.fmt} support ({self.feature}); "
                                    "install a Pillow wheel from PyPI (pip install --force-reinstall pillow)")

    def save_options(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, image: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(to_rgb8(image), "RGB").save(buf, format=self.fmt, **self.save_options())
        return buf.getvalue()

    def decode(self, data: bytes, height: int, width: int) -> torch.Tensor:
        return from_rgb8(_read_image_bytes(data, self.fmt, height, width))

    def describe(self) -> dict[str, Any]:
        options = ", ".join(f"{k}={v!r}" for k, v in self.save_options().items())
        return {"codec": self.name, "quality": self.quality, "quality_kind": "quality 1-100, higher = more bits",
                "chroma_format": "4:2:0", "library": "Pillow", "library_version": PIL.__version__,
                f"{self.feature}_version": features.version(self.feature), **self._library_details(),
                "encode_call": f"PIL.Image.fromarray(rgb8, 'RGB').save(buf, format={self.fmt!r}, {options})",
                "decode_call": "PIL.Image.open(io.BytesIO(data)).convert('RGB')",
                "input": "8-bit RGB, round(clamp(x, 0, 1) * 255)",
                "bpp": "len(file bytes) * 8 / (H * W), headers included"}

    def _library_details(self) -> dict[str, Any]:
        return {}


@register_anchor("jpeg")
class JpegCodec(_PillowCodec):
    """Baseline JPEG (JFIF) through Pillow: libjpeg's scaled standard tables, 4:2:0, libjpeg's standard Huffman
    tables unless ``optimize=True`` (optimised tables: a file of an 8x8 image shrinks from 631 to 285 bytes)."""

    fmt, feature = "JPEG", "jpg"
    default_qualities = (5, 10, 15, 25, 40, 60, 80)

    def __init__(self, quality: int, *, optimize: bool = False) -> None:
        super().__init__(quality)
        self.optimize = bool(optimize)

    def save_options(self) -> dict[str, Any]:
        return {"quality": self.quality, "subsampling": "4:2:0", "optimize": self.optimize, "progressive": False,
                "keep_rgb": False}

    def _library_details(self) -> dict[str, Any]:
        turbo = bool(features.check("libjpeg_turbo"))
        return {"libjpeg_turbo": turbo, "libjpeg_turbo_version": features.version("libjpeg_turbo") if turbo else None}


@register_anchor("webp")
class WebpCodec(_PillowCodec):
    """Lossy WebP (VP8) through Pillow and libwebp; VP8 lossy coding is 4:2:0 by definition."""

    fmt, feature = "WEBP", "webp"
    default_qualities = (1, 5, 15, 30, 50, 70, 85)

    def __init__(self, quality: int, *, method: int = 4) -> None:
        super().__init__(quality)
        self.method = _check_int(method, 0, 6, "WebP method")

    def save_options(self) -> dict[str, Any]:
        return {"quality": self.quality, "lossless": False, "method": self.method, "exact": False}


# --- binary anchors


def _find_binary(binary: str, purpose: str, install: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise AnchorUnavailable(f"{binary!r} not found on PATH; it is the {purpose}. {install}")
    return path


def _binary_version(path: str, flag: str) -> str:
    """The first 'version X' in the output of ``path flag`` (whatever its exit status), else 'unknown'."""
    try:
        out = subprocess.run([path, flag], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"version\s+v?(\d[\w.\-]*)", (out.stdout + out.stderr).decode(errors="replace"), re.I)
    return match.group(1) if match else "unknown"


def _is_placeholder(token: str) -> bool:
    return token[:1] == "{" and token[-1:] == "}"


def _join(template: list[str]) -> str:
    """A command template as one shell-quoted line, placeholders left bare."""
    return " ".join(tok if _is_placeholder(tok) else shlex.quote(tok) for tok in template)


def _fill(template: list[str], values: dict[str, Any]) -> list[str]:
    """Replace the placeholder tokens ('{input}', ...) of a command template; other tokens are kept as they are."""
    return [str(values[tok[1:-1]]) if _is_placeholder(tok) and tok[1:-1] in values else tok for tok in template]


class _BinaryCodec:
    """Runs an encoder and a decoder binary (no shell) on files in a temporary directory removed after each call.

    ``encode_template()`` / ``decode_template()`` are the command lines with placeholder tokens for the per-call
    values; ``describe()`` records them, ``last_commands`` holds the exact argument lists of the latest calls.
    """

    name: str
    quality_kind = "qp"  # higher = fewer bits
    max_qp: int
    version_flag: str
    install: str

    def __init__(self, quality: int, encoder: str, decoder: str, timeout: float) -> None:
        self.quality = _check_int(quality, 0, self.max_qp, f"{self.name} QP")
        self.encoder = _find_binary(encoder, f"{self.name.upper()} encoder", self.install)
        self.decoder = _find_binary(decoder, f"{self.name.upper()} decoder", self.install)
        self.timeout = timeout
        self.last_commands: dict[str, list[str]] = {}
        self._versions: dict[str, str] = {}

    def versions(self) -> dict[str, str]:
        if not self._versions:
            self._versions = {"encoder_version": _binary_version(self.encoder, self.version_flag),
                              "decoder_version": _binary_version(self.decoder, self.version_flag)}
        return self._versions

    def _run(self, kind: str, template: list[str], values: dict[str, Any]) -> None:
        cmd = _fill(template, values)
        self.last_commands[kind] = cmd
        try:
            out = subprocess.run(cmd, capture_output=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"{self.name} {kind} timed out after {self.timeout} s: {shlex.join(cmd)}") from err
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).decode(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} {kind} failed (exit {out.returncode}): {shlex.join(cmd)}\n{tail}")

    def _describe_commands(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "decoder": self.decoder, **self.versions(),
                "encode_command": _join(self.encode_template()),
                "decode_command": _join(self.decode_template()),
                "bpp": "len(bitstream file bytes) * 8 / (H * W), headers included"}

    def encode_template(self) -> list[str]:
        raise NotImplementedError

    def decode_template(self) -> list[str]:
        raise NotImplementedError


BPG_COLOR_SPACES = ("ycbcr", "ycbcr_bt709", "ycbcr_bt2020", "ycgco", "rgb")


@register_anchor("bpg")
class BpgCodec(_BinaryCodec):
    """BPG (HEVC intra in a BPG file) through ``bpgenc`` / ``bpgdec``: PNG in, PNG out.

    Every encoder option is passed explicitly: QP, chroma format (4:4:4 by default, as in CompressAI's benchmark),
    colour space (``ycbcr``: bpgenc's BT.601 full-range conversion), bit depth, HEVC encoder and effort level
    (``-e`` and ``-m`` as in libbpg 0.9.8's bpgenc). The QP sweep follows the CTC QPs extended to 47; it has not been
    measured against real binaries here.
    """

    max_qp = 51
    version_flag = "-h"
    install = ("Install BPG from https://bellard.org/bpg/ (build libbpg with 'make' and put bpgenc and bpgdec on "
               "PATH; Debian has no package).")
    default_qualities = (47, 42, 37, 32, 27, 22)

    def __init__(self, quality: int, *, chroma: str = "444", color_space: str = "ycbcr", bit_depth: int = 8,
                 hevc_encoder: str = "x265", level: int = 8, encoder: str = "bpgenc", decoder: str = "bpgdec",
                 timeout: float = 600) -> None:
        if chroma not in ("444", "422", "420"):
            raise ValueError(f"BPG chroma must be '444', '422' or '420', got {chroma!r}")
        if color_space not in BPG_COLOR_SPACES:
            raise ValueError(f"BPG color_space must be one of {BPG_COLOR_SPACES}, got {color_space!r}")
        self.chroma, self.color_space, self.hevc_encoder = chroma, color_space, hevc_encoder
        self.bit_depth = _check_int(bit_depth, 8, 12, "BPG bit depth")
        self.level = _check_int(level, 1, 9, "BPG level")
        super().__init__(quality, encoder, decoder, timeout)

    def encode_template(self) -> list[str]:
        return [self.encoder, "-o", "{bitstream}", "-q", str(self.quality), "-f", self.chroma, "-c", self.color_space,
                "-b", str(self.bit_depth), "-e", self.hevc_encoder, "-m", str(self.level), "{input}"]

    def decode_template(self) -> list[str]:
        return [self.decoder, "-o", "{output}", "{bitstream}"]

    def encode(self, image: torch.Tensor) -> bytes:
        rgb = to_rgb8(image)
        with tempfile.TemporaryDirectory(prefix="icm-bpg-") as tmp:
            src, bitstream = Path(tmp, "input.png"), Path(tmp, "coded.bpg")
            Image.fromarray(rgb, "RGB").save(src, format="PNG", compress_level=1)
            self._run("encode", self.encode_template(), {"input": src, "bitstream": bitstream})
            return bitstream.read_bytes()

    def decode(self, data: bytes, height: int, width: int) -> torch.Tensor:
        with tempfile.TemporaryDirectory(prefix="icm-bpg-") as tmp:
            bitstream, out = Path(tmp, "coded.bpg"), Path(tmp, "decoded.png")
            bitstream.write_bytes(data)
            self._run("decode", self.decode_template(), {"bitstream": bitstream, "output": out})
            return from_rgb8(_read_image_bytes(out.read_bytes(), "PNG", height, width))

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, "quality": self.quality, "quality_kind": "QP 0-51, higher = fewer bits",
                "chroma_format": f"{self.chroma[0]}:{self.chroma[1]}:{self.chroma[2]}",
                "color_space": self.color_space, "color_conversion": "RGB -> color_space by bpgenc, back by bpgdec",
                "bit_depth": self.bit_depth, "hevc_encoder": self.hevc_encoder, "level": self.level,
                "input": "8-bit RGB PNG, round(clamp(x, 0, 1) * 255)", "output": "PNG written by bpgdec",
                **self._describe_commands()}


@register_anchor("vtm")
class VtmCodec(_BinaryCodec):
    """VVC intra through the VTM reference software, one frame, on raw planar 8-bit YCbCr files.

    RGB is converted here to full-range YCbCr (``matrix``: BT.709 by default, as CompressAI's VTM benchmark does, or
    BT.601), 4:4:4 by default or 4:2:0 (2x2 mean; odd sizes are padded by edge replication to even and cropped
    back). The encoder pads to its minimum CU size itself (``--ConformanceWindowMode=1``) and the decoder crops
    that back. ``config``: an encoder configuration such as ``cfg/encoder_intra_vtm.cfg`` of the VTM sources,
    else ``$ICM_VTM_CFG``; its SHA-256 is recorded. ``extra_args`` are appended to the encoder command. The QP
    sweep (CTC QPs extended to 47) has not been measured against real binaries here.
    """

    max_qp = 63
    version_flag = "--help"
    install = ("Build VTM from https://vcgit.hhi.fraunhofer.de/jvet/VVCSoftware_VTM (cmake; the binaries land in "
               "bin/) and put EncoderAppStatic and DecoderAppStatic on PATH.")
    default_qualities = (47, 42, 37, 32, 27, 22)

    def __init__(self, quality: int, *, config: str | os.PathLike | None = None, chroma: str = "444",
                 matrix: str = "bt709", encoder: str = "EncoderAppStatic", decoder: str = "DecoderAppStatic",
                 extra_args: tuple[str, ...] = (), timeout: float = 600) -> None:
        if chroma not in ("444", "420"):
            raise ValueError(f"VTM chroma must be '444' or '420', got {chroma!r}")
        _matrix(matrix)
        self.chroma, self.matrix, self.extra_args = chroma, matrix, tuple(str(a) for a in extra_args)
        super().__init__(quality, encoder, decoder, timeout)
        config = config if config is not None else os.environ.get(VTM_CFG_ENV)
        if not config or not Path(config).is_file():
            where = f"'{config}' is not a file" if config else f"no config= given and ${VTM_CFG_ENV} is not set"
            raise AnchorUnavailable(f"VTM needs an encoder configuration file ({where}): pass config= or set "
                                    f"${VTM_CFG_ENV}, e.g. to cfg/encoder_intra_vtm.cfg of the VTM sources")
        self.config = str(Path(config).resolve())
        self.config_sha256 = hashlib.sha256(Path(self.config).read_bytes()).hexdigest()

    def encode_template(self) -> list[str]:
        fmt = self.chroma
        return [self.encoder, "-c", self.config, "-i", "{input}", "-b", "{bitstream}", "-wdt", "{width}",
                "-hgt", "{height}", "-q", str(self.quality), "-f", "1", "-fr", "1", "--InputBitDepth=8",
                f"--InputChromaFormat={fmt}", f"--ChromaFormatIDC={fmt}", "--ConformanceWindowMode=1",
                *self.extra_args]

    def decode_template(self) -> list[str]:
        return [self.decoder, "-b", "{bitstream}", "-o", "{output}", "-d", "8"]

    def _coded_size(self, height: int, width: int) -> tuple[int, int]:
        return (height + height % 2, width + width % 2) if self.chroma == "420" else (height, width)

    def encode(self, image: torch.Tensor) -> bytes:
        rgb = to_rgb8(image)
        h, w = self._coded_size(*rgb.shape[:2])
        rgb = np.pad(rgb, ((0, h - rgb.shape[0]), (0, w - rgb.shape[1]), (0, 0)), mode="edge")
        with tempfile.TemporaryDirectory(prefix="icm-vtm-") as tmp:
            src, bitstream = Path(tmp, "input.yuv"), Path(tmp, "coded.bin")
            src.write_bytes(b"".join(p.tobytes() for p in rgb_to_yuv(rgb, self.chroma, self.matrix)))
            self._run("encode", self.encode_template(),
                      {"input": src, "bitstream": bitstream, "width": w, "height": h})
            return bitstream.read_bytes()

    def decode(self, data: bytes, height: int, width: int) -> torch.Tensor:
        h, w = self._coded_size(height, width)
        with tempfile.TemporaryDirectory(prefix="icm-vtm-") as tmp:
            bitstream, out = Path(tmp, "coded.bin"), Path(tmp, "decoded.yuv")
            bitstream.write_bytes(data)
            self._run("decode", self.decode_template(), {"bitstream": bitstream, "output": out})
            planes = _read_yuv(out.read_bytes(), h, w, self.chroma)
        return from_rgb8(yuv_to_rgb(*planes, matrix=self.matrix)[:height, :width])

    def describe(self) -> dict[str, Any]:
        chroma = "4:4:4" if self.chroma == "444" else "4:2:0"
        return {"codec": self.name, "quality": self.quality, "quality_kind": "QP 0-63, higher = fewer bits",
                "chroma_format": chroma, "config": self.config, "config_sha256": self.config_sha256,
                "color_conversion": f"RGB -> YCbCr full range {self.matrix.upper()} 8-bit, in icm_helpers.anchors "
                                    "(4:2:0: 2x2 mean down, bilinear centre-sited up; odd sizes edge-padded to even)",
                "input": f"raw planar 8-bit YCbCr {chroma}, {{width}}x{{height}} = the image size"
                         + (" rounded up to even" if self.chroma == "420" else ""),
                "output": "raw planar 8-bit YCbCr written by the decoder (-d 8)",
                **self._describe_commands()}
