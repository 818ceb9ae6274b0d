#!/usr/bin/env python3
"""Training and evaluation throughput of the paper configuration, naive loop vs the suite's optimized path.

One command, one run, one machine::

    .venv/bin/python papermill_runs/bench.py --device cuda --steps 200 --warmup 20 --out bench_gpu.json

measures, with the same model, data, seeds and number of steps:

* **train / naive**: the loop written the straightforward way (as in CompressAI's ``examples/train.py``): fp32,
  eager, NCHW, batches loaded in the main process, ``loss.item()`` (a host-device sync) on every step;
* **train / optimized**: the suite's real ``training.train_icm`` with the speed knobs on (``--amp`` bf16 autocast
  with an fp32 rate path, channels_last, cudnn.benchmark, DataLoader workers + pinned memory, logs kept on the device,
  ``--compile`` optional);
* **eval**: images/s of the likelihood rate (codec forward in eval mode, one image at a time as ``evaluate`` does;
  fp32 and with autocast) and of real bitstream coding (CompressAI compress + decompress, fp32);
* **pseudo-labels**: the share of a naive training step spent computing the recognizer's pseudo-labels (the upper
  bound of what caching them could save).

Model: Cheng2020Attention (``--N``, paper 192, random weights) + the aux-enc detection branch of Table 1 + a frozen
Faster R-CNN (``--recognizer torchvision``: torchvision's R50-FPN v2 with random weights, no download;
``torchvision-x101``: the paper's X101-32x8d-FPN rebuilt from torchvision parts, random weights; ``suite``:
the suite's small detector for quick CPU runs). Data: random images (``--image-size``) cropped to ``--crop``.
The loss trajectories of both modes are in the JSON (same seeds and batches: they should agree within bf16 noise).
Prints a table; writes ``--out`` atomically. CPU smoke size: ``--device cpu --N 32 --batch-size 2 --crop 64
--steps 2 --warmup 1 --recognizer suite``.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

#: --recognizer -> the torchvision backend's Faster R-CNN arch (icm_helpers/backends/torchvision_det.py)
TORCHVISION_ARCHS = {"torchvision": "resnet50_fpn_v2", "torchvision-x101": "resnext101_32x8d_fpn"}
SUITE_DET = dict(width=8, anchor_sizes=(16, 32, 64, 128, 256), fpn_channels=16, representation=32,
                 box_batch_per_image=32, rpn_post_nms=(50, 50), score_threshold=0.0)
SUITE_AUX = dict(width=0.125, anchor_sizes=(16, 32, 64, 128, 256), fpn_channels=16, representation=32,
                 box_batch_per_image=32, rpn_post_nms=(50, 50))


class RandomImages(torch.utils.data.Dataset):
    """``n`` random RGB images (fixed seed) of ``size`` x ``size``; ``image_size`` lets the loader plan crops ahead."""

    def __init__(self, n: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = [torch.rand(3, size, size, generator=g) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def image_size(self, i: int) -> tuple[int, int]:
        return tuple(self.images[i].shape[-2:])

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "image_id": i}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200, help="timed training steps per mode")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps before (cudnn autotuning, compile, workers)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--image-size", type=int, default=None, help="size of the random images (default: crop + 64)")
    p.add_argument("--N", type=int, default=192, help="codec channels (paper: 192)")
    p.add_argument("--recognizer", choices=(*TORCHVISION_ARCHS, "suite"), default="torchvision",
                   help="torchvision: R50-FPN v2; torchvision-x101: the paper's X101-32x8d-FPN rebuilt from "
                        "torchvision parts (random weights either way); suite: the small CPU detector")
    p.add_argument("--aux-width", type=float, default=None,
                   help="aux branch width (default 1.0; suite recognizer 0.125)")
    p.add_argument("--amp", default="auto", help="bf16 | none | auto (bf16 on CUDA, none on CPU)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="optimized loader workers (default: 4 on CUDA, 0 on CPU)")
    p.add_argument("--compile", action="store_true", help="also torch.compile in the optimized mode")
    p.add_argument("--eval-images", type=int, default=None,
                   help="images per evaluation measurement (default 2 x batch)")
    p.add_argument("--lambda", dest="lambda_", type=float, default=1.6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--modes", default="naive,optimized", help="which training modes to run")
    p.add_argument("--out", default=None, help="JSON file to write (atomically)")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def build(args, device: str):
    """(codec, recognizer, aux branch, spec), freshly initialised from the seed (same weights for every mode)."""
    from icm_helpers.aux_branches import build_aux_branch
    from icm_helpers.codec import build_codec
    from icm_helpers.recognizers import build_recognizer
    from icm_helpers.training import IcmSpec

    torch.manual_seed(args.seed)
    if args.recognizer in TORCHVISION_ARCHS:
        rec = build_recognizer("detection", "torchvision", 90, arch=TORCHVISION_ARCHS[args.recognizer],
                               pretrained=False, score_threshold=0.5)
        aux_cfg = {"width": 1.0 if args.aux_width is None else args.aux_width}
        num_classes = 90
    else:
        rec = build_recognizer("detection", "suite", 3, **SUITE_DET)
        aux_cfg = {**SUITE_AUX, **({} if args.aux_width is None else {"width": args.aux_width})}
        num_classes = 3
    rec = rec.freeze().to(device)
    torch.manual_seed(args.seed + 1)
    codec = build_codec(N=args.N).to(device)
    aux = build_aux_branch("detection", "enc", args.N, num_classes, **aux_cfg).to(device)
    spec = IcmSpec("detection", args.lambda_, "enc", 0.5, seed=args.seed)
    return codec, rec, aux, spec


def train_naive(args, device: str, dataset) -> dict:
    """The straightforward loop: fp32, eager, NCHW, main-process loading, loss.item() every step."""
    from icm_helpers.aux_branches import seed_random_stream
    from icm_helpers.training import EpochLoader, TrainConfig, clip_groups, codec_optimizers, icm_terms

    codec, rec, aux, spec = build(args, device)
    seed_random_stream(aux, spec.seed)  # = train_icm: the branch draws from its own stream
    total = args.warmup + args.steps
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, crop_size=args.crop, poly_start_frac=0.99)
    opts = codec_optimizers(codec, list(aux.parameters()), cfg)
    # = train_icm's schedule
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, cfg.lr_lambda(total)) for o in opts.values()]
    torch.manual_seed(spec.seed)
    loader = EpochLoader(dataset, args.batch_size, spec.seed, args.crop, device=device)
    codec.train()
    aux.train()
    losses, t_start = [], time.perf_counter()
    step = 0
    epoch = 0
    while step < total:
        for batch in loader(epoch):
            if step == args.warmup:
                _sync(device)
                t_start = time.perf_counter()
            terms = icm_terms(spec, codec, rec, aux, batch["image"])
            opts["main"].zero_grad()
            terms["loss"].backward()
            # the codec and the branch each clipped alone
            for group in clip_groups(codec, list(aux.parameters()), cfg.clip_scope):
                torch.nn.utils.clip_grad_norm_(group, cfg.clip_max_norm)
            opts["main"].step()
            opts["quantiles"].zero_grad()
            q = codec.aux_loss()
            q.backward()
            opts["quantiles"].step()
            losses.append(terms["loss"].item())  # per-step sync, as in CompressAI's example
            q.item()
            for s in scheds:
                s.step()
            step += 1
            if step >= total:
                break
        epoch += 1
    _sync(device)
    seconds = time.perf_counter() - t_start
    return {"images_per_s": args.steps * args.batch_size / seconds, "seconds": seconds, "losses": losses}


def train_optimized(args, device: str, dataset, amp: str | None, workers: int) -> dict:
    """The suite's real ``train_icm`` with the speed knobs on."""
    from icm_helpers.training import Callback, TrainConfig, train_icm

    cuda = str(device).startswith("cuda")
    codec, rec, aux, spec = build(args, device)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, crop_size=args.crop,
                      steps_per_epoch=args.warmup + args.steps, poly_start_frac=0.99, amp=amp, channels_last=cuda,
                      compile=args.compile, num_workers=workers, pin_memory=cuda, cudnn_benchmark=cuda)
    if len(dataset) // args.batch_size < cfg.steps_per_epoch:
        raise ValueError("internal: the benchmark dataset must hold warmup + steps batches")
    marks: dict = {"losses": []}

    class StepTimer(Callback):
        def after_step(self, state, step, logs):  # the only syncs: at the end of the warm-up and of the last step
            marks["losses"].append(logs["loss"])  # tensors: read after the run
            if step + 1 == args.warmup:
                _sync(device)
                marks["t_start"] = time.perf_counter()
            if step + 1 == cfg.steps_per_epoch:
                _sync(device)
                marks["t_end"] = time.perf_counter()

    marks["t_start"] = time.perf_counter()  # (warmup 0: includes the loader's start-up)
    with tempfile.TemporaryDirectory() as tmp:
        train_icm(spec, codec, rec, aux, dataset, cfg, Path(tmp) / "state.pt", log=None, device=device,
                  callbacks=[StepTimer()])
    seconds = marks["t_end"] - marks["t_start"]
    return {"images_per_s": args.steps * args.batch_size / seconds, "seconds": seconds,
            "losses": [float(v) for v in marks["losses"]],
            "knobs": {k: getattr(cfg, k) for k in cfg.SPEED_FIELDS}}


@torch.no_grad()
def eval_throughput(args, device: str, amp: str | None) -> dict:
    """Images/s of the likelihood rate (codec forward, eval mode, one image at a time) and of real bitstream coding."""
    from icm_helpers.codec import codec_forward, compress_image, decompress_image, update_entropy_tables

    codec, _, _, _ = build(args, device)
    codec.eval()
    update_entropy_tables(codec)
    n = args.eval_images or 2 * args.batch_size
    g = torch.Generator().manual_seed(args.seed + 2)
    images = [torch.rand(1, 3, args.crop, args.crop, generator=g).to(device) for _ in range(n + 1)]
    out = {}

    def timed(fn):
        fn(images[0])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for x in images[1:]:
            fn(x)
        _sync(device)
        return n / (time.perf_counter() - t0)

    out["likelihood_fp32_images_per_s"] = timed(lambda x: codec(x)["likelihoods"]["y"].sum())
    if amp:
        dtype = {"bf16": torch.bfloat16}[amp]

        def mixed(x):
            with torch.autocast(torch.device(device).type, dtype=dtype):
                return codec_forward(codec, x)["likelihoods"]["y"].sum()

        out[f"likelihood_{amp}_images_per_s"] = timed(mixed)
    out["bitstream_fp32_images_per_s"] = timed(lambda x: decompress_image(codec, compress_image(codec, x)))
    return out


def pseudo_label_share(args, device: str, dataset) -> dict:
    """Seconds of ``recognizer.pseudo_labels`` per batch vs a whole naive step (forward + backward + steps)."""
    from icm_helpers.training import EpochLoader

    _, rec, _, _ = build(args, device)
    batches = [b["image"] for _, b in
               zip(range(3), EpochLoader(dataset, args.batch_size, args.seed, args.crop, device=device)(0))]
    rec.pseudo_labels(batches[0])
    _sync(device)
    t0 = time.perf_counter()
    for x in batches[1:]:
        rec.pseudo_labels(x)
    _sync(device)
    return {"seconds_per_batch": (time.perf_counter() - t0) / (len(batches) - 1)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from icm_helpers.config import check_device
    from icm_helpers.io import atomic_write_json

    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.startswith("cuda")
    amp = ("bf16" if cuda else None) if args.amp == "auto" else (None if args.amp in ("none", "null", "") else args.amp)
    workers = (4 if cuda else 0) if args.num_workers is None else args.num_workers
    image_size = args.image_size or args.crop + 64
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    total = args.warmup + args.steps
    dataset = RandomImages(total * args.batch_size, image_size, args.seed)
    result = {"device": device,
              "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "config": {"N": args.N, "batch_size": args.batch_size, "crop": args.crop, "image_size": image_size,
                         "steps": args.steps, "warmup": args.warmup, "recognizer": args.recognizer, "amp": amp,
                         "num_workers": workers, "compile": args.compile, "lambda": args.lambda_},
              "train": {}}
    if "naive" in modes:
        result["train"]["naive"] = train_naive(args, device, dataset)
    if "optimized" in modes:
        result["train"]["optimized"] = train_optimized(args, device, dataset, amp, workers)
    t = result["train"]
    if "naive" in t and "optimized" in t:
        a, b = t["naive"]["losses"], t["optimized"]["losses"]
        diffs = [abs(x - y) / max(1e-12, abs(x)) for x, y in zip(a, b)]
        result["train"]["speedup"] = t["optimized"]["images_per_s"] / t["naive"]["images_per_s"]
        result["train"]["loss_rel_diff_max"] = max(diffs) if diffs else None
        result["train"]["loss_rel_diff_mean"] = sum(diffs) / len(diffs) if diffs else None
    result["eval"] = eval_throughput(args, device, amp)
    pl = pseudo_label_share(args, device, dataset)
    if "naive" in t:
        step_s = t["naive"]["seconds"] / args.steps
        pl["share_of_naive_step"] = pl["seconds_per_batch"] / step_s
    result["pseudo_labels"] = pl
    print(table(result))
    if args.out:
        atomic_write_json(args.out, result)
        print(f"wrote {args.out}")
    return result


def table(r: dict) -> str:
    c = r["config"]
    lines = [f"device: {r['device']} ({r['device_name']}), torch {r['torch']}, {r['threads']} CPU threads",
             f"config: cheng2020-attn N={c['N']}, {c['recognizer']} Faster R-CNN + aux-enc, batch {c['batch_size']}, "
             f"crop {c['crop']}, {c['steps']} timed steps after {c['warmup']} warm-up, amp={c['amp']}, "
             f"workers={c['num_workers']}",
             "", "| measurement | images/s |", "|---|---|"]
    for mode in ("naive", "optimized"):
        if mode in r["train"]:
            lines.append(f"| train, {mode} | {r['train'][mode]['images_per_s']:.3g} |")
    if "speedup" in r["train"]:
        lines.append(f"| train speed-up (optimized / naive) | x{r['train']['speedup']:.2f} |")
    for k, v in r["eval"].items():
        lines.append(f"| eval, {k.replace('_images_per_s', '').replace('_', ' ')} | {v:.3g} |")
    pl = r["pseudo_labels"]
    share = f", {100 * pl['share_of_naive_step']:.0f}% of a naive step" if "share_of_naive_step" in pl else ""
    lines.append(f"| pseudo-labels: {pl['seconds_per_batch'] * 1000:.0f} ms per batch{share} | |")
    if r["train"].get("loss_rel_diff_max") is not None:
        lines.append(f"\nloss trajectories (naive vs optimized): max relative difference "
                     f"{r['train']['loss_rel_diff_max']:.2e}, "
                     f"mean {r['train']['loss_rel_diff_mean']:.2e} over {len(r['train']['naive']['losses'])} steps")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
