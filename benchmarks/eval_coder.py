"""Benchmark of one evaluated image's codec work: the old sequence vs ``evaluation.LearnedCoder``.

Per image (bitstream=True, decode="all", no ROI, fp32), in one run on one machine, alternating the two (the order
swapped from image to image, so drift of the machine's load does not favour one):

* **old**: what ``evaluate`` ran per image before the per-image coders: CompressAI's forward (estimated bpp; it runs
  g_a and g_s), then ``compress_image`` (g_a again) and ``decompress_image`` (the decoder's g_s);
* **new**: ``LearnedCoder.code``: g_a once (the estimated rate and the bitstream share y and z), the decoder's g_s.

With ``--batch B`` (B > 1), afterwards a third arm on the same images:

* **grouped**: ``LearnedCoder.code_batch`` on B consecutive images at a time (one wavefront pass for the group's
  latents, encoder and decoder; every network still image by image): per image, the group's time / B.

All give the same record (checked: estimated bpp, bytes, decoded image bit for bit). The recognizer is not part of
either (it is the same for both). Wall seconds and the process's CPU seconds (``time.process_time``: with one
thread, core-seconds, less sensitive to other load on the machine); the seconds inside g_a / g_s are timed with
forward hooks. Writes JSON (``--out``) and prints a markdown table.

    python -m benchmarks.eval_coder --threads 1 --config 128x128:icm_helpers/assets/demo/codec_start.pt \\
        --config 832x1088:192 --images 8 2 --out eval_coder.json

On a GPU (``--device cuda``; the codec, its wavefront coder's networks and the images on the device, the rANS coder
on the CPU; each timed span waits for the device's kernels), the check a session lent a GPU runs in one go:

    python -m benchmarks.eval_coder --device cuda --threads 4 --config 832x1088:192 --config 576x576:192 \\
        --images 8 8 --batch 8 --out $OUT/eval_coder_cuda.json

``--config HxW:N`` (random init, the latent spread as in ``benchmarks.coder``) or ``HxW:checkpoint.pt`` (a codec saved
by ``codec.save_codec``). Images: COCO val images from ``--data`` (resized, centre-cropped), else smooth random ones.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.coder import (  # noqa: E402
    DEFAULT_DATA,
    _codec,
    _images,
    _transform_timer,
    device_name,
    device_sync,
    run_benchmark,
)


def _parse_config(text: str) -> tuple[int, int, str]:
    try:
        size, codec = text.split(":", 1)
        h, w = size.lower().split("x")
        return int(h), int(w), codec
    except ValueError:
        raise argparse.ArgumentTypeError(f"config {text!r}: expected HxW:N or HxW:checkpoint.pt") from None


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS)")
    p.add_argument("--config", type=_parse_config, action="append", dest="configs", required=True,
                   help="HxW:N (random cheng2020-attn) or HxW:checkpoint.pt; repeatable")
    p.add_argument("--images", type=int, nargs="+", default=[1], help="images per config: one number or one each")
    p.add_argument("--out", type=Path, help="JSON file to write")
    p.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help="folder of .jpg images (else random images)")
    p.add_argument("--spread", type=float, default=20.0, help="random init: scale of g_a's last convolution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="B > 1: also time the coder on groups of B images")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:k]: where the codec runs (the rANS coder: the CPU)")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    args.weights = None  # benchmarks.coder._codec reads it
    if len(args.images) not in (1, len(args.configs)):
        p.error(f"--images: one number or one per config ({len(args.configs)}), got {args.images}")
    args.images = args.images * len(args.configs) if len(args.images) == 1 else args.images
    return args


def _old(codec, x):
    import torch

    from icm_helpers.codec import bits_from_likelihoods, compress_image, crop_to, decompress_image, pad_to_multiple

    with torch.no_grad():
        xp, pad = pad_to_multiple(x)
        out = codec(xp)
        bpp = float(bits_from_likelihoods(out["likelihoods"])[0]) / (x.shape[-2] * x.shape[-1])
        enc = compress_image(codec, xp)
        x_hat = crop_to(decompress_image(codec, enc), pad)
    return x_hat, bpp, enc["num_bytes"]


def _new(coder, x):
    x_hat, fields = coder.code({"image": x[0]}, x)
    return x_hat, fields["bpp_estimated"], round(fields["bpp_bitstream"] * x.shape[-2] * x.shape[-1] / 8)


class _TimedCalls:
    """A rANS coder object whose method calls add their seconds to ``spent["rans"]``."""

    def __init__(self, inner, spent: dict[str, float]):
        self._inner, self._spent = inner, spent

    def __getattr__(self, name: str):
        method = getattr(self._inner, name)

        def call(*args):
            t0 = time.perf_counter()
            try:
                return method(*args)
            finally:
                self._spent["rans"] += time.perf_counter() - t0
        return call


@contextlib.contextmanager
def _rans_timer():
    """Seconds inside the wavefront coder's rANS calls (encode, flush, decode) while the block runs: the serial CPU
    share of an image, which a GPU cannot take (``wavefront``'s coder classes wrapped for the block)."""
    from icm_helpers import wavefront

    spent = {"rans": 0.0}
    classes = (wavefront.BufferedRansEncoder, wavefront.RansDecoder)
    wavefront.BufferedRansEncoder = lambda: _TimedCalls(classes[0](), spent)
    wavefront.RansDecoder = lambda: _TimedCalls(classes[1](), spent)
    try:
        yield spent
    finally:
        wavefront.BufferedRansEncoder, wavefront.RansDecoder = classes


def _timed(codec, fn) -> tuple[Any, dict[str, float]]:
    sync = device_sync(next(codec.parameters()).device)
    with _transform_timer(codec) as spent, _rans_timer() as rans:
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        sync()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, {"seconds": seconds, "cpu_seconds": cpu, "g_a_s": spent["g_a"], "g_s_s": spent["g_s"],
                 "rans_s": rans["rans"]}


def run_config(h: int, w: int, codec_spec: str, n_images: int, args: argparse.Namespace, log=print) -> dict[str, Any]:
    import torch

    from icm_helpers.codec import codec_N, load_codec
    from icm_helpers.evaluation import EvalOptions, LearnedCoder

    codec = load_codec(codec_spec).eval() if codec_spec.endswith(".pt") else _codec(int(codec_spec), args)
    codec.to(args.device)
    source, images = _images(args.data, n_images, h, w, args.seed)
    images = [x.to(args.device) for x in images]
    coder = LearnedCoder(codec, EvalOptions(device=args.device))
    if torch.device(args.device).type == "cuda":
        _new(coder, images[0])  # warm-up: CUDA's and cuDNN's set-up at a new size is no image's cost
    rows, new_outputs = [], []
    for i, x in enumerate(images):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        results, row = {}, {"image": i, "order": list(order)}
        for which in order:
            results[which], row[which] = _timed(codec, (lambda: _old(codec, x)) if which == "old"
                                                else (lambda: _new(coder, x)))
        (x_old, bpp_old, bytes_old), (x_new, bpp_new, bytes_new) = results["old"], results["new"]
        row["identical"] = bool(torch.equal(x_old, x_new) and bpp_old == bpp_new and bytes_old == bytes_new)
        row["bytes"] = bytes_old
        rows.append(row)
        new_outputs.append(results["new"] if args.batch > 1 else None)
        log(f"{h}x{w} {codec_spec} image {i}: old {row['old']['seconds']:.2f} s, new {row['new']['seconds']:.2f} s, "
            f"identical {row['identical']}")
    arms = ["old", "new"]
    if args.batch > 1:
        arms.append("grouped")
        _grouped(coder, codec, images, new_outputs, rows, args.batch, log)
    keys = ("seconds", "cpu_seconds", "g_a_s", "g_s_s", "rans_s")
    mean = {which: {k: sum(r[which][k] for r in rows) / len(rows) for k in keys} for which in arms}
    return {"height": h, "width": w, "codec": codec_spec, "N": codec_N(codec), "images": len(rows), "source": source,
            "batch": args.batch, "per_image": rows, "mean": mean, "all_identical": all(r["identical"] for r in rows)}


def _grouped(coder, codec, images, new_outputs, rows: list[dict[str, Any]], batch: int, log) -> None:
    """The "grouped" arm: ``code_batch`` on ``batch`` consecutive images; each row gets its group's times / size
    and ``identical`` also checks the group's records against the one-image coder's (``new_outputs``)."""
    import torch

    for start in range(0, len(images), batch):
        xs = images[start: start + batch]
        coded, timing = _timed(codec, lambda: coder.code_batch([{"image": x[0]} for x in xs], xs))
        for k, (x, (x_hat, fields)) in enumerate(zip(xs, coded)):
            row = rows[start + k]
            row["grouped"] = {key: value / len(xs) for key, value in timing.items()}
            x_new, bpp_new, bytes_new = new_outputs[start + k]
            bytes_grouped = round(fields["bpp_bitstream"] * x.shape[-2] * x.shape[-1] / 8)
            row["identical"] = bool(row["identical"] and torch.equal(x_hat, x_new)
                                    and fields["bpp_estimated"] == bpp_new and bytes_grouped == bytes_new)
        log(f"group of {len(xs)} from image {start}: {timing['seconds'] / len(xs):.3f} s per image")


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| size | codec | images | old s/image (g_a, g_s; CPU s) | new s/image (g_a, g_s, rANS; CPU s) | new / "
             "old (wall, CPU) | grouped s/image (rANS; CPU s) | identical |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, n, g = r["mean"]["old"], r["mean"]["new"], r["mean"].get("grouped")
        grouped = f"B={r['batch']}: {g['seconds']:.3f} ({g['rans_s']:.3f}; {g['cpu_seconds']:.3f})" if g else "-"
        lines.append(f"| {r['height']}x{r['width']} | N={r['N']} {Path(r['codec']).name} | {r['images']} | "
                     f"{o['seconds']:.3f} ({o['g_a_s']:.3f}, {o['g_s_s']:.3f}; {o['cpu_seconds']:.3f}) | "
                     f"{n['seconds']:.3f} ({n['g_a_s']:.3f}, {n['g_s_s']:.3f}, {n['rans_s']:.3f}; "
                     f"{n['cpu_seconds']:.3f}) | "
                     f"{n['seconds'] / o['seconds']:.2f}, {n['cpu_seconds'] / o['cpu_seconds']:.2f} | {grouped} | "
                     f"{r['all_identical']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _args(argv)
    return run_benchmark(args, lambda config, n: run_config(*config, n, args), markdown, nice=os.nice(0),
                         device=device_name(args.device), argv=sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
