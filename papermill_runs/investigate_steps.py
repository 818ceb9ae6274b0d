#!/usr/bin/env python3
"""Issue-5 investigation: does longer ICM training change aux-enc vs w/o aux on the demo world?

Same demo profile, detection only, lambdas {0.8, 3.2}, ``--epochs`` x 20 steps (the profile: 3 epochs = 60 steps).
Reuses the demo run's world and shipped models (``runs/demo/{data,models}``, after ``make demo``); trains into
``runs/demo_steps<epochs>/``. Prints each model's point and the BD-rate with its 95% paired-bootstrap CI.

    .venv/bin/python papermill_runs/investigate_steps.py --epochs 9
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from icm_helpers.bootstrap import format_ci  # noqa: E402
from icm_helpers.config import resolve_run_dir  # noqa: E402
from icm_helpers.experiment import Experiment  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--epochs", type=int, default=9)
ap.add_argument("--lambdas", type=float, nargs="+", default=[0.8, 3.2])
args = ap.parse_args()
t0 = time.time()
demo = resolve_run_dir("demo")
ex = Experiment("demo", run_dir=demo.parent / f"demo_steps{args.epochs}",
                overrides={"tasks.detection.train.epochs": args.epochs, "tasks.detection.lambdas": args.lambdas})
for sub in ("data", "models"):
    if not (demo / sub).is_dir():
        sys.exit(f"{demo / sub} is missing: run `make demo` first")
    if not (ex.run_dir / sub).exists():
        ex.run_dir.mkdir(parents=True, exist_ok=True)
        os.symlink(demo / sub, ex.run_dir / sub)
for r in ex.run_grid("detection", [None, "enc"]):
    print(f"{r['method']:10s} lambda={r['lambda_']:g} mAP={r['metric']:.4f} "
          f"bpp_bitstream={r['bpp_bitstream']:.4f} psnr={r['psnr']:.2f}")
bd = ex.bd_rate_table("detection", "baseline", ["aux_enc"])[0]
print("BD-rate aux_enc vs baseline:", format_ci(bd["bpp_bitstream"]), "(bitstream) |",
      format_ci(bd["bpp_estimated"]), "(estimated)")
print(f"{time.time() - t0:.0f} s")
