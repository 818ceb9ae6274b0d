"""A failed notebook: which cell failed and why, for the status file and for the message on stderr.

A cell that raised: papermill's ``PapermillExecutionError`` carries the cell (its index in the notebook papermill
executed, its execution count and source) and the cause (``ename``, ``evalue``). A dead kernel, a timeout or an
interrupt carry no cell: the executed copy shows which cell was running.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import nbformat
from papermill.exceptions import PapermillExecutionError

from .common import first_line, rel

# papermill's tags for cells it adds to a notebook
INJECTED_TAG = "injected-parameters"
ERROR_MARKER_TAG = "papermill-error-cell-tag"


def _tags(cell: Any) -> list:
    return cell.get("metadata", {}).get("tags", [])


def _executed_cells(executed_copy: Optional[Path]) -> list:
    """The cells papermill executed, as in the executed copy less the error-marker cells it adds after a failure
    (so that papermill's ``cell_index`` points into this list); ``[]`` when there is no readable copy."""
    if executed_copy is None or not executed_copy.is_file():
        return []
    try:
        cells = nbformat.read(str(executed_copy), as_version=4).cells
    except Exception:  # an unreadable copy: the exception's own data is all there is
        return []
    return [cell for cell in cells if ERROR_MARKER_TAG not in _tags(cell)]


def _running_cell(cells: list) -> Optional[int]:
    """The cell that failed without an exception naming it: the one with an error output or papermill's exception
    flag (e.g. a timeout), else the last one that started executing (e.g. the kernel died)."""
    for i, cell in enumerate(cells):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors or cell.get("metadata", {}).get("papermill", {}).get("exception") is True:
            return i
    started = [i for i, cell in enumerate(cells) if cell.get("metadata", {}).get("papermill", {}).get("start_time")]
    return started[-1] if started else None


def _cause(exc: BaseException) -> tuple[str, str]:
    """(ename, evalue): the exception's own when it carries them (papermill's, nbclient's), else its type and the
    first line of its message."""
    ename = getattr(exc, "ename", None) or type(exc).__name__
    evalue = getattr(exc, "evalue", None)
    if evalue is None:
        text = str(exc).strip()
        evalue = text.splitlines()[0] if text else ""
    return ename, evalue


def describe_failure(exc: BaseException, executed_copy: Optional[Path]) -> dict[str, Any]:
    """``ename``, ``evalue``, ``execution_count``, ``cell_index`` (0-based, in the source notebook: papermill's
    injected-parameters cell does not count), ``cell_first_line`` and a one-line ``summary``."""
    ename, evalue = _cause(exc)
    info: dict[str, Any] = {
        "ename": ename,
        "evalue": evalue,
        "execution_count": getattr(exc, "exec_count", None),
        "cell_index": None,
        "cell_first_line": None,
    }
    cells = _executed_cells(executed_copy)
    if isinstance(exc, PapermillExecutionError):
        info["cell_first_line"] = first_line(exc.source)
        index = exc.cell_index if 0 <= exc.cell_index < len(cells) else None
    else:
        index = _running_cell(cells)
        if index is not None:
            info["execution_count"] = cells[index].get("execution_count")
            info["cell_first_line"] = first_line(cells[index].get("source", ""))
    if index is not None and INJECTED_TAG in _tags(cells[index]):
        info["cell_first_line"] = "<the injected-parameters cell>"
    elif index is not None:
        info["cell_index"] = index - sum(INJECTED_TAG in _tags(cell) for cell in cells[:index])
    info["summary"] = f"{ename}: {evalue}" if evalue else ename
    if info["cell_first_line"] is not None:
        where = f"cell {info['cell_index']}" if info["cell_index"] is not None else "cell"
        info["summary"] += f" (in {where}: {info['cell_first_line']})"
    return info


def report_failure(nb: Path, executed_copy: Optional[Path], info: dict[str, Any], interrupted: bool) -> None:
    """The failure on stderr: the notebook, the failing cell, the cause, the executed copy, how to continue."""
    lines = [f"\nerror: notebook {nb.stem} {'was interrupted' if interrupted else 'failed'} ({rel(nb)})"]
    if info.get("cell_first_line") is not None:
        where = []
        if info.get("cell_index") is not None:
            where.append(f"cell {info['cell_index']} (0-based, in {nb.name})")
        if info.get("execution_count") is not None:
            where.append(f"In [{info['execution_count']}] in the executed copy")
        lines.append(f"  failing cell: {', '.join(where) or 'unknown index'}")
        lines.append(f"      {info['cell_first_line']}")
    if not interrupted:
        lines.append(f"  cause: {info['ename']}" + (f": {info['evalue']}" if info.get("evalue") else ""))
    if executed_copy is not None:
        lines.append(f"  executed copy with the error: {rel(executed_copy)}")
    else:
        lines.append("  no executed copy was written (the notebook did not start executing)")
    lines.append(f"  rerun the same command to continue: completed notebooks are skipped, {nb.stem} reruns.")
    print("\n".join(lines), file=sys.stderr, flush=True)
