"""The profile's folder under the out dir: its status file (``run_status.json``), its lock, and the decision to
skip or (re)run each notebook."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from icm_helpers.io import atomic_write_text, read_json

from .common import RunnerError, now, rel, say
from .params import validate_profile_name

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: runs are not locked
    fcntl = None

STATUS_FILE = "run_status.json"
LOCK_FILE = ".run.lock"
STATUS_VERSION = 1


def profile_dir_for(out_dir: Path, profile: str) -> Path:
    validate_profile_name(profile)
    out_dir = Path(out_dir).resolve()
    profile_dir = (out_dir / profile).resolve()
    if profile_dir.parent != out_dir:  # belt and braces: the name check already forbids this
        raise RunnerError(f"profile {profile!r} would escape the out dir {out_dir}")
    return profile_dir


@contextlib.contextmanager
def profile_lock(profile_dir: Path) -> Iterator[None]:
    """One runner per profile at a time (an flock, released by the OS if the process dies)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(profile_dir / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunnerError(
                f"another runner is working on profile {profile_dir.name!r} "
                f"({rel(profile_dir / LOCK_FILE)} is locked)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------- status file
def _empty_status() -> dict[str, Any]:
    return {"version": STATUS_VERSION, "notebooks": {}}


def load_status(profile_dir: Path) -> dict[str, Any]:
    path = Path(profile_dir) / STATUS_FILE
    if not path.exists():
        return _empty_status()
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        say(f"warning: cannot read {rel(path)} ({exc}); treating every notebook as not run")
        return _empty_status()
    if not isinstance(data, dict) or not isinstance(data.get("notebooks"), dict):
        return _empty_status()
    return data


def save_status(profile_dir: Path, status: dict[str, Any]) -> None:
    status["version"] = STATUS_VERSION
    status["updated_at"] = now()
    text = json.dumps(status, indent=2, ensure_ascii=False, allow_nan=True) + "\n"
    atomic_write_text(Path(profile_dir) / STATUS_FILE, text)


# ----------------------------------------------------------------------------------------------- skip or run
@dataclass
class Decision:
    run: bool
    reason: str  # why it runs, or why it is skipped


def _describe_param_changes(old: Any, new: dict[str, Any], limit: int = 4) -> str:
    if not isinstance(old, dict):
        return ""
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            changes.append(f"+{key}={new[key]!r}")
        elif key not in new:
            changes.append(f"-{key}")
        elif old[key] != new[key]:
            changes.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    if len(changes) > limit:
        changes = changes[:limit] + [f"... {len(changes) - limit} more"]
    return ", ".join(changes)


def decide(
    entry: Optional[dict[str, Any]],
    params: dict[str, Any],
    p_hash: str,
    s_hash: str,
    executed_copy: Path,
    force: bool,
) -> Decision:
    """Skip a notebook iff it is complete with the same params and source and its copy exists."""
    if not entry:
        return Decision(True, "no previous run")
    state = entry.get("status")
    if force:
        return Decision(True, f"--force; was {state}")
    if state == "failed":
        err = entry.get("error") or {}
        return Decision(True, f"failed last time: {err.get('summary') or 'see the status file'}")
    if state == "running":
        return Decision(True, "the previous run did not finish (interrupted?)")
    if state != "complete":
        return Decision(True, f"previous status {state!r}")
    reasons = []
    if entry.get("params_sha256") != p_hash:
        detail = _describe_param_changes(entry.get("params"), params)
        reasons.append("params changed since the last complete run" + (f" ({detail})" if detail else ""))
    if entry.get("source_sha256") != s_hash:
        reasons.append("notebook source changed since the last complete run")
    if not executed_copy.is_file():
        reasons.append(f"executed copy {rel(executed_copy)} is missing")
    if reasons:
        return Decision(True, "; ".join(reasons))
    return Decision(False, "complete; --force to redo")
