"""The notebooks of a run: ``NN_*.ipynb`` in numeric order, ``--only`` / ``--from``, and the hash of their source."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import nbformat

from .common import RunnerError, rel, sha256_text

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"


def discover_notebooks(notebooks_dir: Path) -> list[Path]:
    """``<dir>/[0-9][0-9]_*.ipynb`` sorted by their number (then name)."""
    notebooks_dir = Path(notebooks_dir)
    if not notebooks_dir.is_dir():
        raise RunnerError(f"notebooks dir {rel(notebooks_dir)} does not exist")
    found = [p for p in notebooks_dir.glob(NOTEBOOK_GLOB) if p.is_file()]
    return sorted(found, key=lambda p: (int(p.name[:2]), p.name))


def _matches(token: str, nb: Path) -> bool:
    token = token.strip()
    if token.endswith(".ipynb"):
        token = token[: -len(".ipynb")]
    if token.isdigit():
        return int(token) == int(nb.name[:2])
    return token == nb.stem


def _resolve(tokens: Sequence[str], notebooks: list[Path], what: str) -> list[Path]:
    """The notebooks ``tokens`` name (numbers like ``03`` or full names), in the order of ``notebooks``; a token
    naming none is an error naming ``what`` gave it."""
    names = ", ".join(p.stem for p in notebooks) or "none"
    wanted: list[Path] = []
    for token in tokens:
        hits = [p for p in notebooks if _matches(str(token), p)]
        if not hits:
            raise RunnerError(f"{what} {token}: no such notebook (available: {names})")
        wanted.extend(h for h in hits if h not in wanted)
    return [p for p in notebooks if p in wanted]


def profile_notebooks(cfg: dict[str, Any]) -> Optional[list[str]]:
    """The notebooks a profile runs when ``--only`` is not given: its ``notebooks:`` list (numbers or names), or
    None = every notebook."""
    value = cfg.get("notebooks")
    if value is None:
        return None
    tokens = value if isinstance(value, list) else []
    if not tokens or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in tokens):
        raise RunnerError(f"profile {cfg.get('name')!r}: 'notebooks' must be a non-empty list of notebook numbers "
                          f"or names, e.g. [\"01\", \"02\"] (leave it out to run every notebook); got {value!r}")
    return [f"{v:02d}" if isinstance(v, int) else v for v in value]


def select_notebooks(
    notebooks: list[Path], only: Optional[Sequence[str]] = None, start: Optional[str] = None,
    default: Optional[Sequence[str]] = None,
) -> list[Path]:
    """Apply ``--only`` (numbers like ``03`` or full names; any notebook) or else the profile's ``default`` list
    (None: every notebook), then ``--from`` (same forms) to the list."""
    names = ", ".join(p.stem for p in notebooks) or "none"
    if only:
        selected = _resolve(only, notebooks, "--only")
    elif default is not None:
        selected = _resolve(default, notebooks, "the profile's notebooks list:")
    else:
        selected = list(notebooks)
    if start:
        hits = [p for p in notebooks if _matches(start, p)]
        if hits:
            first = notebooks.index(hits[0])
            selected = [p for p in selected if notebooks.index(p) >= first]
        elif start.strip().isdigit():
            selected = [p for p in selected if int(p.name[:2]) >= int(start)]
        else:
            raise RunnerError(f"--from {start}: no such notebook (available: {names})")
        if not selected and default is not None and not only:
            raise RunnerError(f"--from {start}: the profile runs only {', '.join(default)}; run the notebooks "
                              "beyond them by naming them with --only")
    return selected


def source_sha256(notebook: Path) -> str:
    """Hash of the notebook's cells' (type, source) only: outputs, execution counts and metadata
    do not count, so opening/saving or executing a notebook in Jupyter does not make it 'changed'."""
    nb = nbformat.read(str(notebook), as_version=4)
    payload = [[cell.get("cell_type", ""), cell.get("source", "")] for cell in nb.cells]
    return sha256_text(json.dumps(payload, ensure_ascii=False, separators=(",", ":")))
