"""Benchmark of the latent coders: CompressAI's position-by-position coder vs the wavefront coder.

For every configuration (image size, codec N) and every image, in one run on one machine: the time of
``codec.compress_image`` and ``codec.decompress_image`` with ``coder="compressai"`` (CompressAI's ``compress`` /
``decompress``) and ``coder="wavefront"`` (``icm_helpers.wavefront``), the part of each spent in the analysis /
synthesis transforms g_a / g_s (the same network for both coders; timed with forward hooks inside the same call),
the bytes of both bitstreams, and the time of the likelihood forward (CompressAI's ``forward``: the estimated rate).
With more than one image of a size, also the wavefront coder's batched path (``compress_batch`` /
``decompress_batch``), per image. Writes JSON (``--out``) and prints a markdown table.

    python -m benchmarks.coder --threads 1 --images 1 8 --out coder.json

The codec is CompressAI's cheng2020-attn, randomly initialised (seeded) or loaded with ``--weights``; ``--spread``
scales its analysis transform's last convolution so that the latent has about a trained codec's spread (the tests do
the same), which sets how many bytes the symbols take (the number of symbols, hence the coders' work, does not
depend on it). Images: COCO val images from ``--data`` (resized to cover the size, centre-cropped), else smooth
random images.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

DEFAULT_CONFIGS = ("832x1216:192", "128x128:48")
DEFAULT_DATA = "/work/shared/data/coco_tiny/val2017"


def _parse_config(text: str) -> tuple[int, int, int]:
    try:
        size, n = text.split(":")
        h, w = size.lower().split("x")
        return int(h), int(w), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"config {text!r}: expected HxW:N, e.g. 832x1216:192") from None


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS)")
    p.add_argument("--config", type=_parse_config, action="append", dest="configs",
                   help=f"HxW:N, image size (a multiple of 64) and codec N; repeatable (default {DEFAULT_CONFIGS})")
    p.add_argument("--images", type=int, nargs="+", default=[1],
                   help="images per config: one number for all, or one per config")
    p.add_argument("--out", type=Path, help="JSON file to write")
    p.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help="folder of .jpg images (else random images)")
    p.add_argument("--weights", help="a CompressAI cheng2020-attn checkpoint (else random init; N from --config)")
    p.add_argument("--spread", type=float, default=20.0, help="scale of g_a's last convolution (1: as initialised)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]: where the codec runs (the rANS coder: the CPU)")
    args = p.parse_args(argv)
    args.configs = args.configs or [_parse_config(c) for c in DEFAULT_CONFIGS]
    if len(args.images) not in (1, len(args.configs)):
        p.error(f"--images: one number or one per config ({len(args.configs)}), got {args.images}")
    args.images = args.images * len(args.configs) if len(args.images) == 1 else args.images
    return args


@contextlib.contextmanager
def _transform_timer(model) -> Iterator[dict[str, float]]:
    """Seconds spent inside g_a and g_s (forward hooks), accumulated while the block runs; on a GPU each hook waits
    for the device's queued kernels (``sync``), so the seconds are the kernels' and not their launches'."""
    spent = {"g_a": 0.0, "g_s": 0.0}
    start: dict[str, float] = {}
    sync = device_sync(next(model.parameters()).device)
    hooks = []

    def begin(n):
        sync()
        start[n] = time.perf_counter()

    def end(n):
        sync()
        spent[n] += time.perf_counter() - start[n]

    for name in spent:
        module = getattr(model, name)
        hooks.append(module.register_forward_pre_hook(lambda m, i, n=name: begin(n)))
        hooks.append(module.register_forward_hook(lambda m, i, o, n=name: end(n)))
    try:
        yield spent
    finally:
        for h in hooks:
            h.remove()


def device_sync(device):
    """A function that waits for ``device``'s queued work (``torch.cuda.synchronize`` on CUDA, nothing on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timed(model, fn) -> tuple[Any, float, float]:
    """(result, seconds, seconds of it inside g_a / g_s); on a GPU the span ends when the device's kernels have."""
    sync = device_sync(next(model.parameters()).device)
    with _transform_timer(model) as spent:
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        seconds = time.perf_counter() - t0
    return out, seconds, spent["g_a"] + spent["g_s"]


def _images(folder: Path, n: int, h: int, w: int, seed: int):
    import torch
    import torch.nn.functional as F

    paths = sorted(folder.glob("*.jpg"))[:n] if folder.is_dir() else []
    if len(paths) < n:
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, max(1, h // 8), max(1, w // 8), generator=g)
        x = 0.7 * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        return "random", list((x + 0.3 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1).split(1))
    from PIL import Image

    out = []
    for path in paths:
        img = Image.open(path).convert("RGB")
        scale = max(h / img.height, w / img.width)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
        out.append(x.permute(2, 0, 1)[None].float() / 255)
    return f"{folder} (first {n} .jpg, resized and centre-cropped)", out


def _codec(N: int, args: argparse.Namespace):
    import torch

    from icm_helpers.codec import build_codec

    torch.manual_seed(args.seed)
    model = build_codec(N=N, weights=args.weights).eval() if args.weights else build_codec(N=N).eval()
    if args.spread != 1:
        with torch.no_grad():
            model.g_a[-2].weight.mul_(args.spread)
            model.g_a[-2].bias.mul_(args.spread)
    model.update(force=True)
    return model


def run_config(h: int, w: int, N: int, n_images: int, args: argparse.Namespace, log=print) -> dict[str, Any]:
    import torch

    from icm_helpers.codec import (
        bits_from_likelihoods,
        codec_N,
        compress_batch,
        compress_image,
        decompress_batch,
        decompress_image,
    )

    model = _codec(N, args).to(args.device)
    source, images = _images(args.data, n_images, h, w, args.seed)
    images = [x.to(args.device) for x in images]
    with torch.no_grad():
        model(images[0])  # warm-up: the first call of each layer at a new size is slower (on a GPU: cuDNN's set-up)
    rows: list[dict[str, Any]] = []
    strings: dict[str, list] = {"wavefront": [], "compressai": []}
    for i, x in enumerate(images):
        with torch.no_grad():
            out, fwd_s, _ = _timed(model, lambda: model(x))
        row: dict[str, Any] = {"image": i, "forward_s": fwd_s,
                               "estimated_bytes": float(bits_from_likelihoods(out["likelihoods"])[0]) / 8}
        decoded = {}
        for coder in ("wavefront", "compressai"):  # ours first: a drifting machine load favours neither
            enc, enc_s, enc_t = _timed(model, lambda: compress_image(model, x, coder=coder))
            strings[coder].append(enc["strings"])
            decoded[coder], dec_s, dec_t = _timed(model, lambda: decompress_image(model, enc))
            row[coder] = {"compress_s": enc_s, "compress_g_a_s": enc_t, "decompress_s": dec_s,
                          "decompress_g_s_s": dec_t, "bytes": enc["num_bytes"]}
            log(f"  {h}x{w} N={N} image {i} {coder}: compress {enc_s:.2f} s, decompress {dec_s:.2f} s, "
                f"{enc['num_bytes']} bytes")
        row["max_abs_diff_decoded"] = float((decoded["wavefront"] - decoded["compressai"]).abs().max())
        rows.append(row)
    result: dict[str, Any] = {"height": h, "width": w, "N": codec_N(model), "images": n_images, "source": source,
                              "per_image": rows}
    if n_images > 1:
        x = torch.cat(images)
        encs, enc_s, enc_t = _timed(model, lambda: compress_batch(model, x))
        _, dec_s, dec_t = _timed(model, lambda: decompress_batch(model, encs))
        result["wavefront_batch"] = {"compress_s_per_image": enc_s / n_images, "compress_g_a_s_per_image": enc_t /
                                     n_images, "decompress_s_per_image": dec_s / n_images,
                                     "decompress_g_s_s_per_image": dec_t / n_images,
                                     "same_strings_as_single": [e["strings"] for e in encs] == strings["wavefront"]}
    result["summary"] = _summary(rows)
    return result


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str, coder: str | None = None) -> float:
        return sum((r[coder] if coder else r)[key] for r in rows) / len(rows)

    s: dict[str, Any] = {"forward_s": mean("forward_s"), "estimated_bytes": mean("estimated_bytes")}
    for coder in ("wavefront", "compressai"):
        s[coder] = {k: mean(k, coder) for k in rows[0][coder]}
        s[coder]["compress_coding_s"] = s[coder]["compress_s"] - s[coder]["compress_g_a_s"]
        s[coder]["decompress_coding_s"] = s[coder]["decompress_s"] - s[coder]["decompress_g_s_s"]
    ours, ref = s["wavefront"], s["compressai"]
    s["speedup"] = {k: ref[k] / ours[k] for k in ("compress_s", "decompress_s", "compress_coding_s",
                                                   "decompress_coding_s")}
    s["bytes_diff_percent"] = 100 * (ours["bytes"] - ref["bytes"]) / ref["bytes"]
    s["max_abs_diff_decoded"] = max(r["max_abs_diff_decoded"] for r in rows)
    return s


def markdown(results: list[dict[str, Any]]) -> str:
    head = ("| size, N | images | coder | compress s/img (g_a) | decompress s/img (g_s) | coding only: compress / "
            "decompress s | bytes/img | forward s/img |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        s = r["summary"]
        for coder in ("compressai", "wavefront"):
            c = s[coder]
            lines.append(f"| {r['height']}x{r['width']}, N={r['N']} | {r['images']} | {coder} | "
                         f"{c['compress_s']:.3f} ({c['compress_g_a_s']:.3f}) | {c['decompress_s']:.3f} "
                         f"({c['decompress_g_s_s']:.3f}) | {c['compress_coding_s']:.3f} / "
                         f"{c['decompress_coding_s']:.3f} | {c['bytes']:.0f} | {s['forward_s']:.3f} |")
        if "wavefront_batch" in r:
            b = r["wavefront_batch"]
            lines.append(f"| {r['height']}x{r['width']}, N={r['N']} | {r['images']} | wavefront, batched | "
                         f"{b['compress_s_per_image']:.3f} ({b['compress_g_a_s_per_image']:.3f}) | "
                         f"{b['decompress_s_per_image']:.3f} ({b['decompress_g_s_s_per_image']:.3f}) | "
                         f"{b['compress_s_per_image'] - b['compress_g_a_s_per_image']:.3f} / "
                         f"{b['decompress_s_per_image'] - b['decompress_g_s_s_per_image']:.3f} | | |")
        sp = s["speedup"]
        lines.append(f"| {r['height']}x{r['width']}, N={r['N']} | | speed-up | {sp['compress_s']:.1f}x | "
                     f"{sp['decompress_s']:.1f}x | {sp['compress_coding_s']:.0f}x / {sp['decompress_coding_s']:.0f}x"
                     f" | {s['bytes_diff_percent']:+.3f}% | |")
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_benchmark(args: argparse.Namespace, run, to_markdown, **conditions: Any) -> dict[str, Any]:
    """What every benchmark here does around its measurements: ``args.threads`` threads (set before torch starts its
    pool), ``run(config, n_images)`` for each of ``args.configs``, the conditions (versions, CPU, load average before
    and after, ``conditions``), the markdown table printed and the JSON report written to ``args.out``."""
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch starts its thread pool
    import compressai
    import torch

    from icm_helpers.io import atomic_write_json

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.time()
    results = [run(config, n) for config, n in zip(args.configs, args.images)]
    report = {
        "conditions": {"threads": args.threads, "torch": torch.__version__, "compressai": compressai.__version__,
                       "python": sys.version.split()[0], "cpu": _cpu_model(), "cpus": os.cpu_count(),
                       "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                       "seconds": time.time() - t0, "spread": args.spread, "seed": args.seed, **conditions},
        "configs": results,
    }
    print(to_markdown(results))
    if args.out:
        atomic_write_json(args.out, report)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    return run_benchmark(args, lambda config, n: run_config(*config, n, args), markdown, weights=args.weights,
                         device=device_name(args.device))


def device_name(device: str) -> str:
    """``device`` and, for a GPU, its model (the conditions of a report)."""
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return f"{device}: {torch.cuda.get_device_name(torch.device(device))}"
    return device


if __name__ == "__main__":
    main()
