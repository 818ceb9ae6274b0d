"""Pascal-Context-59 for the ``paper`` profile (semantic segmentation, Sec. 4.1 of Iino et al.).

The layout is MMSegmentation's (the paper's recognizer is MMSeg's DeepLabv3+); the root is ``VOCdevkit/VOC2010``::

    VOC2010/JPEGImages/<stem>.jpg
    VOC2010/SegmentationClassContext/<stem>.png      label maps: 0 = background ("other"), 1..59 = the 59 classes
    VOC2010/ImageSets/SegmentationContext/train.txt  4998 stems, one per line
    VOC2010/ImageSets/SegmentationContext/val.txt    5105 stems

Labels are mapped as MMSeg's ``PascalContextDataset59`` does (``reduce_zero_label=True``): 0 -> 255 (ignored),
k -> k-1 for k = 1..59; 255 stays 255. Class order = ``PASCAL_CONTEXT_59_CLASSES`` (MMSeg's METAINFO order).
Nothing here downloads anything; see ``PASCAL_CONTEXT_SETUP`` for how to prepare the data.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from .data import load_rgb
from .io import atomic_write_bytes, atomic_write_text
from .progress import progress

PASCAL_CONTEXT_SETUP = """\
Pascal-Context-59 setup (about 1.3 GB to download yourself; nothing is downloaded by this suite):

1. Images: download the PASCAL VOC 2010 train/val tar and extract it (it creates VOCdevkit/VOC2010/JPEGImages):
       wget http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar
       tar -xf VOCtrainval_03-May-2010.tar -C data/
2. Annotations: download trainval_merged.json (the Pascal-Context annotations in the Detail API's format):
       wget -P data/VOCdevkit/VOC2010 https://codalabuser.blob.core.windows.net/public/trainval_merged.json
3. Convert to MMSegmentation's layout (the label maps MMSeg's converter writes; neither the Detail API nor MMSeg
   is needed) and check both splits:
       python -m icm_helpers.pascal_context prepare --voc data/VOCdevkit/VOC2010 \\
           --detail-json data/VOCdevkit/VOC2010/trainval_merged.json
   It writes VOC2010/SegmentationClassContext/<stem>.png (0 = background, 1..59 = the classes) and
   VOC2010/ImageSets/SegmentationContext/{train,val}.txt; --out DIR writes them under DIR instead.
Expected: train 4998 images, val 5105 images.
"""

__doc__ += "\n" + PASCAL_CONTEXT_SETUP

# MMSegmentation PascalContextDataset59.METAINFO["classes"]: contiguous label k (after reduce_zero_label) is
# PASCAL_CONTEXT_59_CLASSES[k].
PASCAL_CONTEXT_59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant",
    "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table",
    "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)
assert len(PASCAL_CONTEXT_59_CLASSES) == 59

PASCAL_CONTEXT_SPLITS = ("train", "val")
PASCAL_CONTEXT_EXPECTED_COUNTS = {"train": 4998, "val": 5105}
IGNORE_INDEX = 255
IMAGE_DIR = "JPEGImages"
LABEL_DIR = "SegmentationClassContext"
SPLIT_DIR = Path("ImageSets") / "SegmentationContext"


def reduce_zero_label(label: np.ndarray, source: str | Path | None = None) -> np.ndarray:
    """MMSeg's ``reduce_zero_label``: 0 -> 255, k -> k-1, 255 stays 255; returns int64.

    Values 60..254 cannot come from the 59-class converter (e.g. a 459-class label map) and would silently
    corrupt the confusion matrix, so they raise ``ValueError`` (naming ``source``).
    """
    lab = np.asarray(label)
    bad = ((lab >= 60) & (lab != 255)) | (lab < 0)
    if bad.any():
        vals = np.unique(lab[bad])[:5].tolist()
        where = f" in {source}" if source is not None else ""
        raise ValueError(f"label values {vals}{where} are outside 0..59 (and not 255): not a Pascal-Context-59 "
                         "label map made by `python -m icm_helpers.pascal_context prepare` or MMSeg's converter "
                         "(see PASCAL_CONTEXT_SETUP)")
    out = lab.astype(np.int64) - 1
    out[lab == 0] = IGNORE_INDEX
    out[lab == 255] = IGNORE_INDEX
    return out


def read_label(path: str | Path) -> np.ndarray:
    """Read a label PNG as its raw class indices (mode L / P / I;16 / I); colour (RGB) label maps raise."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(f"label map {path} has mode {im.mode}: expected a single-channel index PNG (L or P)")
            return np.array(im)
    except (OSError, SyntaxError) as exc:
        raise ValueError(
            f"cannot read label map {path}: {exc} (corrupt or truncated file? re-run the converter)"
        ) from exc


def _resolve_hint(root: Path) -> str:
    for cand in (root / "VOC2010", root / "VOCdevkit" / "VOC2010"):
        if (cand / IMAGE_DIR).is_dir():
            return f" (did you mean {cand}? the root is the VOC2010 folder)"
    return ""


def _split_file(root: Path, split: str) -> Path:
    if split not in PASCAL_CONTEXT_SPLITS:
        raise ValueError(f"unknown Pascal-Context split {split!r}; use one of {PASCAL_CONTEXT_SPLITS}")
    return root / SPLIT_DIR / f"{split}.txt"


def read_split(root: str | Path, split: str) -> list[str]:
    path = _split_file(Path(root), split)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def verify_pascal_context(root: str | Path, split: str = "val", max_examples: int = 5) -> dict[str, Any]:
    """Report on a Pascal-Context split under ``root`` (= VOCdevkit/VOC2010): directories and split file present,
    number of ids vs the expected count (a subset is allowed and reported), ids without image or label."""
    root = Path(root)
    split_file = _split_file(root, split)
    rep: dict[str, Any] = {
        "root": str(root), "split": split, "root_exists": root.is_dir(),
        "image_dir": str(root / IMAGE_DIR), "image_dir_exists": (root / IMAGE_DIR).is_dir(),
        "label_dir": str(root / LABEL_DIR), "label_dir_exists": (root / LABEL_DIR).is_dir(),
        "split_file": str(split_file), "split_file_exists": split_file.is_file(),
        "num_ids": 0, "expected_ids": PASCAL_CONTEXT_EXPECTED_COUNTS[split], "complete": False, "subset": False,
        "num_missing_images": 0, "missing_image_examples": [], "num_missing_labels": 0, "missing_label_examples": [],
        "ok": False, "hint": _resolve_hint(root) if not (root / IMAGE_DIR).is_dir() else "",
    }
    if rep["split_file_exists"]:
        ids = read_split(root, split)
        rep["num_ids"] = len(ids)
        rep["complete"] = len(ids) == rep["expected_ids"]
        rep["subset"] = 0 < len(ids) < rep["expected_ids"]
        if rep["image_dir_exists"]:
            with_img = {p.stem for p in (root / IMAGE_DIR).glob("*.jpg")}
            miss = [i for i in ids if i not in with_img]
            rep["num_missing_images"], rep["missing_image_examples"] = len(miss), miss[:max_examples]
        if rep["label_dir_exists"]:
            with_lab = {p.stem for p in (root / LABEL_DIR).glob("*.png")}
            miss = [i for i in ids if i not in with_lab]
            rep["num_missing_labels"], rep["missing_label_examples"] = len(miss), miss[:max_examples]
    rep["ok"] = bool(
        rep["root_exists"]
        and rep["image_dir_exists"]
        and rep["label_dir_exists"]
        and rep["split_file_exists"]
        and rep["num_ids"] > 0
        and rep["num_missing_images"] == 0
        and rep["num_missing_labels"] == 0
    )
    return rep


def check_pascal_context(root: str | Path, split: str = "val") -> dict[str, Any]:
    """``verify_pascal_context`` that raises ``FileNotFoundError``/``ValueError`` naming what is missing and the
    fix (see ``PASCAL_CONTEXT_SETUP``). Returns the report."""
    rep = verify_pascal_context(root, split)
    fix = "See icm_helpers.pascal_context.PASCAL_CONTEXT_SETUP"
    prepare = "python -m icm_helpers.pascal_context prepare"
    if not rep["root_exists"]:
        raise FileNotFoundError(f"Pascal-Context root {rep['root']} does not exist{rep['hint']}. {fix} "
                                "(step 1: VOCtrainval_03-May-2010.tar).")
    if not rep["image_dir_exists"]:
        raise FileNotFoundError(f"Pascal-Context image directory {rep['image_dir']} is missing{rep['hint']}. {fix} "
                                "(step 1: extract VOCtrainval_03-May-2010.tar).")
    if not rep["label_dir_exists"]:
        raise FileNotFoundError(f"Pascal-Context label directory {rep['label_dir']} is missing. {fix} "
                                f"(steps 2-3: trainval_merged.json, then {prepare}).")
    if not rep["split_file_exists"]:
        raise FileNotFoundError(f"Pascal-Context split file {rep['split_file']} is missing. {fix} "
                                f"(step 3: {prepare} writes ImageSets/SegmentationContext/{{train,val}}.txt).")
    if rep["num_ids"] == 0:
        raise ValueError(f"Pascal-Context split file {rep['split_file']} lists no image ids. {fix} (re-run step 3).")
    if rep["num_missing_images"]:
        raise FileNotFoundError(
            f"{rep['num_missing_images']} of {rep['num_ids']} ids of {rep['split_file']} have no image in "
            f"{rep['image_dir']} "
            f"(e.g. {', '.join(rep['missing_image_examples'])}). {fix} (step 1)."
        )
    if rep["num_missing_labels"]:
        raise FileNotFoundError(
            f"{rep['num_missing_labels']} of {rep['num_ids']} ids of {rep['split_file']} have no label PNG in "
            f"{rep['label_dir']} "
            f"(e.g. {', '.join(rep['missing_label_examples'])}). {fix} (step 3: re-run prepare)."
        )
    return rep


class PascalContext59(torch.utils.data.Dataset):
    """Pascal-Context-59 split in the suite's item format.

    ``image``: resized to ``size`` x ``size`` (bilinear + antialias), as in the paper ("resized the input images
    to 520x520 and padded them to multiples of 64"; padding is done by the evaluation code). ``semantic``
    (int64, 255 = ignore, classes 0..58 after MMSeg's reduce_zero_label): at the ORIGINAL resolution with
    ``label_size="original"`` (evaluation against the original maps, as MMSeg does: logits are upsampled to the
    label size) or resized with nearest to ``size`` x ``size`` with ``label_size="input"`` (training).
    ``image_id`` = index in the split file.
    """

    num_classes = 59
    ignore_index = IGNORE_INDEX
    class_names = PASCAL_CONTEXT_59_CLASSES

    def __init__(
        self, root: str | Path, split: str = "val", size: int | tuple[int, int] = 520, label_size: str = "original"
    ):
        if label_size not in ("original", "input"):
            raise ValueError(f"label_size must be 'original' or 'input', got {label_size!r}")
        self.root = Path(root)
        self.split = split
        self.report = check_pascal_context(self.root, split)
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.label_size = label_size
        self.ids = read_split(self.root, split)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, idx: int) -> Path:
        return self.root / IMAGE_DIR / f"{self.ids[idx]}.jpg"

    def label_path(self, idx: int) -> Path:
        return self.root / LABEL_DIR / f"{self.ids[idx]}.png"

    def __getitem__(self, idx: int) -> dict[str, Any]:
        rgb = load_rgb(self.image_path(idx))
        raw = read_label(self.label_path(idx))
        h, w = rgb.shape[:2]
        if raw.shape != (h, w):
            raise ValueError(f"label map {self.label_path(idx)} is {raw.shape[0]}x{raw.shape[1]} but image "
                             f"{self.image_path(idx)} is {h}x{w}")
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        if (h, w) != self.size:
            image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[
                0
            ].clamp_(0, 1)
        semantic = torch.from_numpy(reduce_zero_label(raw, self.label_path(idx)))
        if self.label_size == "input" and (h, w) != self.size:
            # nearest on the mapped labels (values 0..58 and 255 fit in uint8): no new values can appear
            semantic = F.interpolate(semantic[None, None].to(torch.uint8), size=self.size, mode="nearest-exact")[
                0, 0
            ].long()
        return {
            "image": image.contiguous(),
            "image_id": int(idx),
            "semantic": semantic,
            "orig_size": (int(h), int(w)),
            "name": self.ids[idx],
        }


# ------------------------------------------------------------------ preparation: VOC2010 + trainval_merged.json
#: The Detail API's category ids of the 59 classes, ascending. Pascal-Context numbers its 459 classes alphabetically
#: (1 accordion, 2 aeroplane, ...), so the ascending ids follow MMSeg's alphabetical ``PASCAL_CONTEXT_59_CLASSES``:
#: Detail id ``DETAIL_CATEGORY_IDS[k]`` is value k + 1 of a label PNG, 0 is background, as MMSeg's converter
#: (``tools/dataset_converters/pascal_context.py``) writes them.
DETAIL_CATEGORY_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98,
    104, 105, 113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308,
    324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)
assert len(DETAIL_CATEGORY_IDS) == 59 and list(DETAIL_CATEGORY_IDS) == sorted(set(DETAIL_CATEGORY_IDS))
#: Detail category id -> label value: background 0 stays 0, the 59 classes become 1..59 (then reduce_zero_label).
DETAIL_ID_TO_LABEL = {0: 0, **{cid: k + 1 for k, cid in enumerate(DETAIL_CATEGORY_IDS)}}
DETAIL_JSON_KEYS = ("images", "annos_segmentation")
PREPARE_COMMAND = "python -m icm_helpers.pascal_context prepare"


def load_detail_json(path: str | Path) -> dict[str, Any]:
    """The Detail API's annotation file (``trainval_merged.json``), checked for the keys the conversion reads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Detail annotation file {path} does not exist. Download trainval_merged.json "
                                "(PASCAL_CONTEXT_SETUP step 2) and pass its path as --detail-json.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); download trainval_merged.json again "
                         "(PASCAL_CONTEXT_SETUP step 2)") from exc
    missing = [k for k in DETAIL_JSON_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path} has no {missing}: not the Detail API's trainval_merged.json "
                         "(PASCAL_CONTEXT_SETUP step 2)")
    return data


def detail_images_by_split(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The Detail images of each split (their ``phase``: train / val; test images have no labels)."""
    return {split: [img for img in data["images"] if img.get("phase") == split] for split in PASCAL_CONTEXT_SPLITS}


def detail_annotations_by_image(data: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """{image_id: its segmentation annotations in file order} (the order the Detail API paints them)."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annos_segmentation"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    return by_image


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Boolean mask of one Detail segmentation: COCO RLE (compressed ``counts`` string, as trainval_merged.json
    stores it, or an uncompressed ``counts`` list) or polygons."""
    rle = segmentation
    if isinstance(segmentation, list) or isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
    if list(rle["size"]) != [height, width]:
        raise ValueError(f"mask of size {rle['size']} on an image of {height}x{width}")
    return mask_utils.decode(rle).astype(bool)


def context_label_map(image: dict[str, Any], annotations: list[dict[str, Any]]) -> np.ndarray:
    """The uint8 label map of one image: 0 = background, 1..59 = the classes (``DETAIL_ID_TO_LABEL``); where
    annotations overlap, the later one in the file wins (the Detail API's ``getMask``)."""
    height, width = int(image["height"]), int(image["width"])
    label = np.zeros((height, width), np.uint8)
    unknown = sorted({a["category_id"] for a in annotations if a["category_id"] not in DETAIL_ID_TO_LABEL})
    if unknown:
        raise ValueError(f"{image['file_name']}: category ids {unknown[:5]} are none of the 59 Pascal-Context "
                         "classes: the annotation file is not trainval_merged.json (PASCAL_CONTEXT_SETUP step 2)")
    for ann in annotations:
        try:
            mask = decode_segmentation(ann["segmentation"], height, width)
        except ValueError as exc:
            raise ValueError(f"{image['file_name']}, annotation {ann.get('id')}: {exc}") from exc
        label[mask] = DETAIL_ID_TO_LABEL[ann["category_id"]]
    return label


def _png_bytes(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")  # uint8 2-D: mode "L", as MMSeg's converter writes
    return buf.getvalue()


def _voc_images(voc: Path) -> Path:
    images = voc / IMAGE_DIR
    if not images.is_dir():
        raise FileNotFoundError(f"{images} does not exist{_resolve_hint(voc)}. Extract VOCtrainval_03-May-2010.tar "
                                "(PASCAL_CONTEXT_SETUP step 1) and pass its VOCdevkit/VOC2010 folder as --voc.")
    return images


def _check_images_present(images: Path, by_split: dict[str, list[dict[str, Any]]], detail_json: Path) -> None:
    wanted = [img["file_name"] for imgs in by_split.values() for img in imgs]
    missing = [name for name in wanted if not (images / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(wanted)} images that {detail_json} labels are not in {images} "
            f"(e.g. {', '.join(missing[:5])}). Extract VOCtrainval_03-May-2010.tar (PASCAL_CONTEXT_SETUP step 1) "
            "and pass its VOCdevkit/VOC2010 folder as --voc.")


def _link_images(images: Path, out: Path) -> None:
    """``out/JPEGImages`` -> the VOC2010 images (a directory link; nothing is copied)."""
    target = out / IMAGE_DIR
    if target.resolve() == images.resolve():
        return
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} exists and is not {images}; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    target.symlink_to(images.resolve(), target_is_directory=True)


def prepare_pascal_context(voc: str | Path, detail_json: str | Path, out: str | Path | None = None,
                           force: bool = False, log=print) -> dict[str, Any]:
    """VOC2010 + the Detail API's ``trainval_merged.json`` -> MMSeg's Pascal-Context-59 layout under ``out``
    (default: ``voc``, where MMSeg's converter writes): ``SegmentationClassContext/<stem>.png`` (uint8, 0 =
    background, 1..59 = ``PASCAL_CONTEXT_59_CLASSES``; MMSeg's ``PascalContextDataset59`` reads them with
    ``reduce_zero_label``), ``ImageSets/SegmentationContext/{train,val}.txt`` (sorted stems, the Detail ``phase``),
    and ``JPEGImages`` (a link to ``voc``'s when ``out`` is elsewhere). Every file is written atomically; label maps
    already there are kept unless ``force`` (an interrupted run resumes), the split files come last. No network.
    Returns {"out", "written", "kept", "counts", "reports"} (``verify_pascal_context`` of each split)."""
    voc, detail_json = Path(voc), Path(detail_json)
    out = voc if out is None else Path(out)
    log = log or (lambda *_: None)
    images = _voc_images(voc)
    data = load_detail_json(detail_json)
    by_split = detail_images_by_split(data)
    if not any(by_split.values()):
        raise ValueError(f"{detail_json} has no images of phase 'train' or 'val': not trainval_merged.json")
    _check_images_present(images, by_split, detail_json)
    _link_images(images, out)
    annotations = detail_annotations_by_image(data)
    written = kept = 0
    for split, imgs in by_split.items():
        for img in progress(imgs, total=len(imgs), desc=f"Pascal-Context {split} labels", unit="img"):
            path = out / LABEL_DIR / f"{Path(img['file_name']).stem}.png"
            if path.exists() and not force:
                kept += 1
                continue
            atomic_write_bytes(path, _png_bytes(context_label_map(img, annotations.get(img["image_id"], []))))
            written += 1
    for split, imgs in by_split.items():
        stems = sorted(Path(img["file_name"]).stem for img in imgs)
        atomic_write_text(_split_file(out, split), "".join(stem + "\n" for stem in stems))
    reports = {split: check_pascal_context(out, split) for split in PASCAL_CONTEXT_SPLITS}
    counts = {split: len(imgs) for split, imgs in by_split.items()}
    log(f"Pascal-Context-59 in {out}: {written} label maps written, {kept} kept; train {counts['train']} / val "
        f"{counts['val']} images (full dataset: {PASCAL_CONTEXT_EXPECTED_COUNTS['train']} / "
        f"{PASCAL_CONTEXT_EXPECTED_COUNTS['val']})")
    return {"out": str(out), "written": written, "kept": kept, "counts": counts, "reports": reports}


def main(argv: list[str] | None = None) -> int:
    """``python -m icm_helpers.pascal_context prepare --voc DIR --detail-json FILE [--out DIR] [--force]`` or
    ``... check --root DIR``."""
    parser = argparse.ArgumentParser(prog="python -m icm_helpers.pascal_context",
                                     description="Pascal-Context-59 in MMSegmentation's layout, made from VOC2010 "
                                                 "and the Detail API's trainval_merged.json (no download).")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the label maps and split files, then check both splits")
    prep.add_argument("--voc", required=True, help="the VOCdevkit/VOC2010 folder (with JPEGImages/)")
    prep.add_argument("--detail-json", required=True, help="trainval_merged.json (the Detail API's format)")
    prep.add_argument("--out", default=None, help="where the layout goes (default: --voc, as MMSeg's converter)")
    prep.add_argument("--force", action="store_true", help="rewrite label maps that are already there")
    check = sub.add_parser("check", help="check a prepared layout (both splits)")
    check.add_argument("--root", required=True, help="the prepared VOC2010 folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare_pascal_context(args.voc, args.detail_json, args.out, force=args.force)
        else:
            for split in PASCAL_CONTEXT_SPLITS:
                rep = check_pascal_context(args.root, split)
                print(f"{split}: {rep['num_ids']} images (full dataset: {rep['expected_ids']})")
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def make_fixture(root: str | Path, n_train: int = 4, n_val: int = 3, seed: int = 0) -> Path:
    """Write a tiny Pascal-Context dataset in exactly the MMSeg layout under ``root`` (= a VOC2010 folder).

    Random JPEGs of varied sizes (some landscape, some portrait), label PNGs (alternately mode "L" and mode "P")
    made of large random rectangles with values 0..59 (0 = background, always present, 59 used at least once),
    and the two split files. Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": n_train, "val": n_val}
    k = 0
    for split, n in splits.items():
        stems = []
        for _ in range(n):
            stem = f"2008_{k:06d}"
            k += 1
            h, w = (int(v) for v in rng.integers(180, 500, size=2))
            img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            atomic_write_bytes(root / IMAGE_DIR / f"{stem}.jpg", buf.getvalue())
            lab = np.zeros((h, w), np.uint8)
            values = (
                [59] + [int(v) for v in rng.integers(1, 60, size=4)]
                if k == 1
                else [int(v) for v in rng.integers(0, 60, size=5)]
            )
            for v in values:  # large rectangles: every value survives a resize to 520x520
                y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
                lab[y0: y0 + h // 3, x0: x0 + w // 3] = v
            lab[:8, :8] = 0  # background always present
            im = Image.fromarray(lab)  # mode "L"
            if k % 2 == 0:  # palette PNG (mode "P", as MMSeg's converter output may be re-saved): indices = classes
                im.putpalette([c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            atomic_write_bytes(root / LABEL_DIR / f"{stem}.png", buf.getvalue())
            stems.append(stem)
        atomic_write_text(root / SPLIT_DIR / f"{split}.txt", "".join(s + "\n" for s in sorted(stems)))
    return root


if __name__ == "__main__":
    sys.exit(main())
