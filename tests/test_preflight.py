"""The pre-flight check (``papermill_runs/run.py --profile NAME --check``, ``icm_helpers.preflight``) on a complete
set-up (the smoke profile) and on broken ones (a missing split, missing checkpoint files, no GPU where the profile's
parameters ask for one, a truncated checkpoint, too little GPU memory). No GPU and no network needed."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

from icm_helpers import preflight
from icm_helpers.codec import build_codec, save_codec
from icm_helpers.config import load_profile
from icm_helpers.experiment import Experiment
from icm_helpers.recognizers import build_recognizer, save_recognizer
from papermill_runs import runner

TINY = {"data.counts": {"train": 8, "val": 2, "test": 4}}


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


def _complete_smoke_run_dir(run_dir):
    """The smoke profile's world and start models in ``run_dir`` (untrained weights: only their files matter)."""
    ex = Experiment("smoke", run_dir=run_dir, log=None, overrides=TINY)
    ex.prepare_data()
    for task in ex.tasks():
        rc = ex.cfg["recognizers"][task]
        save_recognizer(ex.recognizer_path(task), build_recognizer(task, "suite", ex.num_classes(task), **rc["model"]))
    save_codec(ex.models_dir / "codec_start.pt", build_codec(N=int(ex.cfg["codec"]["N"])))
    return ex


def test_smoke_profile_before_and_after_notebook_01_passes(tmp_path, capsys, monkeypatch):
    """Nothing there yet: every check is OK (notebook 01 generates and trains); with the world and start models in
    place: their counts and files are checked. The runner's --check exits 0 and writes nothing."""
    checks = preflight.run_checks("smoke", TINY, "cpu", tmp_path / "run")
    assert all(c.ok for c in checks), [c.line() for c in checks]
    found = _by_name(checks)
    assert "not there yet: notebook 01 writes it" in found["data"].detail
    assert "not there yet: notebook 01 trains it" in found["checkpoint/codec_start"].detail
    assert found["gpu"].detail.startswith("device cpu")
    assert set(found) >= {"backend/detection", "backend/segmentation", "checkpoint/recognizer_detection",
                          "checkpoint/recognizer_segmentation", "checkpoint/run_dir", "disk"}

    _complete_smoke_run_dir(tmp_path / "run")
    found = _by_name(preflight.run_checks("smoke", TINY, "cpu", tmp_path / "run"))
    assert all(c.ok for c in found.values()), [c.line() for c in found.values()]
    assert [found[f"data/{s}"].detail for s in ("train", "val", "test")] == [
        "8 images (the profile: 8)", "2 images (the profile: 2)", "4 images (the profile: 4)"]
    assert "loads (weights_only=True)" in found["checkpoint/recognizer_detection"].detail
    assert "3 checkpoints" in found["checkpoint/run_dir"].detail

    monkeypatch.setenv("ICM_RUNS_DIR", str(tmp_path))
    (tmp_path / "smoke").symlink_to(tmp_path / "run")
    out_dir = tmp_path / "out"
    assert runner.main(["--profile", "smoke", "--check", "--out-dir", str(out_dir),
                        "--set", "data.counts={train: 8, val: 2, test: 4}"]) == 0
    out = capsys.readouterr().out
    assert "pre-flight: " in out and " 0 FAIL" in out and "OK   data/test: 4 images" in out
    assert not out_dir.exists()


def _broken_profile(tmp_path):
    """The paper profile's structure with: COCO's train2017 but no val2017, no Pascal-Context at all, the codec and
    detector weights files missing, the segmenter's official checkpoint not in the (empty) torch hub cache."""
    coco = tmp_path / "coco"
    (coco / "train2017").mkdir(parents=True)
    Image.new("RGB", (32, 24)).save(coco / "train2017" / "000000000001.jpg")
    (coco / "annotations").mkdir()
    (coco / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 24, "width": 32}], "annotations": [],
        "categories": [{"id": 1, "name": "thing"}]}))
    cfg = load_profile("paper")
    cfg["name"] = "broken"
    cfg["data"].update(coco_root=str(coco), pascal_context_root=str(tmp_path / "VOC2010"))
    cfg["codec"]["weights"] = str(tmp_path / "missing_codec.pth.tar")
    cfg["recognizers"]["detection"] = {"backend": "torchvision", "train": None,
                                       "model": {"weights": str(tmp_path / "missing_detector.pth")}}
    cfg["recognizers"]["segmentation"] = {"backend": "deeplabv3plus", "train": None, "model": {"weights": "official"}}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "broken.params.yaml").write_text("device: cuda\nseed: 0\n")
    return path


def test_a_broken_set_up_fails_with_one_line_and_a_fix_per_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: SimpleNamespace(free=10 ** 15))
    monkeypatch.setenv("ICM_RUNS_DIR", str(tmp_path / "runs"))
    path = _broken_profile(tmp_path)
    found = _by_name(preflight.run_checks(str(path), None, "cuda", tmp_path / "run"))
    failed = sorted(name for name, c in found.items() if not c.ok)
    assert failed == ["checkpoint/codec_start", "checkpoint/recognizer_detection",
                      "checkpoint/recognizer_segmentation", "data/detection/val2017", "data/segmentation/train",
                      "data/segmentation/val", "gpu"], [c.line() for c in found.values()]
    assert all(found[name].fix for name in failed)
    assert "1 images (a subset of 118287)" in found["data/detection/train2017"].detail
    val = found["data/detection/val2017"]
    assert "val2017 is missing" in val.detail and "download_coco" in val.fix
    assert "PASCAL_CONTEXT_SETUP" in found["data/segmentation/train"].fix
    assert "missing_codec.pth.tar" in found["checkpoint/codec_start"].detail
    assert "missing_detector.pth" in found["checkpoint/recognizer_detection"].detail
    seg = found["checkpoint/recognizer_segmentation"]
    assert "is not in" in seg.detail and seg.fix.startswith("Either download it yourself (wget -P")
    assert "no CUDA GPU is visible" in found["gpu"].detail and "device=cpu" in found["gpu"].fix

    # the same through the runner: its params file asks for cuda; exit code 1, every line printed, nothing written
    assert runner.main(["--profile", str(path), "--check", "--out-dir", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "FAIL data/detection/val2017: " in out and "     fix: python -c" in out
    assert "pre-flight: " in out and " 7 FAIL (" in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_truncated_checkpoint_or_too_little_disk_fails(tmp_path, monkeypatch):
    ex = _complete_smoke_run_dir(tmp_path)
    path = ex.run_dir / "icm" / "detection" / "baseline_lambda0.4" / "codec.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes((ex.models_dir / "codec_start.pt").read_bytes()[:1000])
    found = _by_name(preflight.run_checks("smoke", TINY, "cpu", tmp_path))
    check = found["checkpoint/run_dir"]
    assert not check.ok and "1 of 4 checkpoints are truncated" in check.detail and "baseline_lambda0.4" in check.detail
    assert "delete them" in check.fix
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    disk = _by_name(preflight.run_checks("smoke", TINY, "cpu", tmp_path))["disk"]
    assert not disk.ok and "0.0 GiB free at" in disk.detail and "ICM_RUNS_DIR" in disk.fix


@pytest.mark.parametrize("gib, ok", [(1024.0, True), (0.001, False)])
def test_gpu_memory_against_the_estimate_of_a_training_step(tmp_path, monkeypatch, gib, ok):
    """A (simulated) GPU: its memory is compared with the estimate of one aux-enc training step at the profile's
    batch size; too little names the batch size to lower."""
    _complete_smoke_run_dir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(name="Simulated GPU", total_memory=int(gib * preflight.GIB)))
    check = _by_name(preflight.run_checks("smoke", TINY, "cuda", tmp_path))["gpu"]
    assert check.ok is ok and "Simulated GPU" in check.detail and "one training step needs about" in check.detail
    assert ok or "train.batch_size" in check.fix


def test_evaluation_counts_of_the_paper_profile_are_its_notebooks_01_to_07(tmp_path):
    """What the paper run evaluates on every test image (the README's cost table multiplies these by the measured
    seconds per image): detection 4 lambdas x {w/o aux, aux-enc} + aux-dec and aux-task at lambda 1.6 + ROI (the 4
    w/o-aux models x 2 decoder readings) + the start codec = 19 learned-codec evaluations; segmentation (no ROI) 11;
    JPEG 7 + WebP 7 + BPG 6 + VTM 6 = 26 anchor points per task."""
    ex = Experiment("paper", run_dir=tmp_path, log=None)
    counts = preflight.evaluation_counts(ex)
    assert counts["detection"] == {"trained": 8, "ablation": 2, "roi": 8, "start": 1, "anchors": 26, "reference": 1}
    assert counts["segmentation"] == {"trained": 8, "ablation": 2, "roi": 0, "start": 1, "anchors": 26, "reference": 1}
    study = preflight.evaluation_counts(Experiment("study", run_dir=tmp_path / "s", log=None))
    assert study["detection"]["trained"] == 4 * (3 * 2 + 3)  # 4 seeds x (3 lambdas x 2 arms + 3 MSE lambdas)
    assert study["detection"]["anchors"] == 0 and study["detection"]["roi"] == 0
