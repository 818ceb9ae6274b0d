"""The one place that writes figures and tables to disk (pyprobml style).

Every figure of the suite is saved as ``<figures root>/<profile>/<name>.png`` (150 dpi, for the
README and notebooks), ``<name>.pdf`` (vector, for papers) and ``<name>.json`` (the exact numbers
that were plotted, so results can be diffed and re-plotted without re-running anything:
``icm_helpers.replot``). Tables go through :func:`save_table`: ``<name>.md`` (markdown) and
``<name>.json``, never a picture of a table.

All files are rendered in memory first and then written with :func:`icm_helpers.io.atomic_write_bytes`
(temp file + fsync + rename), so an interrupted run never leaves a truncated figure behind and an
existing figure is only ever replaced by a complete new one.

Only ``fig.savefig`` is used: no backend is forced, so Jupyter's inline backend keeps working and
figures built with :class:`matplotlib.figure.Figure` render headlessly (Agg) on any machine.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from .io import atomic_write_bytes, to_jsonable
from .provenance import result_provenance

__all__ = ["FIGURES_ENV_VAR", "figures_root", "save_figure", "save_table"]

#: Environment variable overriding the figures root directory.
FIGURES_ENV_VAR = "ICM_FIGURES_DIR"

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
PNG_DPI = 150


def figures_root() -> Path:
    """Root directory for figures: ``$ICM_FIGURES_DIR`` if set, else ``<repo root>/figures``.

    The repo root is the parent of the ``icm_helpers`` package directory.
    """
    env = os.environ.get(FIGURES_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "figures"


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use only letters, digits, '_', '-' and '.', not starting "
            f"with '.' or '-' and without path separators (e.g. 'rd_detection'), so that the file "
            f"stays inside the figures directory"
        )
    return value


def _target_dir(profile: str, figures_dir: str | os.PathLike | None) -> Path:
    root = Path(figures_dir) if figures_dir is not None else figures_root()
    return root / _check_name(profile, "profile")


def _json_text(data: Any, name: str) -> str:
    try:
        return json.dumps(to_jsonable(data), indent=2, allow_nan=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"data for figure {name!r} is not JSON serialisable ({exc}); pass only the plotted "
            "numbers as dicts/lists of numbers, strings, numpy arrays or scalars"
        ) from exc


def _with_provenance(data: Any, profile: Any) -> tuple[str, Any]:
    """``(profile name, data with its provenance)``: the Experiment's (``profile`` is one) or the profile name's."""
    provenance = (
        profile.run_provenance() if hasattr(profile, "run_provenance") else result_provenance(profile_name=profile)
    )
    data = {**data, "provenance": provenance} if isinstance(data, dict) else {"data": data, "provenance": provenance}
    return getattr(profile, "profile", profile), data


def _write_files(out_dir: Path, name: str, payload: dict[str, bytes]) -> dict[str, Path]:
    """The one writer of figures and tables: ``<out_dir>/<name>.<ext>`` for every ``ext`` of ``payload``, each
    atomically, after all of them were rendered. Under torchrun only rank 0 writes (the paths are returned on every
    rank)."""
    paths = {ext: out_dir / f"{name}.{ext}" for ext in payload}
    if not _writer():
        return paths
    return {ext: atomic_write_bytes(path, payload[ext]) for ext, path in paths.items()}


def save_figure(
    fig: Figure,
    name: str,
    data: Any,
    profile: Any,
    figures_dir: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write ``fig`` as PNG (150 dpi) and PDF plus the plotted ``data`` as JSON, atomically.

    ``profile``: the profile's name, or the ``Experiment`` itself (notebooks pass ``ex``), whose provenance (git
    commit, package versions, device, threads, profile hash, seed: ``icm_helpers.provenance``) then goes into the
    JSON under ``"provenance"`` (a non-dict ``data`` is stored as ``{"data": ..., "provenance": ...}``); with a name,
    the provenance has no profile hash.

    Files: ``<figures_dir or figures_root()>/<profile>/<name>.{png,pdf,json}``. Everything is
    rendered and serialised in memory before the first file is written, so a bad ``data`` or a
    rendering error leaves existing files untouched. The figure is not closed (notebooks still
    display it).

    Returns:
        ``{"png": path, "pdf": path, "json": path}``.

    Raises:
        ValueError: ``name`` or ``profile`` is not a safe file name, or ``data`` is not JSON
            serialisable.
    """
    _check_name(name, "figure name")
    profile_name, data = _with_provenance(data, profile)
    out_dir = _target_dir(profile_name, figures_dir)
    payload = {"json": _json_text(data, name).encode("utf-8")}
    for fmt, extra in (("png", {"dpi": PNG_DPI}), ("pdf", {"metadata": {"CreationDate": None}})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, bbox_inches="tight", **extra)
        payload[fmt] = buf.getvalue()
    return _write_files(out_dir, name, {fmt: payload[fmt] for fmt in ("png", "pdf", "json")})


def _writer() -> bool:
    """False on the ranks > 0 of a torchrun job (``icm_helpers.distributed``): they render, rank 0 writes."""
    try:
        from .distributed import is_main  # lazy: figures work without torch (a bare install of the plotting helpers)
    except ImportError:  # torch missing: single process
        return True
    return is_main()


def _cell_text(value: Any, float_fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else float_fmt.format(float(value))
    return str(value)


def _markdown(columns: Sequence[str], cells: list[list[str]], title: str | None) -> str:
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    lines = [f"**{title}**", ""] if title else []
    lines += [line(columns), "|" + "|".join("---" for _ in columns) + "|"]
    lines += [line(row) for row in cells]
    return "\n".join(lines) + "\n"


def save_table(
    name: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    profile: Any,
    title: str | None = None,
    figures_dir: str | os.PathLike | None = None,
    float_fmt: str = "{:.2f}",
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a results table as ``<name>.md`` (markdown, to read) and ``<name>.json`` (the raw values), atomically.

    The JSON holds ``{"columns": [...], "rows": [[...], ...], "title", "float_fmt", "provenance"}`` and the keys of
    ``extra`` (``profile``: a name or the Experiment, as for :func:`save_figure`); the markdown formats floats with
    ``float_fmt`` and shows ``None``/NaN as ``n/a``. A table is text: no picture of it is written.

    Returns:
        ``{"md", "json"}`` -> path.

    Raises:
        ValueError: empty ``columns``, a row whose length differs from ``columns``, a bad
            ``float_fmt``, or an invalid ``name`` / ``profile`` / non-serialisable cell.
    """
    _check_name(name, "table name")
    columns = [str(c) for c in columns]
    rows = [list(r) for r in rows]
    if not columns:
        raise ValueError(f"table {name!r} has no columns; pass the column headers as `columns`")
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(
                f"row {i} of table {name!r} has {len(row)} cells but there are {len(columns)} "
                f"columns {columns}; give one value per column (None for a missing value)"
            )
    try:
        cells = [[_cell_text(v, float_fmt) for v in row] for row in rows]
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"float_fmt {float_fmt!r} cannot format a float ({exc}); use e.g. '{{:.3f}}'") from exc
    data = {"columns": columns, "rows": rows, "title": title, "float_fmt": float_fmt, **(extra or {})}
    profile_name, data = _with_provenance(data, profile)
    out_dir = _target_dir(profile_name, figures_dir)
    payload = {"md": _markdown(columns, cells, title).encode("utf-8"), "json": _json_text(data, name).encode("utf-8")}
    return _write_files(out_dir, name, payload)
