"""Shipped start models: the demo profile's recognizers and start codec, so `make demo` skips their training.

The suite trains these itself (notebook 01 does it whenever no matching shipped file exists); shipping them only
saves time. Each shipped file records the *provenance* it was trained for (world spec, split sizes, seed, model and
training settings, see ``Experiment.provenance``). ``Experiment`` uses a shipped file only when that provenance
equals the profile's current one; any change to the profile makes the suite train its own instead.

Regenerate (trains from scratch with the profile's settings, evaluates, rewrites the files and the manifest)::

    .venv/bin/python -m icm_helpers.assets regenerate --profile demo

``manifest.json`` records per file: sha256, size, provenance and the accuracy measured at regeneration (reference
mAP / mIoU of the recognizers on the uncompressed test split; bpp and PSNR of the start codec).
``tests/test_assets.py`` checks that the files still match the manifest and still reach the recorded accuracy.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import REPO_ROOT
from .io import atomic_write_bytes, atomic_write_json, read_json

MAX_TOTAL_BYTES = 20 * 1024 * 1024  # the budget for shipped checkpoints


def asset_dir(cfg: dict[str, Any]) -> Path | None:
    """The profile's shipped-asset directory (``assets:`` key, relative to the repository), or None."""
    rel = cfg.get("assets")
    return (REPO_ROOT / rel).resolve() if rel else None


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(obj: Any) -> Any:
    """JSON round trip: tuples -> lists, so a provenance compares equal however it was built."""
    return json.loads(json.dumps(obj, sort_keys=True))


def find_shipped(cfg: dict[str, Any], name: str, provenance: dict[str, Any]) -> tuple[Path | None, str]:
    """(path, why) of the shipped ``<name>.pt`` when its recorded provenance equals ``provenance``; else (None, why)."""
    root = asset_dir(cfg)
    if root is None:
        return None, "the profile ships no assets"
    path, manifest_path = root / f"{name}.pt", root / "manifest.json"
    if not path.is_file() or not manifest_path.is_file():
        return None, f"no shipped {name} in {root}"
    entry = read_json(manifest_path).get("files", {}).get(name)
    if entry is None:
        return None, f"{name} is not in {manifest_path}"
    if canonical(entry.get("provenance")) != canonical(provenance):
        return None, f"the shipped {name} was trained for other settings (profile changed since `python -m icm_helpers.assets regenerate`)"
    if path.stat().st_size != entry.get("bytes"):
        return None, f"{path} has {path.stat().st_size} bytes, the manifest says {entry.get('bytes')} (git LFS pointer or partial copy?)"
    return path, "provenance matches"


def install_shipped(src: Path, dst: Path) -> Path:
    """Copy a shipped file into the run directory atomically."""
    return atomic_write_bytes(dst, Path(src).read_bytes())


ASSET_NAMES = ("recognizer_detection", "recognizer_segmentation", "codec_start")


def regenerate(profile: str = "demo", work_dir: str | Path | None = None, log=print,
               only: list[str] | None = None) -> dict[str, Any]:
    """Train the profile's recognizers and start codec from scratch, evaluate them, and write them + the manifest
    into the profile's asset directory. ``only``: retrain just these (e.g. ["codec_start"]); the other shipped files
    are kept, which requires their recorded provenance to match the profile (else they are retrained too)."""
    from .codec import load_state
    from .experiment import Experiment

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
        files[f"recognizer_{task}"] = {"provenance": ex.provenance("recognizer", task), "train_seconds": round(seconds, 1),
                                       "accuracy": {"metric_name": ref["metric_name"], "metric": ref["metric"], "test_images": ref["num_images"]}}
    ex.start_codec()
    seconds = load_state(ex.models_dir / "codec_start.pt")["extra"].get("seconds", float("nan"))
    start = ex.evaluate_start(ex.tasks()[0])
    files["codec_start"] = {"provenance": ex.provenance("codec"), "train_seconds": round(seconds, 1),
                            "accuracy": {"bpp_estimated": start["bpp_estimated"], "bpp_bitstream": start["bpp_bitstream"],
                                         "psnr": start["psnr"], "test_images": start["num_images"]}}
    root.mkdir(parents=True, exist_ok=True)
    for name, entry in files.items():
        src = ex.models_dir / f"{name}.pt"
        install_shipped(src, root / f"{name}.pt")
        entry.update(bytes=src.stat().st_size, sha256=sha256(src))
    total = sum(e["bytes"] for e in files.values())
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"shipped assets total {total / 2**20:.1f} MiB > {MAX_TOTAL_BYTES / 2**20:.0f} MiB: shrink the models")
    command = f"python -m icm_helpers.assets regenerate --profile {profile}" + (f" --only {' '.join(only)}" if only != list(ASSET_NAMES) else "")
    manifest = {"profile": profile, "command": command,
                "total_bytes": total, "seconds": round(time.time() - t0, 1), "files": files}
    atomic_write_json(root / "manifest.json", manifest)
    log(f"wrote {len(files)} assets ({total / 2**20:.1f} MiB) to {root} in {manifest['seconds']:.0f} s")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m icm_helpers.assets", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rg = sub.add_parser("regenerate", help="train + evaluate the profile's shipped models and rewrite them")
    rg.add_argument("--profile", default="demo")
    rg.add_argument("--work-dir", default=None, help="where to train (default: a new temp dir; an existing one resumes)")
    rg.add_argument("--only", nargs="+", choices=ASSET_NAMES, help="retrain only these; keep the others (if they still match)")
    args = ap.parse_args(argv)
    regenerate(args.profile, args.work_dir, only=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
