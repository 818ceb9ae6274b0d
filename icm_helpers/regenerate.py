"""Retrain the shipped start models of a profile and rewrite them with their manifest (``icm_helpers.assets``).

    python -m icm_helpers.regenerate --profile demo [--only codec_start] [--work-dir runs/assets_demo]

Trains the profile's recognizers and start codec from scratch (or only the named ones), evaluates them on the test
split, and writes the files, their sha256, provenance and accuracy into the profile's asset directory.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .assets import MAX_TOTAL_BYTES, asset_dir, install_shipped, sha256
from .codec import load_state
from .experiment import Experiment
from .io import atomic_write_json

ASSET_NAMES = ("recognizer_detection", "recognizer_segmentation", "codec_start")


def regenerate(profile: str = "demo", work_dir: str | Path | None = None, log=print,
               only: list[str] | None = None) -> dict[str, Any]:
    """Train the profile's recognizers and start codec from scratch, evaluate them, and write them + the manifest
    into the profile's asset directory. ``only``: retrain just these (e.g. ["codec_start"]); the other shipped files
    are kept, which requires their recorded provenance to match the profile (else they are retrained too)."""
    only = list(ASSET_NAMES if only is None else only)
    unknown = sorted(set(only) - set(ASSET_NAMES))
    if unknown:
        raise ValueError(f"unknown assets {unknown}; valid: {', '.join(ASSET_NAMES)}")
    tmp = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=f"icm_assets_{profile}_"))
    # the others may be installed from the shipped files (when their provenance still matches); these are trained
    ex = Experiment(profile, run_dir=tmp, log=log, use_assets=set(ASSET_NAMES) - set(only))
    root = asset_dir(ex.cfg)
    if root is None:
        raise ValueError(f"profile {profile!r} has no 'assets:' directory to regenerate")
    t0 = time.time()
    ex.prepare_data()
    files: dict[str, Any] = {}
    for task in ex.tasks():
        ex.recognizer(task)
        seconds = load_state(ex.recognizer_path(task))["extra"].get("seconds", float("nan"))  # of the training itself
        ref = ex.evaluate_reference(task)
        files[f"recognizer_{task}"] = {
            "provenance": ex.provenance("recognizer", task),
            "train_seconds": round(seconds, 1),
            "accuracy": {"metric_name": ref["metric_name"], "metric": ref["metric"], "test_images": ref["num_images"]},
        }
    ex.start_codec()
    seconds = load_state(ex.layout.start_codec_path)["extra"].get("seconds", float("nan"))
    start = ex.evaluate_start(ex.tasks()[0])
    files["codec_start"] = {
        "provenance": ex.provenance("codec"),
        "train_seconds": round(seconds, 1),
        "accuracy": {
            "bpp_estimated": start["bpp_estimated"],
            "bpp_bitstream": start["bpp_bitstream"],
            "psnr": start["psnr"],
            "test_images": start["num_images"],
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, entry in files.items():
        src = ex.models_dir / f"{name}.pt"
        install_shipped(src, root / f"{name}.pt")
        entry.update(bytes=src.stat().st_size, sha256=sha256(src))
    total = sum(e["bytes"] for e in files.values())
    if total > MAX_TOTAL_BYTES:
        raise ValueError(
            f"shipped assets total {total / 2**20:.1f} MiB > {MAX_TOTAL_BYTES / 2**20:.0f} MiB: shrink the models"
        )
    command = f"python -m icm_helpers.regenerate --profile {profile}" + (
        f" --only {' '.join(only)}" if only != list(ASSET_NAMES) else ""
    )
    manifest = {"profile": profile, "command": command,
                "total_bytes": total, "seconds": round(time.time() - t0, 1), "files": files}
    atomic_write_json(root / "manifest.json", manifest)
    log(f"wrote {len(files)} assets ({total / 2**20:.1f} MiB) to {root} in {manifest['seconds']:.0f} s")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m icm_helpers.regenerate", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument(
        "--work-dir", default=None, help="where to train (default: a new temp dir; an existing one resumes)"
    )
    ap.add_argument(
        "--only", nargs="+", choices=ASSET_NAMES, help="retrain only these; keep the others (if they still match)"
    )
    args = ap.parse_args(argv)
    regenerate(args.profile, args.work_dir, only=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
