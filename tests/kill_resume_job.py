"""A tiny, deterministic ICM training job for the kill-and-resume stress test (tests/test_reliability_training.py).

    python tests/kill_resume_job.py OUT_DIR --world WORLD_DIR [--epochs 8] [--steps 2]

Trains the detection ICM job of tests/test_training_eval.py (codec N=16 + aux-enc branch, fixed seeds, CPU,
one thread) with its checkpoint at ``OUT_DIR/state.pt`` (so a rerun of the same command resumes), then writes the
SHA-256 of the final codec + aux state_dicts (key, dtype, shape and tensor bytes, in key order) atomically to
``OUT_DIR/final.sha256``. The world is generated into WORLD_DIR if it is not there yet (``generate_world`` reuses a
finished one). Killing this process at any moment and rerunning the same command must end with the same hash.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tiny-world settings shared with the test suite
from conftest import COUNTS, SPEC, tiny_icm_job  # noqa: E402

torch.set_num_threads(1)  # conftest sets 2 on import

from icm_helpers.data import IcmDataset, generate_world  # noqa: E402
from icm_helpers.io import atomic_write_text  # noqa: E402
from icm_helpers.training import InMemory, TrainConfig  # noqa: E402


def state_hash(*modules: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            v = v.detach().cpu().contiguous()
            h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
            h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)

    generate_world(args.world, SPEC, COUNTS)
    train_set = InMemory(IcmDataset(args.world / "train"))
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=4, lr=1e-3, crop_size=64, steps_per_epoch=args.steps, poly_start_frac=0.5
    )
    codec, aux, res, _ = tiny_icm_job(args.out / "state.pt", train_set, cfg)
    digest = state_hash(codec, aux)
    atomic_write_text(args.out / "final.sha256", digest + "\n")
    print(f"resumed_from_epoch={res.resumed_from_epoch} sha256={digest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
