"""The run directory's layout (``run_layout.RunLayout``) and its evaluation records (``result_store``): the paths
the layout names are the ones ``Experiment`` wrote before the layout existed (hard-coded here), the seed a record
belongs to (its own ``seed``, or the rule for records without one), and that the explorer and the comparer find
runs through the layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icm_helpers.codec import build_codec, save_codec
from icm_helpers.experiment import Experiment
from icm_helpers.explorer import BitMapExplorer, discover_runs, missing_inputs
from icm_helpers.io import atomic_write_json
from icm_helpers.result_store import EVERY_SEED, ResultStore, belongs_to_seed, record_seed
from icm_helpers.run_layout import RUN_FOLDER, RunLayout
from icm_helpers.training import IcmSpec


@pytest.fixture()
def ex(tmp_path):
    """The smoke profile (seed 0, alpha 0.5 for both tasks) in a fresh run directory."""
    return Experiment("smoke", run_dir=tmp_path, log=None, overrides={"threads": 1})


def _rel(ex, path: Path) -> str:
    return path.relative_to(ex.run_dir).as_posix()


# ---------------------------------------------------------------- the layout names the paths Experiment always wrote
RUN_PATHS = [  # (spec arguments of Experiment.spec, the run folder relative to the run directory)
    (("detection", 1.6, None), "icm/detection/baseline_lambda1.6"),
    (("detection", 1.6, "enc"), "icm/detection/aux_enc_lambda1.6"),
    (("detection", 1.6, "enc", None, None, "warm", 1), "icm/detection/aux_enc_warm_lambda1.6_seed1"),
    (("detection", 0.4, "enc", 0.25), "icm/detection/aux_enc_lambda0.4_alpha0.25"),
    (("detection", 0.4, "enc", 0.5, None, None, 0), "icm/detection/aux_enc_lambda0.4"),  # the profile's alpha, seed
    (("segmentation", 4, "dec", 0.25, None, None, 2), "icm/segmentation/aux_dec_lambda4_alpha0.25_seed2"),
    (("segmentation", 1, "enc", None, None, "warm", None, "shuffled"),
     "icm/segmentation/aux_enc_warm_shuffled_lambda1"),
    (("detection", 0.016, None, None, None, None, 3, "pseudo", "mse"), "icm/detection/mse_finetune_lambda0.016_seed3"),
]


@pytest.mark.parametrize("args, folder", RUN_PATHS, ids=[f for _, f in RUN_PATHS])
def test_run_paths_are_the_ones_experiment_wrote(ex, args, folder):
    spec = ex.spec(*args)
    assert _rel(ex, ex.layout.run_path(spec)) == folder
    assert _rel(ex, ex.run_path(spec)) == folder  # Experiment's own method delegates to the layout
    assert _rel(ex, ex.codec_path(spec)) == f"{folder}/codec.pt"
    assert _rel(ex, ex.snapshot_path(spec, 0.5)) == f"{folder}/codec_budget0.5.pt"
    assert _rel(ex, ex.layout.history_path(spec)) == f"{folder}/history.json"


def test_start_models_results_and_record_names(ex):
    lay = ex.layout
    assert (_rel(ex, ex.data_dir), _rel(ex, ex.models_dir)) == ("data", "models")
    assert _rel(ex, ex.start_codec_path) == "models/codec_start.pt"
    assert _rel(ex, lay.start_codec_train_state) == "models/train_state_codec_start.pt"
    assert _rel(ex, ex.recognizer_path("segmentation")) == "models/recognizer_segmentation.pt"
    assert _rel(ex, lay.recognizer_train_state("detection")) == "models/train_state_recognizer_detection.pt"
    assert _rel(ex, ex.task_runs_dir("detection")) == "icm/detection"
    assert _rel(ex, ex.result_path("detection", "aux_enc_warm_lambda1.6_seed1")) == (
        "results/detection/aux_enc_warm_lambda1p6_seed1.json")  # dots written as "p"
    spec = ex.spec("detection", 1.6, "enc", seed=1)
    assert lay.run_result_name(spec) == "aux_enc_lambda1.6_seed1"
    assert lay.run_result_name(spec, budget=0.25) == "aux_enc_lambda1.6_seed1_budget0.25"
    assert lay.transfer_result_name(spec, "detection") == "aux_enc_lambda1.6_seed1_from_detection"
    assert lay.roi_result_name("roi", 1.4, 1.6, 0) == "roi_qf1.4_lambda1.6"
    assert lay.roi_result_name("roi_rescale", 1.4, 0.4, 2) == "roi_rescale_qf1.4_lambda0.4_seed2"
    assert lay.anchor_result_name("jpeg", 30) == "jpeg_q30"
    for bad in (lambda: ex.task_runs_dir("nope"), lambda: ex.result_path("nope", "x"),
                lambda: ex.result_path("detection", "a/b")):
        with pytest.raises(ValueError):
            bad()


def test_warm_branch_paths_with_labels_and_the_variant_name(ex):
    """``aux_warm/<task>/<position>[_<labels>]_seed<seed>[_<name>]/branch.pt``; the variant name comes from
    ``tasks.<task>.aux_warm_start.name`` (Experiment) or the ``variant`` argument (the layout)."""
    lay = ex.layout
    assert _rel(ex, ex.warm_branch_path("detection", "enc", 1)) == "aux_warm/detection/enc_seed1/branch.pt"
    assert _rel(ex, ex.warm_branch_path("detection", "enc", 0, "shuffled")) == (
        "aux_warm/detection/enc_shuffled_seed0/branch.pt")
    assert _rel(ex, lay.warm_branch_path("segmentation", "dec", 2, variant="r6v2b")) == (
        "aux_warm/segmentation/dec_seed2_r6v2b/branch.pt")
    assert lay.warm_branch_path("detection", "enc", 0, variant="") == lay.warm_branch_path("detection", "enc", 0)
    ex.cfg["tasks"]["detection"]["aux_warm_start"] = {"epochs": 1, "name": "long"}
    assert _rel(ex, ex.warm_branch_path("detection", "enc", 0, "shuffled")) == (
        "aux_warm/detection/enc_shuffled_seed0_long/branch.pt")
    with pytest.raises(ValueError, match="aux_warm_start.name"):
        lay.warm_branch_path("detection", "enc", 0, variant="a.b")


def test_the_layout_reads_the_profile_when_a_path_is_asked_for(tmp_path):
    """Alone (no Experiment), and with a default alpha changed after it was made: the run folder follows."""
    tasks = {"detection": {"alpha": 0.5}}
    lay = RunLayout(tmp_path, 0, tasks)
    spec = IcmSpec("detection", 1.6, "enc", alpha=0.5)
    assert lay.run_path(spec) == tmp_path / "icm" / "detection" / "aux_enc_lambda1.6"
    tasks["detection"]["alpha"] = 0.25
    assert lay.run_path(spec) == tmp_path / "icm" / "detection" / "aux_enc_lambda1.6_alpha0.5"
    assert RunLayout(tmp_path, 3, tasks).run_path(IcmSpec("detection", 1.6, "enc", alpha=0.25, seed=3)).name == (
        "aux_enc_lambda1.6")  # the profile's seed has no suffix, whatever it is


def test_run_folder_pattern_reads_back_the_layouts_names(ex):
    for args, folder in RUN_PATHS:
        spec = ex.spec(*args)
        m = RUN_FOLDER.fullmatch(ex.layout.run_path(spec).name)
        assert m and m["method"] == spec.method and float(m["lambda_"]) == spec.lambda_
        assert (int(m["seed"]) if m["seed"] else ex.seed) == spec.seed
        assert (float(m["alpha"]) if m["alpha"] else ex.task_cfg(spec.task)["alpha"]) == spec.alpha


# ---------------------------------------------------------------- the seed of a record
def test_record_seed_is_the_records_own_seed_field():
    assert record_seed({"seed": 2, "codec_path": "icm/x/codec.pt"}, profile_seed=0) == 2
    assert record_seed({"seed": 0}, profile_seed=5) == 0
    assert belongs_to_seed({"seed": 2}, 2, profile_seed=0) and not belongs_to_seed({"seed": 2}, 0, profile_seed=0)


def test_record_seed_without_a_seed_field():
    """A trained codec's record written before records carried seeds: the profile's seed; a record with nothing
    trained (anchor, reference, start codec): every seed."""
    old_model = {"method": "roi", "codec_path": "icm/detection/baseline_lambda1.6/codec.pt"}
    assert record_seed(old_model, profile_seed=3) == 3
    assert belongs_to_seed(old_model, 3, profile_seed=3) and not belongs_to_seed(old_model, 0, profile_seed=3)
    anchor = {"method": "jpeg", "anchor": {"codec": "jpeg"}}
    assert record_seed(anchor, profile_seed=3) is EVERY_SEED
    assert all(belongs_to_seed(anchor, s, profile_seed=3) for s in (0, 1, 3))


def _write(ex, task, name, **record):
    atomic_write_json(ex.result_path(task, name), {"task": task, "per_image": [{"image_id": 1}], **record})


def test_store_queries_filter_on_the_seed_rule(ex):
    for lam in (2, 1):
        _write(ex, "segmentation", f"baseline_lambda{lam}", method="baseline", lambda_=float(lam), seed=0,
               codec_path="c")
        _write(ex, "segmentation", f"baseline_lambda{lam}_seed1", method="baseline", lambda_=float(lam), seed=1,
               codec_path="c")
        _write(ex, "segmentation", f"roi_lambda{lam}", method="roi", lambda_=float(lam), codec_path="c")  # no seed
        _write(ex, "segmentation", f"jpeg_q{lam}", method="jpeg", lambda_=float(lam))  # nothing trained
    _write(ex, "segmentation", "baseline_lambda1_budget0p5", method="baseline", lambda_=1.0, seed=0, budget=0.5,
           codec_path="c")
    _write(ex, "segmentation", "start", method="start", lambda_=None)
    store = ex.results
    assert isinstance(store, ResultStore) and store.layout is ex.layout

    def query(method, seed=None, budget=None):
        return [(r["lambda_"], r.get("seed")) for r in ex.full_records("segmentation", method, seed, budget)]

    assert query("baseline") == [(1.0, 0), (2.0, 0)]  # sorted by lambda; default: the profile's seed
    assert query("baseline", 1) == [(1.0, 1), (2.0, 1)]
    assert query("baseline", budget=0.5) == [(1.0, 0)]
    assert query("roi", 0) == [(1.0, None), (2.0, None)] and query("roi", 1) == []
    assert query("jpeg", 0) == query("jpeg", 7) == [(1.0, None), (2.0, None)]
    assert query("start") == []  # no lambda: not a rate point
    by_seed = store.records_by_seed("segmentation", ["jpeg", "roi"], [0, 1])
    assert {s: {m: len(r) for m, r in v.items()} for s, v in by_seed.items()} == {0: {"jpeg": 2, "roi": 2},
                                                                                  1: {"jpeg": 2, "roi": 0}}
    assert len(ex.records("segmentation")) == 9 and len(ex.records(budgets=True)) == 10
    assert all("per_image" not in r for r in ex.records())
    assert [p.name for p in ex.result_paths("segmentation")][:2] == ["baseline_lambda1.json",
                                                                      "baseline_lambda1_seed1.json"]


def test_store_reuses_a_record_only_with_its_evaluation_key(ex):
    lines = []
    ex.log = lines.append  # the store logs through whatever the experiment's log is now
    path = ex.result_path("detection", "jpeg_q10")
    assert ex.results.reusable(path, {"a": 1}, force=False) is None and lines == []  # nothing there
    ex.results.write(path, {"task": "detection", "eval_key": {"a": 1}})
    assert ex.results.reusable(path, {"a": 1}, force=False) == {"task": "detection", "eval_key": {"a": 1}}
    assert ex.results.reusable(path, {"a": 1}, force=True) is None
    assert ex.results.reusable(path, {"a": 2}, force=False) is None
    assert lines == [f"re-evaluating detection/jpeg_q10 ({path}): it was made with other a: 1 -> 2"]


# ---------------------------------------------------------------- the explorer and the comparer use the layout
class _ElsewhereLayout(RunLayout):
    """A layout that keeps the ICM runs and the start codec under other folders: what finds them must ask it."""

    @property
    def icm_root(self) -> Path:
        return self.run_dir / "elsewhere" / "icm"

    @property
    def start_codec_path(self) -> Path:
        return self.run_dir / "elsewhere" / "start.pt"


def _save(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    save_codec(path, build_codec(N=16))


def test_explorer_and_comparer_find_runs_through_the_layout(ex):
    ex.layout = _ElsewhereLayout(ex.run_dir, ex.seed, ex.cfg["tasks"])
    base, warm = ex.spec("detection", 1.6, None), ex.spec("detection", 1.6, "enc", aux_init="warm", seed=1)
    for i, path in enumerate([ex.start_codec_path, ex.codec_path(base), ex.codec_path(warm)]):
        _save(path, i)
    assert _rel(ex, ex.codec_path(warm)) == "elsewhere/icm/detection/aux_enc_warm_lambda1.6_seed1/codec.pt"
    runs = discover_runs(ex, "detection")
    assert list(runs) == ["start", "baseline_lambda1.6", "aux_enc_warm_lambda1.6_seed1", "roi_baseline_lambda1.6"]
    assert runs["start"].path == ex.layout.start_codec_path
    assert runs["aux_enc_warm_lambda1.6_seed1"].path == ex.layout.codec_path(warm)
    assert (runs["aux_enc_warm_lambda1.6_seed1"].method, runs["aux_enc_warm_lambda1.6_seed1"].seed) == (
        "aux_enc_warm", 1)
    explorer = BitMapExplorer(ex, ["detection"])
    assert explorer.runs("detection") == runs
    missing = {m.what: m.detail for m in missing_inputs(ex, "segmentation", discover_runs(ex, "segmentation"))}
    assert "start codec" not in missing  # found where the layout says
    assert str(ex.layout.task_runs_dir("segmentation")) in missing["fine-tuned codecs of segmentation"]
    widgets = pytest.importorskip("icm_helpers.widgets")
    pytest.importorskip("ipywidgets")
    from icm_helpers.data import WorldSpec, generate_world

    generate_world(ex.data_dir, WorldSpec(image_size=64, n_classes=3, seed=0), {"train": 1, "val": 1, "test": 1})
    comparer = widgets.BitMapComparer(explorer)
    assert [key for _, key in comparer.run_a_w.options] == list(runs)
    assert comparer.state().run_a == "baseline_lambda1.6"
