"""Evaluation records are keyed by what determines their numbers (``eval_cache.evaluation_key``): a stored record is
reused only when its key equals the one the settings give now; otherwise it is re-evaluated, with a log line."""
from __future__ import annotations

import pytest
import torch

from icm_helpers import eval_cache
from icm_helpers.codec import load_codec, save_codec
from icm_helpers.experiment import Experiment
from icm_helpers.evaluation import without_timing
from icm_helpers.io import atomic_write_json, read_json

# a tiny world and start models: the keys are what is tested, not the models
TINY = {
    "data.counts": {"train": 8, "val": 2, "test": 4},
    "recognizers.detection.train.epochs": 1,
    "codec.train.epochs": 1,
    "evaluation.bitstream": False,
}


def _watch_evaluations(monkeypatch, field: str) -> list:
    """``field`` of the options of every evaluation that really runs (a reused record adds nothing)."""
    calls: list = []
    real = eval_cache.evaluate

    def evaluate(codec, recognizer, dataset, options, **kwargs):
        calls.append(getattr(options, field))
        return real(codec, recognizer, dataset, options, **kwargs)

    monkeypatch.setattr(eval_cache, "evaluate", evaluate)
    return calls


@pytest.fixture
def counted(monkeypatch):
    """The image counts of every evaluation that really runs."""
    return _watch_evaluations(monkeypatch, "max_images")


def _evaluate_all(ex: Experiment) -> list[dict]:
    """The records that do not depend on ICM training: reference, start codec and one JPEG anchor."""
    anchors, _ = ex.evaluate_anchors("detection", ["jpeg"], {"jpeg": [50]})
    return [ex.evaluate_reference("detection"), ex.evaluate_start("detection"), *anchors]


def test_the_small_recipe_then_the_full_run_in_the_same_run_dir_re_evaluates(tmp_path, counted):
    """The README's "try it small first" (``evaluation.max_images`` small), then the full run in the same run dir:
    the full run re-evaluates the reference, start codec and anchor (saying why) instead of reusing the small run's
    records; a second identical run reuses everything."""
    logs: list[str] = []
    small = Experiment("smoke", run_dir=tmp_path, log=logs.append, overrides={**TINY, "evaluation.max_images": 2})
    small.prepare_data()
    assert [r["num_images"] for r in _evaluate_all(small)] == [2, 2, 2]
    assert counted == [2, 2, 2]

    logs.clear()
    full = Experiment("smoke", run_dir=tmp_path, log=logs.append, overrides=TINY)
    records = _evaluate_all(full)
    assert [r["num_images"] for r in records] == [4, 4, 4] and counted[3:] == [None, None, None]
    redone = [line for line in logs if line.startswith("re-evaluating")]
    assert [line.split()[1] for line in redone] == ["detection/jpeg_q50", "detection/reference", "detection/start"]
    assert all("test_images: 2 -> 4" in line and "max_images: 2 -> null" in line for line in redone), redone
    assert all(r["eval_key"]["test_images"] == 4 for r in records)

    logs.clear()
    again = _evaluate_all(Experiment("smoke", run_dir=tmp_path, log=logs.append, overrides=TINY))
    assert len(counted) == 6 and logs == []  # identical settings: every record reused, nothing said
    assert [r["per_image"] for r in again] == [r["per_image"] for r in records]


def test_another_codec_file_or_a_record_without_a_key_is_re_evaluated(tmp_path, counted):
    """The codec file's identity is in the key (a retrained start codec is re-evaluated; the reference and the
    anchor, which do not use it, are not), and a record written before records had keys is re-evaluated, never
    trusted."""
    logs: list[str] = []
    ex = Experiment("smoke", run_dir=tmp_path, log=logs.append, overrides=TINY)
    ex.prepare_data()
    _evaluate_all(ex)
    assert len(counted) == 3

    codec = load_codec(tmp_path / "models" / "codec_start.pt")
    with torch.no_grad():
        next(codec.g_s.parameters()).mul_(0.5)
    save_codec(tmp_path / "models" / "codec_start.pt", codec)
    legacy = read_json(ex.result_path("detection", "reference"))
    del legacy["eval_key"]
    atomic_write_json(ex.result_path("detection", "reference"), legacy)

    logs.clear()
    _evaluate_all(ex)
    assert len(counted) == 5
    redone = sorted(line for line in logs if line.startswith("re-evaluating"))
    assert len(redone) == 2 and redone[0].startswith("re-evaluating detection/reference")
    assert "no evaluation key" in redone[0]
    assert redone[1].startswith("re-evaluating detection/start") and "codec: " in redone[1]
    assert "test_images" not in redone[1]  # only what differs is named


def test_batch_images_reaches_the_evaluation_and_does_not_re_evaluate(tmp_path, monkeypatch):
    """``evaluation.batch_images`` is passed to ``evaluate`` (grouped wavefront passes) and is not in the record's key:
    grouping gives the same records bit for bit (``tests/test_eval_coders.py``), so a record of another grouping is
    reused, not re-evaluated."""
    seen = _watch_evaluations(monkeypatch, "batch_images")
    bitstream = {**TINY, "evaluation.bitstream": True}
    one = Experiment("smoke", run_dir=tmp_path / "one", overrides={**bitstream, "evaluation.batch_images": 1})
    one.prepare_data()
    grouped = Experiment("smoke", run_dir=tmp_path / "grouped", overrides={**bitstream, "evaluation.batch_images": 3})
    grouped.prepare_data()
    a, b = one.evaluate_start("detection"), grouped.evaluate_start("detection")
    assert seen == [1, 3]
    assert without_timing(a["per_image"]) == without_timing(b["per_image"]) and a["metric"] == b["metric"]
    # the keys differ only in the two runs' own checkpoint files (a checkpoint stores its training's wall time)
    assert {k: v for k, v in a["eval_key"].items() if k not in ("codec", "recognizer")} == {
        k: v for k, v in b["eval_key"].items() if k not in ("codec", "recognizer")}
    grouped_again = Experiment("smoke", run_dir=tmp_path / "one", overrides={**bitstream, "evaluation.batch_images": 3})
    grouped_again.evaluate_start("detection")
    assert seen == [1, 3]  # the record of batch_images 1 reused
