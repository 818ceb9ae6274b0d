"""The exports committed beside the figures (``figures/<profile>/exports/``), opened with pandas as a researcher
would: every per-image CSV agrees with its rate point in the VCM-layout summary."""
from __future__ import annotations

import math

import numpy as np
import pytest

from icm_helpers.config import REPO_ROOT

pd = pytest.importorskip("pandas")
EXPORTS = sorted((REPO_ROOT / "figures").glob("*/exports"))
# Per-image values are written with full float precision and averaged here in another order than the suite's mean:
# the floor is ~1e-15 relative. A per-image CSV paired with another rate point differs by >= 1e-4 relative (the
# closest two rate points of the demo). 1e-9 sits between the two on a log scale.
REL = 1e-9


def _summary(exports, task):
    path = exports / f"vcm_summary_{task}.csv"
    assert path.is_file(), f"{path} missing: rerun notebook 07"
    return pd.read_csv(path)


@pytest.mark.parametrize("exports", EXPORTS, ids=lambda p: p.parent.name)
def test_every_per_image_csv_matches_one_summary_row(exports):
    tasks = sorted(p.name for p in exports.iterdir() if p.is_dir())
    assert tasks, f"{exports}: no per-image exports"
    for task in tasks:
        summary = _summary(exports, task)
        assert list(summary.columns[:7]) == ["Dataset", "qp", "avg_bpp", "end_accuracy", "encode", "decode", "nn_task"]
        coded = [p for p in sorted((exports / task).glob("*.csv")) if p.stem != "reference"]
        assert len(coded) == len(summary), (task, len(coded), len(summary))  # one summary row per coded model
        for path in coded:
            table = pd.read_csv(path)
            assert table["image_id"].is_unique, path
            avg = table["bpp_bitstream"].mean()
            rows = summary[np.isclose(summary["avg_bpp"], avg, rtol=REL, atol=0)]
            if len(rows) > 1:  # the range coder's whole bytes can give two models (e.g. two seeds) the same rate
                rows = rows[np.isclose(rows["bpp_estimated"], table["bpp_estimated"].mean(), rtol=REL, atol=0)]
            assert len(rows) == 1, f"{path.name}: mean bpp_bitstream {avg} matches {len(rows)} summary rows"
            row = rows.iloc[0]
            assert row["num_images"] == len(table), path.name
            assert math.isclose(row["bpp_estimated"], table["bpp_estimated"].mean(), rel_tol=REL) or \
                row["method"] in ("jpeg", "webp", "bpg", "vtm"), path.name  # anchors have no entropy model
            if task == "segmentation":  # mIoU over the classes present, from the additive per-image counts
                inter = table.filter(regex=r"^inter_\d+$").sum().to_numpy(float)
                union = table.filter(regex=r"^union_\d+$").sum().to_numpy(float)
                miou = (inter[union > 0] / union[union > 0]).mean()
                assert math.isclose(100 * miou, row["end_accuracy"], rel_tol=REL), (path.name, miou)
