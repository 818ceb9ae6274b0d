"""Shipped start models: the demo profile's recognizers, start codec and pre-trained aux-enc branches, so `make demo`
skips their training.

The suite trains these itself (notebook 01 does it whenever no matching shipped file exists); shipping them only
saves time. Each shipped file records the *provenance* it was trained for (world spec, split sizes, seed, model and
training settings, see ``Experiment.provenance``). ``Experiment`` uses a shipped file only when that provenance
equals the profile's current one; any change to the profile makes the suite train its own instead.

Regenerate (trains from scratch with the profile's settings, evaluates, rewrites the files and the manifest)::

    .venv/bin/python -m icm_helpers.regenerate --profile demo

``manifest.json`` records per file: sha256, size, provenance and the accuracy measured at regeneration (reference
mAP / mIoU of the recognizers on the uncompressed test split; bpp and PSNR of the start codec; the branches'
validation loss). A *packed* file (``<name>.pt.xz``, the branches) holds its state dict's float32 tensors rounded to
float16 and is xz-compressed, to stay within ``MAX_TOTAL_BYTES``; installing it writes an ordinary ``.pt`` with those
tensors back in float32 (exactly the rounded values).
``tests/test_assets.py`` checks that the files still match the manifest and still reach the recorded accuracy.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
from pathlib import Path
from typing import Any, Callable

import torch

from .config import REPO_ROOT
from .io import atomic_write_bytes, read_json

PACKED_SUFFIX = ".pt.xz"  # float16 state dict, xz-compressed (see pack / install_shipped)

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
    manifest_path = root / "manifest.json"
    entry = read_json(manifest_path).get("files", {}).get(name) if manifest_path.is_file() else None
    if entry is None:
        return None, f"no shipped {name} in {root}"
    path = root / entry.get("file", f"{name}.pt")
    if not path.is_file():
        return None, f"{path} is listed in {manifest_path} but missing"
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


def pack(state: dict[str, Any]) -> bytes:
    """A checkpoint dict whose ``state_dict``'s float32 tensors are rounded to float16, saved and xz-compressed."""
    half = {k: v.half() if torch.is_tensor(v) and v.dtype == torch.float32 else v
            for k, v in state["state_dict"].items()}
    overflow = [k for k, v in half.items()
                if torch.is_tensor(v) and v.dtype == torch.float16 and not bool(v.isfinite().all())]
    if overflow:
        raise ValueError(f"tensors {overflow} exceed float16's range: ship them unpacked")
    buf = io.BytesIO()
    torch.save({**state, "state_dict": half, "packed": "float16"}, buf)
    return lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME)


def unpack(data: bytes) -> dict[str, Any]:
    """The checkpoint dict of a packed file, its float16 tensors back in float32 (exact: every float16 is a float32)."""
    state = torch.load(io.BytesIO(lzma.decompress(data)), map_location="cpu", weights_only=True)
    if state.pop("packed", None) != "float16":
        raise ValueError("not a packed checkpoint (icm_helpers.assets.pack writes them)")
    state["state_dict"] = {k: v.float() if torch.is_tensor(v) and v.dtype == torch.float16 else v
                           for k, v in state["state_dict"].items()}
    return state


def install_shipped(src: Path, dst: Path) -> Path:
    """Copy a shipped file into the run directory atomically (a packed one unpacked into an ordinary ``.pt``)."""
    src = Path(src)
    if src.name.endswith(PACKED_SUFFIX):
        buf = io.BytesIO()
        torch.save(unpack(src.read_bytes()), buf)
        return atomic_write_bytes(dst, buf.getvalue())
    return atomic_write_bytes(dst, src.read_bytes())


def install_matching(cfg: dict[str, Any], name: str, provenance: dict[str, Any], dst: Path,
                     use_assets: bool | set[str] = True, log: Callable[[str], Any] = print) -> bool:
    """Copy the profile's shipped ``name`` to ``dst`` when it was trained for ``provenance`` (:func:`find_shipped`);
    ``use_assets``: True, False, or the names that may be installed (e.g. all but the one being regenerated). Logs
    which file is used, or why none is when the profile ships assets. True when ``dst`` was installed."""
    if not use_assets or (not isinstance(use_assets, bool) and name not in use_assets):
        return False
    src, why = find_shipped(cfg, name, provenance)
    if src is None:
        if cfg.get("assets"):
            log(f"not using a shipped {name}: {why}; training it")
        return False
    install_shipped(src, dst)
    log(f"using the shipped {name} ({src}; regenerate: python -m icm_helpers.regenerate)")
    return True
