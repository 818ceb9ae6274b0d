"""icm_helpers.exports: per-image CSV / Parquet of one evaluation record, and the VCM-style summary of rate points.

The files are read back with the csv module (not with the code under test) and compared with the records."""
import copy
import csv
import errno
import json
import os
import sys

import pytest
import torch

from icm_helpers import exports
from icm_helpers.exports import (VCM_COLUMNS, export_per_image, per_image_table, vcm_summary_rows,
                                 write_per_image_csv, write_per_image_parquet, write_vcm_summary_csv)
from icm_helpers.io import atomic_write_json

# the documented summary layout, spelled out: a reordering of VCM_COLUMNS must fail here
SUMMARY_HEADER = ["Dataset", "qp", "avg_bpp", "end_accuracy", "encode", "decode", "nn_task", "method", "task",
                  "metric_name", "lambda", "qf", "alpha", "seed", "num_images", "decode_timed_images", "bpp_source",
                  "bpp_estimated", "psnr", "eval_seconds", "profile"]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def det_record(method="baseline", lambda_=1.6, bpps=(0.11, 0.13, 0.12), metric=0.3125, times=True):
    per_image = []
    for i, b in enumerate(bpps):
        dets = [[1.5 * k, 2.0, 10.25, 7.0, 0.9 - 0.1 * k, 1 + k % 3] for k in range(i * 2)]  # 0, 2, 4, ... boxes
        r = {"image_id": 100 + i, "bpp_estimated": b * 0.9, "bpp_bitstream": b, "psnr": 30.0 + i / 3,
             "detections": dets}
        if times:
            r.update(enc_seconds=0.125 * (i + 1), dec_seconds=0.0625 * (i + 1), task_seconds=0.25 * (i + 1))
        per_image.append(r)
    per_image[1]["bpp_side_info"] = 0.001953125  # a key only one image has
    mean = lambda k: sum(r[k] for r in per_image) / len(per_image)  # noqa: E731
    return {"profile": "unit", "task": "detection", "lambda_": lambda_, "method": method, "aux_position": None,
            "alpha": 0.5, "seed": 0, "metric_name": "mAP", "metric": metric, "metrics": {"mAP": metric},
            "num_images": len(per_image), "per_image": per_image, "seconds": 4.5,
            "bpp_estimated": mean("bpp_estimated"), "bpp_bitstream": mean("bpp_bitstream"), "psnr": mean("psnr")}


def seg_record():
    per_image = [{"image_id": i, "bpp_estimated": 0.2 + i / 100, "bpp_bitstream": 0.25 + i / 100, "psnr": 25.5,
                  "seg_intersection": [3743 - i, i, 0], "seg_union": [4096, 353 + i, 7]} for i in range(4)]
    return {"profile": "unit", "task": "segmentation", "lambda_": 2.0, "method": "aux_enc", "metric_name": "mIoU",
            "metric": 0.25, "num_images": 4, "per_image": per_image, "seconds": 1.0,
            "bpp_estimated": 0.215, "bpp_bitstream": 0.265, "psnr": 25.5}


def num(cell):
    return None if cell == "" else float(cell)


# ---------------------------------------------------------------------------------------------------------- per image
def test_detection_csv_round_trip(tmp_path):
    rec = det_record()
    path = write_per_image_csv(rec, tmp_path / "det.csv")
    header, rows = read_csv(path)
    assert header == ["image_id", "bpp_estimated", "bpp_bitstream", "psnr", "num_detections",
                      "bpp_side_info", "dec_seconds", "enc_seconds", "task_seconds"]  # leading, ingredient, A-Z
    assert len(rows) == rec["num_images"]
    for row, r in zip(rows, rec["per_image"]):
        assert int(row["image_id"]) == r["image_id"]
        for key in ("bpp_estimated", "bpp_bitstream", "psnr", "enc_seconds", "dec_seconds", "task_seconds"):
            assert num(row[key]) == r[key], key  # exact: floats are written with their round-trip repr
        assert int(row["num_detections"]) == len(r["detections"])
        assert num(row["bpp_side_info"]) == r.get("bpp_side_info")  # empty where the image has no such key
    assert [int(r["num_detections"]) for r in rows] == [0, 2, 4]


def test_segmentation_csv_wide_columns_round_trip(tmp_path):
    rec = seg_record()
    header, rows = read_csv(write_per_image_csv(rec, tmp_path / "seg.csv"))
    assert header == ["image_id", "bpp_estimated", "bpp_bitstream", "psnr",
                      "inter_0", "inter_1", "inter_2", "union_0", "union_1", "union_2"]
    assert len(rows) == rec["num_images"]
    for row, r in zip(rows, rec["per_image"]):
        assert [int(row[f"inter_{c}"]) for c in range(3)] == r["seg_intersection"]
        assert [int(row[f"union_{c}"]) for c in range(3)] == r["seg_union"]
        assert num(row["bpp_bitstream"]) == r["bpp_bitstream"] and num(row["psnr"]) == r["psnr"]


def test_each_tasks_columns_are_registered_and_found_by_task_or_metric():
    """The ingredient columns are a registry entry per task (``registry.PER_IMAGE_COLUMNS``), named by the same metric
    as the task's evaluation metric; a record without a known ``task`` is placed by its ``metric_name``, and a task
    without an entry gets no ingredient columns (its per-image lists are copied as JSON text)."""
    from icm_helpers.evaluation import METRICS
    from icm_helpers.registry import PER_IMAGE_COLUMNS, TASKS

    assert sorted(PER_IMAGE_COLUMNS) == sorted(TASKS)
    assert all(PER_IMAGE_COLUMNS[t].metric_name == METRICS[t].name for t in TASKS)
    untagged = {k: v for k, v in seg_record().items() if k != "task"}
    assert per_image_table(untagged)[0] == per_image_table(seg_record())[0]
    other = {**seg_record(), "task": "depth", "metric_name": "AbsRel"}
    columns, rows = per_image_table(other)
    assert "inter_0" not in columns and "seg_intersection" in columns
    assert rows[0]["seg_intersection"] == [3743, 0, 0]


def test_column_order_is_stable_whatever_the_key_order(tmp_path):
    rec = det_record()
    shuffled = copy.deepcopy(rec)
    shuffled["per_image"] = [dict(reversed(list(r.items()))) for r in shuffled["per_image"]]
    shuffled["per_image"][0]["zz_extra"] = [1, 2]  # a list value: JSON text, sorted after the others
    cols_a, _ = per_image_table(rec)
    cols_b, rows_b = per_image_table(shuffled)
    assert cols_b == cols_a + ["zz_extra"]
    a = write_per_image_csv(rec, tmp_path / "a.csv").read_bytes()
    assert write_per_image_csv(copy.deepcopy(rec), tmp_path / "b.csv").read_bytes() == a  # deterministic bytes
    _, rows = read_csv(write_per_image_csv(shuffled, tmp_path / "c.csv"))
    assert json.loads(rows[0]["zz_extra"]) == [1, 2] and rows[1]["zz_extra"] == ""


def test_record_path_and_real_evaluation_records(tmp_path, world):
    """Records as ``evaluation.evaluate`` makes them (tiny untrained models) export, also from their JSON files."""
    from icm_helpers.codec import build_codec, update_entropy_tables
    from icm_helpers.data import IcmDataset
    from icm_helpers.evaluation import evaluate
    from icm_helpers.recognizers import build_recognizer

    from conftest import DET_CFG

    ds = IcmDataset(world / "test")
    torch.manual_seed(0)
    codec = build_codec(N=16).eval()
    update_entropy_tables(codec)
    seg = build_recognizer("segmentation", "suite", 3, width=8, head_channels=16, low_channels=8).freeze()
    coded = {"profile": "unit", "task": "segmentation", "lambda_": 1.0, "method": "start",
             **evaluate(codec, seg, ds, max_images=2)}
    det = build_recognizer("detection", "suite", 3, **DET_CFG).freeze()
    reference = {"profile": "unit", "task": "detection", "lambda_": None, "method": "reference",
                 **evaluate(None, det, ds, max_images=2)}
    for rec in (coded, reference):
        path = tmp_path / f"{rec['method']}.json"
        atomic_write_json(path, rec)
        header, rows = read_csv(write_per_image_csv(path, tmp_path / f"{rec['method']}.csv"))
        assert len(rows) == rec["num_images"] == 2
        assert [int(r["image_id"]) for r in rows] == [r["image_id"] for r in rec["per_image"]]
    assert [num(r["bpp_bitstream"]) for r in read_csv(tmp_path / "start.csv")[1]] == \
        [r["bpp_bitstream"] for r in coded["per_image"]]
    header, rows = read_csv(tmp_path / "reference.csv")
    assert "num_detections" in header and rows[0]["bpp_bitstream"] == ""  # the reference has no rate
    assert [int(r["num_detections"]) for r in rows] == [len(r["detections"]) for r in reference["per_image"]]
    summary = vcm_summary_rows([coded, reference], skip_uncoded=True)
    assert len(summary) == 1 and summary[0]["avg_bpp"] == coded["bpp_bitstream"]


def test_records_without_per_image_lists_raise_naming_the_fix(tmp_path):
    stripped = det_record()
    del stripped["per_image"]
    with pytest.raises(ValueError, match=r"no per-image list \('per_image'\).*force=True"):
        write_per_image_csv(stripped, tmp_path / "x.csv")
    with pytest.raises(ValueError, match="force=True"):
        per_image_table({**det_record(), "per_image": []})
    old = det_record()
    for r in old["per_image"]:
        del r["detections"]  # a record of a version without per-image detections
    with pytest.raises(ValueError, match=r"3 of 3 images have no per-image detections.*force=True"):
        write_per_image_csv(old, tmp_path / "x.csv")
    seg = seg_record()
    del seg["per_image"][2]["seg_union"]
    with pytest.raises(ValueError, match="seg_union.*force=True"):
        write_per_image_csv(seg, tmp_path / "x.csv")
    short = det_record()
    short["num_images"] = 5
    with pytest.raises(ValueError, match="num_images=5"):
        write_per_image_csv(short, tmp_path / "x.csv")
    assert not list(tmp_path.iterdir())  # nothing written by any of them


def _temps(path):
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "per_image.csv"
    write_per_image_csv(det_record(), path)
    before = path.read_bytes()
    bad = seg_record()
    bad["per_image"][3]["seg_intersection"] = [1, 2]  # the LAST image is inconsistent: found before any byte is written
    with pytest.raises(ValueError, match="different lengths"):
        write_per_image_csv(bad, path)
    assert path.read_bytes() == before and not _temps(path)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the write itself fails after the temp file got its bytes
    with pytest.raises(OSError, match="no partial file"):
        write_per_image_csv(seg_record(), path)
    with pytest.raises(OSError):
        write_vcm_summary_csv([det_record()], tmp_path / "summary.csv")
    monkeypatch.undo()
    assert path.read_bytes() == before and not _temps(path)
    assert not (tmp_path / "summary.csv").exists() and not _temps(tmp_path / "summary.csv")


def test_parquet_is_skipped_with_a_note_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    notes = []
    out = export_per_image(det_record(), tmp_path / "det.csv", log=notes.append)
    assert out["parquet"] is None and "pyarrow" in out["note"] and notes == [out["note"]]
    assert write_per_image_parquet(det_record(), tmp_path / "det.parquet") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.csv"]
    assert export_per_image(det_record(), tmp_path / "b.csv", parquet=False)["note"] is None
    monkeypatch.delitem(sys.modules, "pyarrow")
    monkeypatch.setattr(exports, "_pyarrow", lambda: (None, None, "pyarrow cannot be imported (needs NumPy 2)"))
    out = export_per_image(det_record(), tmp_path / "c.csv")  # installed but unusable: skipped the same way
    assert out["parquet"] is None and "NumPy 2" in out["note"] and not (tmp_path / "c.parquet").exists()


def test_parquet_round_trip_when_pyarrow_is_installed(tmp_path):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # not installed, or built for another NumPy
        pytest.skip(f"pyarrow not usable here: {exc}")
    rec = seg_record()
    out = export_per_image(rec, tmp_path / "seg.csv")
    assert out["note"] is None and out["parquet"] == tmp_path / "seg.parquet"
    table = pq.read_table(out["parquet"]).to_pylist()
    header, rows = read_csv(out["csv"])
    assert list(table[0]) == header and len(table) == rec["num_images"]
    for got, r in zip(table, rec["per_image"]):
        assert got["bpp_bitstream"] == r["bpp_bitstream"] and got["inter_0"] == r["seg_intersection"][0]


# ---------------------------------------------------------------------------------------------------------- summary
def test_summary_layout_values_and_order(tmp_path):
    records = [det_record("baseline", 0.8, (0.30, 0.32, 0.31), 0.40),
               det_record("aux_enc", 3.2, (0.20, 0.22, 0.21), 0.35),
               det_record("baseline", 0.4, (0.10, 0.12, 0.11), 0.20),
               det_record("aux_enc", 0.4, (0.25, 0.27, 0.26), 0.30),  # lower lambda, HIGHER bpp than lambda 3.2
               det_record("baseline", 1.6, (0.05, 0.07, 0.06), 0.10, times=False)]
    path = write_vcm_summary_csv(records, tmp_path / "summary.csv")
    header, rows = read_csv(path)
    assert header == SUMMARY_HEADER == list(VCM_COLUMNS) and len(rows) == len(records)
    # grouped by method, rate points from the lowest to the highest bpp within each
    assert [(r["method"], r["qp"]) for r in rows] == [("aux_enc", "3.2"), ("aux_enc", "0.4"), ("baseline", "1.6"),
                                                       ("baseline", "0.4"), ("baseline", "0.8")]
    for method in ("aux_enc", "baseline"):
        bpps = [float(r["avg_bpp"]) for r in rows if r["method"] == method]
        assert bpps == sorted(bpps)
    by_key = {(r["method"], r["lambda_"]): r for r in records}
    for row in rows:
        rec = by_key[(row["method"], float(row["lambda"]))]
        assert row["Dataset"] == "unit/detection" and row["task"] == "detection" and row["metric_name"] == "mAP"
        assert float(row["avg_bpp"]) == rec["bpp_bitstream"] and row["bpp_source"] == "bitstream"
        assert float(row["bpp_estimated"]) == rec["bpp_estimated"] and float(row["psnr"]) == rec["psnr"]
        assert float(row["end_accuracy"]) == pytest.approx(100 * rec["metric"], abs=1e-12)  # percent
        assert float(row["qp"]) == float(row["lambda"]) == rec["lambda_"]
        assert int(row["num_images"]) == rec["num_images"] and float(row["eval_seconds"]) == rec["seconds"]
        if "enc_seconds" in rec["per_image"][0]:
            assert float(row["encode"]) == pytest.approx(sum(r["enc_seconds"] for r in rec["per_image"]))
            assert float(row["decode"]) == pytest.approx(sum(r["dec_seconds"] for r in rec["per_image"]))
            assert float(row["nn_task"]) == pytest.approx(sum(r["task_seconds"] for r in rec["per_image"]))
            assert int(row["decode_timed_images"]) == rec["num_images"]
        else:
            assert row["encode"] == row["decode"] == row["nn_task"] == row["decode_timed_images"] == ""
        assert row["qf"] == ""
    assert write_vcm_summary_csv(list(reversed(records)), tmp_path / "again.csv").read_bytes() == path.read_bytes()


def test_summary_times_of_some_images_scale_to_all_and_rates_must_exist(tmp_path):
    partial = det_record()
    for r in partial["per_image"][1:]:  # decode="first": only the first image was decoded
        del r["dec_seconds"]
    row = vcm_summary_rows([partial])[0]
    assert row["decode"] == pytest.approx(0.0625 * 3) and row["decode_timed_images"] == 1
    assert row["encode"] == pytest.approx(0.125 * 6) and row["nn_task"] == pytest.approx(0.25 * 6)
    estimated = vcm_summary_rows([partial], bpp="estimated", dataset="COCO-val")[0]
    assert estimated["avg_bpp"] == partial["bpp_estimated"] and estimated["bpp_source"] == "estimated"
    assert estimated["Dataset"] == "COCO-val"
    reference = {**det_record("reference", None), "bpp_estimated": None, "bpp_bitstream": None, "psnr": None}
    with pytest.raises(ValueError, match="skip_uncoded=True"):
        write_vcm_summary_csv([det_record(), reference], tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()
    assert [r["method"] for r in vcm_summary_rows([reference, det_record()], skip_uncoded=True)] == ["baseline"]
    no_stream = {**det_record(), "bpp_bitstream": None}
    with pytest.raises(ValueError, match="bpp='estimated'"):
        vcm_summary_rows([no_stream])
    with pytest.raises(ValueError, match="bitstream' or 'estimated"):
        exports.vcm_row(det_record(), bpp="kbps")
