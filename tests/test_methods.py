"""Runs are named, paired and coloured by their ids (``icm_helpers.methods``): ``run_label`` is the one producer of
a run's display label, nothing parses a label back, and a curve's colour comes from the methods table, whatever its
label says."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from icm_helpers import plots  # noqa: E402
from icm_helpers.bitmaps import roi_fraction_table  # noqa: E402
from icm_helpers.codec import build_codec  # noqa: E402
from icm_helpers.data import IcmDataset  # noqa: E402
from icm_helpers.methods import (METHODS, RunId, arm_name, method_color, run_label,  # noqa: E402
                                 transfer_method_id)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _same_color(a, b) -> bool:
    return mcolors.to_rgba(a) == mcolors.to_rgba(b)


# ------------------------------------------------------------------------------------------------ labels
def test_run_label_names_each_id_it_has():
    assert run_label(RunId("start")) == "start codec"
    assert run_label(RunId("baseline", 0.4)) == "w/o aux λ=0.4"
    assert run_label(RunId("aux_enc", 1.6)) == "w/ aux λ=1.6"
    assert run_label(RunId("aux_enc_warm", 2.0)) == "w/ aux λ=2"  # the arm, whatever the branch's start
    assert run_label(RunId("baseline", trained_for="detection"), naming="id") == "baseline (detection)"
    assert run_label(RunId("aux_enc", 1.6, alpha=0.3, seed=1), naming="short") == "aux-enc λ=1.6 α=0.3 seed 1"
    assert run_label(RunId("baseline", 1.6), name="ROI (QF 8)") == "ROI (QF 8) λ=1.6"
    assert run_label(RunId("aux_enc", 1.6), naming="label") == "w/ aux loss λ=1.6"
    # a lambda with an unusual float formatting is written the way every label writes it
    assert run_label(RunId("baseline", 0.1 + 0.2)) == "w/o aux λ=0.3"
    assert run_label(RunId("baseline", 1e-5)) == "w/o aux λ=1e-05"


def test_arm_names_and_transfer_ids():
    assert [arm_name(m) for m in ("baseline", "aux_enc", "aux_enc_warm", "aux_dec", "aux_enc_gradsim")] == \
        ["w/o aux", "w/ aux", "w/ aux", "w/ aux", "w/ aux"]
    assert arm_name("start") == "start codec" and arm_name("mse_finetune") == "MSE fine-tune"
    assert arm_name("aux_dec_warm") == "w/ aux"  # a composed ICM id outside the table
    assert transfer_method_id("aux_enc_warm", "segmentation") == "aux_enc_warm_from_segmentation"
    run = RunId("baseline", trained_for="detection")
    assert run.record_method("detection") == "baseline"
    assert run.record_method("segmentation") == "baseline_from_detection"
    assert RunId("baseline").record_method("segmentation") == "baseline"
    assert method_color("aux_enc_warm") == METHODS["aux_enc_warm"].color and method_color("nope") is None


# ------------------------------------------------------------------------------------------------ bit fractions
def test_the_inside_mask_table_pairs_runs_by_their_ids(world):
    """Models given by ``run``: labels from ``run_label``, groups from ``arm_name``, the pair found by its RunId
    (no label is parsed): the summary carries the ids and the paired group."""
    codecs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        codecs.append(build_codec(N=16).eval())
    lam = 0.1 + 0.2  # labels write it as 0.3; the pairing does not go through the label
    base = RunId("baseline", lam)
    models = [{"run": RunId("start"), "lambda_": None, "codec": codecs[0]},
              {"run": base, "codec": codecs[0]},
              {"run": RunId("aux_enc_warm", lam), "codec": codecs[1], "paired_with": base}]
    table = roi_fraction_table(models, IcmDataset(world / "test"), max_images=2)
    assert [r[0] for r in table["rows"]] == ["start codec", "w/o aux λ=0.3", "w/ aux λ=0.3"]
    assert [r[10] for r in table["rows"]] == [None, None, "w/o aux λ=0.3"]  # "paired with": the partner's label
    aux = table["summary"][2]
    assert (aux["method"], aux["group"], aux["lambda_"]) == ("aux_enc_warm", "w/ aux", lam)
    assert (aux["paired_group"], aux["paired_method"]) == ("w/o aux", "baseline")
    with pytest.raises(ValueError, match="not an earlier model"):
        roi_fraction_table([models[2]], IcmDataset(world / "test"), max_images=1)


def _entries(group: str, method: str | None, lam: float = 1.0, **extra):
    inside = {"mean": 0.3, "ci_low": 0.2, "ci_high": 0.4, "n": 8}
    return {"label": f"{group} λ={lam:g}", "group": group, "lambda_": lam, "method": method, "inside": inside,
            "area": 0.1, "delta_inside": None, **extra}


def _line_colors(ax) -> dict[str, tuple]:
    handles, labels = ax.get_legend_handles_labels()
    out = {}
    for h, label in zip(handles, labels):
        artist = h.lines[0] if hasattr(h, "lines") else h
        out[label] = mcolors.to_rgba(artist.get_color())
    return out


def test_bit_fraction_colours_come_from_the_method_not_the_label():
    delta = {"mean": 0.01, "ci_low": 0.0, "ci_high": 0.02, "n": 8}
    summary = [_entries("w/ aux", "baseline"),  # a group named like the aux arm, of the baseline's method
               _entries("odd name λ=0,4", "aux_enc_warm", paired_with="no lambda in this label",
                        paired_group="w/ aux", paired_method="baseline", delta_inside=delta)]
    fig, data = plots.plot_roi_fractions(summary)
    colors = _line_colors(fig.axes[0])
    assert _same_color(colors["w/ aux"], METHODS["baseline"].color)
    assert _same_color(colors["odd name λ=0,4"], METHODS["aux_enc_warm"].color)
    paired = _line_colors(fig.axes[1])
    assert list(paired) == ["odd name λ=0,4 − w/ aux"]  # named by the groups, not by parsing the pair's label
    assert data["groups"]["odd name λ=0,4"]["method"] == "aux_enc_warm"
    assert data["paired"]["odd name λ=0,4"]["paired_group"] == "w/ aux"


def test_learning_curve_colours_come_from_the_arms_methods():
    """Curves are keyed by method id; the labels are only legend text (and the JSON's keys, with their ids)."""
    curves = {arm: {0: [(0, 1.0), (10, 0.9)]} for arm in ("aux_enc_warm", "baseline", "aux_enc_warm_shuffled")}
    result = {"task": "detection", "lambda_": 1.6, "curves": curves, "differences": [],
              "labels": {"aux_enc_warm": "w/o aux", "baseline": "aux-enc", "aux_enc_warm_shuffled": "renamed arm"}}
    fig, data = plots.plot_learning_curves(result)
    colors = {label.split(" (mean")[0]: c for label, c in _line_colors(fig.axes[0]).items()}
    assert _same_color(colors["w/o aux"], METHODS["aux_enc_warm"].color)  # a misleading label changes no colour
    assert _same_color(colors["aux-enc"], METHODS["baseline"].color)
    assert _same_color(colors["renamed arm"], METHODS["aux_enc_warm_shuffled"].color)
    assert data["methods"] == {"w/o aux": "aux_enc_warm", "aux-enc": "baseline", "renamed arm": "aux_enc_warm_shuffled"}
    assert list(data["curves"]) == ["w/o aux", "aux-enc", "renamed arm"]


def test_cosine_colours_come_from_the_branches_methods():
    """A cosine row is red when its first method id is the competent branch's, whatever its label says."""
    rows = [{"codec": "start", "branch": branch, "methods": methods, "mean": 0.1, "low": 0.0, "high": 0.2, "n": 3,
             "unit": "batch"} for branch, methods in (("control", ["aux_enc_warm"]),
                                                       ("competent", ["aux_enc_warm_shuffled"]),
                                                       ("competent - control", ["aux_enc", "aux_enc_warm"]))]
    fig, _ = plots.plot_cosines(rows)
    colors = [mcolors.to_rgba(c.lines[0].get_color()) for c in fig.axes[0].containers]
    assert colors == [mcolors.to_rgba("tab:red"), mcolors.to_rgba("tab:gray"), mcolors.to_rgba("tab:gray")]


# ------------------------------------------------------------------------------------------------ one producer
def _code_cells(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _sources() -> dict[str, str]:
    out = {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "icm_helpers").rglob("*.py"))}
    out.update({str(p.relative_to(REPO)): _code_cells(p) for p in sorted((REPO / "notebooks").glob("*.ipynb"))})
    return out


#: The display names of runs (``methods.arm_name`` / ``short``) that code must not key colours or parsing on.
_DISPLAY_NAMES = {"w/o aux", "w/ aux", "aux-enc", "control", "start codec"}


def test_no_code_parses_a_run_label_or_composes_a_run_id_by_hand():
    """Splitting a label at its lambda, or writing a transfer id by hand, happens nowhere but in ``methods``
    (and in replot's reading of figure JSON written before the ids were stored)."""
    for name, text in _sources().items():
        if name != "icm_helpers/replot.py":
            assert "split(' λ=')" not in text and 'split(" λ=")' not in text, name
        if name not in ("icm_helpers/methods.py", "icm_helpers/run_layout.py"):
            assert "_from_{" not in text, f"{name}: use methods.transfer_method_id / RunId.record_method"


def test_no_colour_table_is_keyed_by_a_display_name():
    """A dict literal mapping run display names to values (as colours once were) exists nowhere in the library."""
    for name, text in _sources().items():
        if not name.endswith(".py") or name == "icm_helpers/replot.py":
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                assert not keys & _DISPLAY_NAMES, f"{name}:{node.lineno}: a dict keyed by display names {keys}"


def test_no_notebook_decides_a_records_seed_itself():
    """Which seed a record belongs to is ``result_store.record_seed``'s rule (``Experiment.full_records``)."""
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        code = _code_cells(path)
        assert 'get("seed"' not in code and "get('seed'" not in code, path.name
