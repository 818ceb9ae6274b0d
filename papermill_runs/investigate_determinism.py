#!/usr/bin/env python3
"""Where do two CPU runs of the same training first differ? Records every aten op of one ICM training step.

    .venv/bin/python papermill_runs/investigate_determinism.py [--steps 3] [--out docs/determinism.json]

Runs the same tiny ICM job (demo-sized codec N=48 on 128x128 images of the demo world, aux-enc detection branch, the
demo's shipped detector, seed 0) in fresh subprocesses under settings that change what differs between machines of
this project's kind: the same settings twice (run-to-run), 1 vs 2 intra-op threads, and the CPU kernels that
PyTorch, oneDNN and MKL dispatch to (``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` / ``MKL_ENABLE_INSTRUCTIONS``:
AVX-512 as on the newer machines, AVX2 as on the older ones, no SIMD). Each run hashes the output of every aten op
of the first training step (forward, backward and the optimizer step, in call order, with the module that ran it)
and the weights after each step. Comparing two runs gives the first op whose output differs, and the step at which
the weights first differ. Nothing is trained for real: a few steps on 8 images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import torch
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "native-2t": {},
    "native-2t-again": {},
    "native-1t": {"ICM_DET_THREADS": "1"},
    "avx2-2t": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "nosimd-2t": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def child(out: Path, steps: int) -> None:
    """One run: record op-output hashes of step 0 and weight hashes after every step."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(ROOT))
    from icm_helpers.aux_branches import build_aux_branch
    from icm_helpers.codec import codec_N, load_codec
    from icm_helpers.config import load_profile
    from icm_helpers.data import IcmDataset, WorldSpec, collate, generate_world
    from icm_helpers.recognizers import load_recognizer
    from icm_helpers.training import IcmSpec, TrainConfig, codec_optimizers, codec_step, icm_terms

    torch.set_num_threads(int(os.environ.get("ICM_DET_THREADS", "2")))
    cfg_demo = load_profile("demo")
    assets = ROOT / "icm_helpers" / "assets" / "demo"
    world = generate_world(out.parent / "world", WorldSpec(**cfg_demo["data"]["world"], seed=0), {"train": 8})
    rec = load_recognizer(assets / "recognizer_detection.pt", expect_task="detection")
    codec = load_codec(assets / "codec_start.pt").train()
    tc = cfg_demo["tasks"]["detection"]
    torch.manual_seed(0)
    aux = build_aux_branch("detection", "enc", codec_N(codec), cfg_demo["data"]["world"]["n_classes"],
                           **tc.get("aux", {}))
    spec = IcmSpec("detection", 1.6, "enc", 0.5)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-4, crop_size=None)
    opts = codec_optimizers(codec, list(aux.parameters()), cfg)
    params = [p for g in opts["main"].param_groups for p in g["params"]]
    train = IcmDataset(world / "train")
    batch = collate([train[i] for i in range(8)])["image"]
    module_stack: list[str] = []
    names = {m: n for n, m in [*(("codec." + k, v) for k, v in codec.named_modules()),
                               *(("aux." + k, v) for k, v in aux.named_modules()),
                               *(("recognizer." + k, v) for k, v in rec.named_modules())]}
    hooks = []
    for m, n in names.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=n: module_stack.append(n)))
        hooks.append(m.register_forward_hook(
            lambda mod, inp, outp: (module_stack.pop() if module_stack else None) and None))

    def digest(t: "torch.Tensor") -> list:
        """sha1 of the bytes, and the float64 sum and max |value| (to size a difference)."""
        d = t.detach().contiguous().cpu()
        f = d.double() if d.is_floating_point() else d.to(torch.float64)
        return [hashlib.sha1(d.numpy().tobytes()).hexdigest()[:12], float(f.sum()), float(f.abs().max())]

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[list[str]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in UNINITIALISED:  # their output is whatever the allocator returned: not a result
                return out
            flat = out if isinstance(out, (tuple, list)) else [out]
            hs = [digest(o) for o in flat if isinstance(o, torch.Tensor) and o.layout == torch.strided and o.numel()]
            self.ops.append([str(func), module_stack[-1] if module_stack else "-", hs])
            return out

    aten = torch.ops.aten
    UNINITIALISED = {aten.empty.memory_format, aten.empty_like.default, aten.new_empty.default,
                     aten.empty_strided.default}

    weights = []
    record = Record()
    torch.manual_seed(1)
    for step in range(steps):
        if step == 0:
            with record:
                terms = icm_terms(spec, codec, rec, aux, batch)
                codec_step(terms["loss"], codec, opts, params, cfg.clip_max_norm)
        else:
            terms = icm_terms(spec, codec, rec, aux, batch)
            codec_step(terms["loss"], codec, opts, params, cfg.clip_max_norm)
        flat = torch.cat([p.detach().flatten() for p in params])
        weights.append([hashlib.sha1(flat.numpy().tobytes()).hexdigest()[:12], flat.double().tolist()[:0]])
        torch.save(flat, out.with_suffix(f".step{step}.pt"))
    for h in hooks:
        h.remove()
    info = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "ops": record.ops, "weights": weights, "loss0": None}
    out.write_text(json.dumps(info))


def first_difference(a: dict, b: dict) -> dict:
    for i, (x, y) in enumerate(zip(a["ops"], b["ops"])):
        if x[0] != y[0]:
            return {"index": i, "kind": "different op sequence", "a": x[:2], "b": y[:2]}
        if [h[0] for h in x[2]] != [h[0] for h in y[2]]:
            (_, sa, ma), (_, sb, _) = x[2][0], y[2][0]
            return {"index": i, "kind": "different output", "op": x[0], "module": x[1],
                    "sum_a": sa, "sum_b": sb, "rel_diff_of_sum": abs(sa - sb) / max(abs(sa), 1e-30), "max_abs": ma}
    if len(a["ops"]) != len(b["ops"]):
        return {"index": min(len(a["ops"]), len(b["ops"])), "kind": "different op count"}
    return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "determinism.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(Path(args.child), args.steps)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="determinism_"))
    runs = {}
    for name, env in SETTINGS.items():
        path = tmp / f"{name}.json"
        subprocess.run([sys.executable, __file__, "--child", str(path), "--steps", str(args.steps)],
                       env={**os.environ, **env}, check=True, cwd=ROOT)
        runs[name] = json.loads(path.read_text())
        print(f"{name}: capability {runs[name]['capability']}, {len(runs[name]['ops'])} ops in step 0", flush=True)
    ref = runs["native-2t"]
    report = {"ops_in_step0": len(ref["ops"]), "comparisons": {}}
    for name, run in runs.items():
        if name == "native-2t":
            continue
        diff = first_difference(ref, run)
        same_weights = [a[0] == b[0] for a, b in zip(ref["weights"], run["weights"])]
        weight_rel = []
        for k in range(args.steps):
            wa, wb = (torch.load(tmp / f"{n}.step{k}.pt", weights_only=True) for n in ("native-2t", name))
            weight_rel.append(float((wa - wb).norm() / wa.norm()))
        n_diff = sum([h[0] for h in x[2]] != [h[0] for h in y[2]] for x, y in zip(ref["ops"], run["ops"]))
        report["comparisons"][name] = {"env": SETTINGS[name], "capability": run["capability"],
                                       "threads": run["threads"],
                                       "first_difference": diff, "ops_with_different_output": n_diff,
                                       "weights_equal_after_step": same_weights,
                                       "weights_rel_diff_after_step": weight_rel}
        print(f"native-2t vs {name}: {json.dumps(report['comparisons'][name])}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
