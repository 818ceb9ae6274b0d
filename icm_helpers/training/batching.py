"""Training batches: which images, cropped where, in which batch, as a function of (seed, epoch) only.

``EpochLoader(epoch)`` draws the order (``randperm``) and the crop windows from one generator seeded by (seed,
epoch), so
the batches are bit-identical for any number of DataLoader workers and ranks; ``equal_size_batches`` walks an
evaluation split of mixed image sizes in batches of one size.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from ..data import InMemory, collate, crop_at, crop_item_at, crop_window, to_device


def _item_size(dataset, j: int) -> tuple[int, int]:
    """(h, w) of item ``j`` without decoding it when the dataset can say (``image_size(j)``, ``InMemory``, ``Subset``);
    otherwise the item is loaded."""
    if isinstance(dataset, InMemory):  # the cached tensor itself (the split's attributes are forwarded too)
        return tuple(dataset.items[j]["image"].shape[-2:])
    if hasattr(dataset, "image_size"):
        h, w = dataset.image_size(j)
        return int(h), int(w)
    if isinstance(dataset, torch.utils.data.Subset):
        return _item_size(dataset.dataset, dataset.indices[j])
    return tuple(dataset[j]["image"].shape[-2:])


def _batch_windows(shapes: list[tuple[int, int]], crop_size: int | None, g: torch.Generator):
    """The crop of one global batch, drawn from ``g`` exactly as ``epoch_loader`` always did: ("batch", window) = one
    window for the whole batch (equal image sizes), ("items", [window per item]) = one window per item (mixed sizes,
    e.g. COCO; padded to the crop first), ("none", None) = no crop."""
    if not crop_size:
        return "none", None
    if len(set(shapes)) > 1:
        return "items", [crop_window(max(h, crop_size), max(w, crop_size), crop_size, g) for h, w in shapes]
    h, w = shapes[0]
    return "batch", crop_window(h, w, crop_size, g)


def _make_batch(items: list[dict], crop_size: int | None, mode: str, windows) -> dict:
    if mode == "none" and len({tuple(it["image"].shape[-2:]) for it in items}) > 1:
        sizes = sorted({tuple(it["image"].shape[-2:]) for it in items})
        raise ValueError(
            f"a training batch holds images of different sizes {sizes[:3]} and crop_size is null: set the task's "
            "train.crop_size (the paper: 256 for COCO) or resize the dataset's images to one size (Pascal-Context: "
            "520x520)"
        )
    if mode == "items":
        return collate([crop_item_at(it, crop_size, win) for it, win in zip(items, windows)])
    batch = collate(items)
    return crop_at(batch, crop_size, windows) if mode == "batch" else batch


def _identity(batch):
    return batch


class _PlannedBatches(torch.utils.data.Dataset):
    """Materialises one planned batch (indices + crop windows) of one rank: what a DataLoader worker runs."""

    def __init__(self, dataset, crop_size: int | None):
        self.dataset, self.crop_size = dataset, crop_size

    def __getitem__(self, entry) -> dict:
        indices, mode, windows = entry
        return _make_batch([self.dataset[j] for j in indices], self.crop_size, mode, windows)


class _PlanSampler(torch.utils.data.Sampler):
    """Yields the plan entries of the current epoch (set by ``EpochLoader``) to the DataLoader's workers."""

    def __init__(self):
        self.entries: list = []

    def __iter__(self):
        return iter(list(self.entries))

    def __len__(self) -> int:
        return len(self.entries)


class EpochLoader:
    """``loader(epoch)``: the batches of one epoch, a deterministic function of (seed, epoch) only.

    The order (``randperm``) and the crop windows are drawn from one generator seeded by (seed, epoch), in the same
    sequence as always, so the batches are bit-identical whatever ``num_workers`` is and however many ranks share
    the work: with ``world_size`` ranks each global batch of ``batch_size`` images is split into ``world_size``
    contiguous slices of ``batch_size // world_size`` and rank ``r`` gets slice ``r`` (same windows as the single
    process). ``num_workers > 0``: the plan is computed in this process (image sizes from ``image_size(j)`` /
    in-memory items, else by loading the item), the images are loaded, cropped and collated by DataLoader workers
    (``persistent_workers`` keeps them across epochs). ``pin_memory``/``channels_last`` apply on CUDA devices /
    to the image tensor. ``max_batches``: at most this many batches per epoch (the steps per epoch)."""

    def __init__(self, dataset, batch_size: int, seed: int, crop_size: int | None = None, drop_last: bool = True,
                 device: str = "cpu", num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = True,
                 rank: int = 0, world_size: int = 1, max_batches: int | None = None, channels_last: bool = False,
                 prefetch_factor: int = 2):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"the global batch_size {batch_size} must be divisible by the number of ranks {world_size} "
                f"(each rank trains on batch_size // world_size images per step)"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.batch_size, self.seed, self.crop_size = dataset, batch_size, seed, crop_size
        self.drop_last, self.device, self.rank, self.world_size = drop_last, device, rank, world_size
        self.max_batches, self.channels_last, self.num_workers = max_batches, channels_last, num_workers
        self.pin_memory = bool(pin_memory) and str(device).startswith("cuda")
        self._loader = None
        if num_workers:
            self._sampler = _PlanSampler()
            self._loader = torch.utils.data.DataLoader(
                _PlannedBatches(dataset, crop_size), batch_size=None, sampler=self._sampler, num_workers=num_workers,
                collate_fn=_identity, pin_memory=self.pin_memory, persistent_workers=bool(persistent_workers),
                prefetch_factor=prefetch_factor,
                # the workers' base seed from a generator of its own, not from the global RNG (which drives the
                # quantisation noise and RoI sampling): the training draws stay the same for any num_workers
                generator=torch.Generator().manual_seed(seed))

    def _order(self, epoch: int) -> tuple[torch.Generator, list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        n = len(order) // self.batch_size * self.batch_size if self.drop_last else len(order)
        if n == 0:
            raise ValueError(f"dataset of {len(self.dataset)} images is smaller than batch_size {self.batch_size}")
        return g, order[:n]

    def num_batches(self) -> int:
        n = len(self.dataset) // self.batch_size if self.drop_last else -(-len(self.dataset) // self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def plan(self, epoch: int) -> list[tuple[list[int], str, Any]]:
        """This rank's entries (indices, crop mode, windows) of ``epoch``, computed without loading images where
        the dataset gives their sizes."""
        g, order = self._order(epoch)
        entries = []
        for i in range(0, len(order), self.batch_size):
            if self.max_batches is not None and len(entries) >= self.max_batches:
                break
            idx = order[i: i + self.batch_size]
            shapes = [_item_size(self.dataset, j) for j in idx] if self.crop_size else []
            mode, windows = _batch_windows(shapes, self.crop_size, g)
            b = len(idx) // self.world_size
            lo, hi = (self.rank * b, (self.rank + 1) * b) if self.world_size > 1 else (0, len(idx))
            entries.append((idx[lo:hi], mode, windows[lo:hi] if mode == "items" else windows))
        return entries

    def _stream(self, epoch: int) -> Iterator[dict]:
        """Single process, no workers: load each batch, then draw its crop (no image is loaded twice)."""
        g, order = self._order(epoch)
        for k, i in enumerate(range(0, len(order), self.batch_size)):
            if self.max_batches is not None and k >= self.max_batches:
                break
            items = [self.dataset[j] for j in order[i: i + self.batch_size]]
            shapes = [tuple(it["image"].shape[-2:]) for it in items] if self.crop_size else []
            mode, windows = _batch_windows(shapes, self.crop_size, g)
            yield _make_batch(items, self.crop_size, mode, windows)

    def _finish(self, batch: dict) -> dict:
        batch = to_device(batch, self.device)
        if self.channels_last and batch["image"].dim() == 4:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        return batch

    def __call__(self, epoch: int) -> Iterator[dict]:
        if self._loader is not None:
            self._sampler.entries = self.plan(epoch)
            source = iter(self._loader)
        elif self.world_size > 1:
            dataset, crop = self.dataset, self.crop_size
            source = (_make_batch([dataset[j] for j in idx], crop, mode, win) for idx, mode, win in self.plan(epoch))
        else:
            source = self._stream(epoch)
        for batch in source:
            yield self._finish(batch)


def epoch_loader(dataset, batch_size: int, seed: int, epoch: int, crop_size: int | None = None, drop_last: bool = True,
                 device: str = "cpu", **kw) -> Iterable[dict]:
    """Shuffled batches for one epoch; order and crops depend only on (seed, epoch) (see ``EpochLoader`` for
    ``num_workers``, ``rank``/``world_size``, ``pin_memory``, ``channels_last``, ``max_batches``)."""
    return EpochLoader(dataset, batch_size, seed, crop_size, drop_last, device, **kw)(epoch)


def equal_size_batches(dataset, batch_size: int, seed: int = 0, device: str = "cpu") -> Iterator[dict]:
    """Every item of ``dataset`` once, in the (seed, epoch 0) order of ``EpochLoader``, in batches of at most
    ``batch_size`` consecutive items of one image size (evaluation splits such as COCO's at shorter edge 800 mix
    sizes; equal-size splits give exactly ``EpochLoader``'s batches)."""
    loader = EpochLoader(dataset, min(batch_size, len(dataset)), seed, drop_last=False, device=device)
    _, order = loader._order(0)
    group: list[dict] = []
    for j in order:
        item = dataset[j]
        if group and (len(group) == batch_size or item["image"].shape[-2:] != group[-1]["image"].shape[-2:]):
            yield loader._finish(collate(group))
            group = []
        group.append(item)
    if group:
        yield loader._finish(collate(group))
