"""Datasets: the generated shapes world (smoke/demo profiles) and the COCO-format loader shared by all profiles.

The generated world is written to disk in the *same layout as real data*: PNG images, a COCO-format
``instances.json`` (boxes, RLE instance masks, categories) and semantic label PNGs (0 = background,
k = category k). Every profile therefore goes through one loader (``IcmDataset``) and one evaluation path
(pycocotools mAP, mIoU), and ROI masks come from instance masks exactly as they do for COCO (Sec. 4.1).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .io import atomic_write_json, read_json

SPLITS = ("train", "val", "test")

# Shape classes of the generated world, in category-id order (id = index + 1).
SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "diamond", "bar", "star")


@dataclass(frozen=True)
class WorldSpec:
    """Parameters of the generated image world (all deterministic given ``seed``)."""

    image_size: int = 64
    n_classes: int = 3
    objects_min: int = 1
    objects_max: int = 3
    object_size_min: float = 0.25  # fraction of the image side
    object_size_max: float = 0.45
    clutter: int = 4  # distractor blobs (background, not objects)
    texture_amplitude: float = 0.25
    noise_std: float = 0.04
    texture_frequency: float = 6.0  # highest spatial frequency of the background gratings (cycles per image side)
    texture_components: int = 4  # gratings summed per colour channel
    detail_patches: int = 0  # background patches of fine stripes / checkers: expensive to code, useless for the task
    detail_amplitude: float = 0.3
    detail_frequency: tuple[float, float] = (12.0, 28.0)  # cycles per image side of the detail patches
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"n_classes must be in 1..{len(SHAPE_CLASSES)}, got {self.n_classes}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.objects_min <= self.objects_max:
            raise ValueError("need 1 <= objects_min <= objects_max")
        if self.texture_components < 1 or self.detail_patches < 0 or not self.texture_frequency > 0:
            raise ValueError("need texture_components >= 1, detail_patches >= 0 and texture_frequency > 0")
        object.__setattr__(
            self, "detail_frequency", tuple(float(f) for f in self.detail_frequency)
        )  # YAML gives a list


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, rot: float) -> np.ndarray:
    """Boolean mask of one shape of 'radius' r centred at (cy, cx) with rotation rot (radians)."""
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(rot), math.sin(rot)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if kind == "triangle":
        return (v <= 0.6 * r) & (v >= -r + 1.7 * np.abs(u))
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "cross":
        return ((np.abs(u) <= 0.3 * r) & (np.abs(v) <= r)) | ((np.abs(v) <= 0.3 * r) & (np.abs(u) <= r))
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if kind == "bar":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.35 * r)
    if kind == "star":
        ang = np.arctan2(v, u)
        rad = np.sqrt(u * u + v * v)
        return rad <= r * (0.55 + 0.45 * np.cos(5 * ang) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def _texture(
    rng: np.random.Generator, size: int, amplitude: float, frequency: float = 6.0, components: int = 4
) -> np.ndarray:
    """Coloured background: a random base colour plus a sum of random gratings up to ``frequency`` cycles/side."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    base = rng.uniform(0.25, 0.75, size=3)
    for ch in range(3):
        acc = np.zeros((size, size), np.float32)
        for _ in range(components):
            fy, fx = rng.uniform(-frequency, frequency, size=2)
            acc += np.sin(2 * math.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * math.pi))
        img[..., ch] = base[ch] + amplitude * acc / components
    return img


def _detail_patches(img: np.ndarray, rng: np.random.Generator, spec: "WorldSpec") -> None:
    """Rectangles of fine stripes or checkers blended into the background (in place). They carry many bits and no
    task information: a task-aware codec should learn to spend little on them."""
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for _ in range(spec.detail_patches):
        h, w = (rng.uniform(0.2, 0.5, size=2) * size).astype(int)
        y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        f = rng.uniform(*spec.detail_frequency)
        theta = rng.uniform(0, math.pi)
        u = math.cos(theta) * xx + math.sin(theta) * yy
        v = -math.sin(theta) * xx + math.cos(theta) * yy
        if rng.random() < 0.5:  # stripes
            pattern = np.sin(2 * math.pi * f * u)
        else:  # checkers
            pattern = np.sign(np.sin(2 * math.pi * f * u) * np.sin(2 * math.pi * f * v))
        colour = rng.uniform(-1, 1, size=3) * spec.detail_amplitude
        patch = pattern[y0:y0 + h, x0:x0 + w, None] * colour
        img[y0:y0 + h, x0:x0 + w] += patch


def render_image(spec: WorldSpec, rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
    """Render one image. Returns (HxWx3 float image in [0,1], instances, HxW semantic label map).

    Each instance is {"category_id", "mask" (visible pixels, HxW bool)}. Objects are drawn in order, so later
    objects occlude earlier ones and masks hold only visible pixels. Clutter blobs are background (label 0).
    """
    size = spec.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = _texture(rng, size, spec.texture_amplitude, spec.texture_frequency, spec.texture_components)
    if spec.detail_patches:
        _detail_patches(img, rng, spec)
    # clutter: soft-coloured ellipses that are NOT objects (costs bits, useless for the task)
    for _ in range(spec.clutter):
        cy, cx = rng.uniform(0, size, size=2)
        ry, rx = rng.uniform(0.05, 0.15, size=2) * size
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img[m] = 0.5 * img[m] + 0.5 * rng.uniform(0.1, 0.9, size=3)
    semantic = np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1, np.int32)
    cats: list[int] = []
    n_obj = int(rng.integers(spec.objects_min, spec.objects_max + 1))
    for k in range(n_obj):
        cat = int(rng.integers(0, spec.n_classes))
        r = rng.uniform(spec.object_size_min, spec.object_size_max) * size / 2
        cy, cx = rng.uniform(r, size - r, size=2)
        m = _shape_mask(SHAPE_CLASSES[cat], yy, xx, cy, cx, r, rng.uniform(0, 2 * math.pi))
        colour = rng.uniform(0.0, 1.0, size=3)
        shade = 1.0 - 0.3 * ((yy - cy) / (2 * r) + 0.5)[..., None]  # a little shading
        img[m] = np.clip(colour * shade[m], 0, 1)
        semantic[m] = cat + 1
        owner[m] = k
        cats.append(cat + 1)
    img = np.clip(img + rng.normal(0, spec.noise_std, img.shape), 0, 1)
    instances = []
    for k, cat in enumerate(cats):
        mask = owner == k
        if mask.sum() >= 16:  # fully occluded objects are dropped
            instances.append({"category_id": cat, "mask": mask})
    return img.astype(np.float32), instances, semantic


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def world_manifest(spec: WorldSpec, counts: dict[str, int]) -> dict[str, Any]:
    """What ``world.json`` records of a generated world: its spec, split sizes and classes."""
    return {
        "kind": "shapes_world",
        "spec": spec.__dict__,
        "counts": dict(counts),
        "classes": list(SHAPE_CLASSES[: spec.n_classes]),
    }


def world_differs(root: str | Path, spec: WorldSpec, counts: dict[str, int]) -> str | None:
    """Why the world under ``root`` is not the one of ``spec`` and ``counts``; None when it is, or when none is
    there."""
    path = Path(root) / "world.json"
    if not path.exists():
        return None
    old = read_json(path)
    if isinstance(old.get("spec"), dict):  # worlds written before a WorldSpec field existed had its default
        defaults = json.loads(json.dumps(WorldSpec().__dict__))
        old["spec"] = {**{k: v for k, v in defaults.items() if k != "seed"}, **old["spec"]}
    if old == json.loads(json.dumps(world_manifest(spec, counts))):
        return None
    return f"{root} holds a generated world with other settings ({old.get('spec')}, {old.get('counts')})"


def generate_world(root: str | Path, spec: WorldSpec, counts: dict[str, int], overwrite: bool = False) -> Path:
    """Write the generated world under ``root/<split>/`` (images/, labels/, instances.json).

    Deterministic: split ``s`` uses seed ``(spec.seed, index of s)``. A finished world (``world.json``
    matching ``spec`` and ``counts``) is reused; a different one raises unless ``overwrite``.

    ``world.json`` is what marks a world finished: it is written (atomically) only after every image and label file
    is on disk (one ``os.sync`` for all of them: two fsyncs per file took three quarters of the generation, 6.0 s
    of 300 images against 1.6 s); a world interrupted before it has no ``world.json`` and is generated again.
    """
    root = Path(root)
    manifest = world_manifest(spec, counts)
    differs = world_differs(root, spec, counts)
    if (root / "world.json").exists():
        if differs is None:
            return root
        if not overwrite:
            raise FileExistsError(f"{differs}; use another data dir or pass overwrite=True to regenerate it")
    categories = [
        {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES[: spec.n_classes])
    ]
    for split_idx, split in enumerate(SPLITS):
        n = int(counts.get(split, 0))
        rng = np.random.default_rng([spec.seed, split_idx])
        images, anns = [], []
        for i in range(n):
            img, instances, semantic = render_image(spec, rng)
            name = f"{i:06d}.png"
            _write_unsynced(root / split / "images" / name, _png_bytes((img * 255 + 0.5).astype(np.uint8)))
            _write_unsynced(root / split / "labels" / name, _png_bytes(semantic))
            images.append({"id": i + 1, "file_name": name, "height": spec.image_size, "width": spec.image_size})
            for inst in instances:
                ys, xs = np.nonzero(inst["mask"])
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                anns.append({
                    "id": len(anns) + 1, "image_id": i + 1, "category_id": inst["category_id"],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(inst["mask"].sum()), "iscrowd": 0, "segmentation": mask_to_rle(inst["mask"]),
                })
        atomic_write_json(
            root / split / "instances.json", {"images": images, "annotations": anns, "categories": categories}
        )
    os.sync()  # every file above is on disk before world.json says the world is finished
    atomic_write_json(root / "world.json", manifest)
    return root


def _write_unsynced(path: Path, data: bytes) -> None:
    """Write a file of a world being generated: through a temporary name (never a half-written file under the real
    name), without fsync (``generate_world`` syncs once before marking the world finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_rgb(path: str | Path) -> np.ndarray:
    """Load an image as HxWx3 uint8 RGB; grayscale/RGBA/palette images are converted. Corrupt files raise
    ValueError naming the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file not found: {path} (the image folder does not match the annotations? "
                                "re-extract / regenerate the dataset)")
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError) as exc:
        raise ValueError(
            f"cannot read image {path}: {exc} (corrupt or truncated file? re-extract the dataset)"
        ) from exc


class IcmDataset(torch.utils.data.Dataset):
    """COCO-format split: ``<split_dir>/instances.json`` + ``images/`` (+ optional ``labels/`` semantic PNGs).

    Items: {"image": 3xHxW float in [0,1], "image_id", "boxes" (n,4 xyxy), "labels" (n,), "roi" (HxW bool union of
    instance masks: the ROI of Ahonen et al.), "semantic" (HxW long, if labels exist)}.
    """

    def __init__(self, split_dir: str | Path, image_dir: str = "images", label_dir: str | None = "labels"):
        self.root = Path(split_dir)
        ann_path = self.root / "instances.json"
        if not ann_path.is_file():
            state = ("does not exist" if not self.root.exists() else
                     "is empty" if self.root.is_dir() and not any(self.root.iterdir()) else f"has no {ann_path.name}")
            raise FileNotFoundError(
                f"dataset split not found: {self.root} {state} ({ann_path} is missing). Run notebook 01_data_prep "
                "(Experiment.prepare_data()) for this profile, or point data_dir at a prepared dataset."
            )

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_path))
        self.ids = sorted(self.coco.getImgIds())
        if not self.ids:
            raise ValueError(f"{ann_path} lists no images: the dataset is empty. Regenerate it with "
                             "Experiment.prepare_data(force=True) (notebook 01_data_prep).")
        self.image_dir = self.root / image_dir
        on_disk = {p.name for p in self.image_dir.iterdir()} if self.image_dir.is_dir() else set()
        missing = sorted(im["file_name"] for im in self.coco.loadImgs(self.ids) if im["file_name"] not in on_disk)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.ids)} images listed in {ann_path} are missing from {self.image_dir} "
                f"(e.g. {', '.join(missing[:5])}): the image folder does not match the annotations. Regenerate the "
                "dataset (Experiment.prepare_data(force=True)) or fix the JSON.")
        self.label_dir = self.root / label_dir if label_dir and (self.root / label_dir).is_dir() else None
        self.categories = sorted(self.coco.getCatIds())

    @property
    def annotation_file(self) -> Path:
        return self.root / "instances.json"

    @property
    def class_names(self) -> dict[int, str]:
        """Category id -> name, as the annotations list them (figures name the classes with it)."""
        return {int(c["id"]): str(c["name"]) for c in self.coco.loadCats(self.categories)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        image_id = self.ids[idx]
        info = self.coco.loadImgs(image_id)[0]
        rgb = load_rgb(self.image_dir / info["file_name"])
        h, w = rgb.shape[:2]
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            dtype=torch.float32,
        ).reshape(-1, 4)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        roi = np.zeros((h, w), bool)
        for a in anns:
            roi |= self.coco.annToMask(a).astype(bool)
        item = {
            "image": torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0),
            "image_id": int(image_id),
            "boxes": boxes,
            "labels": labels,
            "roi": torch.from_numpy(roi),
        }
        if self.label_dir is not None:
            item["semantic"] = torch.from_numpy(
                np.asarray(
                    Image.open(self.label_dir / Path(info["file_name"]).with_suffix(".png").name), dtype=np.int64
                )
            )
        return item


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack equally sized images/maps; keep per-image boxes/labels as lists."""
    out: dict[str, Any] = {
        "image": torch.stack([b["image"] for b in batch]),
        "image_id": [b["image_id"] for b in batch],
    }
    if all("boxes" in b for b in batch):
        out["boxes"], out["labels"] = [b["boxes"] for b in batch], [b["labels"] for b in batch]
    if all("roi" in b for b in batch):
        out["roi"] = torch.stack([b["roi"] for b in batch])
    if all("semantic" in b for b in batch):
        out["semantic"] = torch.stack([b["semantic"] for b in batch])
    return out


def crop_window(h: int, w: int, crop: int, generator: torch.Generator) -> tuple[int, int] | None:
    """The random (top, left) of a ``crop`` x ``crop`` window in an h x w image, drawn from ``generator``; None (and no
    draw) when the image is not larger than the crop. The draws are exactly those ``random_crop`` has always made, so a
    crop plan computed ahead (``epoch_loader`` with workers or ranks) reproduces the single-process crops."""
    if crop >= h and crop >= w:
        return None
    if crop > h or crop > w:
        raise ValueError(f"crop_size {crop} is larger than the images ({h}x{w})")
    top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
    return top, left


def crop_at(batch: dict[str, Any], crop: int, window: tuple[int, int] | None) -> dict[str, Any]:
    """Crop images and dense maps of a batch to the window (top, left) (None: unchanged); boxes are clipped and
    dropped when they vanish."""
    if window is None:
        return batch
    top, left = window
    out = dict(batch)
    for key in ("image", "roi", "semantic"):
        if key in batch:
            out[key] = batch[key][..., top: top + crop, left: left + crop]
    if "boxes" not in batch:
        return out
    boxes, labels = [], []
    for b, lab in zip(batch["boxes"], batch["labels"]):
        b = b - torch.tensor([left, top, left, top], dtype=b.dtype, device=b.device)
        b = b.clamp(0, crop)
        keep = ((b[:, 2] - b[:, 0]) >= 2) & ((b[:, 3] - b[:, 1]) >= 2)
        boxes.append(b[keep])
        labels.append(lab[keep])
    out["boxes"], out["labels"] = boxes, labels
    return out


def random_crop(batch: dict[str, Any], crop: int, generator: torch.Generator) -> dict[str, Any]:
    """Random crop (same window for the whole batch) of images and dense maps; boxes are clipped and dropped
    when they vanish. Used for the training crops (256x256 in the paper, Sec. 4.1)."""
    h, w = batch["image"].shape[-2:]
    return crop_at(batch, crop, crop_window(h, w, crop, generator))


def pad_item(item: dict[str, Any], crop: int) -> dict[str, Any]:
    """Zero-pad an item whose side is shorter than ``crop`` at the bottom/right (ROI 0, semantic 255 = ignore)."""
    h, w = item["image"].shape[-2:]
    ph, pw = max(0, crop - h), max(0, crop - w)
    out = dict(item)
    if ph or pw:
        out["image"] = F.pad(item["image"], (0, pw, 0, ph))
        if "roi" in item:
            out["roi"] = F.pad(item["roi"], (0, pw, 0, ph))
        if "semantic" in item:
            out["semantic"] = F.pad(item["semantic"], (0, pw, 0, ph), value=255)
    return out


def crop_item_at(item: dict[str, Any], crop: int, window: tuple[int, int] | None) -> dict[str, Any]:
    """``crop_item`` with a given window (of the padded item)."""
    out = pad_item(item, crop)
    batch = crop_at(
        {
            **{k: v[None] for k, v in out.items() if k in ("image", "roi", "semantic")},
            "boxes": [item.get("boxes", torch.zeros(0, 4))],
            "labels": [item.get("labels", torch.zeros(0, dtype=torch.int64))],
        },
        crop,
        window,
    )
    for key in ("image", "roi", "semantic"):
        if key in out:
            out[key] = batch[key][0]
    if "boxes" in item:
        out["boxes"], out["labels"] = batch["boxes"][0], batch["labels"][0]
    return out


def crop_item(item: dict[str, Any], crop: int, generator: torch.Generator) -> dict[str, Any]:
    """One random ``crop`` x ``crop`` window of one item (datasets whose images differ in size, e.g. COCO's 256x256
    training crops); a side shorter than ``crop`` is zero-padded at the bottom/right (ROI 0, semantic 255 = ignore)."""
    h, w = item["image"].shape[-2:]
    return crop_item_at(item, crop, crop_window(max(h, crop), max(w, crop), crop, generator))


def to_device(batch: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    """Move a batch's tensors (and lists of tensors) to ``device``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


class InMemory(torch.utils.data.Dataset):
    """Cache a (small) dataset's items in memory."""
    def __init__(self, dataset):
        self.items = [dataset[i] for i in range(len(dataset))]
        self.base = dataset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]

    def __getattr__(self, name: str):
        """Everything else (e.g. ``coco``, the ground truth an evaluation metric reads) comes from the split."""
        if name in ("items", "base"):  # not set yet (unpickling): no recursion into the split
            raise AttributeError(name)
        return getattr(self.base, name)
