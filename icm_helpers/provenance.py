"""Provenance of a result: which code, packages, machine, settings and seed produced it, and how long it took.

``result_provenance(...)`` returns one JSON-serialisable dict to store beside (or inside) an evaluation record.

What is cached and what is not: package versions, the Python version and the CPU model cannot change within a
process and are read once (``functools.lru_cache``), as is a CUDA device's name (per device index); the git state
and torch's thread count are read on EVERY call (a commit, an edit or ``torch.set_num_threads`` can happen between two
results of one process).

The host name, user name and absolute paths are deliberately NOT recorded (records are shared).
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .config import REPO_ROOT
from .io import to_jsonable

PROVENANCE_VERSION = 1
# distribution names as pip knows them (importlib.metadata is case-insensitive on the name)
PACKAGES = ("torch", "torchvision", "compressai", "numpy", "pycocotools", "Pillow", "scipy")
_GIT_TIMEOUT_S = 20.0


# ---------------------------------------------------------------------------------------------------------- git
def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take .git/index.lock to refresh the index (another process may be
    # committing in the same checkout); LC_ALL=C: messages in English for the recorded reason.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env,
                          timeout=_GIT_TIMEOUT_S, check=False)


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


OUTPUT_DIRS = ("figures",)  # written by the suite's own runs: not a change of the code that made a result


def git_state(repo: str | os.PathLike | None = None) -> dict[str, Any]:
    """Git commit and dirty flag of the checkout at ``repo`` (default: ``config.REPO_ROOT``). Never raises.

    Returns ``{"commit": str | None, "dirty": bool | None, "reason": str | None}``:

    - ``commit``: ``git rev-parse HEAD`` (40 hex digits), or None when it cannot be known; ``reason`` then says why
      (git not installed, ``repo`` not the top level of a git checkout - e.g. the package installed into
      site-packages, which may lie inside some other repository -, a repository without commits, git refusing it).
    - ``dirty``: True when a TRACKED file differs from HEAD in the work tree or in the index (modified, staged,
      deleted, renamed, type-changed, a submodule moved): ``git status --porcelain --untracked-files=no`` prints
      anything. Untracked and ignored files (new results, runs/, caches) do not count, nor does ``figures/``: the
      suite itself rewrites the committed figures there during a run (``OUTPUT_DIRS``). None when commit is None.
    """
    repo = Path(REPO_ROOT if repo is None else repo).resolve()
    out: dict[str, Any] = {"commit": None, "dirty": None, "reason": None}
    if not repo.is_dir():
        out["reason"] = "the repository directory does not exist"
        return out
    try:
        top = _git(repo, "rev-parse", "--show-toplevel")
        if top.returncode != 0:
            out["reason"] = f"not a git checkout ({_first_line(top.stderr) or 'git rev-parse failed'})"
            return out
        if Path(top.stdout.strip()).resolve() != repo:
            out["reason"] = ("not the top level of a git checkout (installed package?); the enclosing repository's "
                             "commit would not describe this code")
            return out
        head = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD")
        if head.returncode != 0:
            out["reason"] = "the repository has no commit yet"
            return out
        status = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".",
                      *(f":(exclude){d}" for d in OUTPUT_DIRS))
        if status.returncode != 0:
            out["commit"] = head.stdout.strip()
            out["reason"] = f"git status failed ({_first_line(status.stderr)}); dirty state unknown"
            return out
    except FileNotFoundError:
        out["reason"] = "git is not installed (no 'git' executable on PATH)"
        return out
    except subprocess.TimeoutExpired:
        out["reason"] = f"git did not answer within {_GIT_TIMEOUT_S:g} s"
        return out
    except OSError as exc:
        out["reason"] = f"git could not be run ({exc.strerror or exc})"
        return out
    out["commit"] = head.stdout.strip()
    out["dirty"] = bool(status.stdout.strip())
    return out


# ---------------------------------------------------------------------------------------------------------- packages
@functools.lru_cache(maxsize=None)
def _package_versions() -> tuple[tuple[str, str | None], ...]:
    versions: list[tuple[str, str | None]] = [("python", platform.python_version())]
    for name in PACKAGES:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((name, None))
    return tuple(versions)


def package_versions() -> dict[str, str | None]:
    """``{"python": "3.11.7", "torch": ..., "torchvision": ..., "compressai": ..., "numpy": ..., "pycocotools": ...,
    "Pillow": ..., "scipy": ...}``: installed distribution versions (``importlib.metadata``), None when one is not
    installed. Read once per process."""
    return dict(_package_versions())


# ---------------------------------------------------------------------------------------------------------- device
@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU model: ``model name`` of /proc/cpuinfo (x86 Linux; ``Hardware``/``Processor`` on some ARM kernels),
    else ``platform.processor()``, else ``platform.machine()``, else "unknown". Read once per process."""
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8", errors="replace") as fh:
            fields: dict[str, str] = {}
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in fields and value.strip():
                    fields[key.strip()] = value.strip()
        for key in ("model name", "Hardware", "Processor", "cpu model", "cpu"):
            if fields.get(key):
                return fields[key]
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    import torch  # lazy: the provenance of a run without torch is still written

    return torch.cuda.get_device_name(index)


def device_info(device: Any = "cpu") -> dict[str, Any]:
    """``{"type": "cpu"|"cuda"|..., "index": int | None, "name": str | None}``: the CPU model for "cpu", the GPU's
    name (``torch.cuda.get_device_name``) for "cuda[:N]" (None, with ``error``, when it cannot be read)."""
    text = str(device)
    dtype, _, idx = text.partition(":")
    info: dict[str, Any] = {"type": dtype, "index": int(idx) if idx.isdigit() else None, "name": None}
    if dtype == "cpu":
        info["name"] = cpu_name()
    elif dtype == "cuda":
        try:
            import torch  # lazy: the provenance of a run without torch is still written

            index = info["index"] if info["index"] is not None else torch.cuda.current_device()
            info["index"] = index
            info["name"] = _cuda_name(index)
        except Exception as exc:  # no CUDA build / no GPU visible: recorded, not raised
            info["error"] = f"{type(exc).__name__}: {_first_line(str(exc))}"
    return info


def torch_threads() -> int | None:
    """``torch.get_num_threads()`` now (intra-op threads), None without torch."""
    try:
        import torch  # lazy: the provenance of a run without torch is still written
    except ImportError:
        return None
    return int(torch.get_num_threads())


# ---------------------------------------------------------------------------------------------------------- profile
def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``: keys sorted, no whitespace, UTF-8 characters kept, numpy / torch / Path
    values converted first (``io.to_jsonable``; mapping keys become strings, tuples lists)."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def profile_sha256(profile: dict[str, Any]) -> str:
    """sha256 (hex) of ``canonical_json(profile)``: the same for any key order, different when any setting changes
    (an int and a float of equal value - ``1`` and ``1.0`` - are different settings)."""
    return hashlib.sha256(canonical_json(profile).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------- time
def _utc_iso(t: _dt.datetime | float | int | None, what: str) -> tuple[str | None, float | None]:
    if t is None:
        return None, None
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError(f"{what} is a naive datetime (no time zone); pass an aware one, e.g. "
                             "datetime.now(timezone.utc), or seconds since the epoch (time.time())")
        t = t.timestamp()
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        raise TypeError(f"{what} must be a timezone-aware datetime or seconds since the epoch, got {type(t).__name__}")
    stamp = _dt.datetime.fromtimestamp(float(t), tz=_dt.timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z"), float(t)


# ---------------------------------------------------------------------------------------------------------- all
def result_provenance(profile: dict[str, Any] | None = None, *, profile_name: str | None = None, seed: Any = None,
                      device: Any = "cpu", seconds: float | None = None,
                      started: _dt.datetime | float | None = None, ended: _dt.datetime | float | None = None,
                      repo: str | os.PathLike | None = None) -> dict[str, Any]:
    """Provenance of one result (a JSON-serialisable dict).

    ``profile``: the RESOLVED profile (``config.load_profile(name, overrides)``, i.e. after the overrides); its hash
    is ``profile_sha256(profile)``. ``profile_name``: default ``profile["name"]``. ``seed``: the seed(s) of the run.
    ``device``: "cpu" or "cuda[:N]" (what the result was computed on). ``seconds``: wall time of the work in seconds;
    ``started`` / ``ended``: timezone-aware datetimes or ``time.time()`` values, recorded as ISO 8601 UTC
    ("2024-05-01T12:00:00.000Z"); ``seconds`` defaults to ``ended - started`` when both are given.
    ``repo``: the git checkout to describe (default ``config.REPO_ROOT``).

    Keys: provenance_version, git {commit, dirty, reason}, versions {python, torch, ...; None = not installed},
    torch_cuda (the CUDA version torch was built for, None for a CPU build), device {type, index, name},
    cpu (the CPU model, also for CUDA runs), torch_num_threads, platform (OS and architecture, no host name),
    profile {name, sha256}, seed, wall_seconds, started_utc, ended_utc.
    """
    started_iso, t0 = _utc_iso(started, "started")
    ended_iso, t1 = _utc_iso(ended, "ended")
    if seconds is None and t0 is not None and t1 is not None:
        seconds = t1 - t0
    try:
        import torch  # lazy: the provenance of a run without torch is still written

        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    name = profile_name if profile_name is not None else (profile or {}).get("name")
    record = {
        "provenance_version": PROVENANCE_VERSION,
        "git": git_state(repo),
        "versions": package_versions(),
        "torch_cuda": torch_cuda,
        "device": device_info(device),
        "cpu": cpu_name(),
        "torch_num_threads": torch_threads(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}".strip(),
        "profile": {"name": name, "sha256": profile_sha256(profile) if profile is not None else None},
        "seed": to_jsonable(seed),
        "wall_seconds": None if seconds is None else float(seconds),
        "started_utc": started_iso,
        "ended_utc": ended_iso,
    }
    return record
