"""Pseudo-labels computed once per image (the y of Eq. 4-6: the frozen recognizer's output on the ORIGINAL image).

Without random augmentation (``crop_size: null``) an image is the same tensor every time it is drawn, and a frozen
recognizer in eval mode gives it the same labels, so they need not be recomputed every epoch. ``PseudoLabelCache``
keys them by the image's bytes: a batch whose images are all known gets the stored labels; any other batch is
labelled exactly as without the cache (one ``recognizer.pseudo_labels`` call on the whole batch) and its labels are
stored per image. The result is bit-identical to the uncached loop as long as an image's labels do not depend on the
other images of its batch at the batch's size (true of the suite's recognizers on CPU: every training batch has the
same size; ``tests/test_label_cache.py`` checks the training itself is identical either way).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

#: integer label maps are stored in the smallest of these that holds their values (restored to their dtype on reading)
_COMPACT_INTS = (torch.uint8, torch.int16, torch.int32)


def image_key(image: torch.Tensor) -> bytes:
    """A digest of one image's shape, dtype and values (the cache key)."""
    x = image.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(x.shape), str(x.dtype))).encode())
    h.update(x.view(torch.uint8).numpy().tobytes() if x.dtype != torch.bool else x.numpy().tobytes())
    return h.digest()


def _compact(t: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.numel() == 0:
        return t, t.dtype
    lo, hi = int(t.min()), int(t.max())
    for small in _COMPACT_INTS:
        info = torch.iinfo(small)
        if info.min <= lo and hi <= info.max:
            return t.to(small), t.dtype
    return t, t.dtype


def _split(labels: Any, n: int) -> list[Any]:
    """Per-image labels of a batch: a detector's list of per-image dicts, or a label-map tensor [B, H, W]."""
    if isinstance(labels, torch.Tensor):
        return [_compact(labels[i].clone()) for i in range(n)]
    if isinstance(labels, (list, tuple)) and len(labels) == n:
        return [{k: v.clone() for k, v in entry.items()} if isinstance(entry, dict) else entry for entry in labels]
    raise TypeError(f"pseudo-labels must be a list of {n} per-image entries or a [B, ...] tensor, got {type(labels)}")


def _join(entries: list[Any]) -> Any:
    if isinstance(entries[0], tuple):  # compacted label maps
        return torch.stack([t.to(dtype) for t, dtype in entries])
    return [dict(entry) if isinstance(entry, dict) else entry for entry in entries]


class PseudoLabelCache:
    """Pseudo-labels per image, computed on first sight (``__call__(recognizer, images)``); ``hits`` / ``misses``
    count images. One cache serves one recognizer and one split's images (a profile without random crops)."""

    def __init__(self) -> None:
        self._labels: dict[bytes, Any] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._labels)

    def __call__(self, recognizer, images: torch.Tensor) -> Any:
        keys = [image_key(im) for im in images]
        missing = [k for k in keys if k not in self._labels]
        if missing:
            labels = recognizer.pseudo_labels(images)
            for k, entry in zip(keys, _split(labels, len(keys))):
                self._labels.setdefault(k, entry)
            self.misses += len(set(missing))
            self.hits += len(keys) - len(set(missing))
            return labels
        self.hits += len(keys)
        return _join([self._labels[k] for k in keys])


def label_source(recognizer, cache: PseudoLabelCache | None):
    """``images -> pseudo-labels``: through ``cache`` when given, else the recognizer every time."""
    if cache is None:
        return recognizer.pseudo_labels
    return lambda images: cache(recognizer, images)
