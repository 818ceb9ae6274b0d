"""ONE evaluation path for every method (baseline, aux, ROI, start codec, uncompressed reference).

Per test image: pad to a multiple of 64 (Sec. 4.1), run the codec in eval mode for ``bpp_estimated``
(-log2 likelihoods of y and z over the ORIGINAL pixel count), code a real bitstream with CompressAI's range coder
for ``bpp_bitstream`` (bytes of the y and z strings * 8 over the original pixel count; the few bytes of shape
header are not counted, as in CompressAI's own evaluation), decode that bitstream, crop the padding and give the
decoded image to the frozen recognizer. Rates are the mean of the per-image bpp (CompressAI's convention).

Task metrics against the ground truth of the split: detection = COCO mAP@[.5:.95] via pycocotools (AP50 too);
segmentation = mIoU over all classes present in the label maps (background included for the generated world).

Where things are: ``evaluate`` validates its options (``EvalOptions``), picks ONE per-image coder before the loop
(``make_coder``: ``ReferenceCoder`` = the uncompressed image, ``AnchorCoder`` = a conventional codec through the
``anchors.ImageCodec`` protocol, ``LearnedCoder`` = the learned codec: estimated rate, real bitstream, ROI, AMP),
and runs ``_evaluate_images``: per image, the coder returns (decoded image, its record fields), the loop adds the
PSNR and the recognizer's prediction, and the metric (``DetectionMetric`` / ``SegmentationMetric``) adds its
per-image values. ``SegmentationMetric.miou`` is the suite's one mIoU rule (also used by ``bootstrap`` and
``plots``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import multiprocessing as mp
import pickle
import time
import traceback
from typing import Any, Callable, Iterator

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval

from . import distributed as dist_lib
from .anchors import ImageCodec
from .codec import bits_from_likelihoods, codec_forward, compress_latent, crop_to, decompress_batch, decompress_image
from .codec import latent_rate, pad_to_multiple, padded_size
from .config import check_device
from .data import to_device
from .distributed import unshard
from .progress import progress
from .roi import check_roi, roi_latent_scaling
from .precision import fp32_detection_heads, warn_if_slow_bf16
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
        return {
            "mIoU": self.miou(inter, union),
            "pixel_accuracy": float(inter.sum() / max(1, self.confusion.sum())),
            "per_class_iou": (inter / np.maximum(union, 1)).tolist(),
        }

    @staticmethod
    def miou(intersection, union) -> float:
        """THE mIoU rule of the suite, for per-class intersections and unions (pixel counts) of one image, of a split
        (the confusion matrix) or of a bootstrap resample (image-weighted sums): the mean IoU over the classes whose
        union is non-empty (present in the label map or predicted, ignored pixels excluded); 0.0 when no class is
        (no labelled pixel: nothing was recognised). Every per-image or resampled mIoU of the suite is this one."""
        inter, union = np.asarray(intersection, dtype=np.float64), np.asarray(union, dtype=np.float64)
        present = union > 0
        return float((inter[present] / union[present]).mean()) if present.any() else 0.0

    @classmethod
    def image_value(cls, record: dict[str, Any]) -> float:
        """The mIoU of one image from its per-image record (``update``'s ``seg_intersection`` / ``seg_union``)."""
        return cls.miou(record["seg_intersection"], record["seg_union"])


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


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """PSNR (dB) of a decoded image in [0, 1] against the original (MSE floored at 1e-10)."""
    return float(-10 * torch.log10(torch.mean((x_hat - x) ** 2).clamp_min(1e-10)))


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How ``evaluate`` codes and recognises the test images: its keyword arguments (see ``evaluate``)."""

    bitstream: bool = True
    roi_qf: float | None = None
    roi_decoder: str = "as_is"
    max_images: int | None = None
    log: Callable[[str], Any] | None = None
    device: str = "cpu"
    amp: str | None = None
    distributed: bool | None = None
    workers: int = 1
    shard: tuple[int, int] | None = None
    decode: str = "all"
    batch_images: int = 1
    desc: str = ""

    def __post_init__(self):
        warn_if_slow_bf16(self.amp, self.device)

    @classmethod
    def from_profile(cls, evaluation: dict[str, Any] | None, device: str = "cpu", **fields: Any) -> "EvalOptions":
        """The options a profile's ``evaluation`` block sets (``bitstream``, ``decode``, ``amp``, ``batch_images``,
        ``workers``: forked CPU processes, so 1 on another device), then ``fields`` (e.g. ``max_images``, ``desc``)."""
        ec = evaluation or {}
        settings = {"bitstream": bool(ec.get("bitstream", True)), "decode": ec.get("decode", "all"),
                    "amp": ec.get("amp"), "batch_images": ec.get("batch_images", 1), "device": device,
                    "workers": int(ec.get("workers", 1)) if torch.device(device).type == "cpu" else 1}
        return cls(**{**settings, **fields})

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def autocast(self):
        """bf16 autocast with ``amp="bf16"``, else nothing."""
        if self.amp == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


class _OneByOne:
    """``code_batch`` as ``code`` image by image: coders that gain nothing from coding images together."""

    def code_batch(self, items: list[dict[str, Any]], xs: list[torch.Tensor]
                   ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        return [self.code(item, x) for item, x in zip(items, xs)]


class ReferenceCoder(_OneByOne):
    """The uncompressed reference: the recognizer sees the original image; no rate, no PSNR."""

    measures_quality = False

    def code(self, item: dict[str, Any], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return x, {}


class AnchorCoder(_OneByOne):
    """A conventional codec (``anchors.ImageCodec``): its whole file is the bitstream; no estimated rate."""

    measures_quality = True

    def __init__(self, codec: ImageCodec):
        self.codec = codec

    def code(self, item: dict[str, Any], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        t_enc = time.perf_counter()
        data = self.codec.encode(x[0])
        t_dec = time.perf_counter()
        x_hat = self.codec.decode(data, x.shape[-2], x.shape[-1])[None].to(x.device)
        return x_hat, {"bpp_bitstream": len(data) * 8.0 / (x.shape[-2] * x.shape[-1]), "enc_seconds": t_dec - t_enc,
                       "dec_seconds": time.perf_counter() - t_dec}


class LearnedCoder:
    """The learned codec (cheng2020-attn) on one image or a group of images, padded to a multiple of 64 and cropped
    back.

    ``bitstream=False``: CompressAI's forward (``codec_forward`` under AMP) gives the likelihoods (estimated bpp)
    and the decoded image g_s(round(y)). ``bitstream=True``: the analysis transform runs ONCE, y = g_a(x) and
    z = h_a(y) feed both the estimated rate (``codec.latent_rate``: the forward's rate path, the same bits) and the
    wavefront range coder (``codec.compress_latent``); the forward's g_s is not run, since the recognised image is the
    one the decoder rebuilds from the bitstream (``decode="all"``: ``decompress_batch``; ``"first"``: the encoder-side
    reconstruction, the first image also decoded and compared bit for bit). Under ``amp="bf16"`` the estimated rate
    comes from g_a under autocast (as the mixed-precision forward computes it) and the bitstream from an fp32 g_a:
    the range coder's inputs are fp32 always, so there g_a runs twice.

    ``code_batch``: images of one padded size (``_evaluate_images`` groups ``batch_images`` consecutive ones) share
    ONE pass of the wavefront coder over their latents, encoder and decoder; every network (g_a, h_a, h_s, g_s, the
    rate path) still runs image by image, and the wavefront coder's matmuls run per image, so each image's record and
    decoded image equal the ones it gets alone, bit for bit, and each bitstream decodes alone. What a group saves is
    the wavefront loop's per-step overhead (about 230 steps at 832x1088, whatever the group's size). A group's
    encoding / decoding seconds are shared equally by its images (``enc_seconds``, ``dec_seconds``).
    ``roi_qf``: Ahonen et al.'s ROI scaling of the latent (``roi.roi_latent_scaling``) around the whole image; it
    scales each image by its own mask, so ROI images are coded one at a time."""

    measures_quality = True

    def __init__(self, codec, opts: EvalOptions):
        codec.eval()
        self.codec, self.opts = codec, opts
        self.decoded_once = False  # decode="first": the first image this process codes is decoded and compared

    def code(self, item: dict[str, Any], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.code_batch([item], [x])[0]

    @torch.no_grad()
    def code_batch(self, items: list[dict[str, Any]], xs: list[torch.Tensor]
                   ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        opts = self.opts
        if opts.roi_qf and len(xs) > 1:
            return [self.code(item, x) for item, x in zip(items, xs)]
        padded = [pad_to_multiple(x) for x in xs]
        roi_ctx = (
            roi_latent_scaling(self.codec, pad_to_multiple(items[0]["roi"][None, None].float())[0], opts.roi_qf,
                               opts.roi_decoder)
            if opts.roi_qf
            else contextlib.nullcontext({"side_bits": 0})
        )
        with roi_ctx as roi_info:
            if opts.bitstream:
                coded = self._bitstream([xp for xp, _ in padded])
            else:
                coded = [self._forward(xp) for xp, _ in padded]
        return [self._record(x, pad, *out, roi_info) for x, (_, pad), out in zip(xs, padded, coded)]

    def _record(self, x: torch.Tensor, pad, likelihoods: dict[str, torch.Tensor], x_hat: torch.Tensor,
                coded: dict[str, Any], roi_info: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The decoded image cropped back and the image's record fields (rates over its ORIGINAL pixels)."""
        num_pixels = x.shape[-2] * x.shape[-1]
        side_bits = roi_info["side_bits"]  # the signalled ROI mask (decoder="rescale"), counted in both rates
        fields: dict[str, Any] = {
            "bpp_estimated": (float(bits_from_likelihoods(likelihoods)[0]) + side_bits) / num_pixels}
        if self.opts.roi_qf:
            fields["bpp_side_info"] = side_bits / num_pixels
            fields["roi_latent_fraction"] = roi_info["inside_fraction"]
        if coded:
            num_bytes = coded.pop("num_bytes")
            fields.update(coded, bpp_bitstream=(num_bytes * 8.0 + side_bits) / num_pixels)
        return crop_to(x_hat, pad), fields

    def _forward(self, xp: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
        """(likelihoods, g_s(round(y)), {}): CompressAI's forward, no bitstream."""
        with self.opts.autocast():
            out = codec_forward(self.codec, xp) if self.opts.amp else self.codec(xp)
        return out["likelihoods"], out["x_hat"].clamp(0, 1), {}

    def _bitstream(self, xps: list[torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]]:
        """Per image (likelihoods, decoded image, {"enc_seconds", ["dec_seconds"], "num_bytes"}), one fp32 g_a each,
        the group's latents coded (and decoded) in one wavefront pass."""
        codec, opts, n = self.codec, self.opts, len(xps)
        with torch.autocast(opts.device_type, enabled=False):  # the range coder's inputs: fp32 always
            t_enc = time.perf_counter()
            ys = [codec.g_a(xp) for xp in xps]
            zs = [codec.h_a(y) for y in ys]
            encs = compress_latent(codec, torch.cat(ys), torch.cat(zs), reconstruct=opts.decode == "first")
            timing: list[dict[str, Any]] = [{"enc_seconds": (time.perf_counter() - t_enc) / n} for _ in encs]
            x_hats = self._decode(encs, timing)
            if not opts.amp:
                likelihoods = [latent_rate(codec, y, z)[0] for y, z in zip(ys, zs)]  # the forward's rate
        if opts.amp:  # the mixed-precision forward's rate: g_a under autocast, the rate path in fp32
            with opts.autocast():
                likelihoods = [latent_rate(codec, codec.g_a(xp))[0] for xp in xps]
        return [(lk, x_hat, {**t, "num_bytes": enc["num_bytes"]})
                for lk, x_hat, t, enc in zip(likelihoods, x_hats, timing, encs)]

    def _decode(self, encs: list[dict[str, Any]], timing: list[dict[str, Any]]) -> list[torch.Tensor]:
        """The images the decoder rebuilds from ``encs`` (``decode="all"``: all of them decoded in one wavefront
        pass; ``"first"``: the encoder-side reconstructions, the first image of this process decoded and compared)."""
        if self.opts.decode == "all":
            t_dec = time.perf_counter()
            x_hats = list(decompress_batch(self.codec, encs).split(1))
            for t in timing:
                t["dec_seconds"] = (time.perf_counter() - t_dec) / len(encs)
            return x_hats
        if not self.decoded_once:
            t_dec = time.perf_counter()
            x_hat = decompress_image(self.codec, encs[0])
            timing[0]["dec_seconds"] = time.perf_counter() - t_dec
            self.decoded_once = True
            if not torch.equal(x_hat, encs[0]["x_hat"]):
                raise RuntimeError(
                    "the decoder's image differs from the encoder-side reconstruction: the entropy coder is not "
                    "reproducible here; evaluate with decode='all'"
                )
        return [enc["x_hat"] for enc in encs]


def make_coder(codec, opts: EvalOptions):
    """The per-image coder of ``codec``: None -> ``ReferenceCoder``, an ``anchors.ImageCodec`` -> ``AnchorCoder``,
    else (a CompressAI model) ``LearnedCoder``."""
    if codec is None:
        return ReferenceCoder()
    if isinstance(codec, ImageCodec):
        if opts.roi_qf is not None:
            raise ValueError(f"the ROI method scales a learned codec's latent; {codec.name} has none")
        return AnchorCoder(codec)
    return LearnedCoder(codec, opts)


def _check_options(codec, recognizer, opts: EvalOptions) -> None:
    check_device(opts.device)
    if opts.amp not in (None, "bf16"):
        raise ValueError(f"amp must be None or 'bf16', got {opts.amp!r}")
    if opts.amp:
        fp32_detection_heads(recognizer)  # boxes, proposals and NMS in fp32; the backbone in bf16
    if opts.roi_qf is not None and codec is None:
        raise ValueError("roi_qf needs a codec")
    if opts.roi_qf is not None:
        check_roi(opts.roi_qf, opts.roi_decoder)
    if isinstance(opts.batch_images, bool) or not isinstance(opts.batch_images, int) or opts.batch_images < 1:
        raise ValueError(f"batch_images must be an integer >= 1 (images coded together), got {opts.batch_images!r}")
    if opts.decode not in DECODE_MODES:
        raise ValueError(f"unknown decode {opts.decode!r}; valid: {', '.join(DECODE_MODES)}")
    if opts.workers > 1 and opts.device_type != "cpu":
        raise ValueError(
            f"workers={opts.workers} forks CPU worker processes, and a forked process cannot use {opts.device} (CUDA "
            "cannot be re-initialised in a forked subprocess): use workers=1 on a GPU"
        )


@torch.no_grad()
def evaluate(codec, recognizer, dataset, options: EvalOptions | None = None, **settings: Any) -> dict[str, Any]:
    """Evaluate ``codec`` (None = uncompressed reference) + frozen ``recognizer`` on ``dataset``.

    The settings: an ``EvalOptions`` and / or its fields as keywords (a keyword overrides the field), i.e.
    ``evaluate(codec, rec, ds, bitstream=True, roi_qf=None, roi_decoder="as_is", max_images=None, log=None,
    device="cpu", amp=None, distributed=None, workers=1, shard=None, decode="all", batch_images=1, desc="")``.

    ``workers`` > 1 (CPU, single process run): the images are split round-robin over that many forked worker processes
    (one intra-op thread each; CompressAI's autoregressive range coding is serial Python, so processes, not threads,
    speed it up) and merged back in image order, exactly as a torchrun-sharded evaluation is. ``shard=(r, W)``:
    evaluate only images r, r + W, ... (and return the metric's state as "metric_state").

    ``amp="bf16"``: the recognizer and the codec's g_a/g_s under autocast (likelihoods stay fp32); the real
    bitstream (compress/decompress) is always coded in fp32 with autocast off.
    ``distributed`` (default: when running under torchrun, see ``icm_helpers.distributed``): every rank evaluates
    every ``world_size``-th image and the per-image records and metric states are gathered, so every rank returns
    the single-process result (call it on every rank).

    ``decode``: "all" (every bitstream is decoded by CompressAI's decoder and that image is recognised) or "first"
    (the image the decoder rebuilds is computed on the encoder side, ``codec.compress_image(reconstruct=True)``; the
    first image each process codes is also decoded and must be equal to it bit for bit, else a RuntimeError). Both
    give the same records; "first" skips the serial decoder's cost for the other images.

    ``batch_images``: up to that many consecutive test images of one padded size are coded together, in one pass of
    the wavefront coder (``LearnedCoder.code_batch``); the records are the same as one image at a time, bit for bit.

    ``roi_qf``: apply the ROI method of Ahonen et al. with the item's ``roi`` mask (needs the mask at the encoder);
    ``roi_decoder``: "as_is" or "rescale" (see ``icm_helpers.roi``; the signalled mask's bits count in both rates).
    Returns {"bpp_estimated", "bpp_bitstream", "metric_name", "metric", "metrics", "per_image", "seconds"}.
    """

    opts = dataclasses.replace(options or EvalOptions(), **settings)
    _check_options(codec, recognizer, opts)
    sharded = dist_lib.is_distributed() if opts.distributed is None else bool(opts.distributed)
    metric = make_metric(recognizer, dataset)
    n = len(dataset) if opts.max_images is None else min(opts.max_images, len(dataset))
    coder = make_coder(codec, opts)
    if opts.workers > 1 and not sharded and opts.shard is None and n > 1:
        return _evaluate_forked(coder, recognizer, dataset, metric, n, min(opts.workers, n), opts)
    t0 = time.time()
    shard = opts.shard
    indices = list(dist_lib.shard(n) if sharded else range(shard[0], n, shard[1]) if shard else range(n))
    show = dist_lib.is_main() and (shard is None or shard[0] == 0)  # one bar: rank 0 / the first forked worker
    per_image = _evaluate_images(coder, recognizer, dataset, metric, indices, opts, n, show)
    if sharded and dist_lib.is_distributed():
        per_image = dist_lib.unshard(dist_lib.all_gather_object(per_image))
        metric.load_states(dist_lib.all_gather_object(metric.state()))
    summary = _summarize(
        metric, per_image, n, max(dist_lib.all_gather_object(time.time() - t0)) if sharded else time.time() - t0
    )
    if shard is not None:
        summary["metric_state"] = metric.state()
    return summary


@torch.no_grad()
def _evaluate_images(coder, recognizer, dataset, metric, indices: list[int], opts: EvalOptions, n: int,
                     show: bool) -> list[dict[str, Any]]:
    """THE per-image loop: code the images (``batch_images`` consecutive ones of one padded size together), recognise
    each decoded image, let the metric score it; records in the order of ``indices``."""
    per_image = []
    bar = progress(total=len(indices), desc=opts.desc or "evaluate", unit="image") if show else None
    for group in _image_groups(dataset, indices, opts):
        coded = coder.code_batch([item for _, item in group], [item["image"][None] for _, item in group])
        for (i, item), (x_hat, fields) in zip(group, coded):
            record: dict[str, Any] = {"image_id": item["image_id"], **fields}
            if coder.measures_quality:
                record["psnr"] = psnr(x_hat, item["image"][None])
            t_task = time.perf_counter()
            with opts.autocast():
                prediction = _to_float(recognizer.predict(x_hat))
            if opts.device_type == "cuda":
                torch.cuda.synchronize()  # the time of the recognizer's kernels, not of their launch
            record["task_seconds"] = time.perf_counter() - t_task  # the recognizer on the decoded image (nn_task)
            record.update(metric.update(item["image_id"], prediction, item) or {})
            per_image.append(record)
            if bar is not None:
                bar.update(1)
            if opts.log and (i + 1) % 50 == 0 and dist_lib.is_main():
                opts.log(f"  evaluated {i + 1}/{n} images")
    if bar is not None:
        bar.close()
    return per_image


def _image_groups(dataset, indices: list[int], opts: EvalOptions) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """The items of ``indices`` in order, in groups of consecutive ones of one padded size (``codec.padded_size``),
    at most ``opts.batch_images`` each: what ``LearnedCoder.code_batch`` codes in one wavefront pass."""
    group: list[tuple[int, dict[str, Any]]] = []
    for i in indices:
        item = to_device(dataset[i], opts.device)
        if group and (len(group) == opts.batch_images
                      or padded_size(*item["image"].shape[-2:]) != padded_size(*group[0][1]["image"].shape[-2:])):
            yield group
            group = []
        group.append((i, item))
    if group:
        yield group


def _summarize(metric, per_image: list[dict[str, Any]], n: int, seconds: float) -> dict[str, Any]:
    """The evaluation record: the metric over all images and the mean of each per-image rate / quality value."""
    metrics = metric.compute()
    summary: dict[str, Any] = {"metric_name": metric.name, "metric": metrics[metric.name], "metrics": metrics,
                               "num_images": n, "per_image": per_image, "seconds": seconds}
    for key in ("bpp_estimated", "bpp_bitstream", "psnr", "bpp_side_info", "roi_latent_fraction", *TIMING_KEYS):
        vals = [r[key] for r in per_image if r.get(key) is not None]
        summary[key] = float(np.mean(vals)) if vals else None
    return summary


def _forked_shard(conn, coder, recognizer, dataset, metric, indices: list[int], opts: EvalOptions, n: int,
                  show: bool) -> None:
    """A forked worker: its arguments are the parent's objects (inherited, copy-on-write); it sends back
    ("ok", (per-image records, metric state)) or ("error", the exception) through ``conn``."""
    torch.set_num_threads(1)
    try:
        per_image = _evaluate_images(coder, recognizer, dataset, metric, indices, opts, n, show)
        reply: tuple[str, Any] = ("ok", (per_image, metric.state()))
    except BaseException as exc:  # noqa: BLE001 - re-raised in the parent
        reply = ("error", exc)
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its traceback
            reply = ("error", RuntimeError(f"a forked evaluation worker failed:\n{traceback.format_exc()}"))
    conn.send(reply)
    conn.close()


def _evaluate_forked(coder, recognizer, dataset, metric, n: int, workers: int, opts: EvalOptions) -> dict[str, Any]:
    """The images over ``workers`` forked processes (worker r: images r, r + workers, ...; the models are shared
    copy-on-write), each returning its records and metric state through a pipe; merged in image order."""
    t0 = time.time()
    ctx = mp.get_context("fork")
    shard_opts = dataclasses.replace(opts, log=None)
    jobs, parts = [], []
    try:
        for r in range(workers):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_forked_shard, daemon=True,
                               args=(send, coder, recognizer, dataset, metric, list(range(r, n, workers)),
                                     shard_opts, n, r == 0))
            proc.start()
            send.close()  # the parent keeps only the receiving end: a worker that dies gives EOFError, not a hang
            jobs.append((proc, receive))
        for r, (proc, receive) in enumerate(jobs):
            try:
                status, value = receive.recv()
            except EOFError:
                proc.join()
                raise RuntimeError(f"forked evaluation worker {r} died (exit code {proc.exitcode})") from None
            if status == "error":
                raise value
            parts.append(value)
    finally:
        for proc, receive in jobs:
            receive.close()
            if len(parts) < workers:  # a worker failed: stop the others
                proc.terminate()
            proc.join()
    metric.load_states([st for _, st in parts])
    return {**_summarize(metric, unshard([p for p, _ in parts]), n, time.time() - t0), "workers": workers}
