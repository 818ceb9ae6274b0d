"""Tables from evaluation records (``evaluation.evaluate`` / ``eval_cache.evaluate_cached``): a per-image table of one
record (CSV, and Parquet when pyarrow is installed) and a summary table with one row per rate point in the column
layout of MPEG VCM common-test-condition reporting. Every file is written atomically (``io.atomic_write_bytes``):
the whole table is built in memory first, so an error leaves no partial file and the previous file intact.

Per-image table (``per_image_table``): one row per test image, in the record's image order. Columns, in this order:

1. ``image_id``, ``bpp_estimated``, ``bpp_bitstream`` (bits per ORIGINAL pixel), ``psnr`` (dB, of the decoded image
   against the original; empty for the uncompressed reference);
2. the per-image ingredients of the task metric - detection: ``num_detections`` (how many boxes the recognizer
   returned; the boxes themselves stay in the JSON record); segmentation, wide form: ``inter_0 .. inter_<C-1>`` then
   ``union_0 .. union_<C-1>`` (pixel counts of the per-class intersection and union, class index c as in the
   label maps). Each task's columns are a class registered in ``registry.PER_IMAGE_COLUMNS``; the record's task is
   its ``task``, else the task whose class names its ``metric_name`` (mAP / mIoU); any other task has no ingredient
   columns and its per-image lists are copied as JSON text like any other key;
3. every other per-image key (e.g. ``bpp_side_info``, ``roi_latent_fraction``, ``enc_seconds``, ``dec_seconds``) in
   alphabetical order; a key some images lack is empty for them; list / dict values are JSON text.

None is written as an empty cell; floats with Python's shortest round-trip repr (``float(cell)`` gives the stored
value back exactly).

VCM summary (``vcm_summary_rows``): the layout is the per-rate-point ``summary.csv`` that InterDigital's
CompressAI-Vision (the MPEG VCM / FCM common-test-condition evaluation framework) writes for image datasets
(``compressai_vision/run/eval_remote_inference.py``, ``eval_encode_type == "bpp"``) and that its
``scripts/metrics/gen_mpeg_cttc_csv.py`` collects into the CSV pasted into the MPEG reporting template:
``Dataset, qp, avg_bpp, end_accuracy, encode, decode, nn_task``, with ``end_accuracy`` in percent ("accuracy in %
for MPEG template") and the times summed over all images in seconds. The MPEG CTC document and its spreadsheet
template themselves are not openly available (MPEG member access); see ``VCM_COLUMNS`` for how each column is
filled here and the columns added after them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from .io import atomic_write_bytes, atomic_write_text, read_json, to_jsonable
from .registry import PER_IMAGE_COLUMNS

LEADING_COLUMNS = ("image_id", "bpp_estimated", "bpp_bitstream", "psnr")
_REFRESH = ("re-evaluate it with force=True (e.g. Experiment.evaluate_run(spec, force=True), evaluate_start / "
            "evaluate_reference(task, force=True)) so that the record stores its per-image values")

VCM_CORE_COLUMNS = ("Dataset", "qp", "avg_bpp", "end_accuracy", "encode", "decode", "nn_task")
VCM_EXTRA_COLUMNS = ("method", "task", "metric_name", "lambda", "qf", "alpha", "seed", "num_images",
                     "decode_timed_images", "bpp_source", "bpp_estimated", "psnr", "eval_seconds", "profile")
VCM_COLUMNS = VCM_CORE_COLUMNS + VCM_EXTRA_COLUMNS
"""Summary columns. CompressAI-Vision's image-dataset summary first:

- ``Dataset``: the ``dataset`` argument, default ``"<profile>/<task>"`` of the record;
- ``qp``: the rate parameter of the rate point - the record's ``lambda_`` (the R-D weight the codec was fine-tuned
  with; CompressAI-Vision puts the codec's QP / quality index here); empty for the start codec;
- ``avg_bpp``: the record's ``bpp_bitstream`` (real range-coded bytes * 8 / original pixels, the mean over images of
  the per-image bpp, CompressAI's convention) - or ``bpp_estimated`` with ``bpp="estimated"``. CompressAI-Vision
  divides total bits by total pixels instead; both agree when all test images have the same size;
- ``end_accuracy``: the task metric (``metric``: COCO mAP@[.5:.95] or mIoU) x 100, in percent;
- ``encode`` / ``decode`` / ``nn_task``: the per-image ``enc_seconds`` / ``dec_seconds`` / ``task_seconds`` (the
  recognizer on the decoded image) summed over all images (total seconds, as CompressAI-Vision sums its per-image
  timers). When only some images were timed (``evaluation.decode: first`` decodes the first image of each process
  and takes the others' reconstruction from the encoder), the total is their mean times the number of images, and
  ``decode_timed_images`` says how many were decoded; empty when no image has the key (``task_seconds`` is recorded
  by evaluations of this version on).

Then, for this project: ``method``, ``task``, ``metric_name``, ``lambda`` (= qp), ``qf`` (ROI methods), ``alpha``,
``seed``, ``num_images``, ``decode_timed_images``, ``bpp_source`` ("bitstream" or "estimated": which bpp
``avg_bpp`` is), ``bpp_estimated`` (always the entropy-model estimate), ``psnr`` (dB, mean over images),
``eval_seconds`` (the evaluation's wall time, seconds), ``profile``.
"""
_TIME_KEYS = (("encode", "enc_seconds"), ("decode", "dec_seconds"), ("nn_task", "task_seconds"))


# ---------------------------------------------------------------------------------------------------------- cells
def _cell(value: Any) -> Any:
    value = to_jsonable(value)
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), allow_nan=True)
    return value


def _csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return buf.getvalue()


def _label(record: dict[str, Any]) -> str:
    parts = [str(record.get(k)) for k in ("task", "method") if record.get(k) is not None]
    if record.get("lambda_") is not None:
        parts.append(f"lambda={record['lambda_']}")
    return "record " + ("/".join(parts) if parts else "(no task/method)")


def _as_record(record: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    return read_json(record) if isinstance(record, (str, os.PathLike)) else record


# ---------------------------------------------------------------------------------------------------------- per image
@PER_IMAGE_COLUMNS.register("detection")
class DetectionColumns:
    """Detection's per-image ingredient: how many boxes the recognizer returned (the boxes stay in the record)."""

    metric_name = "mAP"

    @staticmethod
    def table(record: dict[str, Any], per_image: list[dict[str, Any]]
              ) -> tuple[list[str], tuple[str, ...], list[dict[str, Any]]]:
        """``(columns, per-image keys they replace, one dict of column values per image)``."""
        missing = sum("detections" not in r for r in per_image)
        if missing:
            raise ValueError(f"{_label(record)}: {missing} of {len(per_image)} images have no per-image detections "
                             f"list ('detections'; evaluated by an older version); {_REFRESH}")
        return ["num_detections"], ("detections",), [{"num_detections": len(r["detections"])} for r in per_image]


@PER_IMAGE_COLUMNS.register("segmentation")
class SegmentationColumns:
    """Segmentation's per-image ingredients: the per-class intersections and unions, wide form."""

    metric_name = "mIoU"

    @staticmethod
    def table(record: dict[str, Any], per_image: list[dict[str, Any]]
              ) -> tuple[list[str], tuple[str, ...], list[dict[str, Any]]]:
        """``(columns, per-image keys they replace, one dict of column values per image)``."""
        missing = sum("seg_intersection" not in r or "seg_union" not in r for r in per_image)
        if missing:
            raise ValueError(f"{_label(record)}: {missing} of {len(per_image)} images have no per-image "
                             f"'seg_intersection' / 'seg_union' lists (evaluated by an older version); {_REFRESH}")
        lengths = {len(r[k]) for r in per_image for k in ("seg_intersection", "seg_union")}
        if len(lengths) != 1:
            raise ValueError(f"{_label(record)}: the per-image 'seg_intersection' / 'seg_union' lists have different "
                             f"lengths {sorted(lengths)}; they must have one entry per class; {_REFRESH}")
        n_classes = lengths.pop()
        columns = [f"inter_{c}" for c in range(n_classes)] + [f"union_{c}" for c in range(n_classes)]
        derived = [{**{f"inter_{c}": v for c, v in enumerate(r["seg_intersection"])},
                    **{f"union_{c}": v for c, v in enumerate(r["seg_union"])}} for r in per_image]
        return columns, ("seg_intersection", "seg_union"), derived


def _task_columns(record: dict[str, Any]) -> Any:
    """The registered per-image columns of the record's task (its ``task``, else the task of its ``metric_name``);
    None for a task without any."""
    task = record.get("task")
    if task in PER_IMAGE_COLUMNS:
        return PER_IMAGE_COLUMNS[task]
    by_metric = {cls.metric_name: cls for cls in PER_IMAGE_COLUMNS.values()}
    return by_metric.get(record.get("metric_name"))


def per_image_table(record: dict[str, Any] | str | os.PathLike) -> tuple[list[str], list[dict[str, Any]]]:
    """``(columns, rows)`` of the per-image table of one evaluation record (a dict or the path of its JSON file); see
    the module docstring for the columns. Raises ValueError naming the fix when the record has no per-image list, or
    lacks the per-image metric lists of its task (records of older versions)."""
    record = _as_record(record)
    per_image = record.get("per_image")
    if not isinstance(per_image, list) or not per_image:
        raise ValueError(f"{_label(record)} has no per-image list ('per_image'): it was stored without per-image "
                         f"values or stripped; {_REFRESH}")
    num_images = record.get("num_images")
    if num_images is not None and len(per_image) != num_images:
        raise ValueError(f"{_label(record)} lists {len(per_image)} images in 'per_image' but num_images={num_images}: "
                         f"the record is inconsistent; {_REFRESH}")
    task_columns = _task_columns(record)
    ingredient_cols: list[str] = []
    consumed: tuple[str, ...] = ()  # per-image keys replaced by the ingredient columns
    derived: list[dict[str, Any]] = [{} for _ in per_image]
    if task_columns is not None:
        ingredient_cols, consumed, derived = task_columns.table(record, per_image)
    fixed = set(LEADING_COLUMNS) | set(ingredient_cols) | set(consumed)
    others = sorted({str(k) for r in per_image for k in r} - fixed)
    columns = list(LEADING_COLUMNS) + ingredient_cols + others
    rows = []
    for d, r in zip(derived, per_image):
        row = {k: r.get(k) for k in LEADING_COLUMNS}
        row.update(d)
        row.update({k: r.get(k) for k in others})
        rows.append(row)
    return columns, rows


def write_per_image_csv(record: dict[str, Any] | str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the per-image table of ``record`` as CSV (header row, then one row per image) atomically to ``path``."""
    columns, rows = per_image_table(record)
    return atomic_write_text(path, _csv_text(columns, rows))


def _pyarrow() -> tuple[Any, Any, str | None]:
    """``(pyarrow, pyarrow.parquet, None)``, or ``(None, None, why)`` when pyarrow cannot be used."""
    try:
        import pyarrow as pa  # optional dependency
        import pyarrow.parquet as pq  # optional dependency
    except ModuleNotFoundError:
        return None, None, "pyarrow is not installed (pip install pyarrow)"
    except ImportError as exc:  # installed but unusable, e.g. built for another NumPy
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        return None, None, f"pyarrow cannot be imported ({first}; install a pyarrow that matches this environment)"
    return pa, pq, None


def write_per_image_parquet(record: dict[str, Any] | str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Write the per-image table as Parquet atomically to ``path``; returns None (and writes nothing) when pyarrow is
    not installed or cannot be imported. Column types are pyarrow's inference; empty cells are nulls; list / dict
    values JSON text."""
    pa, pq, _ = _pyarrow()
    if pa is None:
        return None
    columns, rows = per_image_table(record)
    data = {c: [None if (v := _cell(r.get(c))) == "" else v for r in rows] for c in columns}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(data), sink)
    return atomic_write_bytes(path, sink.getvalue().to_pybytes())


def export_per_image(record: dict[str, Any] | str | os.PathLike, csv_path: str | os.PathLike,
                     parquet: bool = True, log=None) -> dict[str, Any]:
    """Write ``csv_path`` and, when ``parquet`` and pyarrow is usable, the same table beside it as ``.parquet``.

    Returns ``{"csv": Path, "parquet": Path | None, "note": str | None}``; ``note`` says why parquet was skipped (also
    given to ``log``, e.g. ``print``). Never fails for a missing or unusable pyarrow."""
    record = _as_record(record)
    out: dict[str, Any] = {"csv": write_per_image_csv(record, csv_path), "parquet": None, "note": None}
    if parquet:
        target = Path(csv_path).with_suffix(".parquet")
        _, _, why = _pyarrow()
        out["parquet"] = None if why else write_per_image_parquet(record, target)
        if out["parquet"] is None:
            out["note"] = f"{target.name} skipped: {why or 'pyarrow is not usable'}; the CSV is complete"
            if log:
                log(out["note"])
    return out


# ---------------------------------------------------------------------------------------------------------- VCM summary
def total_seconds(per_image: list[dict[str, Any]], key: str) -> tuple[float | None, int]:
    """``(total over all images, images timed)`` of the per-image time ``key``: the sum when every image was timed,
    the mean of the timed ones times the number of images when only some were, ``(None, 0)`` when none was."""
    timed = [float(r[key]) for r in per_image if r.get(key) is not None]
    if not timed:
        return None, 0
    total = sum(timed) if len(timed) == len(per_image) else sum(timed) / len(timed) * len(per_image)
    return float(total), len(timed)


def vcm_row(record: dict[str, Any] | str | os.PathLike, dataset: str | None = None,
            bpp: str = "bitstream") -> dict[str, Any]:
    """One summary row (``VCM_COLUMNS``) of one evaluation record = one rate point. ``bpp``: "bitstream" (default;
    the real coded size) or "estimated". Raises ValueError for a record without that rate (the uncompressed
    reference, or a record evaluated with ``evaluation.bitstream: false``)."""
    record = _as_record(record)
    if bpp not in ("bitstream", "estimated"):
        raise ValueError(f"bpp must be 'bitstream' or 'estimated', got {bpp!r}")
    rate = record.get(f"bpp_{bpp}")
    if rate is None:
        hint = ("it is uncoded (the uncompressed reference has no rate point): leave it out, or pass skip_uncoded=True"
                if record.get("bpp_estimated") is None else
                "it was evaluated without a real bitstream (evaluation.bitstream: false): pass bpp='estimated'")
        raise ValueError(f"{_label(record)} has no bpp_{bpp}: {hint}")
    metric = record.get("metric")
    per_image = record.get("per_image") or []
    row: dict[str, Any] = {
        "Dataset": dataset if dataset is not None else f"{record.get('profile')}/{record.get('task')}",
        "qp": record.get("lambda_"),
        "avg_bpp": float(rate),
        "end_accuracy": None if metric is None else 100.0 * float(metric),
    }
    for column, key in _TIME_KEYS:
        row[column], timed = total_seconds(per_image, key)
        if column == "decode":
            row["decode_timed_images"] = timed if row[column] is not None else None
    row.update({"method": record.get("method"), "task": record.get("task"), "metric_name": record.get("metric_name"),
                "lambda": record.get("lambda_"), "qf": record.get("qf"), "alpha": record.get("alpha"),
                "seed": record.get("seed"), "num_images": record.get("num_images"), "bpp_source": bpp,
                "bpp_estimated": record.get("bpp_estimated"), "psnr": record.get("psnr"),
                "eval_seconds": record.get("seconds"), "profile": record.get("profile")})
    return row


def vcm_summary_rows(records: Iterable[dict[str, Any] | str | os.PathLike], dataset: str | None = None,
                     bpp: str = "bitstream", skip_uncoded: bool = False) -> list[dict[str, Any]]:
    """Summary rows of ``records`` (dicts or JSON paths), sorted by (Dataset, method, avg_bpp, qp): within each method
    the rate points go from the lowest to the highest bpp. ``skip_uncoded``: leave out records without any rate
    (the uncompressed reference) instead of raising."""
    rows = []
    for rec in map(_as_record, records):
        if skip_uncoded and rec.get("bpp_bitstream") is None and rec.get("bpp_estimated") is None:
            continue
        rows.append(vcm_row(rec, dataset=dataset, bpp=bpp))

    def key(row: dict[str, Any]):
        qp = row["qp"]
        return (str(row["Dataset"]), str(row["method"]), row["avg_bpp"],
                math.inf if qp is None else float(qp))

    return sorted(rows, key=key)


def write_vcm_summary_csv(records: Iterable[dict[str, Any] | str | os.PathLike], path: str | os.PathLike,
                          dataset: str | None = None, bpp: str = "bitstream", skip_uncoded: bool = False) -> Path:
    """Write ``vcm_summary_rows(...)`` as CSV (columns ``VCM_COLUMNS``) atomically to ``path``."""
    rows = vcm_summary_rows(records, dataset=dataset, bpp=bpp, skip_uncoded=skip_uncoded)
    return atomic_write_text(path, _csv_text(list(VCM_COLUMNS), rows))
