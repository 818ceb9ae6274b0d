"""COCO 2017 for the ``paper`` profile (object detection, Sec. 4.1 of Iino et al.).

Layout expected under a root directory (the official archives extract exactly to this)::

    <root>/train2017/*.jpg                              118287 images
    <root>/val2017/*.jpg                                  5000 images
    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json

Get it with ``download_coco(root, splits=("val2017",))`` (images + annotations, ~1 GB for val) -- the only
function here that touches the network, and only when called explicitly -- or by hand::

    wget http://images.cocodataset.org/zips/val2017.zip
    wget http://images.cocodataset.org/annotations/annotations_trainval2017.zip
    unzip val2017.zip -d <root> && unzip annotations_trainval2017.zip -d <root>

``verify_coco`` reports what is there, ``check_coco`` raises a clear error naming what is missing and the fix.

``CocoDetection`` items follow the suite's protocol (see ``icm_helpers.data``): in ``mode="eval"`` the image is
resized so that its shorter edge is 800 (bilinear, antialiased), as in the paper ("resized the images to have a
shorter edge of 800 and padded them to a multiple of 64"; the padding is done by the evaluation code with
``icm_helpers.codec.pad_to_multiple``). Boxes are in pixels of the returned image, ``item["scale"]`` is
returned size / original size, and ``DetectionMetric`` divides predicted boxes by it so that mAP is computed by
pycocotools against the ORIGINAL annotations (``dataset.coco``). In ``mode="train"`` the image keeps its
original size (the training loader takes random 256x256 crops itself).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from .data import load_rgb

COCO_SPLITS = ("train2017", "val2017")
COCO_EXPECTED_COUNTS = {"train2017": 118287, "val2017": 5000}
_SPLIT_ALIASES = {"train": "train2017", "val": "val2017", "train2017": "train2017", "val2017": "val2017"}

# Official archives. Sizes (bytes) and MD5 checksums cross-checked against several independent public sources
# (e.g. PaddleDetection's dataset downloader, the NVIDIA/Intel MaskRCNN download scripts, CM/MLCommons dataset
# scripts, wget logs showing "Length: 815585330"). COCO itself publishes no checksum file.
COCO_FILES: dict[str, dict[str, Any]] = {
    "train2017": {
        "url": "http://images.cocodataset.org/zips/train2017.zip",
        "filename": "train2017.zip",
        "size": 19336861798,
        "md5": "cced6f7f71b7629ddf16f17bbcfab6b2",
        "provides": ("train2017",),
    },
    "val2017": {
        "url": "http://images.cocodataset.org/zips/val2017.zip",
        "filename": "val2017.zip",
        "size": 815585330,
        "md5": "442b8da7639aecaf257c1dceb8ba8c80",
        "provides": ("val2017",),
    },
    "annotations": {
        "url": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        "filename": "annotations_trainval2017.zip",
        "size": 252907541,
        "md5": "f4bbac642086de4f52a3fdda2de5fa2c",
        "provides": ("annotations/instances_train2017.json", "annotations/instances_val2017.json"),
    },
}


def normalize_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"unknown COCO split {split!r}; use one of {COCO_SPLITS}") from None


def annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{normalize_split(split)}.json"


def _fix_hint(root: Path, split: str) -> str:
    return (
        f"Fix: python -c \"from icm_helpers.coco import download_coco; download_coco('{root}', splits=('{split}',))\" "
        f"(or download {COCO_FILES[split]['url']} and {COCO_FILES['annotations']['url']} and unzip both into {root})."
    )


# ----------------------------------------------------------------------------------------------- download


def _urlopen(request: urllib.request.Request, timeout: float = 60.0):
    """Indirection so tests can replace the network with a local fake."""
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (explicit user-requested download only)


def md5_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _progress(total: int | None, initial: int, desc: str):
    try:
        return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
    except ImportError:  # pragma: no cover - tqdm is a dependency of the suite, keep a plain fallback anyway
        class _Plain:
            def __init__(self):
                self.n, self.last = initial, -1

            def update(self, k):
                self.n += k
                if total:
                    pct = int(100 * self.n / total)
                    if pct != self.last:
                        self.last = pct
                        print(f"\r{desc}: {pct}%", end="", flush=True)

            def close(self):
                print()

        return _Plain()


def _download_file(url: str, dest: Path, size: int | None, chunk: int = 1 << 20) -> Path:
    """Stream ``url`` to ``dest`` through ``dest.part``; a partial ``.part`` is resumed with an HTTP Range request."""
    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    if size is not None and done > size:  # garbage from another file: start again
        part.unlink()
        done = 0
    if size is None or done < size:
        headers = {"User-Agent": "icm_helpers-coco-downloader"}
        if done:
            headers["Range"] = f"bytes={done}-"
        resp = _urlopen(urllib.request.Request(url, headers=headers))
        try:
            status = getattr(resp, "status", None) or resp.getcode()
            if done and status != 206:  # server ignored the Range header: restart from zero
                done = 0
            total = size
            if total is None:
                length = resp.headers.get("Content-Length")
                total = done + int(length) if length else None
            bar = _progress(total, done, dest.name)
            try:
                with open(part, "ab" if done else "wb") as fh:
                    while True:
                        block = resp.read(chunk)
                        if not block:
                            break
                        fh.write(block)
                        bar.update(len(block))
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                bar.close()
        finally:
            resp.close()
    got = part.stat().st_size
    if size is not None and got != size:
        raise OSError(
            f"download of {url} stopped at {got} of {size} bytes; call download_coco again to resume from {part}"
        )
    os.replace(part, dest)
    return dest


def _extract_into(archive: Path, root: Path, provides: Iterable[str]) -> None:
    """Extract ``archive`` into a temp dir inside ``root`` and move the top-level entries into place.

    A top-level directory that does not exist yet is renamed into place in one step, so a half-extracted folder
    never appears under its final name; into an existing directory (e.g. ``annotations/``) files are moved one by
    one with atomic renames.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".extract-{archive.stem}-", dir=root))
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"{archive}: member {bad} fails its CRC check; delete the archive and download again")
            zf.extractall(tmp)
        for entry in sorted(tmp.iterdir()):
            final = root / entry.name
            if not final.exists():
                os.replace(entry, final)
            elif final.is_dir() and entry.is_dir():
                for src in sorted(entry.rglob("*")):
                    if src.is_file():
                        dst = final / src.relative_to(entry)
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(src, dst)
            else:
                raise FileExistsError(
                    f"{final} already exists and is not a directory we can merge into; remove it and retry"
                )
        missing = [p for p in provides if not (root / p).exists()]
        if missing:
            raise ValueError(f"{archive} did not provide {missing}: wrong archive?")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_coco(root: str | Path, splits: Iterable[str] = ("val2017",), annotations: bool = True, *,
                  keep_archives: bool = False, files: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Download and extract COCO 2017 into ``root`` (only ever called explicitly by a user).

    Streams each archive with a progress bar to ``<root>/<name>.part`` (a partial ``.part`` is resumed), checks
    size and MD5, extracts into a temp dir inside ``root`` and renames into place. Parts that are already in
    place are skipped. ``files`` overrides ``COCO_FILES`` (tests use it with a local fake server).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = dict(COCO_FILES if files is None else files)
    keys = [normalize_split(s) for s in splits] + (["annotations"] if annotations else [])
    for key in keys:
        spec = table[key]
        provides = tuple(spec.get("provides", ()))
        if provides and all(
            (root / p).exists() and (not (root / p).is_dir() or any((root / p).iterdir())) for p in provides
        ):
            print(f"{key}: already in place under {root}, skipped")
            continue
        archive = root / spec["filename"]
        if not (archive.exists() and (spec.get("size") is None or archive.stat().st_size == spec["size"])):
            _download_file(spec["url"], archive, spec.get("size"))
        if spec.get("md5"):
            got = md5_file(archive)
            if got != spec["md5"]:
                bad = archive.with_name(archive.name + ".bad")
                os.replace(archive, bad)
                raise ValueError(f"MD5 mismatch for {archive.name}: got {got}, expected {spec['md5']}; "
                                 f"moved it to {bad}, delete it and call download_coco again")
        _extract_into(archive, root, provides)
        if not keep_archives:
            archive.unlink()
        print(f"{key}: extracted into {root}")
    return root


# ----------------------------------------------------------------------------------------------- verification


def _load_json(path: Path) -> dict[str, Any]:
    with open(path, "r", encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO instances file (no 'images' list)")
    return data


def _list_images(image_dir: Path) -> set[str]:
    with os.scandir(image_dir) as it:
        return {e.name for e in it if e.is_file()}


def _verify(root: str | Path, split: str, image_ids: Iterable[int] | None = None, max_examples: int = 5
            ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    root = Path(root)
    split = normalize_split(split)
    image_dir = root / split
    ann = annotation_path(root, split)
    rep: dict[str, Any] = {
        "root": str(root),
        "split": split,
        "root_exists": root.is_dir(),
        "image_dir": str(image_dir),
        "image_dir_exists": image_dir.is_dir(),
        "num_files_on_disk": 0,
        "annotation_file": str(ann),
        "annotation_exists": ann.is_file(),
        "annotation_parses": False,
        "annotation_error": None,
        "num_images_json": 0,
        "expected_images": COCO_EXPECTED_COUNTS[split],
        "complete": False,
        "subset": False,
        "num_checked": 0,
        "num_missing": 0,
        "missing_examples": [],
        "ok": False,
    }
    data = None
    on_disk: set[str] = set()
    if rep["image_dir_exists"]:
        on_disk = _list_images(image_dir)
        rep["num_files_on_disk"] = len(on_disk)
    if rep["annotation_exists"]:
        try:
            data = _load_json(ann)
            rep["annotation_parses"] = True
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            rep["annotation_error"] = f"{type(exc).__name__}: {exc}"
    if data is not None:
        images = data["images"]
        rep["num_images_json"] = len(images)
        rep["complete"] = len(images) == rep["expected_images"]
        rep["subset"] = 0 < len(images) < rep["expected_images"]
        if image_ids is not None:
            wanted = set(int(i) for i in image_ids)
            images = [im for im in images if int(im["id"]) in wanted]
        rep["num_checked"] = len(images)
        if rep["image_dir_exists"]:
            missing = [im["file_name"] for im in images if im["file_name"] not in on_disk]
            rep["num_missing"] = len(missing)
            rep["missing_examples"] = sorted(missing)[:max_examples]
    rep["ok"] = bool(rep["root_exists"] and rep["image_dir_exists"] and rep["annotation_parses"]
                     and rep["num_images_json"] > 0 and rep["num_missing"] == 0 and rep["num_files_on_disk"] > 0)
    return rep, data


def verify_coco(root: str | Path, split: str = "val2017") -> dict[str, Any]:
    """Report on a COCO split under ``root``: root / image dir / JSON presence, JSON image count vs the expected
    count (a subset such as coco_tiny is allowed and reported as ``subset``), JSON images missing on disk."""
    return _verify(root, split)[0]


def _raise_for(rep: dict[str, Any]) -> None:
    root, split = Path(rep["root"]), rep["split"]
    hint = _fix_hint(root, split)
    if not rep["root_exists"]:
        raise FileNotFoundError(f"COCO dataset directory {root} does not exist. {hint}")
    if not rep["image_dir_exists"]:
        raise FileNotFoundError(f"COCO image directory {rep['image_dir']} is missing. {hint}")
    if rep["num_files_on_disk"] == 0:
        raise FileNotFoundError(f"COCO image directory {rep['image_dir']} is empty (interrupted extraction?). {hint}")
    if not rep["annotation_exists"]:
        raise FileNotFoundError(f"COCO annotation file {rep['annotation_file']} is missing. {hint}")
    if not rep["annotation_parses"]:
        raise ValueError(f"COCO annotation file {rep['annotation_file']} cannot be read ({rep['annotation_error']}); "
                         f"it is corrupt or truncated: delete it and re-extract annotations_trainval2017.zip. {hint}")
    if rep["num_images_json"] == 0:
        raise ValueError(f"COCO annotation file {rep['annotation_file']} lists no images")
    if rep["num_missing"]:
        raise FileNotFoundError(
            f"{rep['num_missing']} of {rep['num_checked']} images listed in {rep['annotation_file']} are missing from "
            f"{rep['image_dir']} (e.g. {', '.join(rep['missing_examples'])}): the image folder does not match the "
            f"annotations (incomplete extraction, or a JSON of another split/subset). {hint}")


def check_coco(root: str | Path, split: str = "val2017", image_ids: Iterable[int] | None = None) -> dict[str, Any]:
    """Like ``verify_coco`` but raise ``FileNotFoundError``/``ValueError`` naming what is missing and the fix.
    With ``image_ids`` only those images need to be on disk. Returns the report."""
    rep, _ = _verify(root, split, image_ids)
    _raise_for(rep)
    return rep


# ----------------------------------------------------------------------------------------------- dataset


def _coco_from_dict(data: dict[str, Any]):
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def contiguous_category_map(coco) -> tuple[dict[int, int], dict[int, int]]:
    """(COCO category id -> contiguous 0..K-1, contiguous -> COCO id), in sorted-id order (detectron2's
    convention). ``coco``: a pycocotools COCO, a dataset exposing ``.coco``, or a COCO-format dict."""
    if hasattr(coco, "coco"):
        coco = coco.coco
    cats = coco["categories"] if isinstance(coco, dict) else coco.dataset["categories"]
    ids = sorted(int(c["id"]) for c in cats)
    to_contig = {cid: k for k, cid in enumerate(ids)}
    return to_contig, {k: cid for cid, k in to_contig.items()}


def image_decodes(path: str | Path) -> str | None:
    """None if ``path`` decodes as an image, else the reason. JPEGs are decoded at reduced DCT scale (draft mode),
    which still reads the whole entropy-coded stream, so truncation is caught at a fraction of the cost."""
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "corrupt"
        return f"{type(exc).__name__}: {exc}"


def resized_size(h: int, w: int, short_edge: int, max_size: int | None = None) -> tuple[int, int, float]:
    """(new_h, new_w, scale) with the shorter edge equal to ``short_edge`` (exactly) and the aspect ratio kept;
    with ``max_size`` the longer edge is capped (detectron2's ResizeShortestEdge(800, 1333) behaviour)."""
    scale = short_edge / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
        return int(round(h * scale)), int(round(w * scale)), scale
    if h <= w:
        return short_edge, int(round(w * scale)), scale
    return int(round(h * scale)), short_edge, scale


class CocoDetection(torch.utils.data.Dataset):
    """COCO 2017 detection split with the suite's item format (see the module docstring).

    ``mode="eval"``: shorter edge resized to ``short_edge`` (bilinear + antialias; ROI nearest; boxes scaled).
    ``mode="train"``: original size, ``scale`` 1.0. ``image_ids``: restrict to these images (order kept sorted).
    ``on_corrupt="raise"``: unreadable images raise ``ValueError`` naming the file when the item is loaded;
    ``"skip"``: every image is test-decoded at construction and unreadable ones are dropped with a warning
    (their ids, files and reasons in ``self.skipped``). Crowd annotations are excluded from boxes, labels and ROI;
    images without annotations are kept (empty boxes). ``self.coco`` holds the ORIGINAL annotations.
    """

    def __init__(self, root: str | Path, split: str = "val2017", mode: str = "eval", short_edge: int = 800,
                 image_ids: Iterable[int] | None = None, on_corrupt: str = "raise", max_size: int | None = None):
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        if short_edge <= 0:
            raise ValueError(f"short_edge must be positive, got {short_edge}")
        self.root = Path(root)
        self.split = normalize_split(split)
        self.mode, self.short_edge, self.max_size, self.on_corrupt = mode, int(short_edge), max_size, on_corrupt
        wanted = None if image_ids is None else sorted({int(i) for i in image_ids})
        rep, data = _verify(self.root, self.split, wanted)
        _raise_for(rep)
        self.report = rep
        self.coco = _coco_from_dict(data)
        self.image_dir = self.root / self.split
        all_ids = set(self.coco.getImgIds())
        if wanted is not None:
            unknown = [i for i in wanted if i not in all_ids]
            if unknown:
                raise ValueError(
                    f"image ids not in {rep['annotation_file']}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
                )
            ids = wanted
        else:
            ids = sorted(all_ids)
        self.skipped: list[tuple[int, str, str]] = []
        if on_corrupt == "skip":
            keep = []
            for i in ids:
                path = self.image_dir / self.coco.imgs[i]["file_name"]
                reason = image_decodes(path)
                if reason is None:
                    keep.append(i)
                else:
                    self.skipped.append((i, str(path), reason))
            if self.skipped:
                examples = ", ".join(Path(p).name for _, p, _ in self.skipped[:5])
                warnings.warn(
                    f"skipped {len(self.skipped)} corrupt/unreadable image(s) of {len(ids)} in {self.image_dir} "
                    f"(e.g. {examples}); see dataset.skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
            ids = keep
        if not ids:
            raise ValueError(f"no usable images in {self.image_dir}")
        self.ids = ids
        self.categories = sorted(self.coco.getCatIds())

    @property
    def annotation_file(self) -> Path:
        return annotation_path(self.root, self.split)

    @property
    def class_names(self) -> dict[int, str]:
        """Category id -> name (COCO's 80 classes; figures name the classes with it)."""
        return {int(c["id"]): str(c["name"]) for c in self.coco.loadCats(self.coco.getCatIds())}

    def __len__(self) -> int:
        return len(self.ids)

    def image_size(self, idx: int) -> tuple[int, int]:
        """(h, w) of item ``idx`` as ``__getitem__`` returns it, from the annotation file (no decoding): lets the
        training loader plan its random crops ahead (DataLoader workers, ranks; ``training.EpochLoader``)."""
        info = self.coco.imgs[self.ids[idx]]
        h, w = int(info["height"]), int(info["width"])
        if self.mode == "eval":
            h, w, _ = resized_size(h, w, self.short_edge, self.max_size)
        return h, w

    def __getitem__(self, idx: int) -> dict[str, Any]:
        image_id = self.ids[idx]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        rgb = load_rgb(path)  # ValueError naming the file if it is corrupt or truncated
        h, w = rgb.shape[:2]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            dtype=torch.float64,
        ).reshape(-1, 4)
        labels = torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64)
        roi = np.zeros((h, w), bool)
        for a in anns:
            m = self.coco.annToMask(a)
            if m.shape != roi.shape:
                raise ValueError(f"annotation {a.get('id')} of {path} has a {m.shape} mask for a {h}x{w} image "
                                 "(JSON height/width do not match the file)")
            roi |= m.astype(bool)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        roi_t = torch.from_numpy(roi)
        scale = 1.0
        if self.mode == "eval":
            nh, nw, scale = resized_size(h, w, self.short_edge, self.max_size)
            if (nh, nw) != (h, w):
                image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[
                    0
                ].clamp_(0, 1)
                roi_t = F.interpolate(roi_t[None, None].to(torch.uint8), size=(nh, nw), mode="nearest-exact")[
                    0, 0
                ].bool()
            boxes = boxes * scale
        return {
            "image": image.contiguous(),
            "image_id": int(image_id),
            "boxes": boxes.to(torch.float32),
            "labels": labels,
            "roi": roi_t,
            "scale": float(scale),
            "orig_size": (int(h), int(w)),
            "file_name": str(info["file_name"]),
        }
