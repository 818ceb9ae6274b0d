"""Redraw a figures folder from its committed JSON, with today's plot functions: nothing is trained or evaluated.

    python -m icm_helpers.replot study_v1 demo [--figures-dir figures] [--only rd_curves bd_rate_ci]

Every figure's JSON holds the numbers it plotted; this module turns them back into the plot function's input, draws
the figure and writes it through :func:`icm_helpers.figures.save_figure` (PNG, PDF, JSON). The new JSON's
``provenance`` is that of the redraw; the run's own provenance is kept under ``replotted_from``. Tables get their
markdown again (a picture of a table is removed), and the VCM summaries of ``exports/`` take the decode totals of
their per-image CSVs. Figures whose numbers are not in their JSON (the bit maps) are left as they are; the samples
figure re-renders the profile's generated world (deterministic from its seed) and checks its boxes against the JSON.

JSON written before the plot functions stored their titles and rows carries less: those titles and the BD-rate rows
are rebuilt from the sibling JSON files and the profile, as the notebooks built them.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from .bootstrap import short_reason
from .config import load_profile
from .data import SHAPE_CLASSES, SPLITS, WorldSpec, render_image
from .exports import VCM_COLUMNS, total_seconds
from .figures import figures_root, save_figure, save_table
from .io import atomic_write_text, read_json
from .methods import METHODS
from .plots import (BPP_LABELS, plot_bd_matrix, plot_bd_rate_ci, plot_cosines, plot_dose_response,
                    plot_learning_curves, plot_loss_curves, plot_paired_differences, plot_rd_grid, plot_roi_fractions,
                    plot_samples)

__all__ = ["redrawn_figures", "replot_folder", "refresh_vcm_summary", "main"]

_LABEL_TO_METHOD = {m.label: m.id for m in METHODS.values()}
_SEEDED_NAME = re.compile(r"^(?P<method>.+) \(seed (?P<seed>[^)]+)\)$")
_BD_LABEL = re.compile(r"^(?P<task>[^:]+): (?P<label>.+?)(?:, seed (?P<seed>\S+)|, (?P<pooled>pooled over seeds))? "
                       r"vs (?P<anchor>\S+)$")
_OLD_REASON_CHARS = 60  # format_ci once printed the first 60 characters of an undefined BD-rate's reason


class Folder:
    """One figures folder: its JSON files, the profile that made them and where the redrawn files go."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name

    def json(self, name: str) -> dict[str, Any] | None:
        path = self.path / f"{name}.json"
        return read_json(path) if path.is_file() else None

    def profile_name(self, data: dict[str, Any]) -> str:
        """The profile of the run that made the numbers (not of a redraw)."""
        profile = (data.get("replotted_from") or data.get("provenance") or {}).get("profile")
        return (profile.get("name") if isinstance(profile, dict) else profile) or self.name

    def profile(self, data: dict[str, Any]) -> dict[str, Any]:
        return load_profile(self.profile_name(data))


def _seed(text: str | None) -> Any:
    return int(text) if text is not None and text.lstrip("-").isdigit() else text


# ------------------------------------------------------------------------------------------------ R-D curves
def _rd_records(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """``(records, tasks, bpp kinds)`` of an R-D grid's JSON: one record per (task, method, seed, lambda) point."""
    merged: dict[tuple, dict[str, Any]] = {}
    tasks = [t for t, v in data.items() if isinstance(v, dict) and any(k in BPP_LABELS for k in v)]
    keys = [k for k in data[tasks[0]] if k in BPP_LABELS]
    for task in tasks:
        for key in keys:
            panel = data[task][key]
            for name, points in panel.items():
                if not isinstance(points, dict):
                    continue
                match = _SEEDED_NAME.match(name)
                method, seed = (match["method"], _seed(match["seed"])) if match else (name, None)
                for bpp, metric, lam in zip(points["bpp"], points["metric"], points["lambda_"]):
                    record = merged.setdefault((task, method, seed, lam), {
                        "task": task, "method": method, "lambda_": lam, "metric": metric,
                        "metric_name": panel["metric_name"], **({} if seed is None else {"seed": seed})})
                    record[key] = bpp
    return list(merged.values()), tasks, keys


#: The BD-rate tables notebooks 07 and 08 write beside their charts.
BD_TABLES = ("bd_rate_table", "bd_rate_vs_jpeg", "bd_rate_vs_vtm", "bd_rate_vs_mse", "bd_rate_adaptive_alpha")


def _table_reasons(folder: Folder) -> dict[tuple, dict[str, str]]:
    """(task, method, anchor, seed) -> {bpp kind: reason} of the "n/a (reason)" cells of the folder's BD-rate
    tables (the reasons older chart JSON did not keep)."""
    out: dict[tuple, dict[str, str]] = {}
    for table in filter(None, map(folder.json, BD_TABLES)):
        for values in table["rows"]:
            cell = dict(zip(table["columns"], values))
            for column, value in cell.items():
                kind = next((k for k in BPP_LABELS if column.startswith("BD-rate") and f"({k[4:]})" in column), None)
                if kind and isinstance(value, str) and value.startswith("n/a ("):
                    key = (cell["task"], cell["method"], cell["anchor"], cell.get("seed"))
                    out.setdefault(key, {})[kind] = _whole_clause(value)[5:-1]
    return out


def _reasons_of(row: dict[str, Any], reasons: dict[tuple, dict[str, str]]) -> dict[str, str]:
    """The table's reasons for a row; a row read without its seed (one seed) takes its task's and method's."""
    exact = reasons.get((row["task"], row["method"], row["anchor"], row["seed"]))
    loose = [v for k, v in reasons.items() if k[:3] == (row["task"], row["method"], row["anchor"])]
    return exact or (loose[0] if row["seed"] is None and len(loose) == 1 else {})


def _bd_rows_of(data: dict[str, Any], folder: Folder | None = None) -> list[dict[str, Any]]:
    """The BD-rate rows of a ``plot_bd_rate_ci`` JSON: stored as they are, or rebuilt from its labels and panels
    (with the reasons of undefined BD-rates from the folder's tables)."""
    if "rows" in data:
        return data["rows"]
    reasons = _table_reasons(folder) if folder is not None else {}
    rows = []
    for i, label in enumerate(data["labels"]):
        match = _BD_LABEL.match(label)
        if match is None:
            raise ValueError(f"cannot read the BD-rate row label {label!r}")
        row = {"task": match["task"], "method": _LABEL_TO_METHOD.get(match["label"], match["label"]),
               "anchor": match["anchor"], "seed": "pooled" if match["pooled"] else _seed(match["seed"])}
        row.update({key: {"error": reason} for key, reason in _reasons_of(row, reasons).items()})
        row.update({key: entries[i] for key, entries in data["panels"].items() if entries[i] is not None})
        rows.append(row)
    return rows


def _rd_grid(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    records, tasks, keys = _rd_records(data)
    ci = folder.json("bd_rate_ci") if "bd_rates" in data else None
    return plot_rd_grid(records, tasks, keys, bd_rows=_bd_rows_of(ci, folder) if ci else None)


def _bd_rate_ci(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    profile = folder.profile_name(data)
    default = "adaptive alpha: BD-rate with 95% CIs" if "adaptive" in name else "BD-rate with 95% CIs"
    return plot_bd_rate_ci(_bd_rows_of(data, folder), title=data.get("title") or f"{default} ({profile})")


# ------------------------------------------------------------------------------------------------ curves
def _loss_curves(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    curves = {k: v["y"] for k, v in data["curves"].items()}
    first_x = next(iter(data["curves"].values()))["x"][0]
    return plot_loss_curves(curves, ylabel=data["ylabel"], xlabel=data["xlabel"],
                            title=data.get("title") or _loss_title(folder, name), first_x=first_x)


def _loss_title(folder: Folder, name: str) -> str:
    task = name.rsplit("_", 1)[-1]
    if name.startswith("adaptive_alpha_weight"):
        return f"{task}: adaptive auxiliary weight"
    summary = folder.json(f"ablation_summary_{task}") or {}
    return f"{summary.get('title') or task}: validation main loss (Eq. 4)"


#: The method ids of the arms of learning-curve JSON written before it stored them (``methods``): the colours those
#: figures were drawn in.
_LEGACY_CURVE_ARM_METHODS = {"w/o aux": "baseline", "aux-enc": "aux_enc", "control": "aux_enc_warm_shuffled"}


def _learning_curves(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    task = data.get("task") or name.rsplit("_", 1)[-1]
    lam = data.get("lambda_") or folder.profile(data)["tasks"][task]["ablation_lambda"]
    methods = data.get("methods") or _LEGACY_CURVE_ARM_METHODS  # {label: method id}
    ids = {label: methods.get(label, label) for label in data["curves"]}  # an arm without an id: its label
    curves = {ids[label]: {_seed(s): [tuple(p) for p in pts] for s, pts in c["seeds"].items()}
              for label, c in data["curves"].items()}
    result = {"task": task, "lambda_": float(lam), "curves": curves, "labels": {i: label for label, i in ids.items()},
              "differences": data["differences"]}
    return plot_learning_curves(result, title=data.get("title"))


#: The method ids of the branches of cosine JSON written before its rows stored them (``methods``): the colours those
#: figures were drawn in (red: the competent branch and its differences).
_LEGACY_COSINE_BRANCH_METHODS = {"competent": ["aux_enc_warm"], "random": ["aux_enc"],
                                 "control": ["aux_enc_warm_shuffled"],
                                 "competent - control": ["aux_enc_warm", "aux_enc_warm_shuffled"]}


def _cosines(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    task = name.rsplit("_", 1)[-1]
    lam = folder.profile(data)["tasks"][task]["ablation_lambda"]
    rows = [r if "methods" in r else {**r, "methods": _LEGACY_COSINE_BRANCH_METHODS.get(r["branch"], [r["branch"]])}
            for r in data["rows"]]
    fig, new = plot_cosines(rows, title=data.get("title") or f"{task}: cos(G_aux, G_main) on g_a, "
                                                                      f"lambda={lam:g}")
    return fig, {**new, "per_batch": data.get("per_batch")}


def _dose_response(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    curves = {task: {m: [(f, {"bd_rate": b, "ci_low": lo, "ci_high": hi})
                         for f, b, lo, hi in zip(c["budget"], c["bd_rate"], c["ci_low"], c["ci_high"])]
                     for m, c in methods.items()} for task, methods in data["tasks"].items()}
    title = data.get("title") or f"{folder.profile_name(data)}: BD-rate vs the training budget"
    return plot_dose_response(curves, bpp_key=data["bpp_key"], title=title)


# ------------------------------------------------------------------------------------------------ distributions
def _paired_title(folder: Folder, task: str, data: dict[str, Any]) -> str:
    rd = folder.json("rd_aux_vs_baseline") or folder.json("rd_curves") or {}
    names = [n for key in (rd.get(task) or {}).values() for n in key]
    method = "aux_enc_warm" if any(n.startswith("aux_enc_warm") for n in names) else "aux_enc"
    seeds = sorted({_seed(m["seed"]) for n in names if (m := _SEEDED_NAME.match(n))}, key=str)
    seed = seeds[0] if seeds else folder.profile(data).get("seed", 0)
    return f"{folder.profile_name(data)} {task}: per-image {method} minus w/o aux (seed {seed})"


def _paired_differences(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    rows = [{"lambda_": float(lam), key: value} for key, panel in data["panels"].items()
            for lam, value in zip(panel["lambda_"], panel["values"])]
    title = data.get("title") or _paired_title(folder, name.rsplit("_", 1)[-1], data)
    return plot_paired_differences(rows, title=title, keys=list(data["panels"]))


#: The method ids of the groups of bit-fraction JSON written before it stored them (``groups[g]["method"]``): the
#: colours those figures were drawn in.
_LEGACY_ROI_GROUP_METHODS = {"w/o aux": "baseline", "w/ aux": "aux_enc"}


def _roi_summary(data: dict[str, Any]) -> list[dict[str, Any]]:
    """``plot_roi_fractions``'s input from its JSON: the constant lines, then each group's entry per lambda, with the
    method id and paired group the JSON stores (older JSON: the legacy groups' ids, and the paired group read from
    the stored pair label)."""
    area = data.get("mask_area")
    summary = [{"label": label, "lambda_": None, "inside": c, "area": area, "delta_inside": None}
               for label, c in data["constant"].items()]
    for group, g in data["groups"].items():
        paired = data.get("paired", {}).get(group)
        method = g["method"] if "method" in g else _LEGACY_ROI_GROUP_METHODS.get(group)
        for i, lam in enumerate(g["lambda"]):
            entry = {"label": f"{group} λ={lam:g}", "group": group, "lambda_": lam, "area": area, "method": method,
                     "inside": {k: g[k][i] for k in ("mean", "ci_low", "ci_high", "n")}, "delta_inside": None}
            if paired and lam in paired["lambda"]:
                j = paired["lambda"].index(lam)
                entry["delta_inside"] = {k: paired[k][j] for k in ("mean", "ci_low", "ci_high", "n")}
                entry["paired_with"] = paired["paired_with"][j]
                entry["paired_group"] = (paired["paired_group"] if "paired_group" in paired
                                         else str(paired["paired_with"][j]).split(" λ=")[0])
            summary.append(entry)
    return summary


def _roi_fractions(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    fig, new = plot_roi_fractions(_roi_summary(data), title=data.get("title"))
    return fig, {**new, **{k: data[k] for k in ("include_hyper", "skipped_empty_masks", "per_image") if k in data}}


def _transfer_matrix(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    title = data.get("title") or "BD-rate (%) vs JPEG (rows: fine-tuned for; columns: judged by)"
    return plot_bd_matrix(data["cells"], title=title)


# ------------------------------------------------------------------------------------------------ samples
def _world_items(cfg: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The first ``n`` test images of a profile's generated world, as its split returns them (rendered again from
    the seed, 8-bit like the PNG files)."""
    spec = WorldSpec(**cfg["data"]["world"], seed=cfg["seed"])
    rng = np.random.default_rng([spec.seed, SPLITS.index("test")])
    items = []
    for i in range(n):
        img, instances, semantic = render_image(spec, rng)
        pixels = (img * 255 + 0.5).astype(np.uint8).astype(np.float32) / 255.0
        boxes = []
        for inst in instances:
            ys, xs = np.nonzero(inst["mask"])
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
        items.append({"image": torch.from_numpy(pixels).permute(2, 0, 1), "image_id": i + 1,
                      "boxes": torch.tensor(boxes).reshape(-1, 4),
                      "labels": torch.tensor([inst["category_id"] for inst in instances], dtype=torch.int64),
                      "semantic": torch.from_numpy(semantic.astype(np.int64))})
    return items


def _samples(folder: Folder, name: str, data: dict[str, Any]) -> tuple[Figure, dict[str, Any]]:
    cfg = folder.profile(data)
    if cfg["data"]["source"] != "shapes_world":
        raise ValueError(f"{name}: the images of {cfg['data']['source']} are not in the JSON; rerun notebook 01")
    items = _world_items(cfg, len(data["images"]))
    for item, shown in zip(items, data["images"]):
        if item["boxes"].tolist() != shown["boxes"] or item["labels"].tolist() != shown["labels"]:
            raise ValueError(f"{name}: profile {cfg['name']!r} renders another world than the figure shows "
                             f"(image {shown['image_id']}); rerun notebook 01 of the profile that made it")
    names = {i + 1: c for i, c in enumerate(SHAPE_CLASSES[: cfg["data"]["world"]["n_classes"]])}
    return plot_samples(items, n=len(items), class_names=names)


# ------------------------------------------------------------------------------------------------ tables
def _whole_clause(cell: Any) -> Any:
    """A cell "n/a (<reason cut at 60 characters>)" of an older table, with its reason up to the last whole
    clause; any other cell as it is."""
    if not isinstance(cell, str):
        return cell
    match = re.fullmatch(r"n/a \((.*)\)", cell)
    if match is None or len(match[1]) != _OLD_REASON_CHARS:
        return cell
    reason = match[1].rsplit(", ", 1)[0] if ", " in match[1] else match[1].rsplit(" ", 1)[0]
    if reason.count("(") != reason.count(")"):
        reason = reason.split(" (", 1)[0]
    return f"n/a ({short_reason(reason)})"


def _table(folder: Folder, name: str, data: dict[str, Any], root: Path) -> list[str]:
    """Rewrite a table's markdown from its JSON (with whole reasons) and remove any picture of it."""
    rows = [[_whole_clause(c) for c in row] for row in data["rows"]]
    done = []
    if rows != data["rows"] or not (folder.path / f"{name}.md").is_file():
        save_table(name, data["columns"], rows, folder.name, title=data.get("title"), figures_dir=root,
                   float_fmt=data.get("float_fmt", "{:.2f}"),
                   extra={"replotted_from": data.get("replotted_from") or data.get("provenance")})
        done.append(f"{name}.md")
    for ext in ("png", "pdf"):
        picture = folder.path / f"{name}.{ext}"
        if picture.is_file():
            picture.unlink()
            done.append(f"removed {picture.name}")
    return done


# ------------------------------------------------------------------------------------------------ VCM summaries
def _per_image_of(row: dict[str, str], tables: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    """The per-image CSV rows of a summary row: the table whose mean bpp (and estimated bpp) equal the row's."""
    def mean(table, key):
        return float(np.mean([float(r[key]) for r in table]))

    same = [t for t in tables if math.isclose(mean(t, "bpp_bitstream"), float(row["avg_bpp"]), rel_tol=1e-9)]
    if len(same) > 1 and row.get("bpp_estimated"):
        same = [t for t in same if math.isclose(mean(t, "bpp_estimated"), float(row["bpp_estimated"]), rel_tol=1e-9)]
    if len(same) != 1:
        raise ValueError(f"{len(same)} per-image tables match the summary row {row['method']} {row['qp']}")
    return same[0]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def refresh_vcm_summary(path: Path) -> None:
    """Fill a VCM summary's time columns from the per-image CSVs beside it (``exports/<task>/``): ``decode`` from
    the images that were decoded, ``nn_task`` where the images carry ``task_seconds``; other cells as they are."""
    task_dir = path.parent / path.stem.removeprefix("vcm_summary_")
    tables = [_read_csv(p) for p in sorted(task_dir.glob("*.csv")) if p.stem != "reference"]
    rows = _read_csv(path)
    for row in rows:
        per_image = [{k: (float(v) if v else None) for k, v in r.items() if k.endswith("_seconds")}
                     for r in _per_image_of(row, tables)]
        for column, key in (("encode", "enc_seconds"), ("decode", "dec_seconds"), ("nn_task", "task_seconds")):
            total, timed = total_seconds(per_image, key)
            row[column] = "" if total is None else repr(total)
            if column == "decode":
                row["decode_timed_images"] = "" if total is None else str(timed)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(VCM_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{c: row.get(c, "") for c in VCM_COLUMNS} for row in rows])
    atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ the folder
#: Figure name prefix -> the function that redraws it from (folder, name, JSON).
REDRAW: dict[str, Callable[[Folder, str, dict[str, Any]], tuple[Figure, dict[str, Any]]]] = {
    "rd_": _rd_grid,
    "bd_rate_ci": _bd_rate_ci,
    "bd_rate_adaptive_alpha_ci": _bd_rate_ci,
    "ablation_val_loss_": _loss_curves,
    "adaptive_alpha_weight_": _loss_curves,
    "learning_curves_": _learning_curves,
    "gradient_cosines_": _cosines,
    "dose_response": _dose_response,
    "paired_differences_": _paired_differences,
    "bit_fractions_plot_": _roi_fractions,
    "transfer_matrix": _transfer_matrix,
    "data_samples": _samples,
}


def _redraw_of(name: str) -> Callable | None:
    matches = [p for p in REDRAW if name == p or (p.endswith("_") and name.startswith(p))]
    return REDRAW[max(matches, key=len)] if matches else None


def _is_table(data: dict[str, Any]) -> bool:
    return {"columns", "rows", "title"} <= set(data)


def is_figure(json_path: str | Path) -> bool:
    """Whether the JSON file is a figure ``REDRAW`` can draw: its name has a known prefix and it is not a table (a
    table's name may share a figure's prefix, e.g. ``gradient_cosines_table_<task>``)."""
    json_path = Path(json_path)
    return _redraw_of(json_path.stem) is not None and not _is_table(read_json(json_path))


def redrawn_figures(path: str | Path, only: Iterable[str] | None = None) -> Iterator[tuple[str, Figure, dict]]:
    """``(name, figure, data)`` of every figure of the folder ``path`` that ``REDRAW`` knows, drawn from its JSON
    (``data`` keeps the run's provenance as ``replotted_from``); nothing is written. ``only``: these names."""
    folder = Folder(Path(path))
    for json_path in sorted(folder.path.glob("*.json")):
        name = json_path.stem
        if (only and name not in only) or not is_figure(json_path):
            continue
        redraw, data = _redraw_of(name), read_json(json_path)
        fig, new = redraw(folder, name, data)
        yield name, fig, {**new, "replotted_from": data.get("replotted_from") or data.get("provenance")}


def replot_folder(path: str | Path, only: Iterable[str] | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Redraw every figure of the folder ``path`` (e.g. ``figures/study_v1``) that ``REDRAW`` knows, rewrite its
    tables' markdown and its VCM summaries (see the module docstring). ``only``: these names. Returns what was
    written."""
    folder = Folder(Path(path))
    wanted = set(only or [])
    done = []
    for name, fig, data in redrawn_figures(folder.path, wanted):
        save_figure(fig, name, data, folder.name, folder.path.parent)
        plt.close(fig)
        done.append(f"{name}.png")
    for json_path in sorted(folder.path.glob("*.json")):
        name = json_path.stem
        if _redraw_of(name) is not None or (wanted and name not in wanted):
            continue
        data = read_json(json_path)
        if _is_table(data):
            done += _table(folder, name, data, folder.path.parent)
        else:
            log(f"{folder.name}/{name}: left as it is (its numbers are not in its JSON)")
    for summary in sorted((folder.path / "exports").glob("vcm_summary_*.csv")) if not wanted else []:
        refresh_vcm_summary(summary)
        done.append(f"exports/{summary.name}")
    log(f"{folder.name}: {len(done)} files: {', '.join(done)}")
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m icm_helpers.replot", description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="figure folders under --figures-dir (e.g. study_v1 demo)")
    ap.add_argument("--figures-dir", default=None, help="default: the repository's figures/ ($ICM_FIGURES_DIR)")
    ap.add_argument("--only", nargs="+", help="redraw only these figure / table names")
    args = ap.parse_args(argv)
    root = Path(args.figures_dir) if args.figures_dir else figures_root()
    for name in args.folders:
        replot_folder(root / name, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
