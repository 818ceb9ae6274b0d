"""Pascal-Context-59 loader (icm_helpers.pascal_context) on a generated fixture in MMSeg's exact layout."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icm_helpers.codec import pad_to_multiple
from icm_helpers.evaluation import SegmentationMetric
from icm_helpers.pascal_context import (IMAGE_DIR, LABEL_DIR, PASCAL_CONTEXT_59_CLASSES, PASCAL_CONTEXT_EXPECTED_COUNTS,
                                        PASCAL_CONTEXT_SETUP, SPLIT_DIR, PascalContext59, check_pascal_context,
                                        make_fixture, reduce_zero_label, verify_pascal_context)

N_TRAIN, N_VAL = 5, 4


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_fixture(tmp_path_factory.mktemp("pc") / "VOCdevkit" / "VOC2010", N_TRAIN, N_VAL, seed=1)


def _copy(voc: Path, dst: Path) -> Path:
    shutil.copytree(voc, dst)
    return dst


def _raw(voc: Path, stem: str) -> np.ndarray:
    return np.array(Image.open(voc / LABEL_DIR / f"{stem}.png"))


def test_fixture_layout(voc):
    assert (voc / SPLIT_DIR / "train.txt").is_file() and (voc / SPLIT_DIR / "val.txt").is_file()
    stems = (voc / SPLIT_DIR / "train.txt").read_text().split() + (voc / SPLIT_DIR / "val.txt").read_text().split()
    assert len(stems) == N_TRAIN + N_VAL == len(set(stems))
    modes, sizes, values = set(), set(), set()
    for s in stems:
        assert (voc / IMAGE_DIR / f"{s}.jpg").is_file()
        im = Image.open(voc / LABEL_DIR / f"{s}.png")
        modes.add(im.mode)
        sizes.add(im.size)
        values |= set(np.unique(np.array(im)).tolist())
    assert modes == {"L", "P"} and len(sizes) == len(stems)
    assert 0 in values and 59 in values and max(values) <= 59


def test_reduce_zero_label_mapping():
    raw = np.array([[0, 1, 2], [30, 59, 255]], np.uint8)
    out = reduce_zero_label(raw)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [[255, 0, 1], [29, 58, 255]])
    full = np.arange(60, dtype=np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(full), np.r_[255, np.arange(59)])
    with pytest.raises(ValueError, match=r"\[60\] in lab\.png are outside 0\.\.59"):
        reduce_zero_label(np.array([[0, 60]], np.uint8), source="lab.png")


def test_class_names_and_constants():
    assert len(PASCAL_CONTEXT_59_CLASSES) == 59 == len(set(PASCAL_CONTEXT_59_CLASSES))
    assert PASCAL_CONTEXT_59_CLASSES[:5] == ("aeroplane", "bag", "bed", "bedclothes", "bench")
    assert PASCAL_CONTEXT_59_CLASSES[-4:] == ("wall", "water", "window", "wood")
    assert PASCAL_CONTEXT_59_CLASSES.index("person") == 36 and PASCAL_CONTEXT_59_CLASSES.index("pottedplant") == 39
    assert "background" not in PASCAL_CONTEXT_59_CLASSES
    assert PascalContext59.num_classes == 59 and PascalContext59.ignore_index == 255
    assert PascalContext59.class_names == PASCAL_CONTEXT_59_CLASSES
    assert PASCAL_CONTEXT_EXPECTED_COUNTS == {"train": 4998, "val": 5105}
    for needle in ("VOCtrainval_03-May-2010.tar", "host.robots.ox.ac.uk", "trainval_merged.json",
                   "python -m icm_helpers.pascal_context prepare", "SegmentationClassContext"):
        assert needle in PASCAL_CONTEXT_SETUP


def test_items_original_labels(voc):
    ds = PascalContext59(voc, "val")
    assert len(ds) == N_VAL
    stems = (voc / SPLIT_DIR / "val.txt").read_text().split()
    for idx in range(len(ds)):
        item = ds[idx]
        raw = _raw(voc, stems[idx])
        assert item["image_id"] == idx and item["name"] == stems[idx]
        assert item["image"].shape == (3, 520, 520) and item["image"].dtype == torch.float32
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        sem = item["semantic"]
        assert sem.dtype == torch.int64 and tuple(sem.shape) == raw.shape == item["orig_size"]
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        np.testing.assert_array_equal(sem.numpy(), expected)
        assert (sem == 255).any() and int(sem[sem != 255].max()) <= 58
        xp, _ = pad_to_multiple(item["image"][None])
        assert tuple(xp.shape[-2:]) == (576, 576)


def test_image_is_resized_original(voc):
    ds = PascalContext59(voc, "train")
    item = ds[0]
    orig = Image.open(voc / IMAGE_DIR / f"{item['name']}.jpg").convert("RGB")
    ref = np.asarray(orig.resize((520, 520), Image.BILINEAR), np.float32) / 255
    assert np.abs(item["image"].permute(1, 2, 0).numpy() - ref).mean() < 0.02
    small = PascalContext59(voc, "train", size=(64, 96))[0]
    assert small["image"].shape == (3, 64, 96)


def test_items_input_size_labels(voc):
    ds = PascalContext59(voc, "train", label_size="input")
    orig = PascalContext59(voc, "train", label_size="original")
    for idx in range(len(ds)):
        sem = ds[idx]["semantic"]
        ref = orig[idx]["semantic"]
        assert sem.shape == (520, 520) and sem.dtype == torch.int64
        assert set(torch.unique(sem).tolist()) == set(torch.unique(ref).tolist())  # nearest: values preserved
        raw = _raw(voc, ds.ids[idx])
        pil = np.array(Image.fromarray(raw).resize((520, 520), Image.NEAREST))
        expected = np.where(pil == 0, 255, pil.astype(np.int64) - 1)
        assert (sem.numpy() == expected).mean() > 0.99


def test_split_counts_and_verify_report(voc):
    assert len(PascalContext59(voc, "train")) == N_TRAIN and len(PascalContext59(voc, "val")) == N_VAL
    rep = verify_pascal_context(voc, "train")
    assert rep["ok"] and rep["num_ids"] == N_TRAIN and rep["expected_ids"] == 4998
    assert rep["subset"] and not rep["complete"]
    assert rep["num_missing_images"] == 0 and rep["num_missing_labels"] == 0
    assert check_pascal_context(voc, "val")["expected_ids"] == 5105


def test_segmentation_metric_with_items(voc):
    """Items plug into the suite's mIoU: a perfect prediction scores 1, ignore pixels do not count."""
    ds = PascalContext59(voc, "val")
    perfect, shifted = SegmentationMetric(59, 255), SegmentationMetric(59, 255)
    for idx in range(len(ds)):
        item = ds[idx]
        sem = item["semantic"]
        logits = torch.nn.functional.one_hot(sem.clamp(max=58), 59).permute(2, 0, 1)[None].float()
        perfect.update(idx, logits, item)
        shifted.update(idx, logits.roll(1, dims=1), item)
    assert perfect.compute()["mIoU"] == pytest.approx(1.0)
    assert shifted.compute()["mIoU"] == pytest.approx(0.0)


def test_errors_missing_pieces(voc, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*PASCAL_CONTEXT_SETUP"):
        check_pascal_context(tmp_path / "nothing", "val")
    with pytest.raises(FileNotFoundError, match=r"did you mean .*VOC2010"):
        PascalContext59(voc.parent, "val")  # the VOCdevkit folder instead of VOC2010
    with pytest.raises(ValueError, match="unknown Pascal-Context split"):
        verify_pascal_context(voc, "test")

    root = _copy(voc, tmp_path / "a")
    shutil.rmtree(root / LABEL_DIR)
    with pytest.raises(FileNotFoundError, match=r"SegmentationClassContext is missing.*pascal_context prepare"):
        check_pascal_context(root, "val")

    root = _copy(voc, tmp_path / "b")
    (root / SPLIT_DIR / "val.txt").unlink()
    assert not verify_pascal_context(root, "val")["split_file_exists"]
    with pytest.raises(FileNotFoundError, match=r"split file .*val\.txt is missing"):
        PascalContext59(root, "val")
    assert len(PascalContext59(root, "train")) == N_TRAIN  # the other split is unaffected

    root = _copy(voc, tmp_path / "c")
    (root / SPLIT_DIR / "val.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="lists no image ids"):
        check_pascal_context(root, "val")

    root = _copy(voc, tmp_path / "d")
    stems = (root / SPLIT_DIR / "val.txt").read_text().split()
    (root / IMAGE_DIR / f"{stems[1]}.jpg").unlink()
    rep = verify_pascal_context(root, "val")
    assert rep["num_missing_images"] == 1 and rep["missing_image_examples"] == [stems[1]] and not rep["ok"]
    with pytest.raises(FileNotFoundError, match=rf"1 of {N_VAL} ids .* no image .*{stems[1]}"):
        PascalContext59(root, "val")

    root = _copy(voc, tmp_path / "e")
    (root / LABEL_DIR / f"{stems[2]}.png").unlink()
    (root / LABEL_DIR / f"{stems[3]}.png").unlink()
    rep = verify_pascal_context(root, "val")
    assert rep["num_missing_labels"] == 2 and rep["num_missing_images"] == 0
    with pytest.raises(FileNotFoundError, match=rf"2 of {N_VAL} ids .* no label PNG .*{stems[2]}"):
        check_pascal_context(root, "val")

    root = _copy(voc, tmp_path / "f")
    shutil.rmtree(root / IMAGE_DIR)
    with pytest.raises(FileNotFoundError, match=r"JPEGImages is missing.*VOCtrainval"):
        check_pascal_context(root, "val")


def test_bad_label_files(voc, tmp_path):
    root = _copy(voc, tmp_path / "g")
    stems = (root / SPLIT_DIR / "val.txt").read_text().split()
    lab = root / LABEL_DIR / f"{stems[0]}.png"
    raw = _raw(root, stems[0])
    Image.fromarray(raw[:-3]).save(lab)  # wrong size
    ds = PascalContext59(root, "val")
    with pytest.raises(ValueError, match="label map .* but image"):
        ds[0]
    bad = raw.copy()
    bad[0, 0] = 120  # e.g. a 459-class label map
    Image.fromarray(bad).save(lab)
    with pytest.raises(ValueError, match=rf"\[120\].*{lab.name}"):
        ds[0]
    Image.fromarray(np.stack([raw] * 3, -1)).save(lab)  # colour label map
    with pytest.raises(ValueError, match="mode RGB"):
        ds[0]
    with pytest.raises(ValueError, match="label_size"):
        PascalContext59(root, "val", label_size="both")
