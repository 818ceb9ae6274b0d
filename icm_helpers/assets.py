"""Shipped start models: the demo profile's recognizers and start codec, so `make demo` skips their training.

The suite trains these itself (notebook 01 does it whenever no matching shipped file exists); shipping them only
saves time. Each shipped file records the *provenance* it was trained for (world spec, split sizes, seed, model and
training settings, see ``Experiment.provenance``). ``Experiment`` uses a shipped file only when that provenance
equals the profile's current one; any change to the profile makes the suite train its own instead.

Regenerate (trains from scratch with the profile's settings, evaluates, rewrites the files and the manifest)::

    .venv/bin/python -m icm_helpers.regenerate --profile demo

``manifest.json`` records per file: sha256, size, provenance and the accuracy measured at regeneration (reference
mAP / mIoU of the recognizers on the uncompressed test split; bpp and PSNR of the start codec).
``tests/test_assets.py`` checks that the files still match the manifest and still reach the recorded accuracy.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import REPO_ROOT
from .io import atomic_write_bytes, read_json

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
        return (
            None,
            f"the shipped {name} was trained for other settings "
            "(profile changed since `python -m icm_helpers.regenerate`)",
        )
    if path.stat().st_size != entry.get("bytes"):
        return (
            None,
            f"{path} has {path.stat().st_size} bytes, the manifest says {entry.get('bytes')} "
            "(git LFS pointer or partial copy?)",
        )
    return path, "provenance matches"


def install_shipped(src: Path, dst: Path) -> Path:
    """Copy a shipped file into the run directory atomically."""
    return atomic_write_bytes(dst, Path(src).read_bytes())
