"""What every part of the runner shares: the usage-error exception, exit codes, default paths, message helpers."""
from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
DEFAULT_OUT_DIR = REPO_ROOT / "papermill_runs"
DEFAULT_PARAMS_DIR = REPO_ROOT / "papermill_runs" / "params"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class RunnerError(Exception):
    """A usage / configuration problem: printed as ``error: ...`` and exit code 2."""


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def rel(path: Path) -> str:
    """``path`` relative to the current directory when it is below it (for messages)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def fmt_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def first_line(source: str, limit: int = 120) -> str:
    """The first non-blank line of a cell's source, cut to ``limit`` characters."""
    for line in (source or "").splitlines():
        if line.strip():
            line = line.rstrip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return "<empty cell>"
