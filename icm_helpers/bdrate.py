"""Bjøntegaard-delta (BD) measures for rate / task-metric curves.

Image coding for machines compares codecs by the bits per pixel (bpp) they need for a given *task*
metric (detection mAP, segmentation mIoU, ...) instead of PSNR; the computation is otherwise the
classic Bjøntegaard delta:

* **BD-rate** (:func:`bd_rate`): ``log10(rate)`` is modelled as a function of the metric for the
  anchor and the test curve, the gap between the two models is averaged over the overlapping metric
  interval, and the average log-rate difference ``d`` is reported as ``(10**d - 1) * 100`` percent.
  Negative values mean the test codec needs fewer bits for the same task accuracy.
* **BD-metric** (:func:`bd_metric`, e.g. BD-mAP): the metric is modelled as a function of
  ``log10(rate)`` and the average metric gain at equal rate over the overlapping log-rate interval
  is reported in the metric's own unit. Positive values mean the test codec is more accurate.

Two interpolation methods are provided:

``"pchip"`` (default)
    The JVET common-test-conditions procedure (JVET-K1010, the VTM CTC Excel sheet, and the
    JCTVC/JVET ``bdRateExtend`` macro): a monotone piecewise cubic Hermite interpolant
    (Fritsch & Carlson 1980, Moler's end-point rule; :class:`scipy.interpolate.PchipInterpolator`
    implements exactly these derivatives) through the sorted points, integrated exactly, piece by
    piece, over ``[max(min_anchor, min_test), min(max_anchor, max_test)]``.
``"cubic"``
    The original VCEG-M33 procedure (G. Bjøntegaard, "Calculation of average PSNR differences
    between RD-curves", 2001): a least-squares cubic polynomial (``np.polyfit(x, y, 3)``; with four
    points it interpolates them), integrated analytically over the same overlap interval.

Points may be given in any order; they are sorted by the independent variable. Curves need not be
monotone, but every point of a curve must have a distinct independent value (the metric for
BD-rate, the rate for BD-metric).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator

__all__ = ["VALID_METHODS", "bd_rate", "bd_metric"]

#: Interpolation methods understood by :func:`bd_rate` and :func:`bd_metric`, with the minimum
#: number of points per curve each one needs.
VALID_METHODS: dict[str, int] = {"pchip": 2, "cubic": 4}

ArrayLike = Sequence[float] | np.ndarray


def _check_method(method: str) -> int:
    if method not in VALID_METHODS:
        raise ValueError(
            f"unknown BD interpolation method {method!r}; use one of {sorted(VALID_METHODS)} "
            "('pchip' = JVET CTC piecewise cubic, 'cubic' = VCEG-M33 polynomial)"
        )
    return VALID_METHODS[method]


def _as_curve(rate: ArrayLike, metric: ArrayLike, curve: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one R-D curve and return ``(log10(rate), metric)`` as float arrays."""
    rate = np.asarray(rate, dtype=float)
    metric = np.asarray(metric, dtype=float)
    if rate.ndim != 1 or metric.ndim != 1:
        raise ValueError(
            f"{curve} rates and metrics must be 1-D sequences, got shapes {rate.shape} and "
            f"{metric.shape}; pass one value per operating point"
        )
    if rate.size != metric.size:
        raise ValueError(
            f"{curve} has {rate.size} rates but {metric.size} metric values; give exactly one "
            "(rate, metric) pair per operating point"
        )
    if not np.all(np.isfinite(rate)) or np.any(rate <= 0):
        raise ValueError(
            f"{curve} rates must be positive and finite (bits per pixel), got {rate.tolist()}; "
            "BD measures work on log10(rate), so drop failed or zero-rate points"
        )
    if not np.all(np.isfinite(metric)):
        raise ValueError(
            f"{curve} metric values must be finite, got {metric.tolist()}; drop failed evaluations"
        )
    return np.log10(rate), metric


def _integrator(x: np.ndarray, y: np.ndarray, method: str) -> Callable[[float, float], float]:
    """Fit ``y(x)`` (x strictly increasing) and return ``integral(lo, hi)`` computed exactly."""
    if method == "pchip":
        return PchipInterpolator(x, y, extrapolate=False).integrate
    antiderivative = np.polyint(np.polyfit(x, y, 3))
    return lambda lo, hi: np.polyval(antiderivative, hi) - np.polyval(antiderivative, lo)


def _average_gap(
    anchor: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    method: str,
    x_name: str,
) -> float:
    """Mean of ``y_test(x) - y_anchor(x)`` over the overlap of the two x ranges.

    ``anchor`` and ``test`` are ``(x, y)`` pairs in any order; ``x_name`` names the independent
    variable in error messages.
    """
    min_points = _check_method(method)  # (the public functions check it first, before the data)
    fits, ranges = [], []
    for curve, (x, y) in (("anchor", anchor), ("test", test)):
        if x.size < min_points:
            raise ValueError(
                f"{curve} curve has {x.size} point(s) but method {method!r} needs at least "
                f"{min_points}; add operating points or use method='pchip' (>= 2 points)"
            )
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        duplicated = x[1:][np.diff(x) == 0]
        if duplicated.size:
            raise ValueError(
                f"{curve} curve has duplicate {x_name} values {np.unique(duplicated).tolist()}"
                f"{' (log10 bpp)' if x_name == 'rate' else ''}; every operating point needs a "
                f"distinct {x_name} for the interpolation, so drop or average the duplicates"
            )
        fits.append(_integrator(x, y, method))
        ranges.append((x[0], x[-1]))
    lo = max(r[0] for r in ranges)
    hi = min(r[1] for r in ranges)
    if not hi > lo:
        raise ValueError(
            f"the {x_name} ranges of the curves do not overlap (anchor {ranges[0]}, test "
            f"{ranges[1]}{', log10 bpp' if x_name == 'rate' else ''}); BD measures are only "
            "defined on a common interval, so add operating points that make the ranges overlap"
        )
    fit_anchor, fit_test = fits
    return float((fit_test(lo, hi) - fit_anchor(lo, hi)) / (hi - lo))


def bd_rate(
    rate_anchor: ArrayLike,
    metric_anchor: ArrayLike,
    rate_test: ArrayLike,
    metric_test: ArrayLike,
    method: str = "pchip",
) -> float:
    """Bjøntegaard-delta rate of ``test`` against ``anchor``, in percent.

    ``log10(rate)`` is interpolated as a function of the task metric (``method`` as described in
    the module docstring: ``"pchip"`` = JVET-K1010 CTC, ``"cubic"`` = VCEG-M33), the two models are
    integrated exactly over the overlapping metric interval and the mean log-rate difference ``d``
    is returned as ``(10**d - 1) * 100``. Negative = the test codec needs fewer bits for the same
    metric; scaling every test rate by ``s`` gives exactly ``(s - 1) * 100``.

    Args:
        rate_anchor, rate_test: bits per pixel of each operating point (> 0).
        metric_anchor, metric_test: task metric (e.g. mAP, mIoU) of the same points; higher is better.
        method: ``"pchip"`` (>= 2 points per curve) or ``"cubic"`` (>= 4 points per curve).

    Raises:
        ValueError: mismatched lengths, too few points, non-positive/non-finite rates, non-finite
            metrics, duplicate metric values within a curve, non-overlapping metric ranges, or an
            unknown ``method``.
    """
    _check_method(method)
    log_ra, ma = _as_curve(rate_anchor, metric_anchor, "anchor")
    log_rt, mt = _as_curve(rate_test, metric_test, "test")
    gap = _average_gap((ma, log_ra), (mt, log_rt), method, x_name="metric")
    with np.errstate(over="ignore"):  # a wild cubic fit may overflow: report +inf, not a crash
        return float((np.power(10.0, gap) - 1.0) * 100.0)


def bd_metric(
    rate_anchor: ArrayLike,
    metric_anchor: ArrayLike,
    rate_test: ArrayLike,
    metric_test: ArrayLike,
    method: str = "pchip",
) -> float:
    """Bjøntegaard-delta metric (e.g. BD-mAP, BD-PSNR) of ``test`` against ``anchor``.

    The metric is interpolated as a function of ``log10(rate)`` and the mean difference
    ``metric_test - metric_anchor`` over the overlapping log-rate interval is returned in the
    metric's own unit (positive = the test codec is more accurate at equal rate). Arguments,
    methods and errors are as for :func:`bd_rate`, except that duplicate *rates* within a curve are
    rejected (the rate is the independent variable here).
    """
    _check_method(method)
    log_ra, ma = _as_curve(rate_anchor, metric_anchor, "anchor")
    log_rt, mt = _as_curve(rate_test, metric_test, "test")
    return _average_gap((log_ra, ma), (log_rt, mt), method, x_name="rate")
