"""Atomic file writes: nothing half-written ever appears under its final name.

Every result, checkpoint and figure of the suite goes through these helpers: the bytes are written to a
temporary file in the destination directory, flushed and fsync'ed, then renamed over the final name
(``os.replace`` is atomic on POSIX within one filesystem).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; final files get the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):  # disk full, quota, I/O error: say which file, and that the old one survives
            reason = exc.strerror or str(exc)
            msg = f"could not write {path}: {reason}; the previous file (if any) is intact, no partial file was left"
            # same errno -> same OSError subclass (callers can still test errno / except e.g. PermissionError)
            raise (OSError(exc.errno, msg) if exc.errno is not None else OSError(msg)) from exc
        raise
    _fsync_dir(path.parent)
    return path


def to_jsonable(obj: Any) -> Any:
    """Convert numpy / torch scalars and arrays (recursively) into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    try:  # torch is optional here
        import torch  # lazy: the runner imports this module, and its --list stays fast without torch

        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().tolist()
    except ImportError:  # pragma: no cover
        pass
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    text = json.dumps(to_jsonable(obj), indent=indent, sort_keys=False, allow_nan=True)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through an in-memory buffer, then an atomic write."""
    import torch  # lazy: the runner imports this module, and its --list stays fast without torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete the temp files that ``atomic_write_bytes`` leaves beside ``path`` when its process is killed mid-write
    (``.<name>.<random>.tmp``; never a file under the final name). Call it only where one process owns ``path``
    (e.g. a training job at start-up). Returns how many were removed."""
    path = Path(path)
    n = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
        tmp.unlink(missing_ok=True)
        n += 1
    return n
