"""Retrain the shipped start models of a profile and rewrite them with their manifest (``icm_helpers.assets``).

    python -m icm_helpers.regenerate --profile demo [--only codec_start] [--work-dir runs/assets_demo]

Trains the profile's recognizers, start codec and pre-trained aux-enc branches (protocol v2's R6v2, on the start
codec) from scratch (or only the named ones), evaluates them, and writes the files, their sha256, provenance and
accuracy into the profile's asset directory. The branches are shipped packed (float16, xz: ``assets.pack``); their
validation loss is measured again on the packed weights.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .assets import MAX_TOTAL_BYTES, PACKED_SUFFIX, asset_dir, install_shipped, pack, sha256, unpack
from .codec import load_state
from .experiment import Experiment
from .io import atomic_write_bytes, atomic_write_json, read_json
from .training.jobs import branch_val_loss

BRANCHES = ("aux_branch_detection_enc", "aux_branch_segmentation_enc")  # shipped packed (assets.pack)
ASSET_NAMES = ("recognizer_detection", "recognizer_segmentation", "codec_start", *BRANCHES)


def branch_entry(ex: Experiment, task: str) -> tuple[dict[str, Any], bytes]:
    """The pre-trained aux-enc branch of ``task`` (``Experiment.warm_aux_branch``: trained unless present), packed, and
    its manifest entry: provenance, the pre-training's last validation loss and the packed weights' own."""
    seed = int(ex.task_cfg(task)["aux_warm_start"].get("seed", ex.seed))
    ex.warm_aux_branch(task, "enc", seed)
    path = ex.warm_branch_path(task, "enc", seed)
    state = load_state(path)
    data = pack(state)
    codec, recognizer = ex.start_codec(), ex.recognizer(task)
    batch = int(ex.task_cfg(task)["aux_warm_start"]["batch_size"])
    val = {}
    for kind, state_dict in (("unpacked", state["state_dict"]), ("packed", unpack(data)["state_dict"])):
        aux = ex.build_branch(task, "enc", seed, codec, recognizer)  # both measured alike: same draws, same images
        aux.load_state_dict(state_dict)
        val[kind] = branch_val_loss("enc", aux, codec, recognizer, ex.dataset("val", task), batch, seed, ex.device)
    history = state["history"]
    timing_path = path.parent / "timing.json"  # absent or "shipped" when the branch was installed, not trained, here
    timing = read_json(timing_path) if timing_path.exists() else {}
    return {"provenance": ex.provenance("branch", task), "file": f"aux_branch_{task}_enc{PACKED_SUFFIX}",
            "train_seconds": None if timing.get("shipped") else timing.get("loop_seconds"),
            # the pre-training's last logged value, then the weights as trained and as shipped, measured here as the
            # pre-training measures it (so "unpacked" equals the logged value when the data are the same)
            "accuracy": {"val_aux_loss_pretrained": float(history[-1]["val_aux"]),
                         "val_aux_loss_unpacked": val["unpacked"], "val_aux_loss_packed": val["packed"],
                         "rounds": len(history), "val_images": len(ex.dataset("val", task))}}, data


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
    packed = {}
    for task in ex.tasks():
        if f"aux_branch_{task}_enc" in ASSET_NAMES and ex.task_cfg(task).get("aux_warm_start"):
            files[f"aux_branch_{task}_enc"], packed[f"aux_branch_{task}_enc"] = branch_entry(ex, task)
    root.mkdir(parents=True, exist_ok=True)
    for name, entry in files.items():
        dst = root / entry.get("file", f"{name}.pt")
        if name in packed:
            atomic_write_bytes(dst, packed[name])
        else:
            install_shipped(ex.models_dir / f"{name}.pt", dst)
        entry.update(bytes=dst.stat().st_size, sha256=sha256(dst))
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
