"""Paired bootstrap CIs (icm_helpers.bootstrap): the resampled metrics reproduce pycocotools / the confusion-matrix
mIoU exactly, a resample with image multiplicities equals evaluating a set with those images duplicated, and the
BD-rate CI behaves on curves with known answers."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from icm_helpers.bootstrap import DetectionResampler, SegmentationResampler, bd_rate_ci, format_ci, resample_weights
from icm_helpers.evaluation import DetectionMetric, SegmentationMetric


def _coco(n_images, rng):
    """A COCO ground truth with 1-3 boxes of 3 categories per image."""
    from pycocotools.coco import COCO

    images, anns = [], []
    for i in range(n_images):
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 64, "width": 64})
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, 40, 2)
            w, h = rng.uniform(8, 24, 2)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": k, "name": str(k)} for k in (1, 2, 3)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _noisy_predictions(coco, rng):
    """Per image: jittered GT boxes (some with the wrong class) + false positives, as the recognizer would give."""
    preds = {}
    for img in coco.getImgIds():
        boxes, labels, scores = [], [], []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img)):
            if rng.random() < 0.15:
                continue  # missed
            x, y, w, h = np.asarray(a["bbox"]) + rng.normal(0, 1.0, 4)
            boxes.append([x, y, x + w, y + h])
            labels.append(a["category_id"] if rng.random() > 0.1 else int(rng.integers(1, 4)))
            scores.append(rng.uniform(0.3, 1.0))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 50, 2)
            boxes.append([x, y, x + 10, y + 10])
            labels.append(int(rng.integers(1, 4)))
            scores.append(rng.uniform(0.0, 0.8))
        preds[img] = {
            "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float64),
        }
    return preds


def _detection_record(coco, preds, image_ids):
    ds = type("DS", (), {"coco": coco})()
    metric = DetectionMetric(ds)
    per_image = [{"image_id": i, **metric.update(i, [preds[i]], {})} for i in image_ids]
    return {"per_image": per_image, "metric": metric.compute()["mAP"]}


def test_detection_resampler_matches_pycocotools_and_duplication():
    rng = np.random.default_rng(0)
    coco = _coco(12, rng)
    preds = _noisy_predictions(coco, rng)
    ids = coco.getImgIds()
    rec = _detection_record(coco, preds, ids)
    res = DetectionResampler(rec, coco)
    assert 0.2 < rec["metric"] < 0.95
    assert res(np.ones(len(ids), int)) == pytest.approx(rec["metric"], abs=1e-12)
    # multiplicities == an evaluation on a set where image i appears m_i times (as new images with new ids)
    weights = np.array([2, 0, 1, 3, 0, 1, 1, 0, 2, 1, 1, 0])
    gt = coco.dataset
    images, anns, dup_preds, new_id = [], [], {}, 1000
    for img, m in zip(ids, weights):
        for _ in range(m):
            new_id += 1
            images.append({**coco.imgs[img], "id": new_id})
            for a in coco.loadAnns(coco.getAnnIds(imgIds=img)):
                anns.append({**a, "id": len(anns) + 1, "image_id": new_id})
            dup_preds[new_id] = preds[img]
    from pycocotools.coco import COCO

    dup = COCO()
    dup.dataset = {"images": images, "annotations": anns, "categories": gt["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        dup.createIndex()
    expected = _detection_record(dup, dup_preds, [im["id"] for im in images])["metric"]
    assert res(weights) == pytest.approx(expected, abs=1e-9)
    assert res(weights) != pytest.approx(rec["metric"], abs=1e-4)  # the resample really changes the metric


def test_segmentation_resampler_matches_confusion_matrix_and_duplication():
    rng = np.random.default_rng(1)
    n, C = 6, 4
    labels = [torch.from_numpy(rng.integers(0, C, (16, 16))) for _ in range(n)]
    logits = [torch.randn(1, C, 16, 16) + 3 * torch.nn.functional.one_hot(l, C).permute(2, 0, 1)[None] for l in labels]
    metric = SegmentationMetric(C)
    per_image = [metric.update(i, logits[i], {"semantic": labels[i]}) for i in range(n)]
    res = SegmentationResampler({"per_image": per_image})
    assert res(np.ones(n)) == pytest.approx(metric.compute()["mIoU"], abs=1e-12)
    weights = np.array([0, 3, 1, 0, 2, 0])
    dup = SegmentationMetric(C)
    for i, m in enumerate(weights):
        for _ in range(m):
            dup.update(i, logits[i], {"semantic": labels[i]})
    assert res(weights) == pytest.approx(dup.compute()["mIoU"], abs=1e-12)


def _curve(bpp_scale, metric_of_image, n, lambdas=(1, 2, 4, 8)):
    """Points whose per-image bpp and per-image 'accuracy' are known; metric = weighted mean accuracy."""
    pts = []
    for lam in lambdas:
        bpp = bpp_scale * (0.1 + 0.05 * lam) * (1 + 0.3 * np.sin(np.arange(n)))
        acc = metric_of_image(lam)
        pts.append(({"bpp_bitstream": bpp, "bpp_estimated": bpp * 0.99}, lambda w, acc=acc: float(w @ acc / w.sum())))
    return pts


def test_bd_rate_ci_known_answers():
    n = 40
    rng = np.random.default_rng(2)
    base_acc = rng.uniform(0.3, 0.9, n)
    acc = lambda lam: np.clip(base_acc * (0.5 + 0.1 * lam), 0, 1)
    curves = {"anchor": _curve(1.0, acc, n), "same": _curve(1.0, acc, n), "cheaper": _curve(0.8, acc, n)}
    out = bd_rate_ci(curves, "anchor", ["same", "cheaper"], samples=200, seed=0)
    for key in ("bpp_bitstream", "bpp_estimated"):
        # identical method: 0 in every resample (paired); 20% fewer bits per image: exactly -20% in every resample
        assert out["same"][key]["bd_rate"] == pytest.approx(0, abs=1e-9)
        assert out["same"][key]["ci_low"] == pytest.approx(0, abs=1e-9) and out["same"][key][
            "ci_high"
        ] == pytest.approx(0, abs=1e-9)
        assert out["cheaper"][key]["bd_rate"] == pytest.approx(-20, abs=1e-9)
        assert out["cheaper"][key]["ci_low"] == pytest.approx(-20, abs=1e-9)
        assert out["cheaper"][key]["samples_defined"] == 200
    # a noisy test method: the CI is a real interval around the point estimate
    noisy = lambda lam: np.clip(acc(lam) + rng.normal(0, 0.1, n), 0, 1)
    curves["noisy"] = _curve(0.9, noisy, n)
    e = bd_rate_ci(curves, "anchor", ["noisy"], samples=300, seed=0)["noisy"]["bpp_bitstream"]
    assert e["ci_low"] < e["bd_rate"] < e["ci_high"] and e["ci_high"] - e["ci_low"] > 1
    assert format_ci(e).startswith(f"{e['bd_rate']:.1f} [")


def test_bd_rate_ci_errors_and_resamples():
    w = resample_weights(10, 5, seed=3)
    assert w.shape == (5, 10) and (w.sum(1) == 10).all()
    assert (resample_weights(10, 5, seed=3) == w).all()  # deterministic
    n = 10
    acc = lambda lam: np.full(n, 0.1 * lam)
    far = lambda lam: np.full(n, 5 + 0.1 * lam)  # metric ranges never overlap
    curves = {"a": _curve(1.0, acc, n), "b": _curve(1.0, far, n)}
    out = bd_rate_ci(curves, "a", ["b"], samples=10)
    assert "do not overlap" in out["b"]["bpp_bitstream"]["error"]
    assert format_ci(out["b"]["bpp_bitstream"]).startswith("n/a")
    with pytest.raises(ValueError, match="no operating points"):
        bd_rate_ci(curves, "a", ["missing"], samples=10)
    curves["c"] = _curve(1.0, acc, n + 1)
    with pytest.raises(ValueError, match="different numbers of test images"):
        bd_rate_ci(curves, "a", ["c"], samples=10)


def _write_seg_record(ex, name, method, lam, scale, gt_frac, jitter, estimated=1.0, **fields):
    """A stored segmentation record of ``gt_frac.shape[0]`` images: rate ``scale`` x sqrt(lambda) (estimated:
    x ``estimated``), per-class intersections = union x (0.4 + 0.07 lambda) x ``jitter(i)``."""
    from icm_helpers.io import atomic_write_json

    per_image = []
    for i, frac in enumerate(gt_frac):
        union, rate = 1000 * frac, scale * 0.05 * lam ** 0.5 * (1 + 0.2 * np.cos(i))
        per_image.append({"image_id": i + 1, "bpp_bitstream": rate, "bpp_estimated": estimated * rate,
                          "seg_intersection": (union * (0.4 + 0.07 * lam) * jitter(i)).tolist(),
                          "seg_union": union.tolist()})
    record = {"task": "segmentation", "method": method, "lambda_": float(lam), "per_image": per_image, **fields}
    atomic_write_json(ex.result_path("segmentation", name), record)


def test_experiment_bd_rate_table_from_stored_records(tmp_path):
    """Experiment.bd_rate_table reads the stored per-image records, pairs the images and reports CIs per bpp kind."""
    from icm_helpers.experiment import Experiment

    ex = Experiment("smoke", run_dir=tmp_path, log=None)
    rng = np.random.default_rng(4)
    gt_frac = rng.uniform(0.2, 0.8, (30, 3))
    for method, scale in (("baseline", 1.0), ("aux_enc", 0.75)):
        for lam in (1, 2, 4, 8):
            _write_seg_record(ex, f"{method}_lambda{lam}", method, lam, scale, gt_frac,
                              jitter=lambda i: rng.uniform(0.9, 1.0, 3), estimated=0.98)
    rows = ex.bd_rate_table("segmentation", "baseline", ["aux_enc", "roi"], samples=200)
    assert [r["method"] for r in rows] == ["aux_enc"]  # roi has no points: skipped
    e = rows[0]["bpp_bitstream"]
    assert e["ci_low"] <= e["bd_rate"] <= e["ci_high"] and e["bd_rate"] < -10
    assert rows[0]["points"] == 4 and e["samples"] == 200 and e["confidence"] == 0.95


def test_bd_rate_table_over_two_seeds_shares_the_untrained_anchors(tmp_path):
    """With two training seeds: a conventional anchor (no ``seed``: nothing trained) is the anchor of every seed; a
    method trained with one seed only (ROI) gets that seed's row and no pooled one, instead of vanishing; a stored
    model record without ``seed`` (written before records carried it) belongs to the profile's seed only."""
    from icm_helpers.experiment import Experiment

    ex = Experiment("smoke", run_dir=tmp_path, log=None)
    ex.cfg["train_seeds"] = [0, 1]
    gt_frac = np.random.default_rng(5).uniform(0.2, 0.8, (30, 3))

    def write(name, method, lam, scale, **fields):  # the same metric at each lambda for every method
        _write_seg_record(ex, name, method, lam, scale, gt_frac, jitter=lambda i: 0.9 + 0.1 * np.sin(i) ** 2, **fields)

    for lam in (1, 2, 4, 8):
        write(f"jpeg_q{lam}", "jpeg", lam, 2.0)  # an anchor: no seed, no codec_path
        for seed, scale in ((0, 0.8), (1, 0.9)):
            trained = {"seed": seed, "codec_path": f"icm/x_seed{seed}/codec.pt"}
            write(f"baseline_lambda{lam}_seed{seed}", "baseline", lam, scale, **trained)
        write(f"roi_lambda{lam}", "roi", lam, 0.7, codec_path="icm/x/codec.pt")  # no seed field: the profile's seed 0
    rows = ex.bd_rate_table("segmentation", "jpeg", ["baseline", "roi"], samples=100, bpp_keys=("bpp_bitstream",))
    assert [(r["method"], r["seed"]) for r in rows] == [("baseline", 0), ("baseline", 1), ("baseline", "pooled"),
                                                        ("roi", 0)]
    bd = {(r["method"], r["seed"]): r["bpp_bitstream"]["bd_rate"] for r in rows}
    # same metric, rates scaled: BD-rate = scale / 2 - 1 exactly (seed 0: -60%, seed 1: -55%, pooled: their mean)
    assert bd[("baseline", 0)] == pytest.approx(-60, abs=1e-6) and bd[("baseline", 1)] == pytest.approx(-55, abs=1e-6)
    assert bd[("baseline", "pooled")] == pytest.approx(-57.5, abs=1e-6)


def test_bd_rate_over_seeds_pools_the_per_seed_values_and_their_spread():
    """Seed 0's models need exactly 20% fewer bits than the anchor, seed 1's exactly 10% (no image noise): the per-seed
    CIs are those points, the pooled estimate is their mean (-15) and the seed-and-image bootstrap CI spans both."""
    from icm_helpers.bootstrap import bd_rate_ci_seeds

    n = 40
    base_acc = np.random.default_rng(2).uniform(0.3, 0.9, n)
    acc = lambda lam: np.clip(base_acc * (0.5 + 0.1 * lam), 0, 1)
    by_seed = {0: {"anchor": _curve(1.0, acc, n), "aux": _curve(0.8, acc, n)},
               1: {"anchor": _curve(1.0, acc, n), "aux": _curve(0.9, acc, n)}}
    out = bd_rate_ci_seeds(by_seed, "anchor", ["aux"], samples=400, seed=0)
    assert out["per_seed"][0]["aux"]["bpp_bitstream"]["bd_rate"] == pytest.approx(-20, abs=1e-9)
    assert out["per_seed"][1]["aux"]["bpp_bitstream"]["bd_rate"] == pytest.approx(-10, abs=1e-9)
    pooled = out["pooled"]["aux"]["bpp_bitstream"]
    assert pooled["bd_rate"] == pytest.approx(-15, abs=1e-9) and pooled["seeds"] == 2
    assert pooled["ci_low"] == pytest.approx(-20, abs=1e-9) and pooled["ci_high"] == pytest.approx(-10, abs=1e-9)
    assert pooled["seed_sd"] == pytest.approx(np.std([-20, -10], ddof=1), abs=1e-9)
    # one seed: bd_rate_ci is the per-seed result, and there is no pooled row
    single = bd_rate_ci_seeds({0: by_seed[0]}, "anchor", ["aux"], samples=50)
    assert single["pooled"] == {} and single["per_seed"][0] == bd_rate_ci(by_seed[0], "anchor", ["aux"], samples=50)
