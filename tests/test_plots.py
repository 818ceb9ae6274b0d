"""Tests for icm_helpers.plots: returned data, sorting, styling contracts and colour scales."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from icm_helpers.figures import save_figure  # noqa: E402
from icm_helpers.plots import plot_bit_maps, plot_loss_curves, plot_rd, plot_rd_grid  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _rec(task, method, lam, bpp, metric, metric_name="mAP"):
    return {"task": task, "method": method, "lambda_": lam, "bpp_estimated": bpp * 0.97,
            "bpp_bitstream": bpp, "metric_name": metric_name, "metric": metric}


RECORDS = [
    # deliberately unsorted by bpp
    _rec("detection", "baseline", 1.6, 0.62, 0.50),
    _rec("detection", "baseline", 0.4, 0.15, 0.38),
    _rec("detection", "baseline", 0.8, 0.31, 0.45),
    _rec("detection", "aux_enc", 0.8, 0.28, 0.47),
    _rec("detection", "aux_enc", 0.4, 0.13, 0.40),
    _rec("detection", "start", None, 0.70, 0.44),
    _rec("segmentation", "baseline", 0.4, 0.2, 0.60, "mIoU"),
    _rec("segmentation", "baseline", 0.8, 0.1, 0.55, "mIoU"),
]


def test_plot_rd_data_sorted_by_bpp():
    fig, data = plot_rd(RECORDS, "detection")
    assert data["task"] == "detection" and data["bpp_key"] == "bpp_bitstream" and data["metric_name"] == "mAP"
    assert data["baseline"] == {"bpp": [0.15, 0.31, 0.62], "metric": [0.38, 0.45, 0.5], "lambda_": [0.4, 0.8, 1.6]}
    assert data["aux_enc"]["bpp"] == [0.13, 0.28] and data["aux_enc"]["lambda_"] == [0.4, 0.8]
    assert data["start"] == {"bpp": [0.7], "metric": [0.44], "lambda_": [None]}
    ax = fig.axes[0]
    assert ax.get_xlabel() == "bpp (bitstream)" and ax.get_ylabel() == "mAP"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["baseline (w/o aux)"].get_xdata()) == [0.15, 0.31, 0.62]
    assert lines["start codec"].get_linestyle() == "None"  # single point: marker only
    assert lines["baseline (w/o aux)"].get_linestyle() == "-"
    assert sorted(t.get_text() for t in ax.texts) == sorted(["λ=0.4", "λ=0.8", "λ=1.6", "λ=0.8", "λ=0.4"])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["start codec", "baseline (w/o aux)", "w/ aux loss"]
    json.dumps(data)  # plain JSON, ready for save_figure


def test_plot_rd_estimated_bpp_methods_subset_and_existing_ax():
    fig, ax = plt.subplots()
    returned_fig, data = plot_rd(RECORDS, "detection", bpp_key="bpp_estimated", methods=["aux_enc"], ax=ax, title="T")
    assert returned_fig is fig and ax.get_title() == "T" and ax.get_xlabel() == "bpp (estimated)"
    assert set(data) == {"aux_enc", "task", "bpp_key", "metric_name"}
    assert data["aux_enc"]["bpp"] == pytest.approx([0.13 * 0.97, 0.28 * 0.97])


def test_plot_rd_skips_points_without_bpp_with_warning():
    records = RECORDS + [dict(_rec("detection", "roi", 0.4, 0.2, 0.41), bpp_bitstream=None)]
    with pytest.warns(UserWarning, match="1 record.*'roi'.*bpp_bitstream"):
        _, data = plot_rd(records, "detection")
    assert "roi" not in data


@pytest.mark.parametrize(
    "records, task, kwargs, match",
    [
        (RECORDS, "classification", {}, r"no records for task 'classification'.*\['detection', 'segmentation'\]"),
        (RECORDS, "detection", {"methods": ["nope"]}, r"methods \['nope'\] have no records"),
        (RECORDS + [_rec("detection", "roi", 1, 0.3, 30.0, "PSNR")], "detection", {}, "mix metrics"),
        ([{"task": "detection", "method": "x"}], "detection", {}, r"lacks keys \['metric', 'metric_name'\]"),
        ([_rec("detection", "task", 1, 0.3, 0.4)], "detection", {}, "clash"),
    ],
)
def test_plot_rd_validation(records, task, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_rd(records, task, **kwargs)


def test_plot_rd_grid_layout_and_data():
    fig, data = plot_rd_grid(RECORDS, ["detection", "segmentation"])
    assert len(fig.axes) == 4
    assert set(data) == {"detection", "segmentation"}
    assert set(data["segmentation"]) == {"bpp_estimated", "bpp_bitstream"}
    assert data["segmentation"]["bpp_bitstream"]["baseline"]["bpp"] == [0.1, 0.2]
    assert fig.axes[3].get_ylabel() == "mIoU" and "bitstream" in fig.axes[3].get_xlabel()


def test_plot_loss_curves():
    curves = {"branch after g_a layer 2": [1.0, 0.8, 0.7], "no branch": np.array([1.1, 0.9])}
    fig, data = plot_loss_curves(curves, title="ablation")
    assert data["curves"]["no branch"] == {"x": [1, 2], "y": [1.1, 0.9]}
    assert data["ylabel"] == "validation main loss (Eq. 4)" and data["xlabel"] == "epoch"
    assert [line.get_label() for line in fig.axes[0].get_lines()] == list(curves)
    with pytest.raises(ValueError, match="non-empty loss curve"):
        plot_loss_curves({"a": []})
    _, data0 = plot_loss_curves(curves, first_x=0)
    assert data0["curves"]["no branch"]["x"] == [0, 1]


def _bit_rows(rng, with_diff=True):
    rows = []
    for scale in (1.0, 4.0):  # second row has much larger bit counts -> its own colour scale
        maps = [rng.gamma(2.0, 0.1 * scale * (i + 1), (16, 24)) for i in range(3)]
        row = {"image": rng.uniform(0, 1, (16, 24, 3)), "maps": maps}
        if with_diff:
            row["diff"] = maps[2] - maps[1]
        rows.append(row)
    return rows


TITLES = ["input", "start codec", "w/o aux", "w/ aux", "difference (w/ − w/o)"]


def test_plot_bit_maps_shares_colour_scale_per_row_and_symmetric_diff(tmp_path):
    rows = _bit_rows(np.random.default_rng(0))
    fig, data = plot_bit_maps(rows, TITLES, row_labels=["img A", "img B"])
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 10  # 2 rows x 5 panels (colourbar axes hold no AxesImage)
    for r, row in enumerate(rows):
        panels = image_axes[5 * r:5 * r + 5]
        map_clims = {ax.images[0].get_clim() for ax in panels[1:4]}
        assert len(map_clims) == 1  # ONE scale for all bit maps of the row
        vmin, vmax = map_clims.pop()
        assert vmin == 0.0 and vmax == pytest.approx(max(m.max() for m in row["maps"]))
        lo, hi = panels[4].images[0].get_clim()
        assert lo == -hi and hi == pytest.approx(np.abs(row["diff"]).max())
        assert panels[4].images[0].get_cmap().name == "RdBu_r"
        assert data["rows"][r]["clim"] == [vmin, vmax] and data["rows"][r]["diff_clim"] == [lo, hi]
        stats = data["rows"][r]["panels"][2]
        assert stats["kind"] == "bits" and stats["title"] == "w/o aux"
        assert stats["mean"] == pytest.approx(row["maps"][1].mean()) and stats["sum"] == pytest.approx(
            row["maps"][1].sum()
        )
        assert data["rows"][r]["panels"][4]["mean"] == pytest.approx(row["diff"].mean())
    assert data["rows"][0]["clim"] != data["rows"][1]["clim"]  # scales are per row, not global
    assert [ax.get_title() for ax in image_axes[:5]] == TITLES
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels.count("bits/pixel") == 2 and labels.count("Δ bits/pixel") == 2
    # summary stats only: small, JSON-serialisable, and the figure saves cleanly
    assert len(json.dumps(data)) < 5000
    save_figure(fig, "bit_maps", data, "p", figures_dir=tmp_path)


def test_plot_bit_maps_without_diff_and_zero_diff():
    rng = np.random.default_rng(1)
    fig, data = plot_bit_maps(_bit_rows(rng, with_diff=False), TITLES[:4])
    assert all(row["diff_clim"] is None for row in data["rows"])
    row = _bit_rows(rng)[0]
    row["diff"] = np.zeros_like(row["diff"])
    _, data = plot_bit_maps([row], TITLES)
    lo, hi = data["rows"][0]["diff_clim"]
    assert lo == -hi and hi > 0  # degenerate all-zero difference still gets a valid symmetric scale


@pytest.mark.parametrize(
    "mutate, titles, match",
    [
        (lambda r: r.update(image=r["image"] * 2), TITLES, r"HxWx3 float array in \[0, 1\]"),
        (lambda r: r.update(image=r["image"][..., 0]), TITLES, "HxWx3"),
        (lambda r: r.update(maps=[]), TITLES, "non-empty 'maps'"),
        (lambda r: r.update(diff=np.zeros((3, 3))), TITLES, "same shape"),
        (lambda r: None, TITLES[:4], "got 4 titles for 5 columns"),
    ],
)
def test_plot_bit_maps_validation(mutate, titles, match):
    row = _bit_rows(np.random.default_rng(2))[0]
    mutate(row)
    with pytest.raises(ValueError, match=match):
        plot_bit_maps([row], titles)


def test_plot_bit_maps_rows_must_share_layout():
    rows = _bit_rows(np.random.default_rng(3))
    del rows[1]["diff"]
    with pytest.raises(ValueError, match="same number of maps"):
        plot_bit_maps(rows, TITLES)


def test_importing_plots_leaves_matplotlib_settings_alone():
    """In a fresh interpreter (a JupyterLab kernel): importing icm_helpers.plots changes no rcParams; a plot function
    draws its figure in the suite's theme and leaves every rcParam as it was."""
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('Agg'); import matplotlib as mpl\n"
        "before = dict(mpl.rcParams)\n"
        "import icm_helpers.plots as plots\n"
        "print(sorted(k for k in before if mpl.rcParams[k] != before[k]))\n"
        "fig, _ = plots.plot_loss_curves({'w/o aux': [1.0, 0.9, 0.8]})\n"
        "print(sorted(k for k in before if mpl.rcParams[k] != before[k]))\n"
        "label = fig.axes[0].xaxis.get_major_ticks()[0].label1\n"
        "print(label.get_fontsize() == plots.theme_rc()['xtick.labelsize'] != mpl.rcParams['xtick.labelsize'])\n"
        "print(fig.axes[0].yaxis.get_gridlines()[0].get_visible() and not mpl.rcParams['axes.grid'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:4] == ["[]", "[]", "True", "True"], proc.stdout


def test_theme_applies_inside_and_restores_after():
    import matplotlib as mpl

    from icm_helpers.plots import theme, theme_rc

    before = dict(mpl.rcParams)
    with theme():
        assert mpl.rcParams["axes.grid"] is True and mpl.rcParams["xtick.labelsize"] == theme_rc()["xtick.labelsize"]
    assert dict(mpl.rcParams) == before


def test_bd_rate_ci_plot_draws_bca_intervals_that_miss_the_point_and_open_bounds():
    """A BCa interval need not contain its point estimate, and a bound can be open (null): both must draw."""
    from icm_helpers.plots import plot_bd_rate_ci

    entry = {"bd_rate": 1.0, "ci_low": 1.5, "ci_high": 4.0, "samples": 10, "samples_defined": 10, "confidence": 0.95}
    open_entry = {"bd_rate": -2.0, "ci_low": None, "ci_high": 3.0, "samples": 10, "samples_defined": 6,
                  "confidence": 0.95}
    rows = [{"task": "detection", "method": "aux_enc", "anchor": "baseline", "seed": 0,
             "bpp_bitstream": entry, "bpp_estimated": open_entry}]
    fig, data = plot_bd_rate_ci(rows)
    assert fig is not None and data
