"""icm_helpers.replot: a figures folder redrawn from its JSON gives the same numbers, rebuilds what older JSON left
out, turns tables back into markdown without pictures, and fills the VCM summaries' decode times."""
from __future__ import annotations

import csv
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from icm_helpers import plots  # noqa: E402
from icm_helpers.figures import save_figure  # noqa: E402
from icm_helpers.io import atomic_write_json  # noqa: E402
from icm_helpers.replot import (Folder, _bd_rows_of, _whole_clause, refresh_vcm_summary,  # noqa: E402
                                replot_folder)
from test_figure_legibility import (TASKS, _bd_rows, _dose_curves, _paired_rows, _rd_records,  # noqa: E402
                                    _roi_summary)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _saved(tmp_path, name, fig_data):
    fig, data = fig_data
    save_figure(fig, name, data, "p", figures_dir=tmp_path)
    return json.loads((tmp_path / "p" / f"{name}.json").read_text())


def _numbers(data):
    return {k: v for k, v in data.items() if k not in ("provenance", "replotted_from")}


@pytest.mark.filterwarnings("ignore:.*record.*have no finite:UserWarning")
def test_a_folder_redrawn_from_its_json_plots_the_same_numbers(tmp_path):
    before = {
        "bd_rate_ci": _saved(tmp_path, "bd_rate_ci", plots.plot_bd_rate_ci(_bd_rows(), title="t")),
        "rd_curves": _saved(tmp_path, "rd_curves", plots.plot_rd_grid(_rd_records(), TASKS, bd_rows=_bd_rows())),
        "dose_response": _saved(tmp_path, "dose_response", plots.plot_dose_response(_dose_curves(), title="d")),
        "paired_differences_detection": _saved(tmp_path, "paired_differences_detection",
                                               plots.plot_paired_differences(_paired_rows(), title="p")),
        "bit_fractions_plot_detection": _saved(tmp_path, "bit_fractions_plot_detection",
                                               plots.plot_roi_fractions(_roi_summary(), title="r")),
        "ablation_val_loss_detection": _saved(tmp_path, "ablation_val_loss_detection",
                                              plots.plot_loss_curves({"a": [1.0, 0.9], "b": [1.1, 0.8]}, title="l")),
    }
    written = replot_folder(tmp_path / "p", log=lambda _: None)
    assert sorted(written) == sorted(f"{name}.png" for name in before)
    for name, data in before.items():
        after = json.loads((tmp_path / "p" / f"{name}.json").read_text())
        assert _numbers(after) == _numbers(data), name
        assert after["replotted_from"] == data["provenance"]


def test_older_bd_rate_json_gives_its_rows_back_with_the_tables_reasons(tmp_path):
    rows = _bd_rows()[:2] + _bd_rows()[-1:]
    entries = {key: [r.get(key) for r in rows] for key in ("bpp_bitstream", "bpp_estimated")}
    labels = ["detection: w/ aux loss, seed 0 vs baseline", "detection: w/ aux loss, seed 1 vs baseline",
              "segmentation: WebP (Pillow, 4:2:0), pooled over seeds vs jpeg"]
    assert _bd_rows_of({"labels": labels, "panels": entries}) == rows
    entries["bpp_bitstream"][2] = None  # older charts kept no reason for an undefined BD-rate; their tables did
    atomic_write_json(tmp_path / "p" / "bd_rate_vs_jpeg.json", {
        "columns": ["task", "method", "anchor", "seed", "BD-rate % (bitstream) [95% CI]"], "title": "vs JPEG",
        "rows": [["segmentation", "webp", "jpeg", "pooled", "n/a (the metric ranges of the curves do not overlap)"]]})
    rebuilt = _bd_rows_of({"labels": labels, "panels": entries}, Folder(tmp_path / "p"))
    assert rebuilt[2]["bpp_bitstream"] == {"error": "the metric ranges of the curves do not overlap"}


def test_tables_get_whole_reasons_and_lose_their_pictures(tmp_path):
    folder = tmp_path / "p"
    cut = "n/a (anchor rates must be positive and finite (bits per pixel), g)"
    atomic_write_json(folder / "dose_response_table.json",
                      {"columns": ["task", "BD-rate"], "rows": [["detection", cut], ["segmentation", 0.5]],
                       "title": "dose", "provenance": {"run": 1}})
    for ext in ("png", "pdf"):
        (folder / f"dose_response_table.{ext}").write_bytes(b"picture")
    replot_folder(folder, log=lambda _: None)
    assert sorted(p.name for p in folder.iterdir()) == ["dose_response_table.json", "dose_response_table.md"]
    md = (folder / "dose_response_table.md").read_text()
    assert "| detection | n/a (anchor rates must be positive and finite (bits per pixel)) |" in md
    assert "| segmentation | 0.50 |" in md
    assert json.loads((folder / "dose_response_table.json").read_text())["replotted_from"] == {"run": 1}
    assert _whole_clause("n/a (the metric ranges of the curves do not overlap (anchor (0.01)") == \
        "n/a (the metric ranges of the curves do not overlap)"
    assert _whole_clause("n/a (short)") == "n/a (short)" and _whole_clause(0.5) == 0.5


def test_vcm_summary_takes_the_decode_time_of_the_decoded_images(tmp_path):
    exports = tmp_path / "exports"
    (exports / "detection").mkdir(parents=True)
    per_image = "image_id,bpp_estimated,bpp_bitstream,psnr,dec_seconds,enc_seconds\n" \
                "1,0.2,0.25,30.0,0.5,0.1\n2,0.3,0.35,31.0,,0.1\n3,0.4,0.45,32.0,,0.1\n"
    (exports / "detection" / "baseline_lambda1.csv").write_text(per_image)
    (exports / "detection" / "reference.csv").write_text("image_id,psnr\n1,\n")
    header = "Dataset,qp,avg_bpp,end_accuracy,encode,decode,nn_task,method,task,metric_name,lambda,qf,alpha,seed," \
             "num_images,bpp_source,bpp_estimated,psnr,eval_seconds,profile\n"
    (exports / "vcm_summary_detection.csv").write_text(
        header + "demo/detection,1.0,0.35,50.0,0.30000000000000004,,,baseline,detection,mAP,1.0,,0.5,0,3,bitstream,"
                 "0.3,31.0,2.0,demo\n")
    refresh_vcm_summary(exports / "vcm_summary_detection.csv")
    with open(exports / "vcm_summary_detection.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["decode"]) == pytest.approx(1.5) and row["decode_timed_images"] == "1"
    assert row["nn_task"] == "" and row["encode"] == "0.30000000000000004" and row["psnr"] == "31.0"


def test_the_samples_are_rendered_again_as_the_split_stores_them(world):
    """The samples figure's images come back from the profile's seed: equal to the split's files, boxes and maps."""
    from dataclasses import asdict

    from conftest import SPEC
    from icm_helpers.data import IcmDataset
    from icm_helpers.replot import _world_items

    spec = {k: v for k, v in asdict(SPEC).items() if k != "seed"}
    items = _world_items({"data": {"world": spec}, "seed": SPEC.seed}, 3)
    stored = IcmDataset(world / "test")
    for item, ref in zip(items, (stored[i] for i in range(3))):
        assert item["image_id"] == ref["image_id"] and torch.equal(item["image"], ref["image"])
        assert torch.equal(item["boxes"], ref["boxes"]) and torch.equal(item["labels"], ref["labels"])
        assert torch.equal(item["semantic"], ref["semantic"])

