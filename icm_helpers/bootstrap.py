"""Paired bootstrap over test images: 95% confidence intervals for task metrics and BD-rates.

A BD-rate compares two R-D curves measured on the SAME test images. Its sampling uncertainty comes from which images
were in the test set, so we resample images with replacement (Efron's nonparametric bootstrap) and use the SAME
resample for every operating point of both methods (paired resampling). For one resample, with multiplicity m_i of
image i:

* rate of a point = sum_i m_i bpp_i / n (the mean per-image bpp, CompressAI's convention);
* detection mAP = COCO mAP@[.5:.95] recomputed by pycocotools' own matching (``COCOeval.evaluate``, run once) and an
  accumulation in which image i counts m_i times (``_coco_ap`` follows ``COCOeval.accumulate``: 101 recall points,
  max 100 detections, area "all"); with m = 1 it reproduces ``COCOeval.stats[0]`` exactly;
* segmentation mIoU = mean over classes with a non-empty union of sum_i m_i I_ic / sum_i m_i U_ic (per-image
  intersections and unions are additive, so this equals the confusion-matrix mIoU of the resampled set; the rule
  is ``evaluation.SegmentationMetric.miou``).

The CI is computed from the BD-rates of ``samples`` resamples by one of ``INTERVALS`` (default: BCa, Efron 1987,
with its acceleration from a jackknife over the test images; ``interval_bounds`` holds the interval math). Resamples
where the BD-rate is undefined (no overlap of the metric ranges) are counted and enter each bound at its unfavourable
end: as -inf for the lower bound and as +inf for the upper one, so they widen the interval; when they reach into the
tail of a bound, that bound is open. Models trained with several seeds: ``bd_rate_ci_seeds`` (per seed, and pooled
with a two-stage seed-and-image bootstrap). From evaluation records (with their per-image lists): ``bd_rate_table``,
one row per method and seed, as ``Experiment.bd_rate_table`` and the notebooks show it.
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import Any, Callable, Sequence

import numpy as np
from pycocotools.cocoeval import COCOeval
from scipy.stats import norm

from .bdrate import bd_rate
from .evaluation import SegmentationMetric
from .registry import RESAMPLERS

REC_THRS = np.linspace(0.0, 1.00, 101)
INTERVALS = {  # the ``interval`` names of bd_rate_ci / bd_rate_ci_seeds / interval_bounds
    "bca": "bias-corrected and accelerated percentile interval (Efron 1987; DiCiccio & Efron 1996)",
    "percentile": "percentiles (1 - confidence) / 2 and (1 + confidence) / 2 of the bootstrap distribution",
    "basic": "basic (reverse percentile) interval: 2 x point estimate - the percentiles, ends swapped",
}


@RESAMPLERS.register("detection")
class DetectionResampler:
    """mAP of one evaluation record for any image multiplicities (``weights``: one int per test image)."""

    needs_dataset = True  # the test split's COCO ground truth

    @classmethod
    def for_record(cls, record: dict[str, Any], dataset) -> "DetectionResampler":
        """For ``record``, evaluated on ``dataset`` (its COCO ground truth)."""
        return cls(record, dataset.coco)

    def __init__(self, record: dict[str, Any], coco_gt):
        per_image = record["per_image"]
        if any("detections" not in r for r in per_image):
            raise ValueError(
                f"record {record.get('method')}/{record.get('lambda_')} has no per-image detections: it was "
                "evaluated by an older version; re-evaluate it (force=True) to get bootstrap CIs"
            )
        self.image_ids = [int(r["image_id"]) for r in per_image]
        results = [{"image_id": r["image_id"], "bbox": d[:4], "score": d[4], "category_id": int(d[5])}
                   for r in per_image for d in r["detections"]]
        self.per_cat: list[tuple[np.ndarray, ...]] = []
        if not results:
            return
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
            ev.params.imgIds = sorted(set(self.image_ids))
            ev.evaluate()
        p = ev.params
        max_det = p.maxDets[-1]
        n_img, n_area = len(p.imgIds), len(p.areaRng)
        pos = {img: self.image_ids.index(img) for img in p.imgIds}  # COCOeval's image order -> record order
        for k in range(len(p.catIds)):
            scores, dtm, dtig, img_of_det, gt_img = [], [], [], [], []
            for i, img in enumerate(p.imgIds):
                e = ev.evalImgs[k * n_area * n_img + i]  # area index 0 = "all"
                if e is None:
                    continue
                scores.append(np.asarray(e["dtScores"][:max_det]))
                dtm.append(e["dtMatches"][:, :max_det])
                dtig.append(e["dtIgnore"][:, :max_det])
                img_of_det.append(np.full(len(scores[-1]), pos[img]))
                gt_img.append(np.full(int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)), pos[img]))
            if not scores:
                continue
            self.per_cat.append((np.concatenate(scores), np.concatenate(dtm, 1), np.concatenate(dtig, 1),
                                 np.concatenate(img_of_det), np.concatenate(gt_img), np.asarray(p.iouThrs)))

    def __call__(self, weights: np.ndarray) -> float:
        return _coco_ap(self.per_cat, np.asarray(weights, dtype=np.int64))


def _coco_ap(per_cat, weights: np.ndarray) -> float:
    precisions = []
    for scores, dtm, dtig, img_of_det, gt_img, iou_thrs in per_cat:
        npig = int(weights[gt_img].sum())
        if npig == 0:
            continue  # COCO: precision -1 for this category, excluded from the mean
        rep = weights[img_of_det]
        s, m, ig = np.repeat(scores, rep), np.repeat(dtm, rep, axis=1), np.repeat(dtig, rep, axis=1)
        order = np.argsort(-s, kind="mergesort")
        m, ig = m[:, order], ig[:, order]
        tps = np.logical_and(m, np.logical_not(ig)).cumsum(1).astype(float)
        fps = np.logical_and(np.logical_not(m), np.logical_not(ig)).cumsum(1).astype(float)
        for t in range(len(iou_thrs)):
            tp, fp = tps[t], fps[t]
            q = np.zeros(len(REC_THRS))
            if tp.size:
                rc = tp / npig
                pr = tp / (fp + tp + np.spacing(1))
                pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope (COCOeval's right-to-left max)
                inds = np.searchsorted(rc, REC_THRS, side="left")
                valid = inds < len(pr)
                q[valid] = pr[inds[valid]]
            precisions.append(q.mean())
    return float(np.mean(precisions)) if precisions else 0.0


@RESAMPLERS.register("segmentation")
class SegmentationResampler:
    """mIoU of one evaluation record for any image multiplicities."""

    needs_dataset = False  # the record's per-image intersections and unions suffice

    @classmethod
    def for_record(cls, record: dict[str, Any], dataset=None) -> "SegmentationResampler":
        return cls(record)

    def __init__(self, record: dict[str, Any]):
        per_image = record["per_image"]
        if any("seg_intersection" not in r for r in per_image):
            raise ValueError(
                f"record {record.get('method')}/{record.get('lambda_')} has no per-image intersections: re-evaluate "
                "it (force=True) to get bootstrap CIs"
            )
        self.inter = np.asarray([r["seg_intersection"] for r in per_image], dtype=np.float64)
        self.union = np.asarray([r["seg_union"] for r in per_image], dtype=np.float64)

    def __call__(self, weights: np.ndarray) -> float:
        return SegmentationMetric.miou(weights @ self.inter, weights @ self.union)


def resample_weights(n_images: int, samples: int, seed: int = 0) -> np.ndarray:
    """(samples, n_images) multiplicities: each row is one resample of n_images images with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_images, size=(samples, n_images))
    return np.stack([np.bincount(row, minlength=n_images) for row in idx])


def _check_images(curves: dict[str, list], names: Sequence[str], bpp_keys: Sequence[str]) -> int:
    missing = [n for n in names if not curves.get(n)]
    if missing:
        raise ValueError(f"no operating points for {missing}; evaluate them first")
    sizes = {len(b[k]) for name in names for b, _ in curves[name] for k in bpp_keys}
    if len(sizes) != 1:
        raise ValueError(
            f"the curves were evaluated on different numbers of test images ({sorted(sizes)}): a paired bootstrap "
            "needs the same images for every point"
        )
    return sizes.pop()


def _bd_values(curves, anchor: str, tests: Sequence[str], bpp_keys: Sequence[str], weights: np.ndarray,
               method: str) -> dict[str, dict[str, Any]]:
    """BD-rate of every test vs ``anchor`` under every row of image multiplicities ``weights`` (row 0: all images):
    ``out[test][key]`` = array (NaN where undefined) or the reason string when even row 0 is undefined."""
    names = [anchor, *tests]
    # metric of every point under every resample: the expensive part, computed once and shared by the bpp kinds
    metrics = {name: [np.array([fn(w) for w in weights]) for _, fn in curves[name]] for name in names}
    out: dict[str, dict[str, Any]] = {t: {} for t in tests}
    for key in bpp_keys:
        # mean per-image bpp of the images in each row (a resample holds n_images images, a jackknife row one fewer)
        rates = {name: [weights @ np.asarray(b[key], float) / weights.sum(axis=1) for b, _ in curves[name]]
                 for name in names}
        for test in tests:
            values = np.full(len(weights), np.nan)
            for s in range(len(weights)):
                try:
                    values[s] = bd_rate([r[s] for r in rates[anchor]], [m[s] for m in metrics[anchor]],
                                        [r[s] for r in rates[test]], [m[s] for m in metrics[test]], method=method)
                except ValueError as exc:
                    if s == 0:
                        values = str(exc).split(";")[0]
                        break
            out[test][key] = values
    return out


def _check_interval(interval: str) -> None:
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r}; valid: {', '.join(map(repr, INTERVALS))}")


def bias_correction(point: float, boot: np.ndarray) -> float:
    """BCa's bias correction z0 = Phi^-1(share of the resamples below the point estimate) (Efron 1987).

    A resample equal to the point counts half (scipy.stats.bootstrap's convention). An undefined resample (NaN or
    infinite) also counts half: it lies on neither side of the point, and counting it below or above would push every
    bound one way. The share is kept within [1/(2N), 1 - 1/(2N)] (N resamples, the resolution of the share), so a
    point outside the whole bootstrap distribution gives a finite z0 instead of +-inf."""
    boot = np.asarray(boot, dtype=float)
    defined = boot[np.isfinite(boot)]
    n = boot.size
    below = np.count_nonzero(defined < point) + 0.5 * (np.count_nonzero(defined == point) + n - defined.size)
    return float(norm.ppf(np.clip(below / n, 0.5 / n, 1 - 0.5 / n)))


def jackknife_acceleration(jack: np.ndarray | None) -> float:
    """BCa's acceleration from the leave-one-out estimates theta_(i) (Efron 1987; DiCiccio & Efron 1996):
    a = sum d_i^3 / (6 (sum d_i^2)^(3/2)), d_i = mean_j theta_(j) - theta_(i).

    Undefined leave-one-out estimates are left out (a skewness estimate has no unfavourable end to put them at).
    0 when there is no jackknife (None), fewer than 2 defined estimates, or when they are all equal up to rounding
    (a = 0/0): the interval is then bias-corrected only."""
    if jack is None:
        return 0.0
    jack = np.asarray(jack, dtype=float)
    jack = jack[np.isfinite(jack)]
    if jack.size < 2 or np.ptp(jack) <= 8 * np.finfo(float).eps * np.abs(jack).max():
        return 0.0
    d = jack.mean() - jack
    return float(np.sum(d**3) / (6 * np.sum(d**2) ** 1.5))


def bca_levels(z0: float, a: float, confidence: float) -> tuple[float, float]:
    """The BCa percentile levels of the lower and upper bound (Efron 1987; DiCiccio & Efron 1996):
    alpha' = Phi(z0 + (z0 + z_alpha) / (1 - a (z0 + z_alpha))), z_alpha = Phi^-1((1 -+ confidence) / 2).

    Past the formula's pole (1 - a (z0 + z_alpha) <= 0, only with a large acceleration) it would wrap around; the
    level is then set to its widest value instead: 0 for the lower bound, 1 for the upper one."""
    z_alpha = float(norm.ppf((1 - confidence) / 2))
    levels = []
    for z in (z_alpha, -z_alpha):
        w = z0 + z
        denominator = 1 - a * w
        shift = w / denominator if denominator > 0 else np.copysign(np.inf, z)
        levels.append(float(norm.cdf(z0 + shift)))
    return levels[0], levels[1]


def _tail_percentile(defined: np.ndarray, undefined: int, pct: float, end: str) -> float:
    """The ``pct`` percentile (numpy's default linear interpolation) of the bootstrap distribution whose ``undefined``
    resamples sit at ``end``: "low" (as -inf) or "high" (as +inf). -inf / +inf (an open bound) when the
    interpolation reaches into them, i.e. when they fill that tail; otherwise it equals ``np.percentile`` of the
    defined values padded with ``undefined`` placeholders at that end (with none undefined:
    exactly ``np.percentile(defined, pct)``)."""
    n = defined.size + undefined
    if defined.size == 0:
        return -np.inf if end == "low" else np.inf
    h = (n - 1) * (pct / 100)  # numpy's virtual index for method="linear": it interpolates sorted[floor(h)..ceil(h)]
    if end == "low":
        if undefined and np.floor(h) < undefined:
            return -np.inf
        padded = np.concatenate([np.full(undefined, defined.min()), defined])  # placeholders: not reached here
    else:
        if undefined and np.ceil(h) > defined.size - 1:
            return np.inf
        padded = np.concatenate([defined, np.full(undefined, defined.max())])
    return float(np.percentile(padded, pct))


def _interval(point: float, boot: np.ndarray, confidence: float, method: str,
              jack: np.ndarray | None) -> tuple[float, float, dict[str, float]]:
    _check_interval(method)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    boot = np.asarray(boot, dtype=float)
    ok = np.isfinite(boot)
    defined, undefined = boot[ok], int(boot.size - np.count_nonzero(ok))
    extra: dict[str, float] = {}
    if method == "bca":
        extra = {"z0": bias_correction(point, boot), "acceleration": jackknife_acceleration(jack)}
        lo_pct, hi_pct = (100 * level for level in bca_levels(extra["z0"], extra["acceleration"], confidence))
    else:
        lo_pct, hi_pct = 50 * (1 - confidence), 50 * (1 + confidence)
    if method == "basic":
        # 2 theta - q_hi, 2 theta - q_lo: the lower bound comes from the upper tail, where undefined ones are +inf
        low = 2 * point - _tail_percentile(defined, undefined, hi_pct, "high")
        high = 2 * point - _tail_percentile(defined, undefined, lo_pct, "low")
    else:
        low = _tail_percentile(defined, undefined, lo_pct, "low")
        high = _tail_percentile(defined, undefined, hi_pct, "high")
    return float(low), float(high), extra


def interval_bounds(point: float, boot: np.ndarray, confidence: float, method: str = "bca",
                    jack: np.ndarray | None = None) -> tuple[float, float]:
    """(low, high) of the ``confidence`` interval of a statistic with estimate ``point`` and bootstrap replicates
    ``boot`` (NaN: undefined in that resample), by ``method`` (one of ``INTERVALS``):

    * "percentile": the (1 -+ confidence) / 2 percentiles of ``boot``;
    * "basic": 2 point - those percentiles, ends swapped;
    * "bca": the percentiles at ``bca_levels(bias_correction(point, boot), jackknife_acceleration(jack))``; ``jack``:
      the statistic's leave-one-out (jackknife) estimates, None for a = 0.

    Undefined replicates are never dropped: each bound is taken with them at its unfavourable end (-inf for the
    lower bound, +inf for the upper one), so they widen the interval; a bound whose tail they fill is -inf / +inf."""
    low, high, _ = _interval(point, boot, confidence, method, jack)
    return low, high


def _summary(point: float, boot: np.ndarray, samples: int, confidence: float, interval: str,
             jack: np.ndarray | None = None) -> dict[str, Any]:
    """A CI entry. An open bound (``interval_bounds`` gave -inf / +inf) is stored as None with ``ci_low_open`` /
    ``ci_high_open`` True, so the entry stays plain JSON; ``format_ci`` prints it as -inf / inf."""
    low, high, extra = _interval(point, boot, confidence, interval, jack)
    defined = int(np.count_nonzero(np.isfinite(boot)))
    return {"bd_rate": float(point), "ci_low": low if np.isfinite(low) else None,
            "ci_high": high if np.isfinite(high) else None, "samples": samples, "samples_defined": defined,
            "confidence": confidence, "samples_undefined": samples - defined, "ci_low_open": bool(np.isneginf(low)),
            "ci_high_open": bool(np.isposinf(high)), "interval": interval, **extra}


def bd_rate_ci(curves: dict[str, list[tuple[dict[str, np.ndarray], Callable[[np.ndarray], float]]]], anchor: str,
               tests: Sequence[str], bpp_keys: Sequence[str] = ("bpp_bitstream", "bpp_estimated"), samples: int = 1000,
               confidence: float = 0.95, seed: int = 0, method: str = "pchip",
               interval: str = "bca") -> dict[str, dict[str, dict[str, Any]]]:
    """BD-rate (%) of each test method against ``anchor`` with a paired-bootstrap CI, per bpp kind.

    ``curves[name]`` = one ({bpp kind: per-image bpp array}, metric function of image multiplicities) per operating
    point; every array indexes the same test images in the same order. ``interval``: one of ``INTERVALS``; "bca"
    takes its acceleration from a jackknife over the test images (the metric functions are also evaluated with each
    image left out). Returns ``out[test][bpp_key]`` = the ``_summary`` entry {"bd_rate" (all images), "ci_low",
    "ci_high", "samples", "samples_defined", "confidence", "samples_undefined", "ci_low_open", "ci_high_open",
    "interval", and for BCa "z0", "acceleration"}, or {"error": reason} when even the point estimate is undefined."""
    return bd_rate_ci_seeds({0: curves}, anchor, tests, bpp_keys, samples, confidence, seed, method,
                            interval)["per_seed"][0]


def bd_rate_ci_seeds(curves_by_seed: dict[Any, dict[str, list]], anchor: str, tests: Sequence[str],
                     bpp_keys: Sequence[str] = ("bpp_bitstream", "bpp_estimated"), samples: int = 1000,
                     confidence: float = 0.95, seed: int = 0, method: str = "pchip",
                     interval: str = "bca") -> dict[str, Any]:
    """BD-rates of models trained with several training seeds: per seed, and pooled over the seeds.

    ``curves_by_seed[s]``: the ``curves`` of ``bd_rate_ci`` for the models of training seed s, all on the same test
    images. Per seed: the paired image bootstrap of ``bd_rate_ci`` (the same image resamples for every seed).
    Pooled: the estimate is the mean of the per-seed BD-rates (what one training run gives on average); its CI comes
    from a two-stage bootstrap that covers both sources of variation: each replicate draws as many seeds as there are,
    with replacement, and one image resample, and averages the drawn seeds' BD-rates under that image resample. A
    replicate with an undefined BD-rate in any drawn seed is counted as undefined. For "bca" the pooled bias
    correction comes from this two-stage distribution and the acceleration from a jackknife over the seeds (the means
    of the per-seed estimates with one seed left out). With few seeds the seed stage resamples from a handful of
    values, so the CI under-covers the seed variance; ``seed_sd`` (the standard deviation of the per-seed estimates) is
    reported beside it.

    Returns {"per_seed": {s: out as bd_rate_ci}, "pooled": {test: {key: summary + "seed_sd", "seeds"}} (pooled only
    with 2 or more seeds)}."""
    _check_interval(interval)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    seeds = list(curves_by_seed)
    sizes = {_check_images(curves_by_seed[s], [anchor, *tests], bpp_keys) for s in seeds}
    if len(sizes) != 1:
        raise ValueError(f"the seeds' models were evaluated on different numbers of test images ({sorted(sizes)})")
    n_images = sizes.pop()
    # row 0: all images; rows 1..samples: the resamples; for BCa then n_images rows with image i left out (jackknife)
    rows = [np.ones((1, n_images), np.int64), resample_weights(n_images, samples, seed)]
    if interval == "bca":
        rows.append(1 - np.eye(n_images, dtype=np.int64))
    weights = np.vstack(rows)
    values = {s: _bd_values(curves_by_seed[s], anchor, tests, bpp_keys, weights, method) for s in seeds}
    out: dict[str, Any] = {"per_seed": {s: {t: {} for t in tests} for s in seeds}, "pooled": {}}
    for s in seeds:
        for test in tests:
            for key in bpp_keys:
                v = values[s][test][key]
                out["per_seed"][s][test][key] = (
                    {"error": v} if isinstance(v, str)
                    else _summary(v[0], v[1:1 + samples], samples, confidence, interval, v[1 + samples:])
                )  # v[1 + samples:]: the jackknife estimates (empty unless BCa)
    if len(seeds) < 2:
        return out
    draws = np.random.default_rng(seed + 1).integers(0, len(seeds), size=(samples, len(seeds)))
    for test in tests:
        out["pooled"][test] = {}
        for key in bpp_keys:
            per = [values[s][test][key] for s in seeds]
            errors = [v for v in per if isinstance(v, str)]
            if errors:
                out["pooled"][test][key] = {"error": errors[0]}
                continue
            matrix = np.stack(per)[:, :1 + samples]  # (seeds, 1 + samples)
            boot = matrix[draws, 1 + np.arange(samples)[:, None]].mean(axis=1)  # NaN if any drawn seed is undefined
            point = matrix[:, 0]
            jack = (point.sum() - point) / (len(seeds) - 1)  # the mean of the other seeds' estimates, per seed left out
            out["pooled"][test][key] = {
                **_summary(point.mean(), boot, samples, confidence, interval, jack),
                "seed_sd": float(point.std(ddof=1)),
                "seeds": len(seeds),
            }
    return out


def record_curve_point(record: dict[str, Any], task: str, dataset=None,
                       bpp_keys: Sequence[str] = ("bpp_bitstream", "bpp_estimated")
                       ) -> tuple[dict[str, np.ndarray], Callable[[np.ndarray], float]]:
    """One operating point of ``bd_rate_ci``'s ``curves`` from an evaluation record with its per-image list: the
    per-image bpp of each kind in ``bpp_keys`` (NaN where an image has none) and the task's resampled metric
    (``RESAMPLERS[task]``; ``dataset``: the test split, for a task whose resampler needs it)."""
    bpp = {k: np.array([p.get(k, np.nan) for p in record["per_image"]], float) for k in bpp_keys}
    return bpp, RESAMPLERS[task].for_record(record, dataset)


def bd_rate_table(records_by_seed: dict[Any, dict[str, list[dict[str, Any]]]], task: str, anchor: str = "baseline",
                  tests: Sequence[str] = ("aux_enc",), method: str = "pchip",
                  bpp_keys: Sequence[str] = ("bpp_bitstream", "bpp_estimated"), samples: int = 1000,
                  confidence: float = 0.95, seed: int = 0, interval: str = "bca", dataset=None,
                  budget: float | None = None) -> list[dict[str, Any]]:
    """BD-rate of each ``tests`` method vs ``anchor`` with paired-bootstrap CIs, from evaluation records.

    ``records_by_seed[s][name]``: the records (with per-image lists, sorted by lambda) of method ``name`` for the
    models of training seed ``s`` (``result_store.ResultStore.records_by_seed``), every record on the same test
    images; ``dataset``: the test split when the task's resampler needs it (detection's COCO ground truth). A test
    method with fewer than 2 operating points in a seed is left out of that seed; a method with points in only some
    seeds gets rows for those seeds, pooled over them when 2 or more (``bd_rate_ci_seeds``: one bootstrap per group
    of methods with the same seeds, so the anchor's resampled metrics are computed once per group). ``seed``: the
    bootstrap's random seed; ``budget``: copied into the rows (the records' training budget fraction).

    Returns one row per (method, seed) and a ``seed: "pooled"`` row per method with 2+ seeds: {"task", "method",
    "anchor", "seed", "points", "budget", and per bpp kind the ``bd_rate_ci`` entry}."""
    seeds = list(records_by_seed)
    curves_by_seed, ids = {}, {}
    for s in seeds:
        curves = {}
        for name in [anchor, *tests]:
            recs = records_by_seed[s].get(name, [])
            if len(recs) < 2 and name != anchor:
                continue
            curves[name] = [record_curve_point(r, task, dataset, bpp_keys) for r in recs]
            ids.update({(name, s, r["lambda_"]): [p["image_id"] for p in r["per_image"]] for r in recs})
        curves_by_seed[s] = curves
    if len({tuple(v) for v in ids.values()}) > 1:
        raise ValueError(
            f"{task}: the records were evaluated on different test images; re-evaluate them on the same split"
        )
    groups: dict[tuple[Any, ...], list[str]] = {}
    for t in tests:
        have = tuple(s for s in seeds if t in curves_by_seed[s] and anchor in curves_by_seed[s])
        if have:
            groups.setdefault(have, []).append(t)
    results = {}
    for have, group in groups.items():
        res = bd_rate_ci_seeds({s: curves_by_seed[s] for s in have}, anchor, group, bpp_keys, samples, confidence,
                               seed, method, interval=interval)
        results.update({t: (have, res) for t in group})
    rows = []
    for t in [t for t in tests if t in results]:
        have, res = results[t]
        points = len(curves_by_seed[have[0]][t])
        rows += [{"task": task, "method": t, "anchor": anchor, "seed": s, "points": points, "budget": budget,
                  **{k: res["per_seed"][s][t][k] for k in bpp_keys}} for s in have]
        if t in res["pooled"]:
            rows.append({"task": task, "method": t, "anchor": anchor, "seed": "pooled", "points": points,
                         "budget": budget, **{k: res["pooled"][t][k] for k in bpp_keys}})
    return rows


def short_reason(error: str, limit: int = 80) -> str:
    """The reason a BD-rate is undefined, in one clause: the error up to its first ", got " or "; " (the values and
    the advice stay in the JSON); beyond ``limit`` characters without its parenthesis, else cut at a word with "…"."""
    reason = re.split(r", got |; ", error, maxsplit=1)[0].strip()
    if len(reason) > limit and " (" in reason:
        reason = reason.split(" (", 1)[0]
    return reason if len(reason) <= limit else reason[:limit].rsplit(" ", 1)[0] + "…"


def format_ci(entry: dict[str, Any], digits: int = 1) -> str:
    """"-12.3 [-20.1, -4.0]" (or "n/a (reason)" when undefined); an open bound prints as -inf / inf; a note when some
    resamples were undefined."""
    if "error" in entry:
        return f"n/a ({short_reason(entry['error'])})"
    low = -np.inf if entry.get("ci_low_open") else entry["ci_low"]
    high = np.inf if entry.get("ci_high_open") else entry["ci_high"]
    text = f"{entry['bd_rate']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    if entry["samples_defined"] < entry["samples"]:
        text += f" ({entry['samples'] - entry['samples_defined']}/{entry['samples']} resamples undefined)"
    return text
