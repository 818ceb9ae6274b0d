"""Tolerance audit: with ``ICM_TOLERANCE_LOG=<file>``, every tolerance comparison a test makes is logged with how much
of its tolerance it used, so floors can be measured across thread counts, CPU kernels and load
(``tests/tolerance_audit.py`` runs the suite under those conditions and writes ``docs/tolerances.md``).

Logged comparisons: ``pytest.approx`` (per scalar), ``torch.allclose``, ``torch.testing.assert_close``, ``np.allclose``,
``np.testing.assert_allclose``. Each line of the log is JSON: ``{"site": "tests/test_x.py:123", "used": u, "ok": b,
"tol": t}`` where ``used`` = max over elements of |actual - expected| / tolerance (1.0 = at the bound) and ``tol`` the
tolerance of the worst element. Comparisons written as ``<`` on a float are not seen here (the audit lists them by
hand). Without the variable nothing is patched.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _site() -> str:
    f = sys._getframe(2)
    while f is not None:
        p = Path(f.f_code.co_filename)
        if p.parent == TESTS and p.name.startswith("test_"):
            return f"tests/{p.name}:{f.f_lineno}"
        f = f.f_back
    return "?"


def install(log_path: str) -> None:
    import numpy as np
    import torch
    from _pytest import approx as approx_mod

    fh = open(log_path, "a", buffering=1)

    def record(used: float, tol: float, ok: bool) -> None:
        fh.write(json.dumps({"site": _site(), "used": float(used), "ok": bool(ok), "tol": float(tol),
                             "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}) + "\n")

    def used_of(actual, expected, rtol: float, atol: float) -> tuple[float, float]:
        a = np.asarray(actual.detach().cpu().double() if isinstance(actual, torch.Tensor) else actual, dtype=float)
        b = np.asarray(
            expected.detach().cpu().double() if isinstance(expected, torch.Tensor) else expected, dtype=float
        )
        a, b = np.broadcast_arrays(a, b)
        if a.size == 0:
            return 0.0, atol
        tol = atol + rtol * np.abs(b)
        diff = np.abs(a - b)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(diff == 0, 0.0, diff / tol)
        i = int(np.nanargmax(u)) if np.isfinite(u).any() or np.isinf(u).any() else 0
        return float(u.flat[i]), float(tol.flat[i])

    real_eq = approx_mod.ApproxScalar.__eq__

    def approx_eq(self, actual):
        ok = real_eq(self, actual)
        try:
            if (
                approx_mod._as_numpy_array(actual) is None
                and isinstance(actual, (int, float))
                and not isinstance(actual, bool)
            ):
                tol = float(self.tolerance)
                d = abs(float(self.expected) - float(actual))
                record(0.0 if d == 0 else (d / tol if tol else float("inf")), tol, ok)
        except (TypeError, ValueError):
            pass
        return ok

    approx_mod.ApproxScalar.__eq__ = approx_eq

    real_allclose = torch.allclose

    def allclose(input, other, rtol=1e-05, atol=1e-08, equal_nan=False):
        ok = real_allclose(input, other, rtol=rtol, atol=atol, equal_nan=equal_nan)
        record(*(used_of(input, other, rtol, atol)), ok=ok)
        return ok

    torch.allclose = allclose

    real_assert_close = torch.testing.assert_close

    def assert_close(actual, expected, *args, rtol=None, atol=None, **kw):
        try:
            real_assert_close(actual, expected, *args, rtol=rtol, atol=atol, **kw)
            ok = True
        except AssertionError:
            ok = False
            raise
        finally:
            if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
                default = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
                           torch.float64: (1e-7, 1e-7)}.get(actual.dtype, (0.0, 0.0))
                r, a = (default if rtol is None else rtol), (default if atol is None else atol)
                r = r[0] if isinstance(r, tuple) else r
                a = a[1] if isinstance(a, tuple) else a
                record(*(used_of(actual, expected, r, a)), ok=ok)

    torch.testing.assert_close = assert_close

    real_np_allclose = np.allclose

    def np_allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
        ok = real_np_allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)
        record(*(used_of(a, b, rtol, atol)), ok=bool(ok))
        return ok

    np.allclose = np_allclose

    real_assert_allclose = np.testing.assert_allclose

    def assert_allclose(actual, desired, rtol=1e-07, atol=0, *args, **kw):
        try:
            real_assert_allclose(actual, desired, rtol, atol, *args, **kw)
            ok = True
        except AssertionError:
            ok = False
            raise
        finally:
            record(*(used_of(actual, desired, rtol, atol)), ok=ok)

    np.testing.assert_allclose = assert_allclose

