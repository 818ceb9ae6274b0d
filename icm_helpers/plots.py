"""Plots used by the notebooks: rate / task-metric curves, loss curves and bit-allocation maps.

Every function builds a figure and returns ``(fig, data)``, where ``data`` holds the plotted numbers
(JSON serialisable); nothing is written to disk here -- the notebook passes both to
:func:`icm_helpers.figures.save_figure`.

Evaluation results are records (dicts) such as::

    {"task": "detection", "method": "baseline", "lambda_": 0.4, "bpp_estimated": 0.31,
     "bpp_bitstream": 0.315, "metric_name": "mAP", "metric": 0.42}

``method`` is e.g. ``"start"`` (the pre-trained codec, a single point), ``"baseline"`` (fine-tuned
for the task without the auxiliary loss), ``"aux_enc"`` (with the auxiliary encoder loss of the
paper) or ``"roi"``.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from .bootstrap import format_ci
from .evaluation import SegmentationMetric
from .methods import METHODS, method_color, short_name
from .placement import PointLabel, figure_legend, legend_right, note_below, place_point_labels, unique_handles

#: The one look of every figure of the suite: seaborn's theme, applied only while a function of this module builds a
#: figure (``theme()``, ``@themed``), so importing the module leaves the user's matplotlib settings as they are.
THEME = {"style": "whitegrid", "context": "paper", "font_scale": 1.1}

_F = TypeVar("_F", bound=Callable[..., Any])
_depth = 0  # nesting of themed calls: the outermost one lays its figure out


def theme_rc() -> dict[str, Any]:
    """The matplotlib settings ``sns.set_theme(**THEME)`` sets globally: style, context, font and the "deep" colour
    cycle (seaborn's colour codes for "b", "g", ... are left alone)."""
    return {
        **sns.axes_style(THEME["style"]),
        **sns.plotting_context(THEME["context"], font_scale=THEME["font_scale"]),
        "font.family": ["sans-serif"],
        "axes.prop_cycle": cycler(color=sns.color_palette("deep")),
    }


@contextlib.contextmanager
def theme() -> Iterator[None]:
    """Within the block, matplotlib uses the suite's theme; afterwards every setting is as before."""
    with mpl.rc_context(theme_rc()):
        yield


def _lay_out(result: Any) -> None:
    """Draw the figure of ``result`` (a Figure or a ``(fig, data)`` pair) once without rendering, so that its ticks
    and layout, which matplotlib creates lazily, take the theme's settings before the theme is left."""
    fig = result[0] if isinstance(result, tuple) and result else result
    if isinstance(fig, Figure):
        fig.draw_without_rendering()


def themed(fn: _F) -> _F:
    """Run ``fn`` (a plot function returning a Figure or ``(fig, data)``) under ``theme()``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _depth
        with theme():
            _depth += 1
            try:
                result = fn(*args, **kwargs)
            finally:
                _depth -= 1
            if _depth == 0:
                _lay_out(result)
        return result

    return wrapper  # type: ignore[return-value]

__all__ = [
    "THEME",
    "theme",
    "themed",
    "METHOD_STYLES",
    "BPP_LABELS",
    "metric_label",
    "plot_rd",
    "plot_rd_grid",
    "plot_loss_curves",
    "plot_bit_maps",
    "plot_bd_rate_ci",
    "BitMapScale",
    "plot_dose_response",
    "plot_paired_differences",
    "plot_bd_matrix",
]

#: Legend label and line style of the known methods, from the one table of methods (``icm_helpers.methods``).
METHOD_STYLES: dict[str, dict[str, Any]] = {m.id: m.style() for m in METHODS.values() if m.kind != "reference"}
#: Axis label of each bpp kind.
BPP_LABELS = {"bpp_bitstream": "bpp (bitstream)", "bpp_estimated": "bpp (estimated)"}
#: Axis label of a task metric, with its unit where it has one (mAP and mIoU are fractions in [0, 1]).
METRIC_LABELS = {"PSNR": "PSNR (dB)", "psnr": "PSNR (dB)"}
#: Line style of the curves of training seed 0, 1, ... when a method has several.
SEED_DASHES = ("-", "--", "-.", ":")
BD_RATE_LABEL = "BD-rate (%)"

_RESERVED_KEYS = ("bpp_key", "task", "metric_name")
_REQUIRED_KEYS = ("task", "method", "metric", "metric_name")


def metric_label(name: str) -> str:
    """The axis label of a task metric: its name, with its unit where it has one ("PSNR (dB)")."""
    return METRIC_LABELS.get(name, name)


def reference_name(method: str) -> str:
    """How a BD-rate's reference (anchor) is named in titles: the method's short name ("w/o aux", "JPEG")."""
    return short_name(method)


def _task_records(records: Iterable[Mapping[str, Any]], task: str) -> tuple[list[Mapping[str, Any]], str]:
    records = list(records)
    for i, rec in enumerate(records):
        missing = [k for k in _REQUIRED_KEYS if k not in rec]
        if missing:
            raise ValueError(
                f"record {i} ({dict(rec)}) lacks keys {missing}; every record needs {list(_REQUIRED_KEYS)}"
            )
    selected = [r for r in records if r["task"] == task]
    if not selected:
        tasks = sorted({str(r["task"]) for r in records})
        raise ValueError(f"no records for task {task!r}; available tasks: {tasks}")
    names = sorted({str(r["metric_name"]) for r in selected})
    if len(names) != 1:
        raise ValueError(f"records of task {task!r} mix metrics {names}; plot one metric per task")
    return selected, names[0]


def _method_order(selected: list[Mapping[str, Any]], methods: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(str(r["method"]) for r in selected))
    clash = [m for m in present if m in _RESERVED_KEYS]
    if clash:
        raise ValueError(
            f"method names {clash} clash with the keys {list(_RESERVED_KEYS)} of the plot data; rename them"
        )
    if methods is None:
        return [m for m in METHOD_STYLES if m in present] + [m for m in present if m not in METHOD_STYLES]
    absent = [m for m in methods if m not in present]
    if absent:
        raise ValueError(f"methods {absent} have no records for this task; available: {present}")
    return list(methods)


def _is_number(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float, np.number)) and math.isfinite(value)


def _method_points(selected: list[Mapping[str, Any]], method: str, bpp_key: str) -> dict[str, list]:
    """``{"bpp", "metric", "lambda_"}`` of one method, sorted by bpp; points without a bpp dropped."""
    recs = [r for r in selected if r["method"] == method]
    usable = [r for r in recs if _is_number(r.get(bpp_key)) and _is_number(r["metric"])]
    if len(usable) < len(recs):
        warnings.warn(
            f"{len(recs) - len(usable)} record(s) of method {method!r} have no finite {bpp_key!r} or "
            "metric and are left out of the plot",
            stacklevel=4,
        )
    usable.sort(key=lambda r: (float(r[bpp_key]), float(r["metric"])))
    return {
        "bpp": [float(r[bpp_key]) for r in usable],
        "metric": [float(r["metric"]) for r in usable],
        "lambda_": [r.get("lambda_") for r in usable],
    }


def _method_style(method: str, fallback: Iterator[tuple[str, str]]) -> dict[str, Any]:
    if method in METHOD_STYLES:
        return dict(METHOD_STYLES[method])
    color, marker = next(fallback)
    return {"label": method, "color": color, "marker": marker}


def _point_text(method: str, value: Any) -> str:
    """The label of a rate point: its lambda, or the quality setting of a conventional anchor (JPEG's q)."""
    symbol = "q" if method in METHODS and METHODS[method].kind == "anchor" else "λ"
    return f"{symbol}={value:g}" if _is_number(value) else f"{symbol}={value}"


def _seed_handles(seeds: Sequence[Any]) -> dict[str, Line2D]:
    """Legend entries of the seeds' dashes (grey, no marker)."""
    return {f"seed {s}": Line2D([], [], color="gray", linestyle=SEED_DASHES[k % len(SEED_DASHES)])
            for k, s in enumerate(seeds)}


def _legend_handle(style: Mapping[str, Any], linestyle: str) -> Line2D:
    """A legend entry drawn like a method's curve (colour, marker, dash) without its data."""
    return Line2D([], [], linestyle=linestyle, **{k: v for k, v in style.items() if k != "label"})


def _rd_panel(ax: Axes, records: list[Mapping[str, Any]], task: str, bpp_key: str, methods: Sequence[str] | None,
              title: str | None) -> tuple[dict[str, Any], list[PointLabel], dict[str, Any]]:
    """Draw one R-D panel: ``(data, point labels to place, legend handles)``; legend handles: one per method (its
    first curve, named by its label) and, when a method has several seeds, one grey dash per seed."""
    selected, metric_name = _task_records(records, task)
    data: dict[str, Any] = {}
    labels: list[PointLabel] = []
    handles: dict[str, Any] = {}
    fallback = zip(itertools.cycle(["tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]),
                   itertools.cycle("DvP<>Xph"))
    for method in _method_order(selected, methods):
        seeds = sorted({r.get("seed") for r in selected if r["method"] == method}, key=lambda s: (s is None, s))
        style = _method_style(method, fallback)
        base_linestyle = style.pop("linestyle", "-")
        for k, seed in enumerate(seeds):
            seed_records = [r for r in selected if r["method"] != method or r.get("seed") == seed]
            points = _method_points(seed_records, method, bpp_key)
            if not points["bpp"]:
                continue
            dash = base_linestyle if len(seeds) == 1 else SEED_DASHES[k % len(SEED_DASHES)]
            name = method if len(seeds) == 1 else f"{method} (seed {seed})"
            label = style["label"] if len(seeds) == 1 else f"{style['label']} (seed {seed})"
            (line,) = ax.plot(points["bpp"], points["metric"], linestyle=dash if len(points["bpp"]) > 1 else "none",
                              **dict(style, label=label))
            handles.setdefault(style["label"], _legend_handle(style, base_linestyle if len(points["bpp"]) > 1
                                                              else "none"))
            if len(seeds) > 1:
                handles.update({h: v for h, v in _seed_handles(seeds).items() if h not in handles})
            labels += [PointLabel(ax, x, y, _point_text(method, lam), line.get_color())
                       for x, y, lam in zip(points["bpp"], points["metric"], points["lambda_"]) if lam is not None]
            data[name] = points
    ax.margins(x=0.06, y=0.1)  # room for the labels of the points at the edges
    ax.set_xlabel(BPP_LABELS.get(bpp_key, bpp_key))
    ax.set_ylabel(metric_label(metric_name))
    ax.set_title(title if title is not None else task)
    ax.grid(True, alpha=0.3)
    data.update(bpp_key=bpp_key, task=task, metric_name=metric_name)
    return data, labels, _seeds_last(handles)


def _seeds_last(handles: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in handles.items() if not k.startswith("seed ")},
            **{k: v for k, v in handles.items() if k.startswith("seed ")}}


@themed
def plot_rd(
    records: Iterable[Mapping[str, Any]],
    task: str,
    bpp_key: str = "bpp_bitstream",
    methods: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> tuple[Figure, dict[str, Any]]:
    """Task metric versus bpp for ``task``: one line with markers per method, sorted by bpp.

    Single-point methods (e.g. ``"start"``) are drawn as a marker only. Records of several training seeds
    (``seed``) of one method are drawn as one curve per seed (same colour, one dash per seed, ``data`` key
    ``"<method> (seed <s>)"``). ``methods`` selects and orders the curves (default: the known methods of
    :data:`METHOD_STYLES` first, then the others in order of appearance). Records whose ``bpp_key`` or metric is
    missing / non-finite are left out with a warning. The legend sits outside the axes, right; each point is labelled
    with its ``lambda_`` (an anchor's quality) where the label covers no data.

    Returns:
        ``(fig, data)`` with ``data = {method: {"bpp": [...], "metric": [...], "lambda_": [...]},
        "bpp_key": ..., "task": ..., "metric_name": ...}``.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.2, 3.8), layout="constrained")
    data, labels, handles = _rd_panel(ax, list(records), task, bpp_key, methods, title)
    legend_right(ax, handles)
    place_point_labels(fig, labels)
    return fig, data


def _bd_note_lines(rows: Sequence[Mapping[str, Any]], task: str, bpp_key: str, reference: str) -> list[str]:
    """The BD-rates of ``task`` against ``reference`` for one bpp kind, one line per method ("pooled over seeds"
    rows only, when the rows have them)."""
    chosen = [r for r in rows if r["task"] == task and r["anchor"] == reference and bpp_key in r]
    pooled = [r for r in chosen if r.get("seed") == "pooled"]
    return [f"{METHOD_STYLES.get(r['method'], {}).get('label', r['method'])}: "
            f"{format_ci(r[bpp_key]).split(' (')[0] if 'bd_rate' in r[bpp_key] else format_ci(r[bpp_key])}"
            for r in pooled or chosen]


def _bd_note(rows: Sequence[Mapping[str, Any]], task: str, bpp_key: str, reference: str) -> str | None:
    lines = _bd_note_lines(rows, task, bpp_key, reference)
    if not lines:
        return None
    pooled = any(r.get("seed") == "pooled" for r in rows if r["task"] == task and r["anchor"] == reference)
    head = f"{BD_RATE_LABEL} vs {reference_name(reference)} [95% CI]" + (", pooled over seeds" if pooled else "")
    return "\n".join([head, *lines])


@themed
def plot_rd_grid(
    records: Iterable[Mapping[str, Any]],
    tasks: Sequence[str],
    bpp_keys: Sequence[str] = ("bpp_estimated", "bpp_bitstream"),
    methods: Sequence[str] | None = None,
    bd_rows: Sequence[Mapping[str, Any]] | None = None,
    bd_reference: str = "baseline",
) -> tuple[Figure, dict[str, Any]]:
    """One R-D panel (see :func:`plot_rd`) per (task, bpp kind): a row per task, a column per bpp kind, one legend
    for the figure on its right. ``bd_rows`` (``Experiment.bd_rate_table`` rows): the BD-rates against
    ``bd_reference`` (one reference; default w/o aux) written under each panel, pooled over seeds when pooled rows
    exist (the other rows: :func:`plot_bd_rate_ci`).

    Returns:
        ``(fig, data)`` with ``data[task][bpp_key]`` = the ``data`` of that panel and, with ``bd_rows``,
        ``data["bd_rates"][panel title]`` = the lines written under it and ``data["bd_reference"]``.
    """
    if not tasks or not bpp_keys:
        raise ValueError(f"need at least one task and one bpp key, got tasks={list(tasks)}, bpp_keys={list(bpp_keys)}")
    records = list(records)
    fig, axes = plt.subplots(len(tasks), len(bpp_keys), figsize=(4.6 * len(bpp_keys) + 2.4, 3.7 * len(tasks)),
                             squeeze=False, layout="constrained")
    data: dict[str, Any] = {}
    labels: list[PointLabel] = []
    handles: dict[str, Any] = {}
    notes: dict[str, list[str]] = {}
    for row, task in zip(axes, tasks):
        for ax, key in zip(row, bpp_keys):
            title = f"{task} — {BPP_LABELS.get(key, key)}"
            data.setdefault(task, {})[key], panel_labels, panel_handles = _rd_panel(ax, records, task, key, methods,
                                                                                    title)
            labels += panel_labels
            handles.update({k: v for k, v in panel_handles.items() if k not in handles})
            note = _bd_note(bd_rows or [], task, key, bd_reference)
            if note:
                note_below(ax, note)
                notes[title] = note.split("\n")[1:]
    figure_legend(fig, _seeds_last(handles))
    if bd_rows is not None:
        data.update(bd_rates=notes, bd_reference=bd_reference)
    place_point_labels(fig, labels)
    return fig, data


@themed
def plot_loss_curves(
    curves: Mapping[str, Sequence[float]],
    ylabel: str = "validation main loss (Eq. 4)",
    xlabel: str = "epoch",
    title: str | None = None,
    first_x: int = 1,
) -> tuple[Figure, dict[str, Any]]:
    """One line per named loss curve (x = first_x, first_x + 1, ...), e.g. the branch-position ablation
    (Figs. 8-9; ``first_x=0`` when the curves start with the value before training).

    Returns:
        ``(fig, data)`` with ``data = {"xlabel", "ylabel", "title", "curves": {name: {"x": [...], "y": [...]}}}``;
        the legend sits outside the axes, right.
    """
    if not curves or any(len(v) == 0 for v in curves.values()):
        lengths = {k: len(v) for k, v in curves.items()}
        raise ValueError(f"need at least one non-empty loss curve, got curve lengths {lengths}")
    fig, ax = plt.subplots(figsize=(7.0, 3.8), layout="constrained")
    data: dict[str, Any] = {"xlabel": xlabel, "ylabel": ylabel, "title": title, "curves": {}}
    for name, values in curves.items():
        y = [float(v) for v in values]
        x = list(range(first_x, first_x + len(y)))
        ax.plot(x, y, marker="o" if len(y) <= 30 else None, markersize=3, label=str(name))
        data["curves"][str(name)] = {"x": x, "y": y}
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    legend_right(ax)
    return fig, data


def ci_bounds(entry: Mapping[str, Any]) -> tuple[float, float]:
    """(low, high) of a BD-rate entry; an open bound (``bootstrap``: more undefined resamples than its tail holds,
    stored as null) is -inf / +inf (drawn as no bar on that side, printed as inf)."""
    lo, hi = entry.get("ci_low"), entry.get("ci_high")
    return (-math.inf if lo is None else float(lo)), (math.inf if hi is None else float(hi))


#: the y label of a task's validation main loss: Eq. 4 (detection), Eq. 6 without its auxiliary term (segmentation)
MAIN_LOSS_LABEL = {"detection": "validation main loss (Eq. 4)", "segmentation": "validation main loss (Eq. 6, no aux)"}


@themed
def plot_learning_curves(result: Mapping[str, Any], title: str | None = None) -> tuple[Figure, dict[str, Any]]:
    """Protocol v2, Q1 (Figs. 8-9 at CPU scale): left, the validation main loss of every run against the training
    step (thin: each seed; thick: the mean over seeds; symlog x so step 0 shows); right, the paired differences (same
    seed) of the arms with their 95% t-intervals, zero marked. ``result``: ``mechanism.learning_curves``'s output:
    ``curves`` keyed by each arm's method id (an id of ``icm_helpers.methods``, which gives its colour; another key:
    matplotlib's colour cycle), ``labels`` {id: the arm's legend text} (default: the method's short name).

    Returns ``(fig, data)`` with the curves keyed by label, ``methods`` {label: method id} and the difference rows."""
    curves, diffs = result["curves"], result["differences"]
    if not curves:
        raise ValueError("no learning curves to plot")
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    labels = {arm: (result.get("labels") or {}).get(arm, short_name(arm)) for arm in curves}
    lam = result.get("lambda_")
    title = title or f"{result.get('task', '')}, lambda={lam:g}: Eq. 4 / Eq. 6 without aux"
    data: dict[str, Any] = {"xlabel": "training step", "title": title, "task": result.get("task"), "lambda_": lam,
                            "curves": {}, "differences": list(diffs),
                            "methods": {labels[arm]: arm for arm in curves}}
    for arm, by_seed in curves.items():
        color = method_color(arm)
        for seed, points in by_seed.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, alpha=0.35, linewidth=0.8)
        steps = sorted(set.intersection(*[{p[0] for p in pts} for pts in by_seed.values()]))
        mean = [float(np.mean([dict(pts)[s] for pts in by_seed.values()])) for s in steps]
        ax.plot(steps, mean, color=color, marker="o", markersize=3, linewidth=2,
                label=f"{labels[arm]} (mean of {len(by_seed)} seeds)")
        data["curves"][labels[arm]] = {"steps": steps, "mean": mean, "seeds": {str(k): v for k, v in by_seed.items()}}
    for pair in dict.fromkeys(r["pair"] for r in diffs):
        rows = [r for r in diffs if r["pair"] == pair]
        x = [r["step"] for r in rows]
        y = [r["mean"] for r in rows]
        lo, hi = [r["low"] for r in rows], [r["high"] for r in rows]
        has_ci = all(np.isfinite(lo))
        note = "95% t-CI" if has_ci else "each seed, no CI"
        line = axd.plot(x, y, marker="o", markersize=3, label=f"{pair} ({rows[0]['n']} seeds, {note})")[0]
        if has_ci:
            axd.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        else:  # too few seeds for an interval: the per-seed differences themselves
            for r in rows:
                axd.plot([r["step"]] * len(r["values"]), r["values"], linestyle="none", marker="x", markersize=4,
                         color=line.get_color(), alpha=0.7)
    axd.axhline(0.0, color="black", linewidth=0.8)
    steps = sorted({p[0] for by_seed in curves.values() for pts in by_seed.values() for p in pts})
    main_loss = MAIN_LOSS_LABEL.get(result.get("task"), "validation main loss")
    for a, ylabel in ((ax, main_loss), (axd, "paired difference of the main loss")):
        a.set_xscale("symlog", linthresh=10)
        ticks = _spread_ticks(steps, a.xaxis.get_transform())
        a.set_xticks(ticks, [str(t) for t in ticks])
        a.minorticks_off()
        a.set_xlabel("training step (symlog)")
        a.set_ylabel(ylabel)
        a.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    axd.set_title("paired by seed: first arm minus second", fontsize=10)
    figure_legend(fig, unique_handles([ax, axd]), where="lower center", ncols=2)
    return fig, data


def _spread_ticks(values: Sequence[float], transform: Any, min_gap: float = 0.07) -> list[float]:
    """The values to label on an axis, in order, each at least ``min_gap`` of the axis's transformed span from the
    one before (the last value is always kept), so that their labels do not run into each other."""
    values = sorted(values)
    if len(values) < 3:
        return values
    pos = transform.transform(np.asarray(values, float))
    gap = min_gap * (pos[-1] - pos[0])
    kept = [0]
    for i in range(1, len(values)):
        if pos[i] - pos[kept[-1]] >= gap:
            kept.append(i)
    if kept[-1] != len(values) - 1:
        kept[-1] = len(values) - 1
    return [values[i] for i in kept]


@themed
def plot_cosines(summary: Sequence[Mapping[str, Any]], title: str | None = None,
                 highlight: str = "aux_enc_warm") -> tuple[Figure, dict[str, Any]]:
    """Protocol v2, Q2: the mean cosine between the auxiliary and the main gradient on g_a per (codec, branch) with
    its 95% t-interval, zero marked. ``summary``: ``mechanism.summarise_cosines``'s rows; a row whose first method id
    (``methods``) is ``highlight`` (the competent branch, or a difference from it) is red, the others gray."""
    if not summary:
        raise ValueError("no cosines to plot")
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(summary) + 1.2), layout="constrained")
    labels = [f"{r['codec']}: {r['branch']}" for r in summary]
    title = title or "gradient alignment of the auxiliary term"
    y = np.arange(len(summary))[::-1]
    for yi, r in zip(y, summary):
        err = None if not np.isfinite(r["low"]) else [[r["mean"] - r["low"]], [r["high"] - r["mean"]]]
        ax.errorbar(r["mean"], yi, xerr=err, fmt="o", color="tab:red" if r["methods"][0] == highlight else "tab:gray",
                    capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # few enough for their labels to stay apart
    ax.set_xlabel("cos(G_aux, G_main) on g_a (95% t-CI)")
    ax.set_ylabel("codec: auxiliary branch")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title)
    return fig, {"title": title, "rows": [dict(r) for r in summary]}


def _stats(values: np.ndarray) -> dict[str, Any]:
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
            "sum": float(values.sum()), "shape": list(values.shape)}


def _check_bit_row(i: int, row: Mapping[str, Any]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray | None]:
    image = np.asarray(row.get("image"), dtype=float)
    if image.ndim != 3 or image.shape[2] != 3 or not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
        raise ValueError(f"rows[{i}]['image'] must be an HxWx3 float array in [0, 1], got shape {image.shape}; "
                         "convert with img.astype(float) / 255 or np.clip(img, 0, 1)")
    maps = [np.asarray(m, dtype=float) for m in row.get("maps") or []]
    diff = None if row.get("diff") is None else np.asarray(row["diff"], dtype=float)
    arrays = maps + ([diff] if diff is not None else [])
    if not maps or any(a.ndim != 2 or a.shape != maps[0].shape or not np.all(np.isfinite(a)) for a in arrays):
        raise ValueError(f"rows[{i}] needs a non-empty 'maps' list of finite HxW arrays of one shape (and 'diff' of "
                         f"the same shape), got shapes {[a.shape for a in arrays]}")
    return image, maps, diff


@dataclass(frozen=True)
class BitMapScale:
    """THE colour rules of bit-allocation maps, shared by :func:`plot_bit_maps` and the comparer
    (``icm_helpers.explorer``): the maps shown together (a figure row, the comparer's two runs) on ONE scale from
    ``min(0, smallest value)`` to the largest value (one unit wide when all are equal), in ``cmap``; their difference
    on a scale symmetric around zero (``±max|diff|``, ``±1`` when it is zero everywhere) in the diverging
    ``diff_cmap`` (red = more bits in the later map); every panel labelled with its mean in bits per pixel."""

    clim: tuple[float, float]
    diff_clim: tuple[float, float] | None = None
    cmap: str = "viridis"
    diff_cmap: str = "RdBu_r"

    @classmethod
    def of(cls, maps: Sequence[np.ndarray], diff: np.ndarray | None = None, cmap: str = "viridis",
           diff_cmap: str = "RdBu_r") -> "BitMapScale":
        vmin = min(0.0, min(float(np.min(m)) for m in maps))
        vmax = max(float(np.max(m)) for m in maps)
        vmax = vmax if vmax > vmin else vmin + 1.0
        lim = None if diff is None else (float(np.abs(diff).max()) or 1.0)
        return cls((vmin, vmax), None if lim is None else (-lim, lim), cmap, diff_cmap)

    def draw_map(self, ax: Axes, values: np.ndarray, alpha: float = 1.0):
        """``values`` (bits/pixel) on the shared scale; the returned image feeds :meth:`colorbar`."""
        return ax.imshow(values, cmap=self.cmap, vmin=self.clim[0], vmax=self.clim[1], alpha=float(alpha),
                         interpolation="nearest")

    def draw_diff(self, ax: Axes, diff: np.ndarray, alpha: float = 1.0):
        if self.diff_clim is None:
            raise ValueError("this scale has no difference: build it with BitMapScale.of(maps, diff)")
        return ax.imshow(diff, cmap=self.diff_cmap, vmin=self.diff_clim[0], vmax=self.diff_clim[1],
                         alpha=float(alpha), interpolation="nearest")

    @staticmethod
    def colorbar(fig: Figure, image, axes, label: str = "bits/pixel"):
        return fig.colorbar(image, ax=axes, label=label, shrink=0.85)

    @staticmethod
    def bpp_label(values: np.ndarray | float, signed: bool = False) -> str:
        """A panel's label: the mean of its map in bits per pixel (signed, 4 decimals, for a difference)."""
        mean = float(np.mean(values))
        return f"mean {mean:+.4f} bpp" if signed else f"mean {mean:.3f} bpp"

    def as_dict(self) -> dict[str, Any]:
        """The numbers of the scale for a figure's JSON."""
        return {"clim": list(self.clim), "diff_clim": None if self.diff_clim is None else list(self.diff_clim),
                "cmap": self.cmap, "diff_cmap": self.diff_cmap}


@themed
def plot_bit_maps(
    rows: Sequence[Mapping[str, Any]],
    titles: Sequence[str],
    row_labels: Sequence[str] | None = None,
    cmap: str = "viridis",
    diff_cmap: str = "RdBu_r",
    panel_size: float = 2.6,
) -> tuple[Figure, dict[str, Any]]:
    """Input images next to their bit-allocation maps (bits per pixel), one row per image.

    Each row dict has ``"image"`` (HxWx3 float in [0, 1]), ``"maps"`` (HxW bits-per-pixel arrays) and optionally
    ``"diff"`` (w/ aux minus w/o aux), drawn by the colour rules of :class:`BitMapScale`: the maps of a row on ONE
    scale with a shared colourbar labelled "bits/pixel", the difference on a diverging scale symmetric around zero
    (red = more bits with aux), every panel labelled with its mean bpp. All rows must have the same panels;
    ``titles`` names the columns, e.g. ``["input", "start codec", "w/o aux", "w/ aux", "difference (w/ − w/o)"]``.

    Returns:
        ``(fig, data)``; ``data["rows"][i]`` holds ``clim``, ``diff_clim`` and per-panel summary
        stats (``mean``/``min``/``max`` bits per pixel, ``sum`` = total bits, ``shape``), not arrays.
    """
    n_maps, has_diff, checked = _check_bit_rows(rows, titles, row_labels)
    ncols = 1 + n_maps + has_diff
    fig, axes = plt.subplots(len(rows), ncols, squeeze=False, layout="constrained",
                             figsize=(panel_size * ncols + 1.0 + has_diff, panel_size * len(rows)))
    data: dict[str, Any] = {"titles": list(titles), "rows": []}
    for r, (image, maps, diff) in enumerate(checked):
        ax_row = axes[r]
        scale = BitMapScale.of(maps, diff, cmap, diff_cmap)
        ax_row[0].imshow(image)
        panels = [{"title": titles[0], "kind": "image", "shape": list(image.shape)}]
        for ax, values, title in zip(ax_row[1:], maps, titles[1:]):
            im = scale.draw_map(ax, values)
            panels.append({"title": title, "kind": "bits", **_stats(values)})
            ax.set_xlabel(scale.bpp_label(values), fontsize=8)
        scale.colorbar(fig, im, list(ax_row[1:1 + n_maps]))
        if diff is not None:
            scale.colorbar(fig, scale.draw_diff(ax_row[-1], diff), ax_row[-1], label="Δ bits/pixel")
            ax_row[-1].set_xlabel(scale.bpp_label(diff, signed=True), fontsize=8)
            panels.append({"title": titles[-1], "kind": "diff", **_stats(diff)})
        for ax, title in zip(ax_row, titles):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        if row_labels:
            ax_row[0].set_ylabel(row_labels[r])
        data["rows"].append({"label": row_labels[r] if row_labels else None, "clim": list(scale.clim),
                             "diff_clim": None if scale.diff_clim is None else list(scale.diff_clim),
                             "panels": panels})
    return fig, data


def _check_bit_rows(rows: Sequence[Mapping[str, Any]], titles: Sequence[str], row_labels: Sequence[str] | None
                    ) -> tuple[int, bool, list[tuple[np.ndarray, list[np.ndarray], np.ndarray | None]]]:
    """(maps per row, whether rows have a difference, the checked rows) of :func:`plot_bit_maps`'s input."""
    if not rows:
        raise ValueError("plot_bit_maps needs at least one row")
    checked = [_check_bit_row(i, r) for i, r in enumerate(rows)]
    layouts = {(len(maps), diff is not None) for _, maps, diff in checked}
    if len(layouts) != 1:
        raise ValueError(f"all rows need the same number of maps and all or none a 'diff', got {sorted(layouts)}")
    n_maps, has_diff = layouts.pop()
    ncols = 1 + n_maps + has_diff
    if len(titles) != ncols:
        raise ValueError(f"got {len(titles)} titles for {ncols} columns (input, {n_maps} map(s)"
                         f"{', diff' if has_diff else ''}); pass one title per column")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"got {len(row_labels)} row_labels for {len(rows)} rows")
    return n_maps, has_diff, checked


def _class_name(class_names: Mapping[int, str] | Sequence[str] | None, label: int) -> str:
    """The name of class ``label``: ``class_names[label]`` of a mapping (ids, 0 the background: COCO-format splits)
    or of a sequence (contiguous labels from 0: MMSeg's Pascal-Context), else "class <label>"."""
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, f"class {label}"))
    if class_names is not None and 0 <= label < len(class_names):
        return str(class_names[label])
    return f"class {label}"


def _class_colors(ids: Iterable[int]) -> dict[int, tuple[float, float, float]]:
    """One colour per class present (boxes and label map alike): tab10, or tab20 beyond 10 classes."""
    ids = sorted(set(ids))
    palette = sns.color_palette("tab10" if len(ids) <= 10 else "tab20")
    return {c: tuple(palette[i % len(palette)]) for i, c in enumerate(ids)}


BACKGROUND_RGB = (0.88, 0.88, 0.88)


def _label_map_rgb(semantic: np.ndarray, colors: Mapping[int, Sequence[float]]) -> np.ndarray:
    """An RGB picture of a label map: classes their colour, ignored pixels (255) white, the rest (the background)
    light grey."""
    rgb = np.empty((*semantic.shape, 3))
    rgb[:] = BACKGROUND_RGB
    rgb[semantic == 255] = 1.0
    for c, color in colors.items():
        rgb[semantic == c] = color
    return rgb


def _draw_boxes(ax: Axes, boxes: Sequence[Sequence[float]], labels: Sequence[int], names: Mapping[int, str],
                colors: Mapping[int, Sequence[float]]) -> list[PointLabel]:
    """The boxes, each in its class's colour; returns their name tags, to be placed where they do not overlap."""
    tags = []
    for (x0, y0, x1, y1), lab in zip(boxes, labels):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colors[lab], lw=1.5))
        tag_box = {"facecolor": colors[lab], "alpha": 0.85, "pad": 0.6, "edgecolor": "none"}
        tags.append(PointLabel(ax, x0, y0, names[lab], "white", (("bbox", tag_box),)))
    return tags


@themed
def plot_samples(dataset, n: int = 4, class_names: Mapping[int, str] | Sequence[str] | None = None
                 ) -> tuple[Figure, dict[str, Any]]:
    """First ``n`` images of a split with their ground truth: boxes named by class on the image (top row) and the
    semantic label map (bottom row, when the split has one), one colour per class in both rows and a legend of the
    classes beside the figure. ``class_names``: id -> name (a mapping; label 0 is the background), or the names of
    labels 0, 1, ... (a sequence; every label is a class); default the split's own ``class_names``."""
    n = min(n, len(dataset))
    items = [dataset[i] for i in range(n)]
    class_names = class_names if class_names is not None else getattr(dataset, "class_names", None)
    has_sem = all("semantic" in it for it in items)
    background = None if isinstance(class_names, Sequence) and not isinstance(class_names, str) else 0
    ids = {int(v) for it in items for v in it["labels"].tolist()} if all("labels" in it for it in items) else set()
    if has_sem:
        ids |= {int(v) for it in items for v in np.unique(it["semantic"].numpy()) if v not in (background, 255)}
    colors = _class_colors(ids)
    names = {c: _class_name(class_names, c) for c in colors}
    fig, axes = plt.subplots(2 if has_sem else 1, n, figsize=(2.4 * n + 1.4, 4.9 if has_sem else 2.5), squeeze=False,
                             layout="constrained")
    data: dict[str, Any] = {"images": [], "class_names": {str(c): name for c, name in names.items()}}
    tags: list[PointLabel] = []
    for j, it in enumerate(items):
        ax = axes[0, j]
        ax.imshow(it["image"].permute(1, 2, 0).numpy())
        boxes, labels = (it["boxes"].tolist(), it["labels"].tolist()) if "boxes" in it else ([], [])
        tags += _draw_boxes(ax, boxes, labels, names, colors)
        ax.set_title(f"image {it['image_id']}", fontsize=8)
        data["images"].append({"image_id": it["image_id"], "boxes": boxes, "labels": labels,
                               "names": [names[lab] for lab in labels]})
        if has_sem:
            axes[1, j].imshow(_label_map_rgb(it["semantic"].numpy(), colors), interpolation="nearest")
            axes[1, j].set_title("semantic labels", fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    handles = {names[c]: Patch(color=colors[c]) for c in colors}
    if has_sem and background is not None:
        handles["background"] = Patch(facecolor=BACKGROUND_RGB, edgecolor="gray")
    figure_legend(fig, handles)
    place_point_labels(fig, tags)
    return fig, data


@themed
def plot_roi_fractions(summary: Sequence[Mapping[str, Any]], title: str | None = None) -> tuple[Figure, dict[str, Any]]:
    """Share of the bits inside the object masks vs lambda (notebook 06), from
    :func:`icm_helpers.bitmaps.roi_fraction_table`'s ``summary``. Left: one line with 95% CI error bars per
    group (e.g. "w/o aux", "w/ aux"), in the colour of its entries' ``method`` (an id of
    :data:`icm_helpers.methods.METHODS`; no method: the next colour of the cycle); models without a lambda (the
    start codec) are dashed horizontal lines, and the mean mask area (the share bits would have if spread evenly
    over the pixels) is a dotted grey line. Right (when entries have a paired difference ``delta_inside``): that
    per-image paired difference (e.g. w/ aux minus w/o aux at the same lambda) with its 95% CI, named by the two
    groups (the entry's ``group`` and ``paired_group``); above zero = more of the bits on the objects.

    Returns:
        ``(fig, data)`` with ``data["groups"][group] = {"lambda", "mean", "ci_low", "ci_high", "n"}`` (plus
        ``method`` when the entries have one), ``data["constant"][label]`` (mean, ci), ``data["mask_area"]`` and
        ``data["paired"][group]`` (same keys as groups, plus ``paired_with``, the labels, and ``paired_group``).
    """
    if not summary:
        raise ValueError("plot_roi_fractions needs at least one summary entry")
    has_pairs = any(s.get("delta_inside") for s in summary)
    fig, axes = plt.subplots(
        1, 1 + has_pairs, figsize=(5.0 * (1 + has_pairs) + 2.4, 3.8), layout="constrained", squeeze=False
    )
    ax = axes[0, 0]
    data: dict[str, Any] = {"title": title, "groups": {}, "constant": {}, "mask_area": None, "paired": {}}
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for s in summary:
        if s.get("lambda_") is None:
            data["constant"][str(s["label"])] = {k: s["inside"][k] for k in ("mean", "ci_low", "ci_high", "n")}
        else:
            groups.setdefault(str(s.get("group", s["label"])), []).append(s)
    colors = {name: method_color(_group_method(entries)) for name, entries in groups.items()}
    for name, entries in groups.items():
        entries = sorted(entries, key=lambda e: float(e["lambda_"]))
        lam = [float(e["lambda_"]) for e in entries]
        mean = np.array([e["inside"]["mean"] for e in entries], dtype=float)
        lo = np.array([e["inside"]["ci_low"] for e in entries], dtype=float)
        hi = np.array([e["inside"]["ci_high"] for e in entries], dtype=float)
        yerr = np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)])
        ax.errorbar(lam, mean, yerr=yerr, marker="o", capsize=3, label=name, color=colors[name])
        data["groups"][name] = {"lambda": lam, "mean": mean.tolist(), "ci_low": lo.tolist(), "ci_high": hi.tolist(),
                                "n": [e["inside"]["n"] for e in entries]}
        if _group_method(entries) is not None:
            data["groups"][name]["method"] = _group_method(entries)
    for label, c in data["constant"].items():
        ax.axhline(c["mean"], color="black", ls="--", lw=1, label=label)
    areas = [float(s["area"]) for s in summary if s.get("area") is not None and math.isfinite(float(s["area"]))]
    if areas:
        data["mask_area"] = float(np.mean(areas))
        ax.axhline(data["mask_area"], color="gray", ls=":", lw=1, label="object area (even spread)")
    ticks = sorted({lam for g in data["groups"].values() for lam in g["lambda"]})
    if has_pairs:
        pax = axes[0, 1]
        for name, entries in groups.items():
            entries = sorted((e for e in entries if e.get("delta_inside")), key=lambda e: float(e["lambda_"]))
            if not entries:
                continue
            lam = [float(e["lambda_"]) for e in entries]
            d = [e["delta_inside"] for e in entries]
            mean = np.array([x["mean"] for x in d], dtype=float)
            lo, hi = np.array([x["ci_low"] for x in d], dtype=float), np.array([x["ci_high"] for x in d], dtype=float)
            pax.errorbar(
                lam,
                mean,
                yerr=np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)]),
                marker="o",
                capsize=3,
                color=colors.get(name),
                label=f"{name} − {entries[0]['paired_group']}" if entries[0].get("paired_group") else name,
            )
            data["paired"][name] = {"lambda": lam, "mean": mean.tolist(), "ci_low": lo.tolist(), "ci_high": hi.tolist(),
                                    "n": [x["n"] for x in d], "paired_with": [e.get("paired_with") for e in entries],
                                    "paired_group": entries[0].get("paired_group")}
        pax.axhline(0.0, color="black", lw=0.8)
        pax.set_ylabel("Δ share inside (paired, per image)")
        pax.set_title("paired difference, 95% CI", fontsize=10)
    for a in axes[0]:
        if ticks:
            a.set_xscale("log", base=2)
            a.set_xticks(ticks, [f"{t:g}" for t in ticks])
            a.minorticks_off()
            a.set_xlabel("λ")
        a.grid(True, alpha=0.3)
    ax.set_ylabel("share of bits inside object masks")
    if title:
        ax.set_title(title, fontsize=10)
    figure_legend(fig, unique_handles(axes[0]))
    return fig, data


def _group_method(entries: Sequence[Mapping[str, Any]]) -> str | None:
    """The method id of a group of :func:`plot_roi_fractions` (its entries' ``method``; None when they have none or
    several)."""
    methods = {e.get("method") for e in entries}
    return methods.pop() if len(methods) == 1 else None


def _bd_row_label(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """A BD-rate row's method label, with its training seed ("seed 1", "pooled over seeds") when rows of several
    seeds are shown."""
    label = METHOD_STYLES.get(row["method"], {}).get("label", row["method"])
    if len({r.get("seed") for r in rows}) <= 1 or row.get("seed") is None:
        return label
    return f"{label}, pooled over seeds" if row["seed"] == "pooled" else f"{label}, seed {row['seed']}"


def _has_bd_rate(row: Mapping[str, Any], key: str) -> bool:
    return "bd_rate" in (row.get(key) or {})


def _missing_reason(row: Mapping[str, Any], key: str) -> str:
    entry = row.get(key)
    return "not computed" if not entry else format_ci(entry).removeprefix("n/a (").removesuffix(")")


def _not_drawn_note(rows: Sequence[Mapping[str, Any]], bpp_keys: Sequence[str]) -> list[str]:
    """One line per (reference, bpp kind, reason) of the rows without a BD-rate: they are not drawn."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for key in bpp_keys:
        for r in rows:
            if not _has_bd_rate(r, key):
                groups.setdefault((r["anchor"], key, _missing_reason(r, key)), []).append(
                    f"{r['task']}: {_bd_row_label(r, rows)}")
    return [f"vs {reference_name(anchor)}, {BPP_LABELS.get(key, key)}: {reason} "
            f"({len(names)} row{'s' if len(names) > 1 else ''}{': ' + '; '.join(names) if len(names) <= 2 else ''})"
            for (anchor, key, reason), names in groups.items()]


def _draw_interval(ax: Axes, y: float, entry: Mapping[str, Any], color: str) -> None:
    """A BD-rate at row ``y``: its interval as its own segment (a BCa interval need not contain the point estimate,
    and an open bound draws no cap on its side), and the point."""
    lo, hi = ci_bounds(entry)
    ends = [v for v in (lo, hi) if np.isfinite(v)]
    if ends:
        ax.hlines(y, min(ends + [entry["bd_rate"]]) if np.isfinite(lo) else entry["bd_rate"],
                  max(ends + [entry["bd_rate"]]) if np.isfinite(hi) else entry["bd_rate"], color=color)
        ax.plot(ends, [y] * len(ends), linestyle="none", marker="|", markersize=8, color=color)
    ax.plot(entry["bd_rate"], y, marker="o", color=color)


def _bd_panel(ax: Axes, rows: Sequence[Mapping[str, Any]], labels: Sequence[str], key: str, anchor: str) -> list[str]:
    """One panel of one reference and bpp kind: a row per BD-rate, its value and CI written right of the axes.
    Returns the labels of the rows drawn."""
    drawn = []
    for y, (r, label) in enumerate(zip(rows, labels)):
        if not _has_bd_rate(r, key):
            continue
        entry = r[key]
        _draw_interval(ax, y, entry, METHOD_STYLES.get(r["method"], {}).get("color", "k"))
        lo, hi = ci_bounds(entry)
        ax.annotate(f"{entry['bd_rate']:.1f} [{lo:.1f}, {hi:.1f}]", xy=(1.0, y), xycoords=("axes fraction", "data"),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
        drawn.append(label)
    ax.axvline(0, color="gray", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), labels)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(BD_RATE_LABEL)
    ax.set_title(f"vs {reference_name(anchor)}: {BPP_LABELS.get(key, key)}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return drawn


@themed
def plot_bd_rate_ci(rows: Sequence[Mapping[str, Any]], bpp_keys: Sequence[str] = ("bpp_bitstream", "bpp_estimated"),
                    title: str | None = None) -> tuple[Figure, dict[str, Any]]:
    """BD-rate point estimates with their bootstrap CIs (``Experiment.bd_rate_table`` rows), one reference per chart:
    a chart (a row of panels) per reference ("anchor": w/o aux, JPEG, ...), a panel per bpp kind that has BD-rates
    against it, one horizontal bar per (task, method, seed) with its value and CI written right of the panel; a
    dashed line at 0 (left of it = fewer bits than the reference). Rows without a BD-rate ("n/a") are not drawn:
    a note under the charts lists them with the reason.

    Returns:
        ``(fig, data)`` with ``data = {"title", "rows" (the input rows), "charts": [{"anchor", "bpp_key",
        "labels" (the rows drawn)}], "not_drawn": [note lines]}``.
    """
    rows = [dict(r) for r in rows]
    anchors = list(dict.fromkeys(r["anchor"] for r in rows))
    charts = {a: [k for k in bpp_keys if any(_has_bd_rate(r, k) for r in rows if r["anchor"] == a)] for a in anchors}
    charts = {a: keys for a, keys in charts.items() if keys}
    not_drawn = _not_drawn_note(rows, bpp_keys)
    sizes = [sum(any(_has_bd_rate(r, k) for k in keys) for r in rows if r["anchor"] == a) for a, keys in charts.items()]
    ncols = max([len(k) for k in charts.values()], default=1)
    fig = plt.figure(figsize=(4.2 * ncols + 3.6, sum(0.32 * n + 1.2 for n in sizes) + 0.16 * len(not_drawn) + 0.8),
                     layout="constrained")
    data: dict[str, Any] = {"title": title, "rows": rows, "charts": [], "not_drawn": not_drawn}
    subfigs = np.atleast_1d(fig.subfigures(max(1, len(charts)), 1, height_ratios=[n + 3 for n in sizes] or None))
    for subfig, (anchor, keys) in zip(subfigs, charts.items()):
        chart_rows = [r for r in rows if r["anchor"] == anchor and any(_has_bd_rate(r, k) for k in keys)]
        labels = [f"{r['task']}: {_bd_row_label(r, chart_rows)}" for r in chart_rows]
        for ax, key in zip(subfig.subplots(1, len(keys), sharey=True, squeeze=False)[0], keys):
            drawn = _bd_panel(ax, chart_rows, labels, key, anchor)
            data["charts"].append({"anchor": anchor, "bpp_key": key, "labels": drawn})
            ax.set_ylabel("task: method" if ax is subfig.axes[0] else "")
    if not charts:
        fig.text(0.5, 0.5, "no BD-rate to draw", ha="center")
    if not_drawn:
        fig.supxlabel("Not drawn (no BD-rate):\n" + "\n".join(not_drawn), fontsize=7, ha="left", x=0.01)
    fig.suptitle((title + "\n" if title else "") + "95% paired-bootstrap CIs; left of 0: fewer bits than the reference",
                 fontsize=10)
    return fig, data


@themed
def plot_dose_response(curves: Mapping[str, Mapping[str, Sequence[tuple[float, Mapping[str, Any]]]]],
                       bpp_key: str = "bpp_bitstream", title: str | None = None) -> tuple[Figure, dict[str, Any]]:
    """BD-rate against the training budget: ``curves[task][method]`` = [(budget fraction, BD-rate entry with
    "bd_rate", "ci_low", "ci_high"), ...]; one panel per task, one line per method with its CI as a band, a dashed
    line at 0 (below = fewer bits than the anchor at the same accuracy)."""
    tasks = list(curves)
    if not tasks:
        raise ValueError("no dose-response curves to plot")
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks) + 2.2, 3.8), squeeze=False,
                             layout="constrained")
    data: dict[str, Any] = {"bpp_key": bpp_key, "title": title, "tasks": {}}
    for ax, task in zip(axes[0], tasks):
        data["tasks"][task] = {}
        for method, points in curves[task].items():
            pts = sorted((float(f), e) for f, e in points if "bd_rate" in e)
            if not pts:
                continue
            x = [f for f, _ in pts]
            y = [float(e["bd_rate"]) for _, e in pts]
            lo, hi = ([ci_bounds(e)[k] for _, e in pts] for k in (0, 1))
            style = METHOD_STYLES.get(method, {"label": method, "color": "tab:gray", "marker": "o"})
            ax.plot(x, y, marker=style["marker"], color=style["color"], label=style["label"])
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15)
            data["tasks"][task][method] = {"budget": x, "bd_rate": y, "ci_low": lo, "ci_high": hi}
        ax.axhline(0, color="gray", ls="--", lw=1)
        ax.set_xlabel("fraction of the training budget")
        ax.set_ylabel(f"{BD_RATE_LABEL} vs w/o aux")
        ax.set_title(f"{task} — {BPP_LABELS.get(bpp_key, bpp_key)}", fontsize=10)
        ax.grid(True, alpha=0.3)
    figure_legend(fig, unique_handles(axes[0]))
    if title:
        fig.suptitle(title)
    return fig, data


def paired_differences(test: Sequence[Mapping[str, Any]], anchor: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-image differences test - anchor of two methods' records at the same lambdas (the same test images): one
    row per (lambda, image) with d_bpp_bitstream, d_bpp_estimated, d_psnr and, for segmentation, d_iou (the image's
    mean IoU over the classes present in it, from the per-image intersections / unions)."""
    by_lambda = {r["lambda_"]: r for r in anchor}
    rows = []
    for rec in test:
        ref = by_lambda.get(rec["lambda_"])
        if ref is None:
            continue
        for a, b in zip(rec["per_image"], ref["per_image"]):
            if a["image_id"] != b["image_id"]:
                raise ValueError(
                    f"lambda {rec['lambda_']}: the two records list other test images; evaluate both on one split"
                )
            row = {"lambda_": rec["lambda_"], "image_id": a["image_id"]}
            for key in ("bpp_bitstream", "bpp_estimated", "psnr"):
                if a.get(key) is not None and b.get(key) is not None:
                    row[f"d_{key}"] = float(a[key]) - float(b[key])
            if "seg_intersection" in a:
                row["d_iou"] = _image_iou(a) - _image_iou(b)
            rows.append(row)
    return rows


def _image_iou(per_image: Mapping[str, Any]) -> float:
    """The image's mIoU by the suite's one rule (``evaluation.SegmentationMetric.miou``)."""
    return SegmentationMetric.image_value(per_image)


#: Axis labels of the paired per-image differences, with their units.
DIFFERENCE_LABELS = {"d_bpp_bitstream": "Δ bpp (bitstream)", "d_bpp_estimated": "Δ bpp (estimated)",
                     "d_psnr": "Δ PSNR (dB)", "d_iou": "Δ IoU of the image (0-1)"}


@themed
def plot_paired_differences(
    rows: Sequence[Mapping[str, Any]],
    title: str | None = None,
    keys: Sequence[str] = ("d_bpp_bitstream", "d_psnr", "d_iou"),
) -> tuple[Figure, dict[str, Any]]:
    """Distribution over test images of the paired per-image differences (``paired_differences``), one panel per
    quantity, one box + points per lambda; a line at 0 (above = the test method has more of it)."""
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        raise ValueError("no paired differences to plot (no common lambdas or no per-image values)")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False, layout="constrained")
    data: dict[str, Any] = {"panels": {}}
    for ax, key in zip(axes[0], keys):
        sub = [r for r in rows if key in r and math.isfinite(r[key])]
        x = [f"{r['lambda_']:g}" for r in sub]
        y = [r[key] for r in sub]
        sns.boxplot(x=x, y=y, ax=ax, color="lightgray", showfliers=False, width=0.5)
        sns.stripplot(x=x, y=y, ax=ax, size=2.5, alpha=0.6, color="tab:red")
        ax.axhline(0, color="gray", ls="--", lw=1)
        ax.set_xlabel("λ")
        ax.set_ylabel(DIFFERENCE_LABELS.get(key, key.replace("d_", "Δ ").replace("_", " ")))
        data["panels"][key] = {"lambda_": x, "values": y}
    data["title"] = title
    if title:
        fig.suptitle(title)
    return fig, data


@themed
def plot_bd_matrix(cells: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str | None = None,
                   xlabel: str = "evaluated by", ylabel: str = "trained for") -> tuple[Figure, dict[str, Any]]:
    """A heatmap of BD-rates: ``cells[row][column]`` = a BD-rate entry ("bd_rate", "ci_low", "ci_high" or "error"),
    annotated "value [low, high]"; colour = the BD-rate (blue = fewer bits than the anchor)."""
    rows = list(cells)
    cols = list(dict.fromkeys(c for r in rows for c in cells[r]))
    values = np.full((len(rows), len(cols)), np.nan)
    labels = np.full((len(rows), len(cols)), "n/a", dtype=object)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            e = cells[r].get(c, {})
            if "bd_rate" in e:
                values[i, j] = e["bd_rate"]
                lo, hi = ci_bounds(e)
                labels[i, j] = f"{e['bd_rate']:.1f}\n[{lo:.1f}, {hi:.1f}]"
    fig, ax = plt.subplots(figsize=(2.6 * len(cols) + 2.0, 1.2 * len(rows) + 1.2), layout="constrained")
    lim = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    sns.heatmap(values, annot=labels, fmt="", cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, ax=ax,
                xticklabels=cols, yticklabels=rows, cbar_kws={"label": BD_RATE_LABEL})
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return fig, {
        "title": title,
        "rows": rows,
        "columns": cols,
        "bd_rate": [[None if np.isnan(v) else float(v) for v in row] for row in values],
        "cells": {r: dict(cells[r]) for r in rows},
    }

