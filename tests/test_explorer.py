"""The bit-map explorer and comparer (notebook 12): runs found on disk (methods, lambdas, alphas, seeds, ROI), what is
missing, region bits and their share inside the objects, the cursor readout, the recognizer's output, one colour rule
with the committed bit-map figures, "save this view", and that a change of the view alone never runs a codec."""
from __future__ import annotations

import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import DET_CFG  # noqa: E402
from PIL import Image  # noqa: E402

from icm_helpers.bitmaps import region_split  # noqa: E402
from icm_helpers.codec import build_codec, load_codec, pad_to_multiple, save_codec  # noqa: E402
from icm_helpers.data import WorldSpec, generate_world  # noqa: E402
from icm_helpers.experiment import Experiment  # noqa: E402
from icm_helpers.explorer import BitMapExplorer, ViewState, discover_runs, draw_view, missing_inputs  # noqa: E402
from icm_helpers.plots import BitMapScale, plot_bit_maps  # noqa: E402
from icm_helpers.recognizers import build_recognizer, save_recognizer  # noqa: E402

LAM = 1.6  # the smoke profile's detection ablation lambda


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _save(path, seed: int) -> None:
    torch.manual_seed(seed)
    save_codec(path, build_codec(N=16))


@pytest.fixture()
def experiment(tmp_path):
    """A run directory with a tiny generated world and small codecs: start, w/o aux and aux-enc at the detection
    ablation lambda of the smoke profile (seed 0)."""
    generate_world(tmp_path / "data", WorldSpec(image_size=64, n_classes=3, seed=0), {"train": 1, "val": 1, "test": 3})
    ex = Experiment("smoke", run_dir=tmp_path, overrides={"threads": 1})
    _save(ex.start_codec_path, 0)
    _save(ex.codec_path(ex.spec("detection", LAM, None)), 1)
    _save(ex.codec_path(ex.spec("detection", LAM, "enc")), 2)
    return ex


@pytest.fixture()
def with_recognizer(experiment):
    torch.manual_seed(0)
    save_recognizer(experiment.recognizer_path("detection"), build_recognizer("detection", "suite", 3, **DET_CFG))
    return experiment


class CountingLoader:
    """load_codec that counts loads and, through a forward hook, every forward pass of every codec."""

    def __init__(self):
        self.loads, self.forwards = 0, 0

    def __call__(self, path):
        self.loads += 1
        codec = load_codec(path)
        codec.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        return codec


# ---------------------------------------------------------------- what exists, what is missing
def test_discover_runs_across_methods_lambdas_alphas_seeds_and_roi(experiment):
    ex = experiment
    _save(ex.codec_path(ex.spec("detection", LAM, "enc", seed=1)), 3)
    _save(ex.codec_path(ex.spec("detection", 0.4, None, seed=2)), 4)
    _save(ex.codec_path(ex.spec("detection", LAM, "enc", aux_init="warm")), 5)
    _save(ex.codec_path(ex.spec("detection", LAM, "enc", alpha=0.25)), 6)
    unfinished = ex.run_path(ex.spec("detection", 3.2, None))
    unfinished.mkdir(parents=True)
    (unfinished / "train_state.pt").write_bytes(b"")  # a run still training: no final codec, not offered
    (ex.task_runs_dir("detection") / "notes").mkdir()  # not a run folder
    runs = discover_runs(ex, "detection")
    assert list(runs) == [
        "start", "baseline_lambda0.4_seed2", "baseline_lambda1.6", "aux_enc_lambda1.6_alpha0.25", "aux_enc_lambda1.6",
        "aux_enc_lambda1.6_seed1", "aux_enc_warm_lambda1.6", "roi_baseline_lambda0.4_seed2", "roi_baseline_lambda1.6"]
    labels = {k: r.label for k, r in runs.items()}
    assert labels["aux_enc_lambda1.6_seed1"] == "aux-enc λ=1.6 seed 1"
    assert labels["aux_enc_lambda1.6"] == "aux-enc λ=1.6 seed 0"  # seeds are named once the task has several
    assert labels["aux_enc_lambda1.6_alpha0.25"] == "aux-enc λ=1.6 α=0.25 seed 0"
    assert labels["roi_baseline_lambda1.6"] == "ROI (QF 1.4) λ=1.6 seed 0"
    assert runs["aux_enc_lambda1.6_seed1"].seed == 1 and runs["aux_enc_lambda1.6_seed1"].path == ex.codec_path(
        ex.spec("detection", LAM, "enc", seed=1))
    assert runs["roi_baseline_lambda1.6"].path == runs["baseline_lambda1.6"].path
    assert runs["roi_baseline_lambda1.6"].roi_qf == 1.4
    assert list(discover_runs(ex, "segmentation")) == ["start"]  # no segmentation runs, no ROI for segmentation
    assert BitMapExplorer(ex, ["detection"]).default_pair("detection") == ("baseline_lambda1.6", "aux_enc_lambda1.6")


def test_warm_started_runs_are_offered_and_are_the_primary_arm(experiment):
    """A profile whose primary aux arm is warm-started (``aux_inits: [warm, ...]``, the demo) compares that arm in
    the inside-mask table and by default in the comparer, which offers the warm run beside the cold one."""
    from icm_helpers.bitmaps import profile_models

    warm = Experiment("smoke", run_dir=experiment.run_dir, overrides={"threads": 1})
    warm.cfg["tasks"]["detection"]["aux_inits"] = ["warm"]  # the smoke profile has no such entry: set as in demo
    _save(warm.codec_path(warm.spec("detection", LAM, "enc", aux_init="warm")), 3)
    assert list(discover_runs(warm, "detection")) == [
        "start", "baseline_lambda1.6", "aux_enc_lambda1.6", "aux_enc_warm_lambda1.6", "roi_baseline_lambda1.6"]
    assert BitMapExplorer(warm, ["detection"]).default_pair("detection") == ("baseline_lambda1.6",
                                                                             "aux_enc_warm_lambda1.6")
    methods = [m["run"].method for m in profile_models(warm, "detection", [LAM])]
    assert methods == ["start", "baseline", "aux_enc_warm"]
    assert [m["run"].method for m in profile_models(experiment, "detection", [LAM])] == ["start", "baseline",
                                                                                          "aux_enc"]


def test_missing_inputs_say_what_and_how_to_make_it(experiment, tmp_path):
    assert [m.what for m in missing_inputs(experiment, "detection")] == ["detection recognizer"]
    assert [m.what for m in missing_inputs(experiment, "segmentation")] == [
        "segmentation recognizer", "fine-tuned codecs of segmentation"]
    empty = Experiment("smoke", run_dir=tmp_path / "nothing", overrides={"threads": 1})
    missing = missing_inputs(empty, "detection")
    assert [m.what for m in missing] == ["test images", "start codec", "detection recognizer",
                                         "fine-tuned codecs of detection"]
    assert "--profile smoke --only 01" in missing[0].fix and "make smoke" in missing[0].fix
    assert "--only 02 03" in missing[-1].line()
    assert not (tmp_path / "nothing").exists() or not any((tmp_path / "nothing").rglob("*.pt"))  # nothing made


# ---------------------------------------------------------------- numbers
def test_region_split_against_hand_computed_values():
    bit_map = np.arange(16, dtype=float).reshape(4, 4)  # total 120 bits
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    r = region_split(bit_map, mask, (1, 3, 0, 2))  # columns 1-2, rows 0-1: values 1, 2, 5, 6
    assert r["bits"] == 14.0 and r["bpp"] == 3.5
    assert r["share_of_image"] == pytest.approx(14 / 120)
    assert r["inside"] == pytest.approx((1 + 5) / 14) and r["area"] == 0.5  # column 1 of the box is in the mask
    assert region_split(bit_map, None, (0, 4, 0, 4)) == {"bits": 120.0, "bpp": 7.5, "share_of_image": 1.0,
                                                         "inside": None, "area": None}
    with pytest.raises(ValueError, match="not a non-empty region"):
        region_split(bit_map, mask, (2, 2, 0, 4))


def test_view_region_and_cursor_readouts(experiment):
    explorer = BitMapExplorer(experiment, ["detection"], codec_loader=CountingLoader())
    state = ViewState("detection", "baseline_lambda1.6", "aux_enc_lambda1.6", image=1, region=(16, 48, 8, 40),
                      cursor=(37, 21))
    view = explorer.view(state)
    item = explorer.item("detection", 1)
    mask = np.asarray(item["roi"]).astype(bool)
    for p, values in zip(view["panels"], view["maps"]):
        sub, sub_mask = values[8:40, 16:48], mask[8:40, 16:48]
        assert p["region_bits"] == pytest.approx(sub.sum()) and p["region_bpp"] == pytest.approx(sub.mean())
        assert p["region_share"] == pytest.approx(sub.sum() / values.sum())
        assert p["region_inside"] == pytest.approx(sub[sub_mask].sum() / sub.sum())
    # the cursor: the bits of the latent position coding pixel (37, 21), over its 16x16 block
    for p, key in zip(view["panels"], ("baseline_lambda1.6", "aux_enc_lambda1.6")):
        codec = load_codec(explorer.runs("detection")[key].path).eval()
        with torch.no_grad():
            lik = codec(pad_to_multiple(item["image"][None])[0])["likelihoods"]["y"]
        assert p["at_cursor"] == pytest.approx(float((-torch.log2(lik[0, :, 21 // 16, 37 // 16])).sum()) / 256,
                                               rel=1e-5)
    assert view["diff_at_cursor"] == pytest.approx(view["panels"][1]["at_cursor"] - view["panels"][0]["at_cursor"])
    assert view["diff_region_bpp"] == pytest.approx(view["diff"][8:40, 16:48].mean())
    # a zoom outside the image is the whole image, a cursor outside it none
    whole = explorer.view(state.replace(region=(70, 90, 0, 10), cursor=(64, 0)))
    assert whole["region"] == [0, 64, 0, 64] and whole["panels"][0]["at_cursor"] is None
    assert whole["panels"][0]["region_share"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown view settings"):
        state.replace(colour="red")


def test_find_image_by_id_index_or_file_name(experiment):
    explorer = BitMapExplorer(experiment, ["detection"])
    ids = list(explorer.dataset("detection").ids)
    assert explorer.find_image("detection", str(ids[2])) == 2
    assert explorer.find_image("detection", "#1") == 1 and explorer.find_image("detection", "#9") is None
    name = explorer.dataset("detection").coco.imgs[ids[1]]["file_name"]
    assert explorer.find_image("detection", name) == 1 and explorer.find_image("detection", "nope") is None
    assert BitMapExplorer(experiment, ["detection"], max_images=2).n_images("detection") == 2


def test_recognizer_output_on_each_decoded_image(with_recognizer):
    explorer = BitMapExplorer(with_recognizer, ["detection"])
    state = explorer.default_state("detection")
    view = explorer.view(state)
    assert explorer.recognizer_passes == 3  # run A's and run B's decoded images, and the original
    for pred, decoded in zip(view["predictions"], view["decoded"]):
        assert set(pred) == {"boxes", "labels", "scores"} and decoded.shape == (64, 64, 3)
    assert all(" box" in p["recognizer"] for p in view["panels"])
    explorer.view(state.replace(opacity=0.2, outlines=False, cursor=(3, 3)))
    assert explorer.recognizer_passes == 3  # cached per (run, image)
    assert missing_inputs(with_recognizer, "detection") == []


# ---------------------------------------------------------------- the picture
def _clims(fig):
    """(vmin, vmax, colour map) of every colour-mapped (2-D) image of the figure; RGB images have none."""
    return [(im.norm.vmin, im.norm.vmax, im.get_cmap().name) for ax in fig.axes for im in ax.get_images()
            if im.get_array().ndim == 2]


def test_one_colour_rule_for_the_comparer_and_the_bit_map_figures(experiment):
    explorer = BitMapExplorer(experiment, ["detection"])
    view = explorer.view(ViewState("detection", "start", "aux_enc_lambda1.6", include_hyper=True))
    fig = draw_view(view)
    clims = _clims(fig)
    scale = BitMapScale.of(view["maps"], view["diff"])
    assert view["scale"] == scale
    maps = [c for c in clims if c[2] == "viridis"]
    diffs = [c for c in clims if c[2] == "RdBu_r"]
    assert maps == [(*scale.clim, "viridis")] * 2  # one colour scale for run A and run B
    assert diffs == [(*scale.diff_clim, "RdBu_r")] and scale.diff_clim[0] == -scale.diff_clim[1]
    assert scale.diff_clim[1] == pytest.approx(np.abs(view["diff"]).max())
    _, data = plot_bit_maps([{"image": view["image_array"], "maps": view["maps"], "diff": view["diff"]}],
                            ["input", "A", "B", "B − A"])
    assert data["rows"][0]["clim"] == list(scale.clim) and data["rows"][0]["diff_clim"] == list(scale.diff_clim)
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("start codec: ") and t.endswith(" bpp") for t in titles)  # bpp on every map panel


def test_outlines_zoom_and_cursor_in_the_picture(experiment):
    explorer = BitMapExplorer(experiment, ["detection"])
    state = ViewState("detection", "baseline_lambda1.6", "aux_enc_lambda1.6", region=(8, 40, 16, 48), cursor=(20, 30))
    fig = draw_view(explorer.view(state))
    panels = [ax for ax in fig.axes if ax.get_images()][:6]  # the colourbars come after the six panels
    n_boxes = len(explorer.item("detection", 0)["boxes"])
    for ax in panels:
        assert ax.get_xlim() == (7.5, 39.5) and ax.get_ylim() == (47.5, 15.5)  # the zoom
        assert len(ax.patches) >= n_boxes and ax.collections  # ground-truth boxes and the mask's contour
        assert any(line.get_marker() == "+" for line in ax.get_lines())  # the cursor
    plain = [ax for ax in draw_view(explorer.view(state.replace(outlines=False))).axes if ax.get_images()][:6]
    assert all(not ax.collections and not ax.patches for ax in plain)


# ---------------------------------------------------------------- saving
def test_save_writes_png_pdf_and_json_of_the_view(experiment, tmp_path):
    explorer = BitMapExplorer(experiment, ["detection"])
    state = ViewState("detection", "baseline_lambda1.6", "roi_baseline_lambda1.6", image=2, region=(0, 32, 0, 32),
                      cursor=(5, 6))
    paths = explorer.save(state, figures_dir=tmp_path / "figs")
    image_id = explorer.image_id("detection", 2)
    name = f"bit_map_view_detection_baseline_lambda1.6_vs_roi_baseline_lambda1.6_image{image_id}"
    assert paths["png"] == tmp_path / "figs" / "smoke" / f"{name}.png"
    assert Image.open(paths["png"]).format == "PNG" and paths["pdf"].stat().st_size > 0
    data = json.loads(paths["json"].read_text())
    assert data["state"]["run_b"] == "roi_baseline_lambda1.6" and data["state"]["cursor"] == [5, 6]
    assert data["region"] == [0, 32, 0, 32] and data["clim"][0] == 0.0 and data["diff_clim"][0] < 0
    assert data["panels"][1]["bpp"] < data["panels"][0]["bpp"]  # ROI spends fewer bits than its w/o-aux codec
    assert data["provenance"]["profile"]["name"] == "smoke"
    assert data["panels"][0]["region_bits"] == pytest.approx(explorer.view(state)["panels"][0]["region_bits"])


# ---------------------------------------------------------------- the widget
def _png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def test_widget_view_changes_do_not_rerun_the_codec(experiment, tmp_path):
    from icm_helpers.widgets import BitMapComparer

    loader = CountingLoader()
    explorer = BitMapExplorer(experiment, ["detection"], codec_loader=loader)
    w = BitMapComparer(explorer, figures_dir=tmp_path / "figs")
    assert w.last_error is None and w.renders == 1
    assert w.state() == ViewState("detection", "baseline_lambda1.6", "aux_enc_lambda1.6", cursor=(32, 32))
    assert (loader.loads, loader.forwards, explorer.codec_passes) == (2, 2, 2)
    first_png, first_info = w.picture.value, w.info.value
    assert _png_size(first_png)[0] > 600 and "w/o aux" in first_info and "aux-enc" in first_info

    # view-only changes: opacity, hyper-latent, outlines, zoom, cursor -> new picture / numbers, NO codec call
    assert w.update(opacity=0.2) != first_png and loader.forwards == 2
    w.update(include_hyper=True)
    bpp_hyper = [p["bpp"] for p in w.last_info["panels"]]
    w.update(include_hyper=False)
    assert all(h > p["bpp"] for h, p in zip(bpp_hyper, w.last_info["panels"]))
    png = w.update(outlines=False)
    assert w.update(region=(0, 32, 32, 64), cursor=(10, 40)) != png and w.state().region == (0, 32, 32, 64)
    assert w.last_info["panels"][0]["region_share"] < 1 and w.last_info["state"]["cursor"] == (10, 40)
    assert loader.forwards == 2
    renders = w.renders
    w.zoom_x_w.value = (0, 64)  # a user's drag (trait change -> observer) redraws too
    assert w.renders == renders + 1 and w.state().region == (0, 64, 32, 64)

    # a new run / image runs the codec once per (run, image); going back is served from the cache
    w.update(run_a="start")
    assert loader.forwards == 3 and loader.loads == 3
    w.update(run_a="baseline_lambda1.6")
    assert loader.forwards == 3
    w.image_w.value = 1  # as the browser's slider does
    assert loader.forwards == 5 and w.last_info["state"]["image"] == 1
    w.search_w.value = "#2"  # the search box
    assert w.state().image == 2 and loader.forwards == 7
    w.search_w.value = "no such image"
    assert "no image matches" in w.status.value and w.state().image == 2
    w.update(run_b="roi_baseline_lambda1.6")  # ROI: the w/o-aux codec (no new load) under the latent scaling
    assert loader.loads == 3 and loader.forwards == 8 and w.last_error is None

    saved = w.save()
    assert saved["png"].is_file() and saved["json"].is_file() and "saved" in w.status.value
    assert loader.forwards == 8

    # unknown runs are reported in the widget, not raised from a callback
    w.run_b_w.options = [*w.run_b_w.options, ("nope", "nope")]
    w.run_b_w.value = "nope"
    assert w.last_error and "nope" in w.status.value
    with pytest.raises(ValueError, match="unknown view settings"):
        w.update(colour="red")
