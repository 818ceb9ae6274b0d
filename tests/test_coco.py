"""COCO 2017 loader (icm_helpers.coco) on the real coco_tiny fixture (80 val + 80 train images of COCO 2017)."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icm_helpers import coco as coco_mod
from icm_helpers.codec import crop_to, pad_to_multiple
from icm_helpers.coco import (COCO_EXPECTED_COUNTS, COCO_FILES, CocoDetection, check_coco, contiguous_category_map,
                              download_coco, verify_coco)
from icm_helpers.evaluation import DetectionMetric

COCO_TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_tiny"

pytestmark = pytest.mark.skipif(not (COCO_TINY / "annotations" / "instances_val2017.json").is_file(),
                                reason=f"real-data fixture {COCO_TINY} not available")


def _fresh_coco(path: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


@pytest.fixture(scope="module")
def val_json():
    return json.loads((COCO_TINY / "annotations" / "instances_val2017.json").read_text())


@pytest.fixture(scope="module")
def gt_val():
    return _fresh_coco(COCO_TINY / "annotations" / "instances_val2017.json")


@pytest.fixture(scope="module")
def val_eval():
    return CocoDetection(COCO_TINY, "val2017", mode="eval")


def _subset_copy(dst: Path, split: str, image_ids=None, mutate=None, copy_images=True) -> Path:
    """Copy (part of) a coco_tiny split into ``dst`` in the official layout; ``mutate(data)`` edits the JSON."""
    data = json.loads((COCO_TINY / "annotations" / f"instances_{split}.json").read_text())
    if image_ids is not None:
        keep = set(image_ids)
        data["images"] = [im for im in data["images"] if im["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    if mutate is not None:
        mutate(data)
    (dst / "annotations").mkdir(parents=True, exist_ok=True)
    (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    (dst / split).mkdir(parents=True, exist_ok=True)
    if copy_images:
        for im in data["images"]:
            shutil.copy(COCO_TINY / split / im["file_name"], dst / split / im["file_name"])
    return dst


def _union_mask(gt, image_id: int) -> np.ndarray:
    info = gt.imgs[image_id]
    out = np.zeros((info["height"], info["width"]), bool)
    for a in gt.imgToAnns[image_id]:
        if not a["iscrowd"]:
            out |= gt.annToMask(a).astype(bool)
    return out


# ----------------------------------------------------------------------------------------------- verification


def test_verify_report_on_coco_tiny():
    for split in ("val2017", "train2017"):
        rep = verify_coco(COCO_TINY, split)
        assert rep["ok"] and rep["root_exists"] and rep["image_dir_exists"] and rep["annotation_parses"]
        assert rep["num_images_json"] == 80 and rep["num_files_on_disk"] == 80
        assert rep["expected_images"] == COCO_EXPECTED_COUNTS[split]
        assert rep["subset"] is True and rep["complete"] is False
        assert rep["num_missing"] == 0 and rep["missing_examples"] == []
    assert COCO_EXPECTED_COUNTS == {"train2017": 118287, "val2017": 5000}
    assert check_coco(COCO_TINY, "val")["split"] == "val2017"  # alias accepted


def test_missing_root_and_empty_image_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*download_coco"):
        check_coco(tmp_path / "nope", "val2017")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CocoDetection(tmp_path / "nope", "val2017")
    root = _subset_copy(tmp_path / "empty", "val2017", copy_images=False)
    rep = verify_coco(root, "val2017")
    assert not rep["ok"] and rep["num_files_on_disk"] == 0 and rep["num_missing"] == 80
    with pytest.raises(FileNotFoundError, match=r"val2017 is empty.*download_coco"):
        check_coco(root, "val2017")
    (root / "val2017").rmdir()
    with pytest.raises(FileNotFoundError, match="image directory .*val2017 is missing"):
        check_coco(root, "val2017")


def test_missing_and_corrupt_json(tmp_path):
    root = _subset_copy(tmp_path / "c", "val2017", image_ids=[5001])
    ann = root / "annotations" / "instances_val2017.json"
    text = ann.read_text()
    ann.write_text(text[: len(text) // 2])  # truncated JSON
    rep = verify_coco(root, "val2017")
    assert rep["annotation_exists"] and not rep["annotation_parses"] and "JSONDecodeError" in rep["annotation_error"]
    with pytest.raises(ValueError, match="cannot be read"):
        check_coco(root, "val2017")
    ann.unlink()
    with pytest.raises(FileNotFoundError, match=r"annotation file .*instances_val2017.json is missing"):
        CocoDetection(root, "val2017")


def test_json_images_mismatch(tmp_path, val_json):
    root = _subset_copy(tmp_path / "m", "val2017")
    names = sorted(im["file_name"] for im in val_json["images"])
    for name in names[::2]:  # delete half of the images
        (root / "val2017" / name).unlink()
    rep = verify_coco(root, "val2017")
    assert rep["num_missing"] == 40 and rep["missing_examples"] == names[::2][:5] and not rep["ok"]
    with pytest.raises(FileNotFoundError, match=rf"40 of 80 images .* missing .*{names[0]}"):
        CocoDetection(root, "val2017")
    # only the requested images need to be there
    present = [im["id"] for im in val_json["images"] if im["file_name"] in set(names[1::2])]
    ds = CocoDetection(root, "val2017", image_ids=present[:3])
    assert len(ds) == 3
    with pytest.raises(ValueError, match="not in"):
        CocoDetection(root, "val2017", image_ids=[present[0], 123456789])


# ----------------------------------------------------------------------------------------------- items


def test_item_format_and_eval_resize(val_eval, gt_val):
    assert len(val_eval) == 80 and val_eval.coco is not None
    cat_ids = set(gt_val.getCatIds())
    for idx in (0, 7, 33, 79):
        item = val_eval[idx]
        info = gt_val.imgs[item["image_id"]]
        h, w = info["height"], info["width"]
        x = item["image"]
        assert x.dtype == torch.float32 and x.ndim == 3 and x.shape[0] == 3
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        H, W = x.shape[-2:]
        assert min(H, W) == 800
        assert abs(max(H, W) - max(h, w) * 800 / min(h, w)) <= 1.0  # aspect kept within 1 px
        assert item["orig_size"] == (h, w)
        assert item["scale"] == pytest.approx(800 / min(h, w), rel=1e-12)
        assert item["boxes"].dtype == torch.float32 and item["boxes"].shape[1] == 4
        assert item["labels"].dtype == torch.int64 and item["labels"].shape[0] == item["boxes"].shape[0]
        assert item["roi"].dtype == torch.bool and item["roi"].shape == (H, W)
        assert set(item["labels"].tolist()) <= cat_ids
        # boxes = original bbox (non-crowd, annotation order) * scale
        anns = [a for a in gt_val.imgToAnns[item["image_id"]] if not a["iscrowd"]]
        exp = np.array(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        )
        np.testing.assert_allclose(item["boxes"].numpy(), exp * 800 / min(h, w), rtol=1e-5, atol=1e-3)
        assert item["labels"].tolist() == [a["category_id"] for a in anns]
        # padding for the codec: multiples of 64, and crop_to undoes it
        xp, pad = pad_to_multiple(x[None])
        assert xp.shape[-2] % 64 == 0 and xp.shape[-1] % 64 == 0
        assert xp.shape[-2] - H < 64 and xp.shape[-1] - W < 64
        assert torch.equal(crop_to(xp, pad)[0], x)


def test_eval_image_is_resized_original(val_eval):
    """The eval image is the original JPEG resized (bilinear + antialias), not some other picture."""
    item = val_eval[3]
    orig = np.asarray(Image.open(COCO_TINY / "val2017" / item["file_name"]).convert("RGB"), np.float32) / 255
    H, W = item["image"].shape[-2:]
    ref = (
        np.asarray(Image.fromarray((orig * 255).round().astype(np.uint8)).resize((W, H), Image.BILINEAR), np.float32)
        / 255
    )
    diff = np.abs(item["image"].permute(1, 2, 0).numpy() - ref)
    assert diff.mean() < 0.01


def test_train_mode_original_size_and_roi_equals_anntomask(gt_val):
    ds = CocoDetection(COCO_TINY, "val2017", mode="train")
    for idx in (0, 10, 50):
        item = ds[idx]
        info = gt_val.imgs[item["image_id"]]
        assert tuple(item["image"].shape[-2:]) == (info["height"], info["width"]) and item["scale"] == 1.0
        union = _union_mask(gt_val, item["image_id"])
        assert union.any()
        np.testing.assert_array_equal(item["roi"].numpy(), union)
        orig = np.asarray(Image.open(COCO_TINY / "val2017" / info["file_name"]).convert("RGB"))
        np.testing.assert_array_equal((item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), orig)


def test_eval_roi_is_nearest_resize(val_eval, gt_val):
    item = val_eval[5]
    union = _union_mask(gt_val, item["image_id"])
    H, W = item["roi"].shape
    ref = np.asarray(Image.fromarray(union.astype(np.uint8) * 255).resize((W, H), Image.NEAREST)) > 0
    assert (item["roi"].numpy() == ref).mean() > 0.999
    assert abs(item["roi"].float().mean().item() - union.mean()) < 0.01


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F").astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def test_roi_from_rle_annotations(tmp_path, gt_val):
    """coco_tiny has no non-crowd RLE annotation: convert polygons to compressed and uncompressed RLE in a copy."""
    from pycocotools import mask as mask_utils

    # an image with >= 2 non-crowd annotations, each contributing pixels no other annotation covers
    img_id = None
    for i in sorted(gt_val.imgs):
        anns = [a for a in gt_val.imgToAnns[i] if not a["iscrowd"]]
        if len(anns) >= 3:
            img_id, anns = i, anns
            break
    assert img_id is not None
    targets = sorted(anns, key=lambda a: -a["area"])[:2]
    poly_masks = {a["id"]: gt_val.annToMask(a).astype(bool) for a in targets}

    def mutate(data):
        for a in data["annotations"]:
            if a["id"] == targets[0]["id"]:
                rle = mask_utils.encode(np.asfortranarray(poly_masks[a["id"]].astype(np.uint8)))
                a["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            elif a["id"] == targets[1]["id"]:
                a["segmentation"] = _uncompressed_rle(poly_masks[a["id"]])

    root = _subset_copy(tmp_path / "rle", "val2017", image_ids=[img_id], mutate=mutate)
    ds = CocoDetection(root, "val2017", mode="train")
    segs = [a["segmentation"] for a in ds.coco.imgToAnns[img_id] if a["id"] in poly_masks]
    assert {type(s["counts"]).__name__ for s in segs} == {"str", "list"}  # both RLE flavours really present
    union = _union_mask(gt_val, img_id)  # from the ORIGINAL polygons
    np.testing.assert_array_equal(ds[0]["roi"].numpy(), union)
    # eval mode too, and a loader that ignored RLE annotations would lose these pixels
    others = np.zeros_like(union)
    for a in gt_val.imgToAnns[img_id]:
        if not a["iscrowd"] and a["id"] not in poly_masks:
            others |= gt_val.annToMask(a).astype(bool)
    assert (union & ~others).sum() > 100


def test_crowd_excluded(val_eval, gt_val):
    crowd_imgs = sorted({a["image_id"] for a in gt_val.dataset["annotations"] if a["iscrowd"]})
    assert crowd_imgs, "coco_tiny val has crowd annotations"
    ds = CocoDetection(COCO_TINY, "val2017", mode="train", image_ids=crowd_imgs)
    checked_pixels = 0
    for idx, img_id in enumerate(ds.ids):
        item = ds[idx]
        anns = gt_val.imgToAnns[img_id]
        assert len(item["labels"]) == sum(1 for a in anns if not a["iscrowd"])
        crowd = np.zeros(item["roi"].shape, bool)
        for a in anns:
            if a["iscrowd"]:
                crowd |= gt_val.annToMask(a).astype(bool)
        only_crowd = crowd & ~_union_mask(gt_val, img_id)
        assert not item["roi"].numpy()[only_crowd].any()
        checked_pixels += int(only_crowd.sum())
    assert checked_pixels > 1000  # the check above is not vacuous


def test_grayscale_and_cmyk_converted(tmp_path, val_json):
    ids = [im["id"] for im in val_json["images"][:2]]
    root = _subset_copy(tmp_path / "g", "val2017", image_ids=ids)
    infos = {im["id"]: im for im in val_json["images"]}
    gray_path = root / "val2017" / infos[ids[0]]["file_name"]
    Image.open(gray_path).convert("L").save(gray_path, format="JPEG", quality=95)
    cmyk_path = root / "val2017" / infos[ids[1]]["file_name"]
    Image.open(cmyk_path).convert("CMYK").save(cmyk_path, format="JPEG", quality=95)
    assert Image.open(gray_path).mode == "L" and Image.open(cmyk_path).mode == "CMYK"
    ds = CocoDetection(root, "val2017", mode="train")
    g = ds[ds.ids.index(ids[0])]["image"]
    assert g.shape[0] == 3 and torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    c = ds[ds.ids.index(ids[1])]["image"]
    orig = (
        torch.from_numpy(
            np.array(Image.open(COCO_TINY / "val2017" / infos[ids[1]]["file_name"]).convert("RGB"))
        ).permute(2, 0, 1)
        / 255
    )
    assert c.shape == orig.shape and float((c - orig).abs().mean()) < 0.05
    ev = CocoDetection(root, "val2017", mode="eval")
    assert all(ev[i]["image"].shape[0] == 3 and min(ev[i]["image"].shape[-2:]) == 800 for i in range(2))


def test_corrupt_images_raise_or_skip(tmp_path, val_json):
    ids = [im["id"] for im in val_json["images"][:6]]
    root = _subset_copy(tmp_path / "bad", "val2017", image_ids=ids)
    infos = {im["id"]: im for im in val_json["images"]}
    trunc = root / "val2017" / infos[ids[1]]["file_name"]
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    junk = root / "val2017" / infos[ids[4]]["file_name"]
    junk.write_bytes(b"this is not a jpeg" * 10)
    ds = CocoDetection(root, "val2017")  # lazy: construction does not decode
    assert len(ds) == 6
    with pytest.raises(ValueError, match=trunc.name):
        ds[ds.ids.index(ids[1])]
    with pytest.raises(ValueError, match=junk.name):
        ds[ds.ids.index(ids[4])]
    with pytest.warns(RuntimeWarning, match=r"skipped 2 corrupt"):
        sk = CocoDetection(root, "val2017", on_corrupt="skip")
    assert len(sk) == 4 and ids[1] not in sk.ids and ids[4] not in sk.ids
    assert sorted(Path(p).name for _, p, _ in sk.skipped) == sorted([trunc.name, junk.name])
    for i in range(len(sk)):
        assert sk[i]["image"].shape[0] == 3
    with pytest.raises(ValueError, match="on_corrupt"):
        CocoDetection(root, "val2017", on_corrupt="ignore")


def test_images_without_annotations_are_kept(tmp_path, val_json):
    ids = [im["id"] for im in val_json["images"][:3]]

    def mutate(data):
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != ids[0]]

    root = _subset_copy(tmp_path / "empty_ann", "val2017", image_ids=ids, mutate=mutate)
    ds = CocoDetection(root, "val2017")
    assert len(ds) == 3
    item = ds[ds.ids.index(ids[0])]
    assert item["boxes"].shape == (0, 4) and item["labels"].shape == (0,) and not item["roi"].any()


def test_contiguous_category_map(val_eval, gt_val):
    to_c, to_id = contiguous_category_map(val_eval)
    ids = sorted(gt_val.getCatIds())
    assert len(ids) == 80 and max(ids) == 90  # COCO ids are not contiguous
    assert [to_c[i] for i in ids] == list(range(80))
    assert all(to_id[to_c[i]] == i for i in ids)
    assert to_c[1] == 0 and to_c[90] == 79 and to_id[11] == 13  # id 12 does not exist in COCO
    assert contiguous_category_map(gt_val.dataset) == (to_c, to_id)


# ----------------------------------------------------------------------------------------------- mAP


def _direct_cocoeval(gt, dets: list[dict], img_ids: list[int]) -> np.ndarray:
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.array(ev.stats)


def test_map_through_detection_metric_equals_direct_cocoeval(val_eval):
    """Synthetic detections made on the RESIZED items, scored by the suite's DetectionMetric, must give exactly
    the mAP of pycocotools COCOeval run directly on the same detections in ORIGINAL coordinates."""
    gt = _fresh_coco(COCO_TINY / "annotations" / "instances_val2017.json")  # independent of the loader
    cat_ids = sorted(gt.getCatIds())
    rng = np.random.default_rng(0)
    metric = DetectionMetric(val_eval)
    direct, resized_coords = [], []
    for idx in range(len(val_eval)):
        item = val_eval[idx]
        info = gt.imgs[item["image_id"]]
        s = 800 / min(info["height"], info["width"])  # the scale, computed independently of item["scale"]
        H, W = item["image"].shape[-2:]
        boxes, labels = [], []
        for b, lab in zip(item["boxes"].numpy().astype(np.float64), item["labels"].tolist()):
            if rng.random() < 0.15:
                continue  # missed object
            wh = np.maximum(b[2:] - b[:2], 1.0)
            boxes.append(b + rng.normal(0, 0.06, 4) * np.concatenate([wh, wh]))
            labels.append(lab)
        for _ in range(int(rng.integers(0, 4))):  # false positives
            x0, y0 = rng.uniform(0, W - 40), rng.uniform(0, H - 40)
            boxes.append(np.array([x0, y0, x0 + rng.uniform(10, 300), y0 + rng.uniform(10, 300)]))
            labels.append(int(rng.choice(cat_ids)))
        boxes = np.array(boxes, np.float64).reshape(-1, 4)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
        scores = rng.uniform(0.05, 1.0, len(boxes))
        pred = {"boxes": torch.from_numpy(boxes.astype(np.float32)), "labels": torch.tensor(labels, dtype=torch.int64),
                "scores": torch.from_numpy(scores.astype(np.float32))}
        metric.update(item["image_id"], [pred], item)
        b32 = pred["boxes"].numpy().astype(np.float64)
        for (x0, y0, x1, y1), lab, sc in zip(b32, labels, pred["scores"].tolist()):
            o = np.array([x0, y0, x1, y1]) / s
            direct.append(
                {
                    "image_id": item["image_id"],
                    "category_id": lab,
                    "bbox": [o[0], o[1], o[2] - o[0], o[3] - o[1]],
                    "score": sc,
                }
            )
            resized_coords.append(
                {"image_id": item["image_id"], "category_id": lab, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": sc}
            )
    img_ids = [gt.imgs[i]["id"] for i in val_eval.ids]
    suite = metric.compute()
    stats = _direct_cocoeval(gt, direct, img_ids)
    assert 0.2 < stats[0] < 0.95  # a non-trivial mAP
    assert suite["mAP"] == pytest.approx(stats[0], abs=1e-9)
    assert suite["AP50"] == pytest.approx(stats[1], abs=1e-9)
    assert suite["num_detections"] == len(direct)
    # control: forgetting the rescale would change the number a lot (so the check above has teeth)
    wrong = _direct_cocoeval(gt, resized_coords, img_ids)
    assert abs(wrong[0] - stats[0]) > 0.1


def test_perfect_detections_give_map_one(val_eval):
    metric = DetectionMetric(val_eval)
    for idx in range(0, len(val_eval), 4):
        item = val_eval[idx]
        n = len(item["labels"])
        metric.update(
            item["image_id"], [{"boxes": item["boxes"], "labels": item["labels"], "scores": torch.ones(n)}], item
        )
    out = metric.compute()
    assert out["mAP"] > 0.999 and out["AP50"] > 0.999


# ----------------------------------------------------------------------------------------------- download (no network)


def test_coco_files_table():
    assert set(COCO_FILES) == {"train2017", "val2017", "annotations"}
    for spec in COCO_FILES.values():
        assert spec["url"].startswith("http://images.cocodataset.org/") and spec["url"].endswith(spec["filename"])
        assert len(spec["md5"]) == 32 and int(spec["md5"], 16) >= 0 and spec["size"] > 10**8


class _FakeResponse(io.BytesIO):
    def __init__(self, body: bytes, status: int):
        super().__init__(body)
        self.status = status
        self.headers = {"Content-Length": str(len(body))}

    def getcode(self):
        return self.status


def _make_zip(member_dir: str) -> bytes:
    buf = io.BytesIO()
    img = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(img, format="JPEG")
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{member_dir}/000000000001.jpg", img.getvalue())
        zf.writestr(f"{member_dir}/000000000002.jpg", img.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("honour_range", [True, False])
def test_download_resumes_verifies_and_extracts(tmp_path, monkeypatch, honour_range):
    body = _make_zip("val2017")
    files = {"val2017": {"url": "http://example.invalid/val2017.zip", "filename": "val2017.zip", "size": len(body),
                         "md5": hashlib.md5(body).hexdigest(), "provides": ("val2017",)}}
    (tmp_path / "val2017.zip.part").write_bytes(body[:100])  # an interrupted earlier download
    seen = []

    def fake(request, timeout=60.0):
        rng = request.get_header("Range")
        seen.append(rng)
        if rng and honour_range:
            start = int(rng.split("=")[1].rstrip("-"))
            return _FakeResponse(body[start:], 206)
        return _FakeResponse(body, 200)

    monkeypatch.setattr(coco_mod, "_urlopen", fake)
    download_coco(tmp_path, splits=("val2017",), annotations=False, files=files)
    assert seen == ["bytes=100-"]
    assert sorted(p.name for p in (tmp_path / "val2017").iterdir()) == ["000000000001.jpg", "000000000002.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val2017"]  # no .part, archive or temp dir left
    download_coco(tmp_path, splits=("val2017",), annotations=False, files=files)  # already in place: no request
    assert len(seen) == 1


def test_download_md5_mismatch_leaves_no_folder(tmp_path, monkeypatch):
    body = _make_zip("val2017")
    files = {"val2017": {"url": "http://example.invalid/val2017.zip", "filename": "val2017.zip", "size": len(body),
                         "md5": "0" * 32, "provides": ("val2017",)}}
    monkeypatch.setattr(coco_mod, "_urlopen", lambda request, timeout=60.0: _FakeResponse(body, 200))
    with pytest.raises(ValueError, match="MD5 mismatch"):
        download_coco(tmp_path, splits=("val2017",), annotations=False, files=files)
    assert not (tmp_path / "val2017").exists()
    assert not any(p.name.startswith(".extract") for p in tmp_path.iterdir())
