"""The demo profile's shipped recognizers and start codec (icm_helpers/assets/demo): within the size budget, intact,
trained for the profile as it is now, and still reaching the accuracy recorded when they were regenerated
(`python -m icm_helpers.regenerate --profile demo`)."""
from __future__ import annotations

import re

import pytest

from icm_helpers.assets import MAX_TOTAL_BYTES, asset_dir, canonical, find_shipped, sha256
from icm_helpers.config import load_profile
from icm_helpers.io import read_json

CFG = load_profile("demo")
ROOT = asset_dir(CFG)
MANIFEST = read_json(ROOT / "manifest.json") if (ROOT / "manifest.json").is_file() else None
pytestmark = pytest.mark.skipif(
    MANIFEST is None, reason="no shipped demo assets (icm_helpers/assets/demo/manifest.json)"
)


def _experiment(tmp_path):
    from icm_helpers.experiment import Experiment

    return Experiment("demo", run_dir=tmp_path / "run", log=None)


def test_manifest_size_and_integrity():
    files = MANIFEST["files"]
    assert set(files) == {"recognizer_detection", "recognizer_segmentation", "codec_start"}
    total = 0
    for name, entry in files.items():
        path = ROOT / f"{name}.pt"
        assert path.stat().st_size == entry["bytes"], f"{path}: size differs from the manifest"
        assert sha256(path) == entry["sha256"], f"{path}: content differs from the manifest (regenerate the assets)"
        total += entry["bytes"]
    assert total == MANIFEST["total_bytes"] <= MAX_TOTAL_BYTES
    # the command that made the files: icm_helpers.regenerate, named icm_helpers.assets before the module split
    assert re.fullmatch(r"python -m icm_helpers\.(regenerate|assets regenerate) --profile demo( --only \w+)?",
                        MANIFEST["command"]), MANIFEST["command"]


def test_assets_were_trained_for_the_current_profile(tmp_path):
    """Changing the demo profile (world, seed, model or training settings) without regenerating fails here."""
    ex = _experiment(tmp_path)
    for task in ("detection", "segmentation"):
        assert canonical(MANIFEST["files"][f"recognizer_{task}"]["provenance"]) == canonical(
            ex.provenance("recognizer", task)
        )
        assert find_shipped(ex.cfg, f"recognizer_{task}", ex.provenance("recognizer", task))[0] is not None
    assert canonical(MANIFEST["files"]["codec_start"]["provenance"]) == canonical(ex.provenance("codec"))
    # another setting -> not used (the suite trains its own)
    other = _experiment(tmp_path)
    other.cfg["recognizers"]["detection"]["train"]["epochs"] += 1
    path, why = find_shipped(other.cfg, "recognizer_detection", other.provenance("recognizer", "detection"))
    assert path is None and "other settings" in why


def test_experiment_installs_shipped_models_without_training(tmp_path, monkeypatch):
    import icm_helpers.experiment as experiment

    def no_training(*a, **k):
        raise AssertionError("trained although a matching shipped model exists")

    monkeypatch.setattr(experiment, "train_recognizer", no_training)
    monkeypatch.setattr(experiment, "train_start_codec", no_training)
    ex = _experiment(tmp_path)
    ex.recognizer("detection")
    ex.start_codec()
    assert sha256(ex.recognizer_path("detection")) == MANIFEST["files"]["recognizer_detection"]["sha256"]
    assert sha256(ex.models_dir / "codec_start.pt") == MANIFEST["files"]["codec_start"]["sha256"]


@pytest.mark.slow
def test_shipped_models_meet_their_recorded_accuracy(tmp_path):
    """Regenerate only the demo world's TEST split (same images: each split has its own seed) and re-measure."""
    from icm_helpers.codec import load_codec
    from icm_helpers.data import IcmDataset, WorldSpec, generate_world
    from icm_helpers.evaluation import evaluate
    from icm_helpers.recognizers import load_recognizer

    dc = CFG["data"]
    n_test = MANIFEST["files"]["codec_start"]["accuracy"]["test_images"]  # the split size the accuracy was recorded on
    root = generate_world(tmp_path / "world", WorldSpec(**dc["world"], seed=CFG["seed"]), {"test": n_test})
    test = IcmDataset(root / "test")
    for task in ("detection", "segmentation"):
        entry = MANIFEST["files"][f"recognizer_{task}"]
        rec = load_recognizer(ROOT / f"recognizer_{task}.pt", expect_task=task)
        got = evaluate(None, rec, test)
        assert got["metric_name"] == entry["accuracy"]["metric_name"]
        assert got["metric"] == pytest.approx(entry["accuracy"]["metric"], abs=0.01), f"{task} recognizer lost accuracy"
    acc = MANIFEST["files"]["codec_start"]["accuracy"]
    rec = load_recognizer(ROOT / "recognizer_detection.pt")
    got = evaluate(load_codec(ROOT / "codec_start.pt"), rec, test)
    assert got["psnr"] == pytest.approx(acc["psnr"], abs=0.05)
    assert got["bpp_estimated"] == pytest.approx(acc["bpp_estimated"], rel=0.01)
    assert got["bpp_bitstream"] == pytest.approx(acc["bpp_bitstream"], rel=0.01)
