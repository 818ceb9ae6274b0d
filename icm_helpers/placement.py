"""Where the words of a figure go, so that none covers the data: legends outside the axes, notes under an axes'
x label, and point labels written only where a measurement finds room.

Matplotlib places legends "best" inside the axes and leaves text where it is told; with a dozen curves both end up
over the data. These helpers put legends and notes outside the axes (constrained layout makes room for them) and
place each point label beside its point only where its box, measured after the figure is laid out, covers no
marker, no curve and no label written before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.collections import Collection
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox

__all__ = ["PointLabel", "legend_right", "figure_legend", "unique_handles", "note_below", "place_point_labels"]

LEGEND_FONTSIZE = 8
NOTE_FONTSIZE = 7
LABEL_FONTSIZE = 6
#: Where a point label may go, tried in this order: (dx, dy) in points from the point, horizontal and vertical
#: alignment of the text (below right first: R-D curves rise to the right, so that side is usually free).
LABEL_OFFSETS = ((5, -5, "left", "top"), (5, 5, "left", "bottom"), (-5, 5, "right", "bottom"),
                 (-5, -5, "right", "top"), (7, 0, "left", "center"), (-7, 0, "right", "center"),
                 (0, 7, "center", "bottom"), (0, -8, "center", "top"))
_CURVE_STEP_PX = 3.0  # spacing of the points sampled along a curve's segments


@dataclass(frozen=True)
class PointLabel:
    """A short text for the point (x, y) in data coordinates of ``ax``."""

    ax: Axes
    x: float
    y: float
    text: str
    color: Any = "black"
    style: tuple[tuple[str, Any], ...] = ()  # more keyword arguments of the text, e.g. (("bbox", {...}),)


def legend_right(ax: Axes, handles: dict[str, Artist] | None = None, **kwargs: Any) -> Legend | None:
    """The axes' legend (``handles``: label -> artist; default: the axes' labelled artists) outside its right edge,
    top-aligned; None when there is nothing to list."""
    handles = unique_handles([ax]) if handles is None else handles
    if not handles:
        return None
    return ax.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     borderaxespad=0.0, fontsize=LEGEND_FONTSIZE, frameon=False, **kwargs)


def unique_handles(axes: Iterable[Axes]) -> dict[str, Artist]:
    """label -> the first handle with that label over ``axes`` (labels starting with "_" are not listed)."""
    out: dict[str, Artist] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            out.setdefault(label, handle)
    return out


def figure_legend(fig: Figure, handles: dict[str, Artist], where: str = "right upper", ncols: int = 1) -> Legend | None:
    """One legend for the whole figure, outside every axes (``where``: "right upper", "lower center", ...)."""
    if not handles:
        return None
    return fig.legend(list(handles.values()), list(handles), loc=f"outside {where}", fontsize=LEGEND_FONTSIZE,
                      frameon=False, ncols=ncols)


def note_below(ax: Axes, text: str, fontsize: float = NOTE_FONTSIZE) -> Artist:
    """``text`` under the axes' x label, left-aligned with the axes (constrained layout makes room for it)."""
    return ax.annotate(text, xy=(0.0, 0.0), xycoords=("axes fraction", ax.xaxis.label), xytext=(0, -6),
                       textcoords="offset points", ha="left", va="top", fontsize=fontsize)


def _points_of_line(line: Line2D) -> tuple[np.ndarray, np.ndarray]:
    """(vertices, radii) in display pixels: the markers, and points sampled along the drawn segments."""
    xy = line.get_transform().transform(np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float))
    xy = xy[np.all(np.isfinite(xy), axis=1)]
    px_per_pt = line.figure.dpi / 72.0
    marker = line.get_marker() not in (None, "None", "", " ", "none")
    radius = (line.get_markersize() / 2 if marker else line.get_linewidth() / 2) * px_per_pt + 1.0
    points, radii = [xy], [np.full(len(xy), radius)]
    if line.get_linestyle() not in ("None", "none", "", " ") and len(xy) > 1:
        for a, b in zip(xy[:-1], xy[1:]):
            n = max(2, int(np.hypot(*(b - a)) / _CURVE_STEP_PX))
            seg = a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)
            points.append(seg)
            radii.append(np.full(n, line.get_linewidth() / 2 * px_per_pt + 1.0))
    return np.concatenate(points), np.concatenate(radii)


def _points_of_collection(coll: Collection) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.asarray(coll.get_offsets(), float)
    if len(offsets) and coll.get_paths() and len(coll.get_paths()) <= len(offsets):  # markers (scatter)
        xy = coll.get_offset_transform().transform(offsets)
        return xy, np.full(len(xy), 4.0)
    verts = [coll.get_transform().transform(p.interpolated(8).vertices) for p in coll.get_paths() if len(p.vertices)]
    xy = np.concatenate(verts) if verts else np.empty((0, 2))
    return xy, np.full(len(xy), 2.0)


def data_points(ax: Axes) -> tuple[np.ndarray, np.ndarray]:
    """Every drawn data point of ``ax`` (markers, curves, error bars: artists in data coordinates) in display pixels,
    with the radius each covers."""
    parts = [_points_of_line(line) for line in ax.lines if line.get_visible() and line.get_transform() == ax.transData]
    parts += [_points_of_collection(c) for c in ax.collections
              if c.get_visible() and c.get_transform() == ax.transData]
    if not parts:
        return np.empty((0, 2)), np.empty(0)
    return np.concatenate([p for p, _ in parts]), np.concatenate([r for _, r in parts])


def _covers_points(box: Bbox, points: np.ndarray, radii: np.ndarray) -> bool:
    if not len(points):
        return False
    inside_x = (points[:, 0] + radii >= box.x0) & (points[:, 0] - radii <= box.x1)
    inside_y = (points[:, 1] + radii >= box.y0) & (points[:, 1] - radii <= box.y1)
    return bool(np.any(inside_x & inside_y))


def _try_label(label: PointLabel, taken: list[Bbox], points: np.ndarray, radii: np.ndarray, renderer: Any) -> bool:
    ax = label.ax
    frame = ax.get_window_extent(renderer)
    for dx, dy, ha, va in LABEL_OFFSETS:
        text = ax.annotate(label.text, (label.x, label.y), xytext=(dx, dy), textcoords="offset points", ha=ha,
                           va=va, fontsize=LABEL_FONTSIZE, color=label.color, **dict(label.style))
        text.set_in_layout(False)
        box = text.get_window_extent(renderer)
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        if inside and not _covers_points(box, points, radii) and not any(box.overlaps(t) for t in taken):
            taken.append(box)
            return True
        text.remove()
    return False


def place_point_labels(fig: Figure, labels: Sequence[PointLabel]) -> list[PointLabel]:
    """Write each label beside its point where it covers no data and no earlier label, inside its axes; a label
    with no such place is left out. Lay the figure out completely (legends, notes) before calling this: the labels
    are measured against the final positions and take no part in the layout. Returns the labels written."""
    if not labels:
        return []
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    written = []
    for ax in dict.fromkeys(label.ax for label in labels):
        points, radii = data_points(ax)
        taken: list[Bbox] = []
        written += [lab for lab in labels if lab.ax is ax and _try_label(lab, taken, points, radii, renderer)]
    return written
