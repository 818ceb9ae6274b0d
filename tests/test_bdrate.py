"""Tests for icm_helpers.bdrate: analytic golden values, a cross-check against the reference
`bjontegaard` package (FAU, v1.3.0) and input validation."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from icm_helpers.bdrate import VALID_METHODS, bd_metric, bd_rate

METHODS = sorted(VALID_METHODS)
RATE = [0.08, 0.15, 0.31, 0.62]  # bpp
MAP = [0.28, 0.37, 0.44, 0.49]  # mAP-like, concave in log(rate)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale, expected", [(0.8, -20.0), (1.25, 25.0), (1.0, 0.0)])
def test_scaled_rates_give_exact_bd_rate(method, scale, expected):
    # log10(rate_test) = log10(rate_anchor) + log10(scale) everywhere -> BD-rate = (scale - 1) * 100.
    assert bd_rate(RATE, MAP, [r * scale for r in RATE], MAP, method) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_identical_curves_give_zero(method):
    assert bd_rate(RATE, MAP, RATE, MAP, method) == 0.0
    assert bd_metric(RATE, MAP, RATE, MAP, method) == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_constant_metric_offset_gives_exact_bd_metric(method):
    assert bd_metric(RATE, MAP, RATE, [m + 0.03 for m in MAP], method) == pytest.approx(0.03, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_partial_overlap_uses_only_the_common_interval(method):
    # log10(rate) linear in the metric: both methods reproduce a line exactly. The test curve is the
    # same line at 0.8x rate but over a shifted metric range; only [0.3, 0.5] is common, and the
    # answer is exactly -20 % whatever part is integrated.
    def line(metric, scale):
        return scale * 10 ** (-1.5 + 2.0 * np.asarray(metric))

    anchor_map, test_map = np.linspace(0.2, 0.5, 4), np.linspace(0.3, 0.6, 5)
    assert bd_rate(line(anchor_map, 1), anchor_map, line(test_map, 0.8), test_map, method) == pytest.approx(
        -20.0, abs=1e-9
    )


def test_sign_sanity():
    better = [m + 0.02 for m in MAP]  # more accurate at every rate
    cheaper = [r * 0.9 for r in RATE]  # same accuracy for fewer bits
    for method in METHODS:
        assert bd_metric(RATE, MAP, RATE, better, method) > 0
        assert bd_rate(RATE, MAP, RATE, better, method) < 0
        assert bd_metric(RATE, MAP, cheaper, MAP, method) > 0
        assert bd_metric(RATE, MAP, RATE, [m - 0.02 for m in MAP], method) < 0
        # swapping anchor and test flips the sign of BD-metric exactly
        assert bd_metric(RATE, better, RATE, MAP, method) == pytest.approx(-bd_metric(RATE, MAP, RATE, better, method))


@pytest.mark.parametrize("method", METHODS)
def test_point_order_does_not_matter(method):
    rng = np.random.default_rng(3)
    test_rate, test_map = [r * 0.87 for r in RATE], [m + 0.01 for m in MAP]
    ref_rate, ref_metric = (
        bd_rate(RATE, MAP, test_rate, test_map, method),
        bd_metric(RATE, MAP, test_rate, test_map, method),
    )
    for _ in range(5):
        pa, pt = rng.permutation(4), rng.permutation(4)
        args = (np.take(RATE, pa), np.take(MAP, pa), np.take(test_rate, pt), np.take(test_map, pt), method)
        assert bd_rate(*args) == pytest.approx(ref_rate, abs=1e-12)
        assert bd_metric(*args) == pytest.approx(ref_metric, abs=1e-12)


def _random_rd_pair(rng, lo, hi):
    """Two plausible monotone R-D curves (4 points): rates roughly doubling, metric rising with
    log(rate) towards saturation, the test curve a noisy shifted copy of the anchor."""
    def curve(shift):
        rate = np.sort(0.05 * 2.0 ** (np.arange(4) + rng.uniform(-0.3, 0.3, 4)) * shift)
        frac = 1 - np.exp(-(np.log2(rate / 0.03) + rng.normal(0, 0.1, 4)) / 2.5)
        return rate, np.sort(lo + (hi - lo) * np.clip(frac, 0.05, 0.98))

    return (*curve(1.0), *curve(rng.uniform(0.7, 1.3)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lo, hi", [(0.2, 0.6), (28.0, 40.0)], ids=["mAP-like", "PSNR-like"])
def test_matches_bjontegaard_package(method, lo, hi):
    """bjontegaard 1.3.0 computes what we compute: its 'pchip' is scipy's PchipInterpolator of
    log10(rate) over the metric (x must be increasing, so we pass sorted curves), integrated exactly
    with `.integrate` over the metric overlap (no sampling); its 'cubic' is np.polyfit(deg 3) with
    np.polyint -- the VCEG-M33 formula. bd_psnr is its BD-metric (metric over log10 rate). So the two
    implementations agree to floating-point rounding; 1e-9 (percent / metric units) leaves margin
    for summation order only."""
    bjontegaard = pytest.importorskip("bjontegaard")
    rng = np.random.default_rng(2024)
    for _ in range(25):
        ra, ma, rt, mt = _random_rd_pair(rng, lo, hi)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its overlap warning (min_overlap=0 still warns on none)
            ref_rate = bjontegaard.bd_rate(ra, ma, rt, mt, method=method, min_overlap=0)
            ref_metric = bjontegaard.bd_psnr(ra, ma, rt, mt, method=method, min_overlap=0)
        assert bd_rate(ra, ma, rt, mt, method) == pytest.approx(ref_rate, rel=1e-12, abs=1e-9)
        assert bd_metric(ra, ma, rt, mt, method) == pytest.approx(ref_metric, rel=1e-12, abs=1e-9)


def test_pchip_and_cubic_differ_on_curved_data():
    # guards against one method silently delegating to the other
    test_rate, test_map = [0.07, 0.16, 0.28, 0.7], [0.3, 0.36, 0.45, 0.5]
    assert bd_rate(RATE, MAP, test_rate, test_map, "pchip") != pytest.approx(
        bd_rate(RATE, MAP, test_rate, test_map, "cubic"), abs=1e-6)


@pytest.mark.parametrize("func", [bd_rate, bd_metric])
@pytest.mark.parametrize(
    "args, method, match",
    [
        ((RATE, MAP[:3], RATE, MAP), "pchip", "one .rate, metric. pair"),
        ((RATE, MAP, RATE[:3], MAP), "pchip", "test has 3 rates but 4 metric"),
        (([0.1], [0.3], RATE, MAP), "pchip", "1 point.*at least 2"),
        ((RATE[:3], MAP[:3], RATE, MAP), "cubic", "3 point.*'cubic' needs at least 4"),
        (([0.0, *RATE[1:]], MAP, RATE, MAP), "pchip", "rates must be positive and finite"),
        (([-0.1, *RATE[1:]], MAP, RATE, MAP), "pchip", "rates must be positive and finite"),
        ((RATE, MAP, [np.inf, *RATE[1:]], MAP), "pchip", "rates must be positive and finite"),
        ((RATE, MAP, RATE, [np.nan, *MAP[1:]]), "pchip", "metric values must be finite"),
        ((RATE, MAP, RATE, MAP), "linear", r"unknown BD interpolation method 'linear'.*\['cubic', 'pchip'\]"),
        ((RATE, MAP, [r * 10 for r in RATE], [m + 0.5 for m in MAP]), "pchip", "do not overlap"),
        (([[0.1, 0.2]], [[0.3, 0.4]], RATE, MAP), "pchip", "1-D"),
    ],
)
def test_invalid_input_raises(func, args, method, match):
    with pytest.raises(ValueError, match=match):
        func(*args, method=method)


def test_duplicate_independent_values_raise():
    # BD-rate interpolates over the metric, BD-metric over the rate: duplicates of each are rejected.
    with pytest.raises(ValueError, match=r"anchor curve has duplicate metric values \[0.37\]"):
        bd_rate(RATE, [0.28, 0.37, 0.37, 0.49], RATE, MAP)
    with pytest.raises(ValueError, match=r"test curve has duplicate rate values"):
        bd_metric(RATE, MAP, [0.08, 0.15, 0.15, 0.62], MAP)
    # ...but a duplicated rate is fine for BD-rate and vice versa
    assert np.isfinite(bd_rate(RATE, MAP, [0.08, 0.15, 0.15, 0.62], MAP))
    assert np.isfinite(bd_metric(RATE, [0.28, 0.37, 0.37, 0.49], RATE, MAP))


def test_no_overlap_in_rate_for_bd_metric():
    with pytest.raises(ValueError, match="rate ranges of the curves do not overlap"):
        bd_metric(RATE, MAP, [r * 100 for r in RATE], MAP)
