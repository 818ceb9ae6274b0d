"""Pascal-Context preparation (``icm_helpers.pascal_context.prepare_pascal_context`` and its command) on a generated
VOC2010 folder and a ``trainval_merged.json`` in the Detail API's format: ``images`` with ``phase``,
``annos_segmentation`` with one compressed COCO RLE per annotation and the Detail category id, ``categories``."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from icm_helpers.pascal_context import (DETAIL_CATEGORY_IDS, IMAGE_DIR, LABEL_DIR, PASCAL_CONTEXT_59_CLASSES,
                                        SPLIT_DIR, PascalContext59, check_pascal_context, decode_segmentation, main,
                                        prepare_pascal_context)

# Pascal-Context's 459 classes are numbered alphabetically; three ids whose names are known independently of the
# conversion table (labels.txt: "2: aeroplane", "284: person"; 458 is the last of the 59, "wood").
AEROPLANE, PERSON, WOOD, NOT_IN_59 = 2, 284, 458, 3  # 3: "air conditioner", merged into background by Detail

# stem: (height, width, phase, [(category id, (y0, y1, x0, x1)), ...] in file order)
PERSON_BOX, PLANE_BOX = (5, 20, 5, 30), (10, 30, 20, 50)
IMAGES = {
    "2008_000002": (40, 60, "train", [(PERSON, PERSON_BOX), (AEROPLANE, PLANE_BOX)]),
    "2008_000003": (6, 2 * 59, "train", [(cid, (0, 6, 2 * k, 2 * k + 2)) for k, cid in enumerate(DETAIL_CATEGORY_IDS)]),
    "2008_000004": (20, 24, "val", [(WOOD, (2, 18, 3, 21))]),
    "2008_000005": (16, 16, "val", []),
}
TEST_PHASE = "2008_000006"  # phase "test": no labels, no JPEG needed


def _rle(h: int, w: int, box: tuple[int, int, int, int]) -> dict:
    m = np.zeros((h, w), np.uint8, order="F")
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}  # JSON holds the compressed string


def detail_json(images: dict = IMAGES) -> dict:
    """A trainval_merged.json in the Detail API's structure (root keys as in the real file)."""
    imgs, anns = [], []
    for stem, (h, w, phase, objects) in {**images, TEST_PHASE: (8, 8, "test", [])}.items():
        image_id = int(stem.replace("_", ""))
        imgs.append({"image_id": image_id, "file_name": f"{stem}.jpg", "height": h, "width": w, "phase": phase,
                     "date_captured": "03-May-2010"})
        for cid, box in objects:
            y0, y1, x0, x1 = box
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cid, "segmentation": _rle(h, w, box),
                         "area": (y1 - y0) * (x1 - x0), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0, "parts": []})
    cats = [{"category_id": cid, "name": f"class{cid}", "supercategory": "object", "onlysemantic": 0, "parts": []}
            for cid in DETAIL_CATEGORY_IDS]
    return {"info": {}, "images": imgs, "annos_segmentation": anns, "categories": cats, "parts": [],
            "annos_occlusion": [], "annos_boundary": []}


def make_voc(root: Path, images: dict = IMAGES) -> tuple[Path, Path]:
    """VOCdevkit/VOC2010 with JPEGImages of the labelled images, and trainval_merged.json beside it."""
    voc = root / "VOCdevkit" / "VOC2010"
    (voc / IMAGE_DIR).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, (h, w, _, _) in images.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(voc / IMAGE_DIR / f"{stem}.jpg")
    path = voc / "trainval_merged.json"
    path.write_text(json.dumps(detail_json(images)))
    return voc, path


def raw_label(root: Path, stem: str) -> np.ndarray:
    with Image.open(root / LABEL_DIR / f"{stem}.png") as im:
        assert im.mode == "L"
        return np.array(im)


@pytest.fixture
def prepared(tmp_path) -> tuple[Path, dict]:
    voc, js = make_voc(tmp_path)
    return voc, prepare_pascal_context(voc, js, log=None)


def test_prepare_writes_mmseg_layout(prepared):
    voc, rep = prepared
    assert (voc / SPLIT_DIR / "train.txt").read_text() == "2008_000002\n2008_000003\n"
    assert (voc / SPLIT_DIR / "val.txt").read_text() == "2008_000004\n2008_000005\n"
    assert not (voc / LABEL_DIR / f"{TEST_PHASE}.png").exists()
    assert rep["counts"] == {"train": 2, "val": 2} and rep["written"] == 4 and rep["kept"] == 0
    for split in ("train", "val"):
        assert check_pascal_context(voc, split)["ok"]


def test_known_pixels_get_mmseg_class_ids(prepared):
    voc, _ = prepared
    lab = raw_label(voc, "2008_000002")
    assert lab[0, 0] == 0  # background
    assert lab[PERSON_BOX[0], PERSON_BOX[2]] == 1 + PASCAL_CONTEXT_59_CLASSES.index("person") == 37
    assert lab[PLANE_BOX[1] - 1, PLANE_BOX[3] - 1] == 1 + PASCAL_CONTEXT_59_CLASSES.index("aeroplane") == 1
    assert lab[15, 25] == 1  # person and aeroplane overlap: the later annotation wins (Detail's getMask)
    assert raw_label(voc, "2008_000004")[10, 10] == 59 and PASCAL_CONTEXT_59_CLASSES[58] == "wood"
    assert not raw_label(voc, "2008_000005").any()
    strips = raw_label(voc, "2008_000003")
    assert strips[3, 0::2].tolist() == list(range(1, 60))  # the 59 Detail ids, ascending = MMSeg's class order
    assert (strips[:, 0::2] == strips[:, 1::2]).all()


def test_suite_reads_prepared_labels_as_mmseg_does(prepared):
    voc, _ = prepared
    train = PascalContext59(voc, "train", size=64, label_size="original")
    item = train[train.ids.index("2008_000002")]
    sem = item["semantic"].numpy()
    assert sem[PERSON_BOX[0], PERSON_BOX[2]] == PASCAL_CONTEXT_59_CLASSES.index("person")
    assert sem[PLANE_BOX[1] - 1, PLANE_BOX[3] - 1] == PASCAL_CONTEXT_59_CLASSES.index("aeroplane")
    assert sem[0, 0] == 255  # background is ignored (reduce_zero_label)
    val = PascalContext59(voc, "val", size=64)
    assert val[val.ids.index("2008_000004")]["semantic"][10, 10] == PASCAL_CONTEXT_59_CLASSES.index("wood")
    assert (val[val.ids.index("2008_000005")]["semantic"] == 255).all()


def test_prepare_into_another_folder_links_images_and_resumes(tmp_path):
    voc, js = make_voc(tmp_path / "src")
    out = tmp_path / "out" / "VOC2010"
    first = prepare_pascal_context(voc, js, out, log=None)
    assert (out / IMAGE_DIR).is_symlink() and (out / IMAGE_DIR).resolve() == (voc / IMAGE_DIR).resolve()
    assert not (voc / LABEL_DIR).exists() and first["written"] == 4
    assert prepare_pascal_context(voc, js, out, log=None)["kept"] == 4
    assert prepare_pascal_context(voc, js, out, force=True, log=None)["written"] == 4
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))


def test_errors_name_the_missing_file_and_the_fix(tmp_path):
    voc, js = make_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json does not exist.*trainval_merged\.json.*step 2"):
        prepare_pascal_context(voc, tmp_path / "nope.json", log=None)
    with pytest.raises(FileNotFoundError, match=r"JPEGImages does not exist.*did you mean .*VOC2010"):
        prepare_pascal_context(voc.parent, js, log=None)
    (voc / IMAGE_DIR / "2008_000004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 images .*2008_000004\.jpg.*VOCtrainval_03-May-2010"):
        prepare_pascal_context(voc, js, log=None)
    assert not (voc / LABEL_DIR).exists() and not (voc / SPLIT_DIR).exists()  # nothing written before the check


def test_wrong_annotation_files_are_refused(tmp_path):
    bad = dict(IMAGES, **{"2008_000002": (40, 60, "train", [(NOT_IN_59, PERSON_BOX)])})
    voc, js = make_voc(tmp_path, bad)
    with pytest.raises(ValueError, match=r"2008_000002\.jpg: category ids \[3\] are none of the 59"):
        prepare_pascal_context(voc, js, log=None)
    js.write_text(json.dumps({"images": [], "annotations": []}))  # a COCO file, not Detail's
    with pytest.raises(ValueError, match=r"has no \['annos_segmentation'\].*not the Detail API"):
        prepare_pascal_context(voc, js, log=None)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], edges])).tolist()}


def test_decode_segmentation_accepts_every_coco_form():
    h, w, box = 12, 10, (2, 9, 3, 7)
    compressed = _rle(h, w, box)
    expected = decode_segmentation(compressed, h, w)
    assert expected.sum() == 7 * 4 and expected[2:9, 3:7].all()
    as_bytes = {"size": [h, w], "counts": compressed["counts"].encode()}
    assert (decode_segmentation(as_bytes, h, w) == expected).all()
    assert (decode_segmentation(_uncompressed_rle(expected), h, w) == expected).all()
    polygon = decode_segmentation([[3, 2, 7, 2, 7, 9, 3, 9]], h, w)
    assert polygon[5, 5] and not polygon[0, 0]
    with pytest.raises(ValueError, match="mask of size"):
        decode_segmentation(compressed, h + 1, w)


def test_command_line(tmp_path, capsys):
    voc, js = make_voc(tmp_path)
    assert main(["prepare", "--voc", str(voc), "--detail-json", str(js)]) == 0
    assert main(["check", "--root", str(voc)]) == 0
    assert "train: 2 images" in capsys.readouterr().out
    assert main(["prepare", "--voc", str(voc), "--detail-json", str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.json does not exist" in err and "--detail-json" in err


def test_png_is_written_as_mmseg_reads_it(prepared):
    voc, _ = prepared
    data = (voc / LABEL_DIR / "2008_000002.png").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size == (60, 40)
