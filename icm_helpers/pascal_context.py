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

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import load_rgb
from .io import atomic_write_bytes, atomic_write_text

PASCAL_CONTEXT_SETUP = """\
Pascal-Context-59 setup (MMSegmentation's recipe; about 1.3 GB download, nothing is downloaded by this suite):

1. Images: download the PASCAL VOC 2010 train/val tar and extract it (it creates VOCdevkit/VOC2010/JPEGImages):
       wget http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar
       tar -xf VOCtrainval_03-May-2010.tar -C data/
2. Context annotations: download trainval_merged.json (the Pascal-Context annotations in Detail format) into
   data/VOCdevkit/VOC2010/:
       wget -P data/VOCdevkit/VOC2010 https://codalabuser.blob.core.windows.net/public/trainval_merged.json
3. Install the Detail API (https://github.com/zhanghang1989/detail-api):
       git clone https://github.com/zhanghang1989/detail-api && (cd detail-api/PythonAPI && make && make install)
4. Convert with MMSegmentation's converter (clone https://github.com/open-mmlab/mmsegmentation; it also needs
   mmengine). It writes VOC2010/SegmentationClassContext/*.png (values 0..59) and
   VOC2010/ImageSets/SegmentationContext/{train,val}.txt:
       python tools/dataset_converters/pascal_context.py data/VOCdevkit data/VOCdevkit/VOC2010/trainval_merged.json
   (older MMSeg releases: tools/convert_datasets/pascal_context.py, same arguments).
5. Point the suite at data/VOCdevkit/VOC2010 and check it:
       python -c "from icm_helpers.pascal_context import check_pascal_context as check; \
                  print(check('data/VOCdevkit/VOC2010', 'val'))"
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
                         f"label map made by MMSeg's converter (see PASCAL_CONTEXT_SETUP)")
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
    if not rep["root_exists"]:
        raise FileNotFoundError(f"Pascal-Context root {rep['root']} does not exist{rep['hint']}. {fix} "
                                "(step 1: VOCtrainval_03-May-2010.tar).")
    if not rep["image_dir_exists"]:
        raise FileNotFoundError(f"Pascal-Context image directory {rep['image_dir']} is missing{rep['hint']}. {fix} "
                                "(step 1: extract VOCtrainval_03-May-2010.tar).")
    if not rep["label_dir_exists"]:
        raise FileNotFoundError(f"Pascal-Context label directory {rep['label_dir']} is missing. {fix} "
                                "(steps 2-4: trainval_merged.json + Detail API + MMSeg's pascal_context.py converter).")
    if not rep["split_file_exists"]:
        raise FileNotFoundError(f"Pascal-Context split file {rep['split_file']} is missing. {fix} "
                                "(step 4: MMSeg's converter writes ImageSets/SegmentationContext/{train,val}.txt).")
    if rep["num_ids"] == 0:
        raise ValueError(f"Pascal-Context split file {rep['split_file']} lists no image ids. {fix} (re-run step 4).")
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
            f"(e.g. {', '.join(rep['missing_label_examples'])}). {fix} (step 4: re-run the converter)."
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
