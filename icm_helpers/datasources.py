"""Where a profile's images come from (``data.source``): one class per source, registered in
``registry.DATA_SOURCES``; the ``Experiment`` asks its source for a split and never tests the source's name.

A source gives, per task: ``prepare()`` (generate or verify; a report of split sizes), ``dataset(split, task)`` with
splits "train", "val" (per-epoch validation) and "test" (evaluation), ``num_classes(task)``, and ``shared`` (one
image set labelled for every task, as the generated world; False: one dataset per task, as COCO / Pascal-Context).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .coco import CocoDetection, check_coco, download_coco
from .config import resolve_data_path
from .data import IcmDataset, InMemory, WorldSpec, generate_world
from .pascal_context import PascalContext59, check_pascal_context
from .registry import DATA_SOURCES, check_task

SPLITS = ("train", "val", "test")


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
