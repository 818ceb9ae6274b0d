"""Bit-allocation maps (notebook 06): map sums, inside/outside shares, the test-set table, colour scales and the
comparer widget's cache (a view change must not run a codec again)."""
from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from icm_helpers.bitmaps import (BitMaps, bit_allocation_map, bit_map_rows, compute_bit_maps, inside_fraction,  # noqa: E402
                                 roi_fraction_table, roi_split, summarize)
from icm_helpers.codec import bits_from_likelihoods, build_codec, load_codec, pad_to_multiple, save_codec  # noqa: E402
from icm_helpers.data import IcmDataset, WorldSpec, generate_world  # noqa: E402
from icm_helpers.figures import save_figure  # noqa: E402
from icm_helpers.plots import plot_bit_maps, plot_roi_fractions  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def codecs():
    """Three small untrained codecs (different seeds = different bit allocations)."""
    out = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        out.append(build_codec(N=16).eval())
    return out


@pytest.fixture(scope="module")
def test_set(world):
    return IcmDataset(world / "test")


# ---------------------------------------------------------------- maps
@pytest.mark.parametrize("hw", [(64, 128), (70, 90)])
def test_map_sums_equal_estimated_bits_of_y_and_y_plus_z(codecs, hw):
    codec = codecs[0]
    x = torch.rand(3, *hw, generator=torch.Generator().manual_seed(0))
    bm = compute_bit_maps(codec, x)
    with torch.no_grad():
        lik = codec(pad_to_multiple(x[None])[0])["likelihoods"]
    y_bits = float((-torch.log2(lik["y"])).sum())
    total = float(bits_from_likelihoods(lik)[0])
    assert bm.y.shape == bm.z.shape == hw and (bm.y >= 0).all() and (bm.z >= 0).all()
    assert bm.y_bits == pytest.approx(y_bits, rel=1e-5) and bm.bits(True) == pytest.approx(total, rel=1e-5)
    assert bm.bpp(True) == pytest.approx(total / (hw[0] * hw[1]), rel=1e-5)  # = the evaluation's bpp_estimated
    m_y, m_yz = bit_allocation_map(codec, x), bit_allocation_map(codec, x, include_hyper=True)
    np.testing.assert_allclose(m_y, bm.y, rtol=1e-6)
    np.testing.assert_allclose(m_yz, bm.y + bm.z, rtol=1e-6)
    if hw[0] % 64 == 0 and hw[1] % 64 == 0:  # no padding: the maps hold every bit
        assert m_y.sum() == pytest.approx(y_bits, rel=1e-4)
        assert m_yz.sum() == pytest.approx(total, rel=1e-4)
    else:  # padded: the bits on the padding are cropped away from the map, never added
        assert 0 < m_y.sum() <= y_bits * (1 + 1e-5) and m_yz.sum() <= total * (1 + 1e-5)
    assert m_yz.sum() > m_y.sum()


def test_maps_are_constant_on_16x16_blocks_and_restore_training_mode(codecs):
    codec = codecs[1].train()
    m = compute_bit_maps(codec, torch.rand(1, 3, 64, 64)).y
    assert codec.training  # restored
    codec.eval()
    blocks = m.reshape(4, 16, 4, 16)
    assert np.allclose(blocks, blocks[:, :1, :, :1])
    with pytest.raises(ValueError, match="3xHxW"):
        compute_bit_maps(codec, torch.rand(2, 3, 64, 64))


def test_roi_map_needs_mask_and_lowers_bits_outside(codecs):
    codec = codecs[0]
    x = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    roi = torch.zeros(64, 64, dtype=torch.bool)
    roi[:32, :32] = True
    with pytest.raises(ValueError, match="roi"):
        compute_bit_maps(codec, x, roi_qf=1.4)
    plain, scaled = compute_bit_maps(codec, x), compute_bit_maps(codec, x, roi=roi, roi_qf=4.0)
    outside = ~roi.numpy()
    assert scaled.y[outside].sum() < plain.y[outside].sum()


# ---------------------------------------------------------------- inside / outside
def test_roi_split_on_a_constructed_map():
    bit_map = np.zeros((4, 4))
    bit_map[0, 0], bit_map[0, 1], bit_map[3, 3] = 3.0, 1.0, 4.0  # 8 bits, 4 inside
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # 4 of 16 pixels
    s = roi_split(bit_map, mask)
    assert s["inside"] == pytest.approx(0.5) and s["outside"] == pytest.approx(0.5)
    assert s["inside"] + s["outside"] == pytest.approx(1.0)
    assert s["area"] == pytest.approx(0.25) and s["concentration"] == pytest.approx(2.0)
    assert inside_fraction(bit_map, mask) == pytest.approx(0.5)
    assert roi_split(bit_map, np.ones((4, 4), bool))["inside"] == pytest.approx(1.0)
    assert roi_split(bit_map, np.zeros((4, 4), bool))["inside"] == 0.0
    assert math.isnan(roi_split(bit_map, np.zeros((4, 4), bool))["concentration"])
    assert math.isnan(inside_fraction(np.zeros((4, 4)), mask))
    with pytest.raises(ValueError, match="shape"):
        roi_split(bit_map, mask[:2])
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = roi_split(rng.random((8, 8)), rng.random((8, 8)) > 0.5)
        assert s["inside"] + s["outside"] == pytest.approx(1.0) and 0 <= s["inside"] <= 1


def test_summarize_mean_std_and_t_interval():
    s = summarize([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5) and s["std"] == pytest.approx(1.2909944)
    half = 3.1824463 * 1.2909944 / 2  # t(0.975, 3) * s / sqrt(n)
    assert s["ci_low"] == pytest.approx(2.5 - half) and s["ci_high"] == pytest.approx(2.5 + half)
    assert summarize([0.3])["n"] == 1 and math.isnan(summarize([0.3])["ci_low"])
    assert summarize([])["n"] == 0 and math.isnan(summarize([])["mean"])


def test_roi_fraction_table_over_a_test_set(codecs, test_set):
    models = [
        {"label": "start", "lambda_": None, "codec": codecs[0]},
        {"label": "w/o aux λ=1", "group": "w/o aux", "lambda_": 1.0, "codec": lambda: codecs[1]},
        {"label": "w/ aux λ=1", "group": "w/ aux", "lambda_": 1.0, "codec": codecs[2], "paired_with": "w/o aux λ=1"},
    ]
    table = roi_fraction_table(models, test_set)
    n = len(test_set)
    assert [r[0] for r in table["rows"]] == ["start", "w/o aux λ=1", "w/ aux λ=1"]
    assert all(len(r) == len(table["columns"]) for r in table["rows"])
    assert table["skipped_empty"] == 0 and not table["include_hyper"]
    for label, recs in table["per_image"].items():
        assert len(recs) == n
        for rec, i in zip(recs, range(n)):
            item = test_set[i]
            assert rec["image_id"] == item["image_id"]
            assert rec["inside"] + rec["outside"] == pytest.approx(1.0)
            assert 0 < rec["area"] < 1
    # the table's inside share is the mean of the per-image shares computed directly from the maps
    direct = [
        inside_fraction(compute_bit_maps(codecs[2], test_set[i]["image"]).y, test_set[i]["roi"].numpy())
        for i in range(n)
    ]
    aux = table["summary"][2]
    assert aux["inside"]["mean"] == pytest.approx(float(np.mean(direct)))
    assert aux["inside"]["ci_low"] <= aux["inside"]["mean"] <= aux["inside"]["ci_high"]
    paired = [
        a["inside"] - b["inside"] for a, b in zip(table["per_image"]["w/ aux λ=1"], table["per_image"]["w/o aux λ=1"])
    ]
    assert aux["delta_inside"]["mean"] == pytest.approx(float(np.mean(paired)))
    assert table["summary"][0]["delta_inside"] is None
    # the hyper-latent variant uses y + z maps
    t2 = roi_fraction_table(models[:1], test_set, include_hyper=True, max_images=2)
    assert t2["include_hyper"] and t2["summary"][0]["inside"]["n"] == 2
    y_z = compute_bit_maps(codecs[0], test_set[0]["image"]).map(True)
    assert t2["per_image"]["start"][0]["inside"] == pytest.approx(inside_fraction(y_z, test_set[0]["roi"].numpy()))
    # plot + JSON through the figures helper
    fig, data = plot_roi_fractions(table["summary"], title="t")
    assert data["constant"]["start"]["mean"] == pytest.approx(table["summary"][0]["inside"]["mean"])
    assert data["paired"]["w/ aux"]["mean"] == [pytest.approx(aux["delta_inside"]["mean"])]
    assert data["mask_area"] == pytest.approx(table["summary"][0]["area"])


def test_roi_fraction_table_errors(codecs, test_set):
    class NoMasks(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": torch.rand(3, 64, 64), "image_id": 0}

    with pytest.raises(ValueError, match="no 'roi'"):
        roi_fraction_table([{"label": "a", "codec": codecs[0]}], NoMasks())
    with pytest.raises(ValueError, match="not an earlier model"):
        roi_fraction_table([{"label": "a", "codec": codecs[0], "paired_with": "b"}], test_set, max_images=1)


# ---------------------------------------------------------------- colour scales
def _norms(ax):
    return [(im.norm.vmin, im.norm.vmax, im.get_cmap().name) for im in ax.get_images()]


def test_figure_rows_share_one_scale_and_diff_is_centred(codecs, test_set):
    rows = bit_map_rows(codecs, [test_set[i] for i in range(2)])
    assert all(len(r["maps"]) == 3 and len(r["inside"]) == 3 for r in rows)
    np.testing.assert_allclose(rows[0]["diff"], rows[0]["maps"][2] - rows[0]["maps"][1])
    fig, data = plot_bit_maps(rows, ["input", "start", "w/o aux", "w/ aux", "diff"])
    axes = np.array([a for a in fig.axes if a.get_images()]).reshape(2, 5)  # colourbars hold no images
    for r, row in enumerate(rows):
        map_norms = {_norms(ax)[0][:2] for ax in axes[r, 1:4]}
        assert len(map_norms) == 1  # ONE colour scale for the three maps of the row
        vmin, vmax = map_norms.pop()
        assert vmin <= min(m.min() for m in row["maps"]) and vmax == pytest.approx(max(m.max() for m in row["maps"]))
        dmin, dmax, cmap = _norms(axes[r, 4])[0]
        assert dmin == pytest.approx(-dmax) and dmax == pytest.approx(np.abs(row["diff"]).max()) and cmap == "RdBu_r"
        assert data["rows"][r]["diff_clim"] == [pytest.approx(dmin), pytest.approx(dmax)]


# ---------------------------------------------------------------- the comparer widget
@pytest.fixture()
def experiment(tmp_path):
    """A run directory with a tiny generated world and three small codecs: start, w/o aux and aux-enc at the
    detection ablation lambda of the smoke profile."""
    from icm_helpers.experiment import Experiment

    generate_world(tmp_path / "data", WorldSpec(image_size=64, n_classes=3, seed=0), {"train": 1, "val": 1, "test": 3})
    ex = Experiment("smoke", run_dir=tmp_path, overrides={"threads": 1})
    lam = ex.task_cfg("detection")["ablation_lambda"]
    paths = [ex.models_dir / "codec_start.pt", ex.run_path(ex.spec("detection", lam, None)) / "codec.pt",
             ex.run_path(ex.spec("detection", lam, "enc")) / "codec.pt"]
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        save_codec(path, build_codec(N=16))
    return ex


class CountingLoader:
    """load_codec that counts loads and, through a forward hook, every forward pass of every codec."""

    def __init__(self):
        self.loads, self.forwards = 0, 0

    def __call__(self, path):
        self.loads += 1
        codec = load_codec(path)
        codec.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        return codec


def _png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def test_explorer_lists_existing_runs_only(experiment):
    from icm_helpers.widgets import BitMapExplorer

    exp = BitMapExplorer(experiment, ["detection", "segmentation"], codec_loader=CountingLoader())
    assert exp.lambdas("detection") == [1.6]  # the only lambda with an ICM run
    assert list(exp.runs("detection", 1.6)) == [
        "start",
        "baseline",
        "aux_enc",
        "roi",
    ]  # method ids (icm_helpers.methods)
    assert [r.label for r in exp.runs("detection", 1.6).values()] == [
        "start codec",
        "w/o aux",
        "aux-enc",
        "ROI (QF 1.4)",
    ]
    assert list(exp.runs("detection", 0.4)) == ["start"]
    assert list(exp.runs("segmentation", 2.0)) == ["start"]  # no segmentation runs, no ROI for segmentation
    assert [v for _, v in exp.image_options("detection")] == [0, 1, 2]


def test_warm_started_runs_are_offered_and_are_the_primary_arm(experiment):
    """A profile whose primary aux arm is warm-started (``aux_inits: [warm, ...]``, the demo) compares that arm in
    the inside-mask table, and the widget offers the warm run beside the cold one."""
    from icm_helpers.bitmaps import profile_models
    from icm_helpers.experiment import Experiment
    from icm_helpers.widgets import BitMapExplorer

    warm = Experiment("smoke", run_dir=experiment.run_dir, overrides={"threads": 1})
    warm.cfg["tasks"]["detection"]["aux_inits"] = ["warm"]  # the smoke profile has no such entry: set as in demo
    spec = warm.spec("detection", 1.6, "enc", aux_init="warm")
    save_codec(warm.run_path(spec) / "codec.pt", build_codec(N=16))
    assert list(BitMapExplorer(warm, ["detection"]).runs("detection", 1.6)) == [
        "start", "baseline", "aux_enc", "aux_enc_warm", "roi"]
    methods = [m.get("method") for m in profile_models(warm, "detection", [1.6])]
    assert methods == [None, "baseline", "aux_enc_warm"]
    assert [m.get("method") for m in profile_models(experiment, "detection", [1.6])] == [None, "baseline", "aux_enc"]


def test_widget_view_changes_do_not_rerun_the_codec(experiment):
    from icm_helpers.widgets import BitMapComparer, BitMapExplorer

    loader = CountingLoader()
    explorer = BitMapExplorer(experiment, ["detection"], codec_loader=loader)
    w = BitMapComparer(explorer, run_a="baseline", run_b="aux_enc")
    assert w.last_error is None and w.renders == 1
    assert (loader.loads, loader.forwards, explorer.codec_passes) == (2, 2, 2)
    first_png, first_info = w.picture.value, w.info.value
    assert _png_size(first_png)[0] > 300 and "w/o aux" in first_info and "aux-enc" in first_info

    # view-only changes: opacity, hyper-latent on/off -> new picture / numbers, NO codec call
    png = w.update(opacity=0.2)
    assert png != first_png and loader.forwards == 2
    w.update(include_hyper=True)
    assert loader.forwards == 2 and w.info.value != first_info
    bpp_hyper = [p["bpp"] for p in w.last_info["panels"]]
    w.update(include_hyper=False)
    assert loader.forwards == 2 and all(h > p["bpp"] for h, p in zip(bpp_hyper, w.last_info["panels"]))
    # a user's click (trait change -> observer) redraws too
    renders = w.renders
    w.opacity_w.value = 0.9
    assert w.renders == renders + 1 and loader.forwards == 2

    # a new run / image runs the codec once per (run, image); going back is served from the cache
    w.update(run_a="start")
    assert loader.forwards == 3 and loader.loads == 3
    w.update(run_a="baseline")
    assert loader.forwards == 3
    w.image_w.value = 1  # as the browser's dropdown does
    assert loader.forwards == 5 and w.last_info["image"] == 1 and w.picture.value != first_png
    w.update(image=0, opacity=0.7)
    assert loader.forwards == 5 and w.picture.value == first_png  # same view again: identical picture, no codec call
    w.update(run_b="roi")  # the ROI baseline: the w/o-aux codec (no new load) under the latent scaling
    assert loader.loads == 3 and loader.forwards == 6 and w.last_error is None
    assert w.last_info["panels"][1]["bpp"] < w.last_info["panels"][0]["bpp"]  # ROI spends fewer bits
    assert explorer.codec_passes == loader.forwards

    # unknown runs are reported in the widget, not raised from a callback
    w.run_b_w.options = [*w.run_b_w.options, ("nope", "nope")]
    w.run_b_w.value = "nope"
    assert w.last_error and "nope" in w.status.value
    with pytest.raises(ValueError, match="unknown state"):
        w.update(colour="red")


def test_widget_figure_one_scale_for_both_maps_and_centred_diff(experiment):
    from icm_helpers.widgets import BitMapExplorer

    explorer = BitMapExplorer(experiment, ["detection"], codec_loader=CountingLoader())
    view = explorer.view("detection", 1.6, 0, "start", "aux_enc", include_hyper=True)
    fig = explorer.figure(view, opacity=0.5)
    panels = [ax for ax in fig.axes if len(ax.get_images()) == 2]  # image + overlay
    assert len(panels) == 3
    a, b, d = (_norms(ax)[1] for ax in panels)
    assert a == b and a[2] == "viridis"  # one colour scale for run A and run B
    assert a[0] == 0.0 and a[1] == pytest.approx(max(m.max() for m in view["maps"]))
    assert d[2] == "RdBu_r" and d[0] == pytest.approx(-d[1]) and d[1] == pytest.approx(np.abs(view["diff"]).max())
    np.testing.assert_allclose(view["diff"], view["maps"][1] - view["maps"][0])  # red = more bits in B
    assert all(ax.get_images()[1].get_alpha() == 0.5 for ax in panels)
    bm = explorer.bit_maps("detection", explorer.runs("detection", 1.6)["start"], 0)
    assert isinstance(bm, BitMaps) and view["panels"][0]["bpp"] == pytest.approx(bm.bpp(True))
    save_figure(fig, "widget_view", {k: v for k, v in view.items() if k not in ("image_array", "maps", "diff")}, "p",
                figures_dir=experiment.run_dir / "figs")
