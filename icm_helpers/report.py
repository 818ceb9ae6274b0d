"""Small text tables for notebooks (markdown; no pandas needed)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

RESULT_COLUMNS = ("task", "method", "lambda_", "bpp_estimated", "bpp_bitstream", "psnr", "metric_name", "metric")


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 4) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def records_table(records: Iterable[dict[str, Any]], columns: Sequence[str] = RESULT_COLUMNS, digits: int = 4) -> str:
    """Markdown table of evaluation records, sorted by task, method and lambda."""
    recs = sorted(records, key=lambda r: (r.get("task", ""), r.get("method", ""), r.get("lambda_") or 0.0))
    return markdown_table(columns, ([r.get(c) for c in columns] for r in recs), digits)
