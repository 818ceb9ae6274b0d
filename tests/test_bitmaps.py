"""Bit-allocation maps (notebook 06): map sums, inside/outside shares, the test-set table and colour scales (the
comparer of notebook 12: tests/test_explorer.py)."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from icm_helpers.bitmaps import (bit_allocation_map, bit_map_rows, compute_bit_maps, inside_fraction,  # noqa: E402
                                 roi_fraction_table, roi_split, summarize)
from icm_helpers.codec import bits_from_likelihoods, build_codec, crop_to, pad_to_multiple  # noqa: E402
from icm_helpers.data import IcmDataset  # noqa: E402
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


def test_maps_keep_the_decoded_image_of_the_same_pass(codecs):
    x = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(3))
    bm = compute_bit_maps(codecs[0], x)
    with torch.no_grad():
        xp, pad = pad_to_multiple(x[None])
        x_hat = crop_to(codecs[0](xp)["x_hat"].clamp(0, 1), pad)[0].permute(1, 2, 0).numpy()
    assert bm.decoded.shape == (70, 90, 3)
    np.testing.assert_allclose(bm.decoded, x_hat, atol=1e-6)


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
