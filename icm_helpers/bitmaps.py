"""Bit-allocation maps (the paper's Figs. 5-6): where in the image does the codec spend its bits?

A bit map is in bits per pixel: the -log2 likelihood of the quantized latent ``y`` summed over its channels,
spread evenly over the 16x16 pixel block that each latent position codes (nearest-neighbour upsampling divided
by the block area), so that the map's sum over the (padded) image equals the entropy model's estimated bits of
``y``. The hyper-latent ``z`` (1/64 resolution, side information) is NOT included by default, as in the paper's
figures, which show the latent's bits; ``include_hyper=True`` adds z's bits spread over its 64x64 blocks, and
the map then sums to the full estimated rate (``bpp_estimated`` of :mod:`icm_helpers.evaluation`).

Images whose size is not a multiple of 64 are padded as in the evaluation; maps are cropped back to the image,
so the bits spent on the padding are not in the map (they are in :attr:`BitMaps.y_bits` / ``z_bits``).

- :func:`compute_bit_maps`: both maps (y, z) of one image in one codec forward pass, plus the totals;
  optionally under the ROI method's latent scaling (Ahonen et al.; :mod:`icm_helpers.roi`).
- :func:`bit_allocation_map`: one map (the original API).
- :func:`bit_map_rows`: rows for :func:`icm_helpers.plots.plot_bit_maps` (input | models... | difference).
- :func:`roi_split` / :func:`inside_fraction`: share of a map's bits inside a mask (object masks).
- :func:`region_split`: the bits of a rectangle of the map and their share inside a mask (the comparer's zoom).
- :func:`roi_fraction_table`: that share for several models over a whole test set (mean, std, 95% CI): the
  paper's claim "the auxiliary loss concentrates bits on the task's regions" predicts a larger inside share
  for the w/-aux models than for the w/o-aux models at the same lambda.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from .codec import crop_to, load_codec, pad_to_multiple
from .methods import RunId, arm_name, run_label
from .roi import roi_latent_scaling

__all__ = ["BitMaps", "compute_bit_maps", "bit_allocation_map", "bit_map_rows", "inside_fraction", "roi_split",
           "region_split", "summarize", "roi_fraction_table", "ROI_TABLE_COLUMNS", "profile_models"]


@dataclass(frozen=True)
class BitMaps:
    """Bit maps of one image under one codec.

    ``y`` / ``z``: HxW bits per pixel of the latent / hyper-latent (cropped to the image); ``y_bits`` /
    ``z_bits``: estimated bits over the padded image; ``num_pixels``: H*W of the unpadded image; ``decoded``: the
    decoded image of the same forward pass (HxWx3 in [0, 1], cropped), when it was kept."""

    y: np.ndarray
    z: np.ndarray
    y_bits: float
    z_bits: float
    num_pixels: int
    decoded: np.ndarray | None = None

    def map(self, include_hyper: bool = False) -> np.ndarray:
        return self.y + self.z if include_hyper else self.y

    def bits(self, include_hyper: bool = False) -> float:
        return self.y_bits + self.z_bits if include_hyper else self.y_bits

    def bpp(self, include_hyper: bool = False) -> float:
        """Estimated bits per pixel of the image (y, or y + z = the evaluation's ``bpp_estimated``)."""
        return self.bits(include_hyper) / self.num_pixels


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or (image.dim() == 4 and image.shape[0] != 1):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a 3xHxW or 1x3xHxW tensor in [0, 1], got {shape}")
    return image if image.dim() == 4 else image[None]


def _block_map(lik: torch.Tensor, H: int, W: int) -> torch.Tensor:
    bits = (-torch.log2(lik)).sum(1, keepdim=True)  # (1,1,h,w) bits per latent position
    block = H // bits.shape[-2]
    if block * bits.shape[-2] != H or block * bits.shape[-1] != W:
        raise ValueError(f"latent grid {tuple(bits.shape[-2:])} does not tile the padded image {H}x{W}")
    return F.interpolate(bits, scale_factor=block, mode="nearest") / (block * block)


@torch.no_grad()
def compute_bit_maps(codec, image: torch.Tensor, roi: torch.Tensor | None = None, roi_qf: float | None = None,
                     roi_decoder: str = "as_is") -> BitMaps:
    """y and z bit maps of one image (3xHxW or 1x3xHxW in [0,1]) in ONE forward pass of ``codec`` (put in eval
    mode for the pass, then restored). With ``roi_qf`` the ROI method's latent scaling is applied with the
    pixel mask ``roi`` (HxW; the item's ``roi``); the signalled mask of ``roi_decoder="rescale"`` is not a latent
    and is not in the maps."""
    x = _as_batch(image)
    device = next(codec.parameters()).device
    xp, pad = pad_to_multiple(x.to(device))
    ctx = contextlib.nullcontext()
    if roi_qf is not None:
        if roi is None:
            raise ValueError("roi_qf needs the item's 'roi' mask")

        ctx = roi_latent_scaling(
            codec, pad_to_multiple(torch.as_tensor(roi, device=device)[None, None].float())[0], roi_qf, roi_decoder
        )
    was = codec.training
    codec.eval()
    try:
        with ctx:
            out = codec(xp)
    finally:
        codec.train(was)
    H, W = xp.shape[-2:]
    lik = out["likelihoods"]
    maps = {k: crop_to(_block_map(lik[k].float().cpu(), H, W), pad)[0, 0].numpy() for k in ("y", "z")}
    totals = {k: float((-torch.log2(lik[k].float())).sum()) for k in ("y", "z")}
    decoded = crop_to(out["x_hat"].float().clamp(0, 1).cpu(), pad)[0].permute(1, 2, 0).numpy()
    return BitMaps(maps["y"], maps["z"], totals["y"], totals["z"], int(x.shape[-2] * x.shape[-1]), decoded)


def bit_allocation_map(codec, image: torch.Tensor, include_hyper: bool = False) -> np.ndarray:
    """HxW map (bits/pixel) for one image (3xHxW or 1x3xHxW in [0,1]): y's bits, plus z's with ``include_hyper``."""
    return compute_bit_maps(codec, image).map(include_hyper)


def bit_map_rows(
    codecs: Mapping[str, Any] | Sequence[Any],
    items: Iterable[Mapping[str, Any]],
    include_hyper: bool = False,
    diff: tuple[int, int] | None = (-1, -2),
) -> list[dict[str, Any]]:
    """Rows for :func:`icm_helpers.plots.plot_bit_maps`: per item the input image, one map per codec and
    ``diff`` = map[diff[0]] - map[diff[1]] (default: last minus second-to-last, i.e. w/ aux minus w/o aux when
    the codecs are start, w/o aux, w/ aux; None: no difference panel). Each row also holds the per-model
    ``bpp`` and ``inside`` (share of bits inside the item's ``roi`` mask, when it has one)."""
    codecs = list(codecs.values()) if isinstance(codecs, Mapping) else list(codecs)
    rows = []
    for it in items:
        bm = [compute_bit_maps(c, it["image"]) for c in codecs]
        maps = [b.map(include_hyper) for b in bm]
        row = {"image": it["image"].permute(1, 2, 0).cpu().numpy().clip(0, 1), "maps": maps,
               "image_id": it.get("image_id"), "bpp": [b.bpp(include_hyper) for b in bm]}
        if diff is not None:
            row["diff"] = maps[diff[0]] - maps[diff[1]]
        if it.get("roi") is not None:
            row["inside"] = [inside_fraction(m, np.asarray(it["roi"])) for m in maps]
        rows.append(row)
    return rows


def inside_fraction(bit_map: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the map's bits that fall inside ``mask`` (e.g. object masks); NaN for an all-zero map."""
    return roi_split(bit_map, mask)["inside"]


def roi_split(bit_map: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Bits inside vs outside ``mask``: ``inside`` + ``outside`` = 1 (shares of the map's bits), ``area`` = the
    mask's share of the pixels, ``concentration`` = inside / area (1: bits spread like the area; > 1: bits
    concentrated on the mask; NaN for an empty mask)."""
    bit_map = np.asarray(bit_map, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if bit_map.shape != mask.shape:
        raise ValueError(f"bit map {bit_map.shape} and mask {mask.shape} differ in shape")
    total = float(bit_map.sum())
    inside = float(bit_map[mask].sum()) / total if total > 0 else float("nan")
    area = float(mask.mean())
    return {
        "inside": inside,
        "outside": 1.0 - inside,
        "area": area,
        "concentration": inside / area if area > 0 else float("nan"),
    }


def region_split(bit_map: np.ndarray, mask: np.ndarray | None, box: Sequence[int]) -> dict[str, float | None]:
    """The bits of the map inside ``box`` = (x0, x1, y0, y1), pixel columns x0..x1-1 and rows y0..y1-1: ``bits``
    (their sum), ``bpp`` (their mean), ``share_of_image`` (of the whole map's bits) and, with an object ``mask``,
    ``inside`` (the share of the box's bits inside the mask; NaN when the box holds no bits) and ``area`` (the mask's
    share of the box's pixels); both None without a mask."""
    bit_map = np.asarray(bit_map, dtype=np.float64)
    x0, x1, y0, y1 = (int(v) for v in box)
    h, w = bit_map.shape
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box (x0, x1, y0, y1) = {tuple(box)} is not a non-empty region of the {w}x{h} map")
    sub = bit_map[y0:y1, x0:x1]
    bits, total = float(sub.sum()), float(bit_map.sum())
    out: dict[str, float | None] = {"bits": bits, "bpp": float(sub.mean()),
                                    "share_of_image": bits / total if total > 0 else float("nan"),
                                    "inside": None, "area": None}
    if mask is not None:
        sub_mask = np.asarray(mask).astype(bool)[y0:y1, x0:x1]
        out["inside"] = float(sub[sub_mask].sum()) / bits if bits > 0 else float("nan")
        out["area"] = float(sub_mask.mean())
    return out


def summarize(values: Iterable[float], ci: float = 0.95) -> dict[str, float]:
    """Mean, sample std and the ``ci`` confidence interval of the mean (Student t over images) of the finite
    values; ``n`` counts them (NaN everywhere when none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}

    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + ci / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


#: Columns of :func:`roi_fraction_table`'s ``rows``.
ROI_TABLE_COLUMNS = ["model", "lambda", "images", "bits inside (mean)", "95% CI low", "95% CI high", "std",
                     "mask area (mean)", "inside / area (mean)", "bpp (mean)", "paired with", "Δ inside (mean)",
                     "Δ 95% CI low", "Δ 95% CI high"]


def roi_fraction_table(
    models: Sequence[Mapping[str, Any]],
    dataset,
    include_hyper: bool = False,
    max_images: int | None = None,
    device: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Share of each model's bits inside the object masks over a test set.

    ``models``: dicts with ``run`` (a :class:`icm_helpers.methods.RunId`: method id and lambda; the model's
    label is ``methods.run_label(run)`` and its group, the curve it belongs to in
    :func:`icm_helpers.plots.plot_roi_fractions`, ``methods.arm_name`` of its method) -- or, for models that are no
    run of the table, ``label`` and optionally ``group`` (default the label) -- then ``lambda_`` (None for the start
    codec; default the run's) and ``codec`` (a model, or a zero-argument callable returning one, loaded when its
    turn comes), optionally ``roi_qf`` and ``paired_with`` (the ``run`` -- or the label -- of an EARLIER model: the
    table then adds the per-image paired difference of the inside shares, this model minus that one, with its 95%
    CI -- much tighter than the CIs of the two means, which mostly reflect how much object area varies between
    images). Items need a ``roi`` mask (union of instance masks); images whose mask is empty are skipped (counted
    in ``skipped_empty``).

    Returns ``{"columns", "rows", "summary": [{label, group, lambda_, method, inside: summarize(), area,
    concentration, bpp, paired_with (the label), paired_group, paired_method, delta_inside: summarize() or None}],
    "per_image": {label: [{"image_id", "inside", "area", "concentration", "bpp"}]}, "include_hyper",
    "skipped_empty"}``. Raises ValueError when the dataset has no ``roi`` masks (e.g. Pascal-Context)."""
    n = len(dataset) if max_images is None else min(int(max_images), len(dataset))
    if n == 0:
        raise ValueError("the dataset is empty")
    items, skipped = [], 0
    for i in range(n):
        it = dataset[i]
        if it.get("roi") is None:
            raise ValueError(
                f"the items of {type(dataset).__name__} have no 'roi' (instance) masks: no inside/outside split"
            )
        if not bool(np.asarray(it["roi"]).any()):
            skipped += 1
            continue
        items.append(it)
    per_image: dict[str, list[dict[str, Any]]] = {}
    done: dict[Any, dict[str, Any]] = {}  # a model's id (its RunId, else its label) -> its summary and per-image values
    summary, rows = [], []
    for m in models:
        run = m.get("run")
        label = run_label(run) if run is not None else m["label"]
        codec = m["codec"]() if callable(m["codec"]) and not isinstance(m["codec"], torch.nn.Module) else m["codec"]
        if device is not None:
            codec = codec.to(device)
        recs = []
        for it in items:
            bm = compute_bit_maps(codec, it["image"], roi=it.get("roi"), roi_qf=m.get("roi_qf"))
            recs.append({"image_id": it.get("image_id"), **roi_split(bm.map(include_hyper), np.asarray(it["roi"])),
                         "bpp": bm.bpp(include_hyper)})
        per_image[label] = recs
        s = {
            "label": label,
            "group": arm_name(run.method) if run is not None else m.get("group", label),
            "lambda_": m.get("lambda_", None if run is None else run.lambda_),
            "method": None if run is None else run.method,
            "inside": summarize(r["inside"] for r in recs),
            **{k: summarize(r[k] for r in recs)["mean"] for k in ("area", "concentration", "bpp")},
            "paired_with": None,
            "paired_group": None,
            "paired_method": None,
            "delta_inside": None,
        }
        partner = m.get("paired_with")
        if partner is not None:
            if partner not in done:
                shown = run_label(partner) if isinstance(partner, RunId) else partner
                raise ValueError(f"{label!r} is paired with {shown!r}, which is not an earlier model")
            other = done[partner]
            s.update(paired_with=other["summary"]["label"], paired_group=other["summary"]["group"],
                     paired_method=other["summary"]["method"])
            s["delta_inside"] = summarize(r["inside"] - q["inside"] for r, q in zip(recs, other["per_image"]))
        done[run if run is not None else label] = {"summary": s, "per_image": recs}
        summary.append(s)
        rows.append(_roi_table_row(s))
        if log:
            log(f"  {label}: {s['inside']['mean']:.3f} of the bits inside the masks ({s['inside']['n']} images)")
    return {"columns": list(ROI_TABLE_COLUMNS), "rows": rows, "summary": summary, "per_image": per_image,
            "include_hyper": bool(include_hyper), "skipped_empty": skipped}


def _roi_table_row(s: Mapping[str, Any]) -> list[Any]:
    """One row of :data:`ROI_TABLE_COLUMNS` from a summary of :func:`roi_fraction_table`."""
    ins, d = s["inside"], s["delta_inside"] or {}
    return [s["label"], s["lambda_"], ins["n"], ins["mean"], ins["ci_low"], ins["ci_high"], ins["std"], s["area"],
            s["concentration"], s["bpp"], s["paired_with"], d.get("mean"), d.get("ci_low"), d.get("ci_high")]


def profile_models(ex, task: str, lambdas: Iterable[float] | None = None, alpha: float | None = None,
                   aux_position: str = "enc") -> list[dict[str, Any]]:
    """The models of a profile for :func:`roi_fraction_table`: the start codec, then w/o aux and w/ aux
    (``aux_position``, its branch started as the profile's primary arm, the first of ``aux_inits``; paired with the
    w/o-aux model of its lambda) at each lambda (default: the profile's). Each is named by its ``run``
    (:class:`icm_helpers.methods.RunId`); codecs load lazily; ``ex.train`` trains a missing run (normally notebooks
    02/03 did)."""

    lambdas = ex.task_cfg(task)["lambdas"] if lambdas is None else lambdas
    models: list[dict[str, Any]] = [{"run": RunId("start"), "lambda_": None, "codec": ex.start_codec}]
    for lam in lambdas:
        baseline = None
        for pos in (None, aux_position):
            spec = ex.spec(task, lam, pos, alpha, aux_init=None if pos is None else ex.aux_inits(task)[0])
            run = RunId(spec.method, float(lam))
            models.append({"run": run, "lambda_": float(lam), "paired_with": baseline,
                           "codec": (lambda s=spec: load_codec(ex.train(s)).to(ex.device))})
            baseline = run if pos is None else baseline
    return models
