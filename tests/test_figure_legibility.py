"""Every figure function of ``icm_helpers.plots`` (the bit maps aside) drawn on small synthetic data of the size the
suite's runs produce, and checked for what a reader needs at a glance and a measurement can tell: no legend over the
data, a label (with its unit where the axis is numeric) on every axis, tick labels and axis labels apart, and no text
over a data point. Each check measures the drawn figure (display coordinates after ``fig.canvas.draw()``)."""
from __future__ import annotations

import itertools
import math
import re
from typing import Any, Callable, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from icm_helpers import plots  # noqa: E402

#: Words that name what a numeric axis counts (its unit, or the quantity whose unit is implied: a share, a step).
UNIT_WORDS = ("bpp", "mAP", "mIoU", "IoU", "dB", "%", "λ", "step", "epoch", "loss", "share", "fraction", "cos",
              "bits", "seconds", "alpha", "weight")
TASKS = ("detection", "segmentation")
LAMBDAS = (0.025, 0.1, 0.4, 1.6)
LEARNED = ("baseline", "aux_enc", "aux_enc_warm", "roi", "aux_dec", "aux_task")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------------------------ synthetic data
def _rd_records() -> list[dict[str, Any]]:
    """Two tasks, the study's methods with two seeds each close together (as on the shapes world), the start codec and
    JPEG / WebP over a wide range of rates."""
    rng = np.random.default_rng(0)
    records = []
    for task, name in zip(TASKS, ("mAP", "mIoU")):
        records.append({"task": task, "method": "start", "lambda_": None, "bpp_bitstream": 0.61, "bpp_estimated": 0.6,
                        "metric_name": name, "metric": 0.58})
        for method, seed in itertools.product(LEARNED, (0, 1)):
            lams = LAMBDAS if method in ("baseline", "aux_enc", "aux_enc_warm", "roi") else (1.6,)
            for lam in lams:
                bpp = 0.53 + 0.07 * math.log10(lam / 0.025) / 1.8 + rng.normal(0, 0.004)
                records.append({"task": task, "method": method, "seed": seed, "lambda_": lam, "bpp_bitstream": bpp,
                                "bpp_estimated": bpp - 0.008, "metric_name": name,
                                "metric": 0.48 + 0.5 * (bpp - 0.5) + rng.normal(0, 0.01)})
        for method, qualities in (("jpeg", (5, 10, 15, 25, 40, 60, 85)), ("webp", (1, 5, 15, 30, 60, 85))):
            for q in qualities:
                bpp = (0.5 if method == "jpeg" else 0.3) + q / 30
                metric = 0.2 + 0.4 * (1 - math.exp(-q / 15))
                records.append({"task": task, "method": method, "lambda_": q, "bpp_bitstream": bpp,
                                "bpp_estimated": None, "metric_name": name, "metric": metric})
    return records


def _entry(value: float, width: float = 5.0) -> dict[str, Any]:
    return {"bd_rate": value, "ci_low": value - width, "ci_high": value + width, "samples": 1000,
            "samples_defined": 1000, "confidence": 0.95}


def _bd_rows() -> list[dict[str, Any]]:
    """Rows against w/o aux (both bpp kinds), against JPEG (bitstream only, so "n/a: missing" for the estimated
    rate), per seed and pooled, as notebook 07 passes them."""
    rows = []
    for task, method, seed in itertools.product(TASKS, ("aux_enc", "aux_enc_warm", "roi"), (0, 1, "pooled")):
        value = {"aux_enc": -2.5, "aux_enc_warm": -0.8, "roi": -9.0}[method]
        rows.append({"task": task, "method": method, "anchor": "baseline", "seed": seed,
                     "bpp_bitstream": _entry(value), "bpp_estimated": _entry(value - 0.2)})
    for task, method, seed in itertools.product(TASKS, ("baseline", "aux_enc", "webp"), (0, 1, "pooled")):
        rows.append({"task": task, "method": method, "anchor": "jpeg", "seed": seed, "bpp_bitstream": _entry(-50.0)})
    return rows


def _learning_curves() -> dict[str, Any]:
    steps = [0, 5, 10, 20, 30, 50, 75, 100, 150, 200, 250, 300]  # validated often, as a longer run would be
    curves = {arm: {seed: [(s, 1.4 - 0.05 * math.log1p(s) + 0.01 * seed + off) for s in steps] for seed in range(3)}
              for arm, off in (("baseline", 0.0), ("aux_enc_warm", 0.005), ("aux_enc_warm_shuffled", 0.01))}
    diffs = [{"pair": pair, "step": s, "n": 3, "mean": 0.01 * k, "low": 0.01 * k - 0.02, "high": 0.01 * k + 0.02,
              "values": [0.0, 0.01, 0.02], "seeds": [0, 1, 2]}
             for pair, k in (("aux-enc - w/o aux", 1), ("control - w/o aux", 2)) for s in steps]
    labels = {"baseline": "w/o aux", "aux_enc_warm": "aux-enc", "aux_enc_warm_shuffled": "control"}
    return {"task": "detection", "lambda_": 1.6, "curves": curves, "labels": labels, "differences": diffs}


class _Samples:
    """A split of three 64x64 images with boxes and a semantic label map (classes 1-3 of the shapes world)."""

    class_names = {1: "circle", 2: "square", 3: "triangle"}

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict[str, Any]:
        semantic = torch.zeros(64, 64, dtype=torch.long)
        semantic[8:30, 8:30] = 1 + i % 3
        semantic[36:60, 30:56] = 1 + (i + 1) % 3
        return {"image": torch.rand(3, 64, 64), "image_id": i + 1, "semantic": semantic,
                "boxes": torch.tensor([[8.0, 8, 30, 30], [30, 36, 56, 60]]),
                "labels": torch.tensor([1 + i % 3, 1 + (i + 1) % 3])}


def _roi_summary() -> list[dict[str, Any]]:
    inside = lambda m: {"mean": m, "ci_low": m - 0.02, "ci_high": m + 0.02, "n": 48}  # noqa: E731
    out = [{"label": "start codec", "lambda_": None, "method": "start", "inside": inside(0.2), "area": 0.1,
            "delta_inside": None}]
    for lam in LAMBDAS:
        out.append({"label": f"w/o aux λ={lam}", "group": "w/o aux", "lambda_": lam, "method": "baseline",
                    "inside": inside(0.21), "area": 0.1, "delta_inside": None})
        out.append({"label": f"w/ aux λ={lam}", "group": "w/ aux", "lambda_": lam, "method": "aux_enc_warm",
                    "inside": inside(0.22), "area": 0.1, "paired_with": f"w/o aux λ={lam}", "paired_group": "w/o aux",
                    "paired_method": "baseline", "delta_inside": inside(0.01)})
    return out


def _paired_rows() -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    return [{"lambda_": lam, "image_id": i, "d_bpp_bitstream": rng.normal(0, 0.01), "d_psnr": rng.normal(0, 0.2),
             "d_iou": rng.normal(0, 0.02)} for lam in LAMBDAS for i in range(24)]


def _dose_curves() -> dict[str, Any]:
    arms = (("aux_enc", -2), ("aux_enc_warm", 1))
    return {task: {m: [(f, _entry(v * f, 4.0)) for f in (0.3, 0.5, 1.0)] for m, v in arms} for task in TASKS}


def _transfer_cells() -> dict[str, Any]:
    return {f"{m} ({t})": {u: _entry(-50.0 + 3 * k) for k, u in enumerate(TASKS)}
            for t in TASKS for m in ("baseline", "aux_enc_warm")}


def _cosine_rows() -> list[dict[str, Any]]:
    return [{"codec": codec, "branch": branch, "methods": [method], "mean": 0.05, "low": -0.02, "high": 0.12, "n": 10,
             "unit": "seed"}
            for codec in ("start codec", "w/o aux step 100")
            for branch, method in (("competent aux-enc", "aux_enc_warm"), ("control", "aux_enc_warm_shuffled"))]


#: name -> a function drawing the figure the way a notebook does.
FIGURES: dict[str, Callable[[], Figure]] = {
    "rd_curves (plot_rd_grid + BD-rates)": lambda: plots.plot_rd_grid(_rd_records(), TASKS, bd_rows=_bd_rows())[0],
    "rd_detection (plot_rd)": lambda: plots.plot_rd(_rd_records(), "detection")[0],
    "bd_rate_ci": lambda: plots.plot_bd_rate_ci(_bd_rows(), title="BD-rate with 95% CIs")[0],
    "ablation_val_loss (plot_loss_curves)": lambda: plots.plot_loss_curves(
        {name: [1.4 - 0.02 * k - 0.001 * i for k in range(11)] for i, name in
         enumerate(("no branch", "branch after g_a", "branch after g_s layer 2", "branch inside the recognizer"))},
        title="detection, lambda=1.6: validation main loss (Eq. 4)", first_x=0)[0],
    "learning_curves": lambda: plots.plot_learning_curves(_learning_curves())[0],
    "gradient_cosines": lambda: plots.plot_cosines(_cosine_rows())[0],
    "data_samples (plot_samples)": lambda: plots.plot_samples(_Samples(), n=3)[0],
    "bit_fractions_plot (plot_roi_fractions)": lambda: plots.plot_roi_fractions(_roi_summary(), title="detection")[0],
    "dose_response": lambda: plots.plot_dose_response(_dose_curves(), bpp_key="bpp_estimated", title="dose")[0],
    "paired_differences": lambda: plots.plot_paired_differences(_paired_rows(), title="aux-enc minus w/o aux")[0],
    "transfer_matrix (plot_bd_matrix)": lambda: plots.plot_bd_matrix(_transfer_cells(), title="BD-rate vs JPEG")[0],
}


# ------------------------------------------------------------------------------------------------ measurements
def _drawn(fig: Figure) -> Any:
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _all_axes(fig: Figure) -> list[Axes]:
    return list(fig.get_axes())


def _is_colorbar(ax: Axes) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def _data_artists(ax: Axes) -> Iterator[Any]:
    """What shows the data: lines, collections and patches in data coordinates, and images."""
    for artist in itertools.chain(ax.lines, ax.collections, ax.patches):
        if artist.get_visible() and artist.get_transform() == ax.transData:
            yield artist
    yield from (im for im in ax.images if im.get_visible())


def _clipped_extent(artist: Any, ax: Axes, renderer: Any) -> Bbox | None:
    """The artist's drawn extent: its window extent, clipped to its axes (data outside it is not drawn)."""
    box = Bbox.intersection(artist.get_window_extent(renderer), ax.get_window_extent(renderer))
    return None if box is None or box.width <= 0 or box.height <= 0 else box


def _legends(fig: Figure) -> list[Any]:
    found = [ax.get_legend() for ax in _all_axes(fig) if ax.get_legend() is not None]
    stack = [fig]
    while stack:
        f = stack.pop()
        found += list(f.legends)
        stack += list(f.subfigs)
    return found


def legend_overlaps(fig: Figure) -> list[str]:
    """Legends whose box overlaps the drawn box of a data artist."""
    renderer = _drawn(fig)
    problems = []
    for legend in _legends(fig):
        box = legend.get_window_extent(renderer)
        for ax in _all_axes(fig):
            for artist in _data_artists(ax):
                extent = _clipped_extent(artist, ax, renderer)
                if extent is not None and box.overlaps(extent):
                    problems.append(f"legend over {type(artist).__name__} {artist.get_label()!r} of "
                                    f"{ax.get_title()!r}")
    return problems


def _tick_texts(axis: Any) -> list[Any]:
    """The tick labels the axis draws: within its view limits (none when its axes is switched off, e.g. an image)."""
    if not axis.axes.axison:
        return []
    lo, hi = sorted(axis.get_view_interval())
    along = 0 if axis.axis_name == "x" else 1
    return [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text().strip()
            and lo - 1e-9 * abs(hi - lo) <= t.get_position()[along] <= hi + 1e-9 * abs(hi - lo)]


def _is_numeric(text: str) -> bool:
    try:
        float(text.replace("−", "-").replace("%", ""))
    except ValueError:
        return False
    return True


def axis_label_problems(fig: Figure) -> list[str]:
    """Axes (not images, not colourbars) with an axis that shows tick labels but has no label, or a numeric axis whose
    label names no unit / quantity from UNIT_WORDS."""
    _drawn(fig)
    problems = []
    for ax in _all_axes(fig):
        if not ax.axison or _is_colorbar(ax):
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            ticks = _tick_texts(axis)
            if not ticks:  # its ticks are labelled on a shared neighbour (or there are none)
                continue
            label = axis.label.get_text().strip()
            where = f"{name} axis of {ax.get_title()!r}"
            if not label:
                problems.append(f"{where}: no label")
            elif all(_is_numeric(t.get_text()) for t in ticks) and not any(w in label for w in UNIT_WORDS):
                problems.append(f"{where}: label {label!r} names no unit")
    return problems


def _overlapping_pairs(boxes: list[tuple[str, Bbox]]) -> list[str]:
    return [f"{a!r} / {b!r}" for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]


def tick_label_overlaps(fig: Figure) -> list[str]:
    """Tick labels of one axis that run into each other."""
    renderer = _drawn(fig)
    problems = []
    for ax in _all_axes(fig):
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _tick_texts(axis)]
            problems += [f"{ax.get_title()!r}: ticks {pair}" for pair in _overlapping_pairs(boxes)]
    return problems


def _figure_texts(fig: Figure) -> Iterator[Any]:
    stack = [fig]
    while stack:
        f = stack.pop()
        yield from (t for t in (f._suptitle, f._supxlabel, f._supylabel) if t is not None)
        stack += list(f.subfigs)


def axis_label_overlaps(fig: Figure) -> list[str]:
    """Axis labels, titles and figure titles that overlap one another or another axes' tick labels."""
    renderer = _drawn(fig)
    labels = [t for ax in _all_axes(fig) for t in (ax.xaxis.label, ax.yaxis.label, ax.title)]
    labels = [t for t in labels + list(_figure_texts(fig)) if t.get_visible() and t.get_text().strip()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
    problems = _overlapping_pairs(boxes)
    for ax in _all_axes(fig):
        own = {ax.xaxis.label, ax.yaxis.label, ax.title}
        ticks = [t.get_window_extent(renderer) for axis in (ax.xaxis, ax.yaxis) for t in _tick_texts(axis)]
        problems += [f"{text!r} over a tick label of {ax.get_title()!r}" for (text, box), t in zip(boxes, labels)
                     if t not in own for tick in ticks if box.overlaps(tick)]
    return problems


def _marker_boxes(ax: Axes, renderer: Any) -> list[Bbox]:
    """A box per drawn data point: each vertex of a data line (its marker's size, or a point) and each scatter dot."""
    frame = ax.get_window_extent(renderer)
    boxes = []
    for line in (a for a in _data_artists(ax) if isinstance(a, Line2D)):
        xy = line.get_transform().transform(np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float))
        half = line.get_markersize() * ax.figure.dpi / 72 / 2 if line.get_marker() not in (None, "None", "") else 0.5
        boxes += [Bbox([[x - half, y - half], [x + half, y + half]]) for x, y in xy
                  if np.isfinite([x, y]).all() and frame.contains(x, y)]
    for coll in (a for a in _data_artists(ax) if hasattr(a, "get_offsets") and len(a.get_offsets())):
        if isinstance(coll, QuadMesh):
            continue
        for x, y in coll.get_offset_transform().transform(np.asarray(coll.get_offsets(), float)):
            if np.isfinite([x, y]).all() and frame.contains(x, y):
                boxes.append(Bbox([[x - 2, y - 2], [x + 2, y + 2]]))
    return boxes


def annotation_overlaps(fig: Figure) -> list[str]:
    """Texts written in an axes (annotations, notes, point labels) that cover a data point of that axes. Images and
    heatmaps are left out: their text is on the picture by design."""
    renderer = _drawn(fig)
    problems = []
    for ax in _all_axes(fig):
        if ax.images or any(isinstance(c, QuadMesh) for c in ax.collections):
            continue
        points = _marker_boxes(ax, renderer)
        for text in (t for t in ax.texts if t.get_visible() and t.get_text().strip()):
            box = text.get_window_extent(renderer)
            hits = sum(box.overlaps(p) for p in points)
            if hits:
                problems.append(f"{text.get_text()[:40]!r} in {ax.get_title()!r} covers {hits} data point(s)")
    return problems


CHECKS = {"legend": legend_overlaps, "axis labels": axis_label_problems, "tick labels": tick_label_overlaps,
          "axis label overlap": axis_label_overlaps, "annotations": annotation_overlaps}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.filterwarnings("ignore:.*record.*have no finite:UserWarning")  # the anchors have no estimated rate
@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("figure", list(FIGURES))
def test_figure_reads_at_a_glance(figure, check):
    fig = FIGURES[figure]()
    assert CHECKS[check](fig) == []


def test_bd_rate_chart_has_one_reference_per_panel_and_no_na_rows():
    fig, data = plots.plot_bd_rate_ci(_bd_rows(), title="BD-rate with 95% CIs")
    _drawn(fig)
    charts = {(c["anchor"], c["bpp_key"]): c["labels"] for c in data["charts"]}
    assert set(charts) == {("baseline", "bpp_bitstream"), ("baseline", "bpp_estimated"), ("jpeg", "bpp_bitstream")}
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["vs w/o aux: bpp (bitstream)", "vs w/o aux: bpp (estimated)", "vs JPEG: bpp (bitstream)"]
    shown = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes]  # the right panel shares the left's
    assert [len(labels) for labels in shown] == [18, 0, 18]
    assert all("seed" in label and " vs " not in label for labels in shown for label in labels)
    assert all(len(labels) == 18 for labels in charts.values())
    assert all("n/a" not in t.get_text() for ax in fig.axes for t in ax.texts)
    assert data["not_drawn"] == ["vs JPEG, bpp (estimated): not computed (18 rows)"]


def test_rd_grid_writes_only_the_bd_rates_against_its_reference():
    _, data = plots.plot_rd_grid(_rd_records(), TASKS, bd_rows=_bd_rows())
    assert data["bd_reference"] == "baseline"
    lines = data["bd_rates"]["detection — bpp (bitstream)"]
    assert lines == ["w/ aux loss: -2.5 [-7.5, 2.5]", "w/ aux loss, warm-started branch: -0.8 [-5.8, 4.2]",
                     "ROI (decoder as is): -9.0 [-14.0, -4.0]"]  # pooled rows, none against JPEG


def test_samples_name_the_classes():
    fig, data = plots.plot_samples(_Samples(), n=3)
    assert data["class_names"] == {"1": "circle", "2": "square", "3": "triangle"}
    texts = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert texts == {"circle", "square", "triangle"}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["circle", "square", "triangle", "background"]
    # labels 0, 1, ... of a sequence are all classes (MMSeg's Pascal-Context), with no background entry
    label_maps = [{"image": torch.rand(3, 8, 8), "image_id": 1, "semantic": torch.tensor([[0, 1], [2, 255]])}]
    fig, _ = plots.plot_samples(label_maps, n=1, class_names=("aeroplane", "bag", "bed"))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["aeroplane", "bag", "bed"]


def test_the_checks_catch_what_they_look_for():
    """Each check fails on a figure made to break its rule (the same rule the old figures broke)."""
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(np.linspace(0, 1, 20), np.linspace(0, 1, 20), "o-", label="data")
    ax.legend(loc="center")
    ax.set_xticks(np.linspace(0, 1, 40))
    ax.text(0.5, 0.5, "over the data")
    assert legend_overlaps(fig) and tick_label_overlaps(fig) and annotation_overlaps(fig)
    assert axis_label_problems(fig) == ["x axis of '': no label", "y axis of '': no label"]
    ax.set_xlabel("psnr difference")
    ax.set_ylabel("rate")
    assert axis_label_problems(fig) == ["x axis of '': label 'psnr difference' names no unit",
                                        "y axis of '': label 'rate' names no unit"]
    fig2, (a, b) = plt.subplots(1, 2, figsize=(3, 2))
    a.set_xlabel("a long label that reaches into the next panel " * 2)
    b.set_xlabel("another label")
    assert axis_label_overlaps(fig2)


def test_point_labels_go_only_where_they_cover_no_data():
    fig, data = plots.plot_rd(_rd_records(), "detection")
    points = _marker_boxes(fig.axes[0], _drawn(fig))
    labels = [t for t in fig.axes[0].texts if re.fullmatch(r"[λq]=.*", t.get_text())]
    assert labels, "no point label found room"
    renderer = _drawn(fig)
    assert not any(t.get_window_extent(renderer).overlaps(p) for t in labels for p in points)


def _committed_figures() -> list[tuple[str, str]]:
    from icm_helpers.config import REPO_ROOT
    from icm_helpers.replot import is_figure

    return [(p.parent.name, p.stem) for p in sorted((REPO_ROOT / "figures").glob("*/*.json")) if is_figure(p)]


@pytest.mark.filterwarnings("ignore:.*record.*have no finite:UserWarning")
@pytest.mark.parametrize("folder, name", _committed_figures(), ids=[f"{f}/{n}" for f, n in _committed_figures()])
def test_committed_figure_reads_at_a_glance(folder, name):
    """The committed figures, drawn again from their JSON (``icm_helpers.replot``), pass every check."""
    from icm_helpers.config import REPO_ROOT
    from icm_helpers.replot import redrawn_figures

    ((_, fig, _),) = list(redrawn_figures(REPO_ROOT / "figures" / folder, [name]))
    assert {check: problems for check, fn in CHECKS.items() if (problems := fn(fig))} == {}
