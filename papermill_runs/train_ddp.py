#!/usr/bin/env python3
"""Train and evaluate ONE ICM run on several GPUs (or CPU processes) with torchrun + DistributedDataParallel.

Single node, all visible GPUs::

    torchrun --standalone --nproc_per_node=gpu papermill_runs/train_ddp.py --profile paper --task detection \
        --lambda 1.6 --aux-position enc

Multi-node (run on every node; node 0's address and a free port; a filesystem shared by all nodes for --run-dir)::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \
        --rdzv_endpoint=$HEAD_NODE:29500 papermill_runs/train_ddp.py --profile paper --task detection --lambda 1.6

CPU (gloo; e.g. a test): ``torchrun --standalone --nproc_per_node=2 papermill_runs/train_ddp.py --profile smoke
--task detection --lambda 1.6 --aux-position enc --device cpu``.

The run goes through ``icm_helpers.experiment.Experiment`` exactly as the notebooks do (same files, same
idempotence: a finished run is reused, an interrupted one resumes). Rank 0 first prepares what the run needs
(data, the frozen recognizer, the start codec) while the other ranks wait; then every rank trains its slice of each
global batch (``batch_size`` in the profile is the GLOBAL batch: each of N ranks gets batch_size / N) and the test
set is evaluated sharded over the ranks. Only rank 0 writes files. The last line rank 0 prints is a JSON summary.

From a notebook: ``icm_helpers.distributed.launch_torchrun("papermill_runs/train_ddp.py", [...], nproc_per_node=...)``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="smoke", help="profile name or YAML path (default: smoke)")
    p.add_argument("--task", required=True, choices=("detection", "segmentation"))
    p.add_argument("--lambda", dest="lambda_", type=float, required=True, help="the rate-task trade-off lambda")
    p.add_argument("--aux-position", default="enc", help="enc (proposed) | dec | task | none (w/o aux baseline)")
    p.add_argument("--alpha", type=float, default=None, help="aux weight (default: the profile's)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<profile>); shared by all nodes")
    p.add_argument("--device", default=None, help="cuda (default when there is a GPU: cuda:<LOCAL_RANK>) or cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="profile override with a dotted key, value parsed as YAML (repeatable), e.g. "
                        "tasks.detection.train.epochs=2")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--force", action="store_true", help="retrain / re-evaluate even if the files exist")
    p.add_argument("--timeout", type=float, default=7200.0, help="collective timeout in seconds (rank 0's preparation "
                                                                  "must fit in it)")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    args.overrides = overrides
    args.aux_position = None if str(args.aux_position).lower() in ("none", "null", "") else args.aux_position
    return args


def run(args: argparse.Namespace) -> dict:
    import torch

    from icm_helpers import distributed as dist_lib
    from icm_helpers.experiment import Experiment

    info = dist_lib.init_from_env(device=args.device, timeout_s=args.timeout)
    main = dist_lib.is_main()
    log = (lambda msg: print(msg, flush=True)) if main else None
    try:
        exp = Experiment(args.profile, run_dir=args.run_dir, overrides=args.overrides, device=info["device"], log=log)
        if os.environ.get("OMP_NUM_THREADS"):  # torchrun sets 1 per process; the profile's `threads` is per machine
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        t0 = time.time()
        if main:  # prerequisites, once: data, the frozen recognizer, the start codec (reused when present)
            exp.prepare_data()
            exp.recognizer(args.task)
            exp.start_codec()
        dist_lib.barrier()
        spec = exp.spec(args.task, args.lambda_, args.aux_position, args.alpha)
        t1 = time.time()
        final = exp.train(spec, force=args.force)
        t2 = time.time()
        record = None if args.no_eval else exp.evaluate_run(spec, force=args.force)
        t3 = time.time()
        summary = {"run": str(exp.run_path(spec)), "codec": str(final), "world_size": info["world_size"],
                   "backend": info["backend"], "device": info["device"], "seconds_prepare": round(t1 - t0, 2),
                   "seconds_train": round(t2 - t1, 2), "seconds_eval": round(t3 - t2, 2)}
        if record is not None:
            summary.update({k: record.get(k) for k in ("metric_name", "metric", "bpp_bitstream", "bpp_estimated",
                                                       "psnr", "num_images")})
        if main:
            print(json.dumps(summary), flush=True)
        return summary
    finally:
        dist_lib.shutdown()


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    record(lambda: run(parse_args(argv)))()  # torchrun then reports the failing rank's traceback
    return 0


if __name__ == "__main__":
    sys.exit(main())
