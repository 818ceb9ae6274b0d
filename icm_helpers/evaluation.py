"""ONE evaluation path for every method (baseline, aux, ROI, start codec, uncompressed reference).

Per test image: pad to a multiple of 64 (Sec. 4.1), run the codec in eval mode for ``bpp_estimated``
(-log2 likelihoods of y and z over the ORIGINAL pixel count), code a real bitstream with CompressAI's range coder
for ``bpp_bitstream`` (bytes of the y and z strings * 8 over the original pixel count; the few bytes of shape
header are not counted, as in CompressAI's own evaluation), decode that bitstream, crop the padding and give the
decoded image to the frozen recognizer. Rates are the mean of the per-image bpp (CompressAI's convention).

Task metrics against the ground truth of the split: detection = COCO mAP@[.5:.95] via pycocotools (AP50 too);
segmentation = mIoU over all classes present in the label maps (background included for the generated world).
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import time
from typing import Any

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from . import distributed as dist_lib
from .codec import bits_from_likelihoods, codec_forward, compress_image, crop_to, decompress_image, pad_to_multiple
from .config import check_device
from .data import to_device
from .distributed import unshard
from .progress import progress
from .roi import check_roi, roi_latent_scaling
from .precision import fp32_detection_heads
from .recognizers import IGNORE_INDEX
from .registry import METRICS

DECODE_MODES = ("all", "first")
# per-image wall times (seconds; what the VCM reporting template asks): the only values that differ between two runs
TIMING_KEYS = ("enc_seconds", "dec_seconds", "task_seconds")


def without_timing(per_image: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-image records without their wall times, for comparing two evaluations."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in per_image]


@METRICS.register("detection")
class DetectionMetric:
    """COCO-style mAP of predicted boxes against the split's instances.json."""

    name = "mAP"

    @classmethod
    def for_recognizer(cls, recognizer, dataset) -> "DetectionMetric":
        return cls(dataset)

    def __init__(self, dataset):
        self.coco = dataset.coco
        self.results: list[dict[str, Any]] = []
        self.image_ids: list[int] = []
        self.counts: list[int] = []  # detections added per update (to merge shards back in image order)

    def update(self, image_id: int, prediction: list[dict[str, torch.Tensor]], item: dict[str, Any]) -> dict[str, Any]:
        """``prediction``: the recognizer's output for a batch of one image."""
        prediction = prediction[0]
        self.image_ids.append(int(image_id))
        # boxes are predicted on the returned (possibly resized) image: back to the original annotation's pixels
        boxes = prediction["boxes"].detach().cpu().double().numpy() / float(item.get("scale", 1.0))
        dets = []
        for (x0, y0, x1, y1), label, score in zip(boxes, prediction["labels"].tolist(), prediction["scores"].tolist()):
            det = {
                "image_id": int(image_id),
                "category_id": int(label),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "score": float(score),
            }
            self.results.append(det)
            dets.append(det["bbox"] + [det["score"], det["category_id"]])
        self.counts.append(len(dets))
        return {"detections": dets}  # per image [x, y, w, h, score, category]: what the bootstrap re-evaluates

    def state(self) -> dict[str, Any]:
        return {"image_ids": self.image_ids, "counts": self.counts, "results": self.results}

    def load_states(self, states: list[dict[str, Any]]) -> None:
        """Merge the states of the ranks of a sharded evaluation (``distributed.shard`` order) back into image order,
        so the result list (and hence COCOeval) is exactly the single-process one."""

        per_rank = []
        for st in states:
            chunks, k = [], 0
            for image_id, c in zip(st["image_ids"], st["counts"]):
                chunks.append((image_id, c, st["results"][k: k + c]))
                k += c
            per_rank.append(chunks)
        self.image_ids, self.counts, self.results = [], [], []
        for image_id, c, res in unshard(per_rank):
            self.image_ids.append(image_id)
            self.counts.append(c)
            self.results.extend(res)

    def compute(self) -> dict[str, float]:
        if not self.results:
            return {"mAP": 0.0, "AP50": 0.0, "num_detections": 0}
        with contextlib.redirect_stdout(io.StringIO()):
            dt = self.coco.loadRes(self.results)
            ev = COCOeval(self.coco, dt, "bbox")
            ev.params.imgIds = sorted(set(self.image_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [max(0.0, float(s)) for s in ev.stats]  # pycocotools reports -1 for "no such objects"
        return {"mAP": stats[0], "AP50": stats[1], "num_detections": len(self.results)}


@METRICS.register("segmentation")
class SegmentationMetric:
    """mIoU from a confusion matrix accumulated over the split."""

    name = "mIoU"

    @classmethod
    def for_recognizer(cls, recognizer, dataset) -> "SegmentationMetric":
        return cls(recognizer.num_outputs, getattr(dataset, "ignore_index", IGNORE_INDEX))

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), np.int64)

    def update(self, image_id: int, prediction: torch.Tensor, item: dict[str, Any]) -> dict[str, Any]:
        """``prediction``: logits (1,C,h,w). When the label map has another size (Pascal-Context is evaluated on
        its ORIGINAL label maps, as MMSeg does), the logits are resized bilinearly to it before the argmax."""
        if prediction.shape[-2:] != item["semantic"].shape[-2:]:
            prediction = torch.nn.functional.interpolate(
                prediction, size=tuple(item["semantic"].shape[-2:]), mode="bilinear", align_corners=False
            )
        pred = prediction.argmax(1)[0].cpu().numpy().ravel()
        gt = item["semantic"].cpu().numpy().ravel()
        keep = gt != self.ignore_index
        confusion = np.bincount(self.num_classes * gt[keep] + pred[keep], minlength=self.num_classes**2).reshape(
            self.num_classes, -1
        )
        self.confusion += confusion
        inter = np.diag(confusion)
        # per image, additive over images: what the bootstrap resamples (icm_helpers.bootstrap)
        return {"seg_intersection": inter.tolist(), "seg_union": (confusion.sum(0) + confusion.sum(1) - inter).tolist()}

    def state(self) -> np.ndarray:
        return self.confusion

    def load_states(self, states: list[np.ndarray]) -> None:
        """Sum the confusion matrices of the ranks of a sharded evaluation (integer counts: exact)."""
        self.confusion = np.sum(np.stack(states), axis=0).astype(np.int64)

    def compute(self) -> dict[str, float]:
        inter = np.diag(self.confusion).astype(float)
        union = self.confusion.sum(0) + self.confusion.sum(1) - inter
        present = union > 0
        iou = inter[present] / union[present]
        return {
            "mIoU": float(iou.mean()) if iou.size else 0.0,
            "pixel_accuracy": float(inter.sum() / max(1, self.confusion.sum())),
            "per_class_iou": (inter / np.maximum(union, 1)).tolist(),
        }


def _to_float(prediction):
    """Predictions made under autocast back to fp32 (boxes / logits), so metrics see one dtype."""
    if isinstance(prediction, torch.Tensor):
        return prediction.float() if prediction.is_floating_point() else prediction
    if isinstance(prediction, list):
        return [{k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in p.items()}
                if isinstance(p, dict) else p for p in prediction]
    return prediction


def make_metric(recognizer, dataset):
    """The metric of ``recognizer``'s task (``registry.METRICS``) for ``dataset``."""
    return METRICS[recognizer.task].for_recognizer(recognizer, dataset)


@torch.no_grad()
def evaluate(
    codec,
    recognizer,
    dataset,
    *,
    bitstream: bool = True,
    roi_qf: float | None = None,
    roi_decoder: str = "as_is",
    max_images: int | None = None,
    log=None,
    device: str = "cpu",
    amp: str | None = None,
    distributed: bool | None = None,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    decode: str = "all",
    desc: str = "",
) -> dict[str, Any]:
    """Evaluate ``codec`` (None = uncompressed reference) + frozen ``recognizer`` on ``dataset``.

    ``workers`` > 1 (CPU, single process run): the images are split round-robin over that many forked worker processes
    (one intra-op thread each; CompressAI's autoregressive range coding is serial Python, so processes, not threads,
    speed it up) and merged back in image order, exactly as a torchrun-sharded evaluation is. ``shard=(r, W)``:
    evaluate only images r, r + W, ... (used by the workers).

    ``amp="bf16"``: the recognizer and the codec's g_a/g_s under autocast (likelihoods stay fp32); the real
    bitstream (compress/decompress) is always coded in fp32 with autocast off.
    ``distributed`` (default: when running under torchrun, see ``icm_helpers.distributed``): every rank evaluates
    every ``world_size``-th image and the per-image records and metric states are gathered, so every rank returns
    the single-process result (call it on every rank).

    ``decode``: "all" (every bitstream is decoded by CompressAI's decoder and that image is recognised) or "first"
    (the image the decoder rebuilds is computed on the encoder side, ``codec.compress_image(reconstruct=True)``; the
    first image each process codes is also decoded and must be equal to it bit for bit, else a RuntimeError). Both
    give the same records; "first" skips the serial decoder's cost for the other images.

    ``roi_qf``: apply the ROI method of Ahonen et al. with the item's ``roi`` mask (needs the mask at the encoder);
    ``roi_decoder``: "as_is" or "rescale" (see ``icm_helpers.roi``; the signalled mask's bits count in both rates).
    Returns {"bpp_estimated", "bpp_bitstream", "metric_name", "metric", "metrics", "per_image", "seconds"}.
    """

    check_device(device)
    sharded = dist_lib.is_distributed() if distributed is None else bool(distributed)
    device_type = torch.device(device).type
    amp_ctx = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext
    if amp not in (None, "bf16"):
        raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
    if amp:
        fp32_detection_heads(recognizer)  # boxes, proposals and NMS in fp32; the backbone in bf16
    if roi_qf is not None and codec is None:
        raise ValueError("roi_qf needs a codec")
    if roi_qf is not None:
        check_roi(roi_qf, roi_decoder)
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode {decode!r}; valid: {', '.join(DECODE_MODES)}")
    if workers > 1 and device_type != "cpu":
        raise ValueError(
            f"workers={workers} forks CPU worker processes, and a forked process cannot use {device} (CUDA "
            "cannot be re-initialised in a forked subprocess): use workers=1 on a GPU"
        )
    metric = make_metric(recognizer, dataset)
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    is_anchor = codec is not None and hasattr(codec, "encode") and hasattr(codec, "decode")
    if roi_qf is not None and is_anchor:
        raise ValueError(f"the ROI method scales a learned codec's latent; {codec.name} has none")
    if codec is not None and not is_anchor:
        codec.eval()
    if workers > 1 and not sharded and shard is None and n > 1:
        return _evaluate_forked(
            codec,
            recognizer,
            dataset,
            metric,
            n,
            min(workers, n),
            bitstream=bitstream,
            roi_qf=roi_qf,
            roi_decoder=roi_decoder,
            max_images=max_images,
            device=device,
            amp=amp,
            decode=decode,
            desc=desc,
        )
    per_image = []
    t0 = time.time()
    indices = list(dist_lib.shard(n) if sharded else range(shard[0], n, shard[1]) if shard else range(n))
    show = dist_lib.is_main() and (shard is None or shard[0] == 0)  # one bar: rank 0 / the first forked worker
    for i in progress(indices, desc=desc or "evaluate", unit="image") if show else indices:
        item = to_device(dataset[i], device)
        x = item["image"][None]
        record: dict[str, Any] = {"image_id": item["image_id"]}
        if codec is None:
            x_hat = x
        elif is_anchor:  # a conventional codec (icm_helpers.anchors): its whole file is the bitstream, no estimate
            t_enc = time.perf_counter()
            data = codec.encode(x[0])
            t_dec = time.perf_counter()
            x_hat = codec.decode(data, x.shape[-2], x.shape[-1])[None].to(x.device)
            record.update(bpp_bitstream=len(data) * 8.0 / (x.shape[-2] * x.shape[-1]), enc_seconds=t_dec - t_enc,
                          dec_seconds=time.perf_counter() - t_dec)
            record["psnr"] = float(-10 * torch.log10(torch.mean((x_hat - x) ** 2).clamp_min(1e-10)))
        else:
            xp, pad = pad_to_multiple(x)
            num_pixels = x.shape[-2] * x.shape[-1]
            roi_ctx = (
                roi_latent_scaling(codec, pad_to_multiple(item["roi"][None, None].float())[0], roi_qf, roi_decoder)
                if roi_qf
                else contextlib.nullcontext({"side_bits": 0})
            )
            with roi_ctx as roi_info:
                side_bits = roi_info["side_bits"]  # signalled ROI mask (decoder="rescale"), counted in both rates
                with amp_ctx():
                    out = codec_forward(codec, xp) if amp else codec(xp)
                record["bpp_estimated"] = (float(bits_from_likelihoods(out["likelihoods"])[0]) + side_bits) / num_pixels
                if roi_qf:
                    record["bpp_side_info"] = side_bits / num_pixels
                    record["roi_latent_fraction"] = roi_info["inside_fraction"]
                if bitstream:
                    with torch.autocast(device_type, enabled=False):  # the range coder's inputs: fp32 always
                        t_enc = time.perf_counter()
                        enc = compress_image(codec, xp, reconstruct=decode == "first")
                        record["enc_seconds"] = time.perf_counter() - t_enc
                        if decode == "all" or not per_image:
                            t_dec = time.perf_counter()
                            x_hat = decompress_image(codec, enc)
                            record["dec_seconds"] = time.perf_counter() - t_dec
                            if decode == "first" and not torch.equal(x_hat, enc["x_hat"]):
                                raise RuntimeError(
                                    "the decoder's image differs from the encoder-side reconstruction: the "
                                    "entropy coder is not reproducible here; evaluate with decode='all'"
                                )
                        else:
                            x_hat = enc["x_hat"]
                    record["bpp_bitstream"] = (enc["num_bytes"] * 8.0 + side_bits) / num_pixels
                else:
                    x_hat = out["x_hat"].clamp(0, 1)
            x_hat = crop_to(x_hat, pad)
            record["psnr"] = float(-10 * torch.log10(torch.mean((x_hat - x) ** 2).clamp_min(1e-10)))
        t_task = time.perf_counter()
        with amp_ctx():
            prediction = _to_float(recognizer.predict(x_hat))
        if device_type == "cuda":
            torch.cuda.synchronize()  # the time of the recognizer's kernels, not of their launch
        record["task_seconds"] = time.perf_counter() - t_task  # the recognizer on the decoded image (VCM's nn_task)
        record.update(metric.update(item["image_id"], prediction, item) or {})
        per_image.append(record)
        if log and (i + 1) % 50 == 0 and dist_lib.is_main():
            log(f"  evaluated {i + 1}/{n} images")
    if sharded and dist_lib.is_distributed():
        per_image = dist_lib.unshard(dist_lib.all_gather_object(per_image))
        metric.load_states(dist_lib.all_gather_object(metric.state()))
    summary = _summarize(
        metric, per_image, n, max(dist_lib.all_gather_object(time.time() - t0)) if sharded else time.time() - t0
    )
    if shard is not None:
        summary["metric_state"] = metric.state()
    return summary


def _summarize(metric, per_image: list[dict[str, Any]], n: int, seconds: float) -> dict[str, Any]:
    """The evaluation record: the metric over all images and the mean of each per-image rate / quality value."""
    metrics = metric.compute()
    summary: dict[str, Any] = {"metric_name": metric.name, "metric": metrics[metric.name], "metrics": metrics,
                               "num_images": n, "per_image": per_image, "seconds": seconds}
    for key in ("bpp_estimated", "bpp_bitstream", "psnr", "bpp_side_info", "roi_latent_fraction", *TIMING_KEYS):
        vals = [r[key] for r in per_image if r.get(key) is not None]
        summary[key] = float(np.mean(vals)) if vals else None
    return summary


_FORK_JOB: dict[str, Any] = {}


def _forked_shard(rank_world: tuple[int, int]) -> tuple[list[dict[str, Any]], Any]:
    torch.set_num_threads(1)
    job = _FORK_JOB
    out = evaluate(job["codec"], job["recognizer"], job["dataset"], shard=rank_world, **job["kwargs"])
    return out["per_image"], out["metric_state"]


def _evaluate_forked(codec, recognizer, dataset, metric, n: int, workers: int, **kwargs) -> dict[str, Any]:
    """``evaluate`` over ``workers`` forked processes (the models are shared copy-on-write); results merged in image
    order."""

    t0 = time.time()
    _FORK_JOB.update(codec=codec, recognizer=recognizer, dataset=dataset, kwargs=kwargs)
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_forked_shard, [(r, workers) for r in range(workers)])
    finally:
        _FORK_JOB.clear()
    metric.load_states([st for _, st in parts])
    return {**_summarize(metric, unshard([p for p, _ in parts]), n, time.time() - t0), "workers": workers}
