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
    missing_rate = {"error": "anchor rates must be positive and finite (bits per pixel), got [nan, nan]; BD measures "
                             "work on log10(rate), so drop failed or zero-rate points"}
    assert format_ci(missing_rate) == "n/a (anchor rates must be positive and finite (bits per pixel))"
    assert format_ci({"error": "word " * 40}).endswith("word…)") and len(format_ci({"error": "word " * 40})) < 90
    no_overlap = out["b"]["bpp_bitstream"]["error"]
    assert format_ci({"error": no_overlap}) == "n/a (the metric ranges of the curves do not overlap)", no_overlap
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
    assert e["interval"] == "bca"  # the default when the profile's evaluation.bootstrap names none
    ex.cfg["evaluation"]["bootstrap"] = {"interval": "percentile"}
    rows = ex.bd_rate_table("segmentation", "baseline", ["aux_enc"], samples=50)
    assert rows[0]["bpp_bitstream"]["interval"] == "percentile"


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


# --- interval kinds (INTERVALS): BCa, percentile, basic; undefined resamples -------------------------------------


def _old_percentile_bounds(boot, confidence):
    """The percentile interval as computed before the ``interval`` option: over the defined resamples only."""
    ok = boot[np.isfinite(boot)]
    return tuple(np.percentile(ok, [50 * (1 - confidence), 50 * (1 + confidence)]))


def _noisy_curves(n=40, seed=2):
    rng = np.random.default_rng(seed)
    base_acc = rng.uniform(0.3, 0.9, n)
    acc = lambda lam: np.clip(base_acc * (0.5 + 0.1 * lam), 0, 1)
    noisy = lambda lam: np.clip(acc(lam) + rng.normal(0, 0.1, n), 0, 1)
    return {"anchor": _curve(1.0, acc, n), "noisy": _curve(0.9, noisy, n)}


def _boot_values(curves, test, samples, seed=0, key="bpp_bitstream"):
    """(point, bootstrap BD-rates) of ``test`` under the resamples bd_rate_ci draws, computed independently of it."""
    from icm_helpers.bootstrap import _bd_values

    n = len(curves["anchor"][0][0][key])
    weights = np.vstack([np.ones((1, n), np.int64), resample_weights(n, samples, seed)])
    v = _bd_values(curves, "anchor", [test], (key,), weights, "pchip")[test][key]
    return v[0], v[1:]


def _edge_curves():
    """A test curve whose lowest metric barely reaches the anchor's highest one: defined on all 30 images, undefined
    (the metric ranges do not overlap) in 23 of the first 200 resamples of seed 0."""
    n = 30
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, n)
    noise = rng.normal(0, 0.05, n)
    acc = lambda lam: base * (0.4 + 0.1 * lam)  # the anchor's top (lambda 8): 1.2 x base
    edge = lambda lam: base * (1.1 + 0.1 * lam) + noise - noise.mean() - 0.01  # its bottom: 1.2 x base - 0.01
    return {"anchor": _curve(1.0, acc, n), "edge": _curve(0.9, edge, n)}


def test_unknown_interval_name_raises_with_the_valid_names():
    from icm_helpers.bootstrap import INTERVALS, bd_rate_ci_seeds, interval_bounds

    assert set(INTERVALS) == {"bca", "percentile", "basic"}
    curves = _noisy_curves()
    for call in (lambda: bd_rate_ci(curves, "anchor", ["noisy"], samples=5, interval="BCa2"),
                 lambda: bd_rate_ci_seeds({0: curves, 1: curves}, "anchor", ["noisy"], samples=5, interval="t"),
                 lambda: interval_bounds(0.0, np.zeros(10), 0.95, "studentized")):
        with pytest.raises(ValueError, match="unknown interval .*'bca', 'percentile', 'basic'"):
            call()


def test_bca_core_equals_scipy_on_scipys_own_resamples():
    """Given scipy.stats.bootstrap's bootstrap distribution and the jackknife of the mean, interval_bounds reproduces
    scipy's BCa interval to rounding: the same z0 (ties half), acceleration and adjusted levels (Efron 1987)."""
    from scipy.stats import bootstrap

    from icm_helpers.bootstrap import interval_bounds

    x = np.random.default_rng(7).exponential(1.0, 25)  # skewed: BCa differs clearly from the percentile interval
    jack = (x.sum() - x) / (x.size - 1)  # leave-one-out means
    for confidence in (0.9, 0.95):
        res = bootstrap((x,), np.mean, n_resamples=4000, method="BCa", confidence_level=confidence,
                        random_state=np.random.default_rng(3))
        low, high = interval_bounds(x.mean(), res.bootstrap_distribution, confidence, "bca", jack)
        assert low == pytest.approx(res.confidence_interval.low, rel=1e-9)
        assert high == pytest.approx(res.confidence_interval.high, rel=1e-9)


def test_bca_core_agrees_with_scipy_within_monte_carlo_error():
    """BCa of the mean of 25 exponentials from our own 100000 resamples vs scipy.stats.bootstrap(method="BCa") from
    its own 100000: the intervals [0.688, 1.445] agree within Monte-Carlo error, and that tolerance is tight enough to
    tell BCa from the percentile interval [0.652, 1.384] and from BCa without acceleration [0.665, 1.403].

    Tolerance: 40 repetitions of each side with fresh seeds gave Monte-Carlo standard deviations of the bounds of
    0.0016 / 0.0026 (ours) and 0.0016 / 0.0028 (scipy), so the difference of one run of each has sd 0.0023 (low) and
    0.0039 (high), and no systematic offset (mean difference 0.0002 +- 0.0004, 0.0000 +- 0.0006). 4 sd, rounded up:
    0.010 and 0.016; the wrong intervals lie 0.023 / 0.042 (a = 0) and 0.036 / 0.061 (percentile) away."""
    from scipy.stats import bootstrap

    from icm_helpers.bootstrap import interval_bounds

    x = np.random.default_rng(7).exponential(1.0, 25)
    n, samples = x.size, 100_000
    boot = x[np.random.default_rng(11).integers(0, n, (samples, n))].mean(axis=1)
    jack = (x.sum() - x) / (n - 1)
    ref = bootstrap((x,), np.mean, n_resamples=samples, method="BCa", random_state=np.random.default_rng(12))
    ref = np.array([ref.confidence_interval.low, ref.confidence_interval.high])
    tol = np.array([0.010, 0.016])
    assert np.all(np.abs(np.array(interval_bounds(x.mean(), boot, 0.95, "bca", jack)) - ref) < tol)
    for wrong in (interval_bounds(x.mean(), boot, 0.95, "bca"), interval_bounds(x.mean(), boot, 0.95, "percentile")):
        assert np.all(np.abs(np.array(wrong) - ref) > tol)


def test_percentile_interval_reproduces_the_old_formula_exactly():
    from icm_helpers.bootstrap import interval_bounds

    boot = np.random.default_rng(0).standard_t(3, 999)
    for confidence in (0.5, 0.9, 0.95, 0.99):
        assert interval_bounds(0.1, boot, confidence, "percentile") == _old_percentile_bounds(boot, confidence)
    # end to end: bd_rate_ci's percentile bounds are the old ones over the same resamples, bit for bit
    curves = _noisy_curves()
    e = bd_rate_ci(curves, "anchor", ["noisy"], samples=300, seed=0, interval="percentile")["noisy"]["bpp_bitstream"]
    point, boot = _boot_values(curves, "noisy", 300)
    assert np.isfinite(boot).all() and e["samples_undefined"] == 0 and e["interval"] == "percentile"
    assert (e["bd_rate"], e["ci_low"], e["ci_high"]) == (point, *_old_percentile_bounds(boot, 0.95))
    assert "z0" not in e and not e["ci_low_open"] and not e["ci_high_open"]


def test_basic_interval_is_the_percentile_interval_reflected_at_the_point():
    from icm_helpers.bootstrap import interval_bounds

    rng = np.random.default_rng(1)
    boot = rng.exponential(1.0, 500)
    point = 0.8
    lo, hi = _old_percentile_bounds(boot, 0.9)
    assert interval_bounds(point, boot, 0.9, "basic") == pytest.approx((2 * point - hi, 2 * point - lo), abs=1e-12)
    # with undefined resamples too, including open bounds: basic = 2 point - (percentile bounds, ends swapped)
    for undefined in (3, 40):
        b = np.concatenate([boot, np.full(undefined, np.nan)])
        p_lo, p_hi = interval_bounds(point, b, 0.9, "percentile")
        assert interval_bounds(point, b, 0.9, "basic") == (2 * point - p_hi, 2 * point - p_lo)
    curves = _noisy_curves()
    e = bd_rate_ci(curves, "anchor", ["noisy"], samples=200, interval="basic")["noisy"]["bpp_bitstream"]
    lo, hi = _old_percentile_bounds(_boot_values(curves, "noisy", 200)[1], 0.95)
    assert (e["ci_low"], e["ci_high"]) == pytest.approx((2 * e["bd_rate"] - hi, 2 * e["bd_rate"] - lo), abs=1e-9)


def test_undefined_resamples_enter_each_bound_at_its_unfavourable_end():
    from icm_helpers.bootstrap import interval_bounds

    defined = np.random.default_rng(3).normal(0, 1, 195)
    # percentile, 4 undefined of 199: the 2.5% tails (virtual index 0.025 x 198 = 4.95) still reach a defined one;
    # 5 of 200 (4.975): they reach into the undefined ones, both bounds are open. BCa's tails here are 2.3% / 2.7%
    # (z0 = -0.02): 4 undefined still closed, 8 open
    for method, closed, opened in (("percentile", 4, 5), ("bca", 4, 8)):
        kept = interval_bounds(0.0, defined, 0.95, method)
        lo, hi = interval_bounds(0.0, np.concatenate([defined, np.full(closed, np.nan)]), 0.95, method)
        assert np.isfinite([lo, hi]).all() and lo < kept[0] and hi > kept[1]  # wider than over the defined ones
        # where the undefined ones sit in ``boot`` does not matter
        assert (lo, hi) == interval_bounds(0.0, np.concatenate([np.full(closed, np.nan), defined]), 0.95, method)
        assert interval_bounds(0.0, np.concatenate([defined, np.full(opened, np.nan)]), 0.95, method) == (-np.inf,
                                                                                                           np.inf)
    # the percentile bound equals np.percentile with the undefined ones as -1e300 (low) / +1e300 (high) stand-ins
    b = np.concatenate([defined, np.full(3, np.nan)])
    lo, hi = interval_bounds(0.0, b, 0.9, "percentile")
    assert lo == np.percentile(np.nan_to_num(b, nan=-1e300), 5) and hi == np.percentile(np.nan_to_num(b, nan=1e300), 95)


def test_undefined_resamples_are_counted_widen_the_bd_rate_ci_and_can_open_it():
    import json

    curves = _edge_curves()
    point, boot = _boot_values(curves, "edge", 200, key="bpp_bitstream")
    assert np.isfinite(point) and np.count_nonzero(np.isnan(boot)) == 23
    for interval in ("percentile", "bca"):
        # confidence 0.5: 23 undefined of 200 fit in the 25% tails: closed, wider than over the defined ones only
        e = bd_rate_ci(curves, "anchor", ["edge"], ("bpp_bitstream",), samples=200, confidence=0.5,
                       interval=interval)["edge"]["bpp_bitstream"]
        assert (e["samples"], e["samples_defined"], e["samples_undefined"]) == (200, 177, 23)
        old_lo, old_hi = _old_percentile_bounds(boot, 0.5)
        if interval == "percentile":
            assert e["ci_low"] < old_lo and e["ci_high"] > old_hi
        assert not e["ci_low_open"] and not e["ci_high_open"]
        assert format_ci(e).endswith("(23/200 resamples undefined)")
        # confidence 0.95: the 2.5% tails (5 resamples) are full of undefined ones: both bounds open, JSON-safe
        e = bd_rate_ci(curves, "anchor", ["edge"], ("bpp_bitstream",), samples=200,
                       interval=interval)["edge"]["bpp_bitstream"]
        assert e["ci_low"] is None and e["ci_high"] is None and e["ci_low_open"] and e["ci_high_open"]
        assert json.loads(json.dumps(e, allow_nan=False)) == e
        assert format_ci(e) == f"{e['bd_rate']:.1f} [-inf, inf] (23/200 resamples undefined)"


def test_bias_correction_counts_ties_and_undefined_resamples_half():
    from scipy.stats import norm

    from icm_helpers.bootstrap import bias_correction

    assert bias_correction(2.5, np.array([1.0, 2.0, 3.0, np.nan])) == pytest.approx(norm.ppf(2.5 / 4))
    assert bias_correction(2.0, np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(norm.ppf(1.5 / 4))
    assert bias_correction(0.0, np.full(10, np.nan)) == 0.0  # all undefined: on neither side
    # the point below every resample: the share is clipped to 1 / (2N), not 0 (z0 = -inf would void the interval)
    assert bias_correction(-1.0, np.arange(10.0)) == pytest.approx(norm.ppf(0.05))


def test_bca_bd_rate_ci_uses_the_image_jackknife():
    """Per seed, BCa's acceleration comes from the BD-rates with each test image left out: the same as computing
    them from curves that lack that image; the bounds are interval_bounds over bd_rate_ci's resamples."""
    from icm_helpers.bootstrap import interval_bounds, jackknife_acceleration

    curves = _noisy_curves(n=20)
    e = bd_rate_ci(curves, "anchor", ["noisy"], samples=300)["noisy"]["bpp_bitstream"]
    assert e["interval"] == "bca"  # the default
    loo = []
    for i in range(20):
        keep = np.arange(20) != i
        sub = {name: [({k: b[k][keep] for k in b}, lambda w, fn=fn, keep=keep: fn(_put(w, keep))) for b, fn in pts]
               for name, pts in curves.items()}
        loo.append(bd_rate_ci(sub, "anchor", ["noisy"], ("bpp_bitstream",), samples=1,
                              interval="percentile")["noisy"]["bpp_bitstream"]["bd_rate"])
    a = jackknife_acceleration(np.array(loo))
    assert a != 0 and e["acceleration"] == pytest.approx(a, rel=1e-9, abs=1e-12)
    point, boot = _boot_values(curves, "noisy", 300)
    assert (e["ci_low"], e["ci_high"]) == pytest.approx(interval_bounds(point, boot, 0.95, "bca", np.array(loo)),
                                                       abs=1e-9)
    assert (e["ci_low"], e["ci_high"]) != pytest.approx(_old_percentile_bounds(boot, 0.95), abs=1e-3)


def _put(w_sub, keep):
    """Multiplicities of the kept images -> multiplicities of all images (0 for the left-out one)."""
    w = np.zeros(keep.size, dtype=np.asarray(w_sub).dtype)
    w[keep] = w_sub
    return w


def test_pooled_bca_with_a_degenerate_seed_jackknife_uses_zero_acceleration():
    """Three seeds with identical models: every leave-one-seed-out mean is the same (a = 0/0); the pooled BCa falls
    back to a = 0 (bias correction only) instead of NaN bounds. The pure functions agree."""
    from icm_helpers.bootstrap import bd_rate_ci_seeds, interval_bounds, jackknife_acceleration

    assert jackknife_acceleration(np.full(3, 0.1)) == 0.0  # np.mean of three 0.1 is not 0.1: still degenerate
    assert jackknife_acceleration(np.array([1.0, 1.0, np.nan])) == 0.0 and jackknife_acceleration(None) == 0.0
    # d = mean - jack = (1, 1, -2): a = sum d^3 / (6 (sum d^2)^1.5) = -6 / (6 x 6^1.5)
    assert jackknife_acceleration(np.array([0.0, 0.0, 3.0])) == pytest.approx(-6 / (6 * 6**1.5))
    boot = np.random.default_rng(4).gamma(2.0, 1.0, 400)
    assert interval_bounds(2.1, boot, 0.95, "bca", np.full(5, -7.3)) == interval_bounds(2.1, boot, 0.95, "bca")
    curves = _noisy_curves(n=20)
    out = bd_rate_ci_seeds({s: curves for s in (0, 1, 2)}, "anchor", ["noisy"], ("bpp_bitstream",), samples=200)
    pooled = out["pooled"]["noisy"]["bpp_bitstream"]
    assert pooled["acceleration"] == 0.0 and pooled["seeds"] == 3 and pooled["seed_sd"] == 0.0
    assert pooled["interval"] == "bca" and np.isfinite([pooled["ci_low"], pooled["ci_high"], pooled["z0"]]).all()
    assert pooled["ci_low"] < pooled["bd_rate"] < pooled["ci_high"]
    assert out["per_seed"][0]["noisy"]["bpp_bitstream"]["acceleration"] != 0  # the per-seed image jackknife is not


def test_pooled_bca_takes_its_acceleration_from_the_leave_one_seed_out_means():
    """Three seeds with 20%, 18% and 5% fewer bits (no image noise): the pooled acceleration is the jackknife one of
    the means of the other two seeds' estimates (right-skewed values: a > 0, the opposite sign to the jackknife of
    the per-seed values themselves)."""
    from icm_helpers.bootstrap import bd_rate_ci_seeds, jackknife_acceleration

    n = 20
    base_acc = np.random.default_rng(2).uniform(0.3, 0.9, n)
    acc = lambda lam: np.clip(base_acc * (0.5 + 0.1 * lam), 0, 1)
    by_seed = {s: {"anchor": _curve(1.0, acc, n), "aux": _curve(scale, acc, n)}
               for s, scale in enumerate((0.8, 0.82, 0.95))}
    out = bd_rate_ci_seeds(by_seed, "anchor", ["aux"], ("bpp_bitstream",), samples=300)
    point = np.array([out["per_seed"][s]["aux"]["bpp_bitstream"]["bd_rate"] for s in range(3)])
    assert point == pytest.approx([-20, -18, -5], abs=1e-9)
    loo = np.array([np.delete(point, i).mean() for i in range(3)])
    pooled = out["pooled"]["aux"]["bpp_bitstream"]
    a = jackknife_acceleration(loo)
    assert a > 0 > jackknife_acceleration(point) and pooled["acceleration"] == pytest.approx(a, rel=1e-9)
    assert pooled["bd_rate"] == pytest.approx(point.mean()) and pooled["ci_low"] < pooled["bd_rate"] < pooled["ci_high"]


def test_bca_levels_reduce_to_the_percentile_levels_and_take_the_widest_level_past_the_pole():
    from scipy.stats import norm

    from icm_helpers.bootstrap import bca_levels

    assert bca_levels(0.0, 0.0, 0.95) == pytest.approx((0.025, 0.975), abs=1e-12)  # z0 = a = 0: percentile
    lo, hi = bca_levels(0.0, 0.6, 0.95)  # upper: 1 - 0.6 x 1.96 < 0, past the pole: the widest level, not a wrap
    assert hi == 1.0 and lo == pytest.approx(norm.cdf(-1.96 / (1 + 0.6 * 1.96)), abs=1e-3)
    assert bca_levels(0.0, -0.6, 0.95)[0] == 0.0
