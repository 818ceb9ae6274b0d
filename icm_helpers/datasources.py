"""Where a profile's images come from (``data.source``): one class per source, registered in
``registry.DATA_SOURCES``; the ``Experiment`` asks its source for a split and never tests the source's name.

A source gives, per task: ``prepare()`` (generate or verify; a report of split sizes), ``verify()`` (the same checks
without generating, downloading or raising: one ``(name, ok, detail, fix)`` per split, for the pre-flight check of
``icm_helpers.preflight``), ``dataset(split, task)`` with
splits "train", "val" (per-epoch validation) and "test" (evaluation), ``num_classes(task)``, and ``shared`` (one
image set labelled for every task, as the generated world; False: one dataset per task, as COCO / Pascal-Context).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .coco import CocoDetection, check_coco, download_coco, verify_coco
from .config import resolve_data_path
from .data import IcmDataset, InMemory, WorldSpec, generate_world, world_differs
from .pascal_context import PascalContext59, check_pascal_context, verify_pascal_context
from .registry import DATA_SOURCES, check_task

SPLITS = ("train", "val", "test")

#: One line of a data source's ``verify()``: (name, ok, what was found, how to fix it when not ok).
Verified = tuple[str, bool, str, str]


def _problem(check, *args: Any) -> tuple[str, str]:
    """(what is wrong, the fix) from the error a ``check_*`` function raises; ("", "") when it raises none."""
    try:
        check(*args)
    except (FileNotFoundError, ValueError) as exc:
        text = str(exc)
        for marker in ("Fix: ", "See "):
            if marker in text:
                what, _, fix = text.partition(marker)
                return what.strip(), (marker if marker == "See " else "") + fix.strip()
        return text, "see the message"
    return "", ""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return split


@DATA_SOURCES.register("shapes_world")
class ShapesWorld:
    """The generated world (``icm_helpers.data``), deterministic from the profile's seed, written under the run
    directory in COCO layout; one image set for both tasks; train and val kept in memory."""

    shared = True

    def __init__(self, cfg: dict[str, Any], seed: int, data_dir: Path):
        self.cfg, self.seed, self.data_dir = cfg, seed, data_dir

    def prepare(self, tasks: list[str], force: bool = False, download: bool = False) -> dict[str, Any]:
        generate_world(
            self.data_dir, WorldSpec(**self.cfg["world"], seed=self.seed), self.cfg["counts"], overwrite=force
        )
        return {split: len(self.dataset(split)) for split in SPLITS}

    def verify(self, tasks: list[str]) -> list[Verified]:
        """The generated world: not there yet (notebook 01 generates it), or its settings and split sizes."""
        counts = {split: int(self.cfg["counts"].get(split, 0)) for split in SPLITS}
        spec = WorldSpec(**self.cfg["world"], seed=self.seed)
        if not (self.data_dir / "world.json").exists():
            return [("data", True, f"generated world not there yet: notebook 01 writes it to {self.data_dir} "
                                   f"({', '.join(f'{k} {v}' for k, v in counts.items())} images)", "")]
        differs = world_differs(self.data_dir, spec, counts)
        if differs:
            return [("data", False, differs, f"use another run dir, or delete {self.data_dir} and rerun notebook 01 "
                                             "(it generates the world of this profile)")]
        out = []
        for split in SPLITS:
            try:
                n = len(IcmDataset(self.data_dir / split))
            except (FileNotFoundError, ValueError) as exc:
                out.append((f"data/{split}", False, str(exc), "rerun notebook 01 with force=True to regenerate it"))
                continue
            out.append((f"data/{split}", n == counts[split], f"{n} images (the profile: {counts[split]})",
                        "rerun notebook 01 with force=True to regenerate the world"))
        return out

    def dataset(self, split: str, task: str | None = None):
        ds = IcmDataset(self.data_dir / check_split(split))
        return InMemory(ds) if split in ("train", "val") else ds

    def num_classes(self, task: str | None = None) -> int:
        return int(self.cfg["world"]["n_classes"])


@DATA_SOURCES.register("coco_pascal_context")
class CocoPascalContext:
    """The paper's datasets: COCO 2017 for detection (train2017; evaluation on val2017 at shorter edge
    ``eval_short_edge``) and Pascal-Context-59 for segmentation (train / val at ``seg_size``, evaluated on the
    original label maps); "val" = the first ``val_images`` images of the evaluation split. Relative roots are under
    ``$ICM_DATA_DIR``."""

    shared = False

    def __init__(self, cfg: dict[str, Any], seed: int, data_dir: Path):
        self.cfg = cfg

    def prepare(self, tasks: list[str], force: bool = False, download: bool = False) -> dict[str, Any]:
        """Verify every task's layout, naming what is missing; ``download=True`` fetches COCO 2017 (Pascal-Context
        needs a manual step, see ``icm_helpers.pascal_context``)."""
        report = {}
        for task in tasks:
            if task == "detection":
                root = resolve_data_path(self.cfg["coco_root"])
                if download:
                    download_coco(root, splits=("train2017", "val2017"), annotations=True)
                for split in ("train2017", "val2017"):
                    check_coco(root, split)
            else:
                root = resolve_data_path(self.cfg["pascal_context_root"])
                for split in ("train", "val"):
                    check_pascal_context(root, split)
            report[task] = {split: len(self.dataset(split, task)) for split in SPLITS}
        return report

    def verify(self, tasks: list[str]) -> list[Verified]:
        """Each task's splits with the datasets' own verification (``verify_coco`` / ``verify_pascal_context``):
        layout, image counts (complete or a subset) and, when not usable, the fix their ``check_*`` names."""
        out = []
        for task in tasks:
            if task == "detection":
                root, what = resolve_data_path(self.cfg["coco_root"]), "COCO"
                splits = [(split, verify_coco(root, split), check_coco) for split in ("train2017", "val2017")]
                count, expected = "num_images_json", "expected_images"
            else:
                root, what = resolve_data_path(self.cfg["pascal_context_root"]), "Pascal-Context"
                splits = [(split, verify_pascal_context(root, split), check_pascal_context)
                          for split in ("train", "val")]
                count, expected = "num_ids", "expected_ids"
            for split, rep, check in splits:
                name = f"data/{task}/{split}"
                if rep["ok"]:
                    size = "complete" if rep["complete"] else f"a subset of {rep[expected]}"
                    out.append((name, True, f"{what} {split} at {root}: {rep[count]} images ({size})", ""))
                else:
                    problem, fix = _problem(check, root, split)
                    out.append((name, False, problem or f"{what} {split} at {root} is not usable", fix))
        return out

    def dataset(self, split: str, task: str | None = None):
        check_split(split)
        if task is None:
            raise ValueError("data source 'coco_pascal_context' has one dataset per task: call dataset(split, task)")
        check_task(task)
        dc = self.cfg
        if task == "detection":
            root = resolve_data_path(dc["coco_root"])
            if split == "train":
                return CocoDetection(root, "train2017", mode="train", on_corrupt=dc.get("on_corrupt", "raise"))
            ds = CocoDetection(root, "val2017", mode="eval", short_edge=int(dc["eval_short_edge"]),
                               on_corrupt=dc.get("on_corrupt", "raise"))
        else:
            root, size = resolve_data_path(dc["pascal_context_root"]), int(dc["seg_size"])
            if split == "train":
                return PascalContext59(root, "train", size=size, label_size="input")
            ds = PascalContext59(root, "val", size=size, label_size="original" if split == "test" else "input")
        return torch.utils.data.Subset(ds, range(min(int(dc["val_images"]), len(ds)))) if split == "val" else ds

    def num_classes(self, task: str | None = None) -> int:
        """COCO: 90 = the largest category id (torchvision's convention); Pascal-Context: 59."""
        return int(self.cfg["num_classes"][check_task(task)])
