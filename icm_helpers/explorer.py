"""Explore the bit maps of finished runs (notebook 12): which runs of a task exist on disk, what is missing, and one
view of two runs, as numbers, a picture and a saved figure. Nothing here trains or evaluates a model.

- :func:`discover_runs`: every finished codec of a task in the run directory: the start codec, every ICM run
  (each method of ``icm_helpers.methods``, lambda, alpha and training seed whose folder holds a final codec; every
  path and folder name comes from the experiment's ``run_layout.RunLayout``, ``ex.layout``) and the ROI baseline (the
  w/o-aux codec under the ROI latent scaling) where the task has a QF.
- :func:`missing_inputs`: what the explorer needs and does not find (test images, start codec, recognizer, runs),
  each with the notebook and command that makes it.
- :class:`ViewState`: what one view shows (task, runs A and B, image, hyper-latent, opacity, outlines, zoom
  region, cursor).
- :class:`BitMapExplorer`: maps, decoded images and the recognizer's outputs, cached per (run, image) (one codec
  forward pass gives the y and z maps and the decoded image, so a change of the view alone never runs a codec
  again); :meth:`~BitMapExplorer.view` -> the numbers, :meth:`~BitMapExplorer.render` -> PNG + numbers,
  :meth:`~BitMapExplorer.save` -> PNG, PDF and JSON through ``figures.save_figure``.
- :func:`draw_view`: the picture: run A | run B (maps over the image, one colour scale) | B - A (zero-centred), and
  under them the recognizer's output on each decoded image and on the original; the colour rules are
  ``plots.BitMapScale``, the same as the committed bit-map figures.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torchvision.ops import box_iou
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .adaptive_alpha import ALPHA_MODES
from .aux_branches import AUX_LABELS, AUX_POSITIONS
from .bitmaps import BitMaps, compute_bit_maps, region_split, roi_split
from .codec import load_codec
from .figures import save_figure
from .methods import METHODS, RunId, icm_method_id, run_label
from .plots import BitMapScale, theme
from .run_layout import RUN_FOLDER
from .training.objective import AUX_INITS, OBJECTIVES, IcmSpec

__all__ = ["START", "RunRef", "Missing", "ViewState", "discover_runs", "missing_inputs", "runs_table",
           "RUNS_TABLE_COLUMNS", "BitMapExplorer", "draw_view", "view_numbers", "class_names"]

START = "start"  # the start codec's method id and run key
ROI_PREFIX = "roi_"  # run key of the ROI baseline on a w/o-aux run: "roi_" + that run's key
CACHE_SIZE = 64  # (run, image) entries kept per cache
LABEL_CMAP = "tab20"  # the recognizer's label maps: class c in colour c % 20 (background 0 not drawn)


@dataclass(frozen=True)
class RunRef:
    """One codec to map. ``key``: unique within the task (``"start"``, the run's folder name such as
    ``"aux_enc_warm_lambda1.6_seed1"``, or ``"roi_"`` + the w/o-aux run's folder name); ``label``: what the
    comparer shows; ``roi_qf``: the QF of the ROI latent scaling (ROI baseline only)."""

    key: str
    label: str
    path: Path
    method: str
    lambda_: float | None = None
    alpha: float | None = None
    seed: int | None = None
    roi_qf: float | None = None

    @property
    def cache_key(self) -> tuple[str, float | None]:
        return (str(self.path), self.roi_qf)


@dataclass(frozen=True)
class Missing:
    """Something the explorer needs and does not find, and how to make it."""

    what: str
    detail: str
    fix: str

    def line(self) -> str:
        return f"MISSING {self.what}: {self.detail}\n        make it: {self.fix}"


def _icm_method_fields() -> dict[str, dict[str, Any]]:
    """ICM method id -> the spec fields that give it (the table's entries win over composed names)."""
    out: dict[str, dict[str, Any]] = {}
    for pos, mode, init, labels, objective in itertools.product(AUX_POSITIONS, ALPHA_MODES, AUX_INITS, AUX_LABELS,
                                                                OBJECTIVES):
        try:
            method = icm_method_id(pos, mode, init, labels, objective)
        except ValueError:  # the w/o-aux baseline has no branch to start or label
            continue
        out.setdefault(method, {"aux_position": pos, "alpha_mode": mode, "aux_init": init, "aux_labels": labels,
                                "objective": objective})
    return out


METHOD_FIELDS = _icm_method_fields()


def spec_of_folder(ex, task: str, name: str) -> IcmSpec | None:
    """The ICM run whose folder (``RunLayout.run_path``) is ``name``, or None when ``name`` is not one: the name is
    read with ``run_layout.RUN_FOLDER`` and accepted when the layout names that run's folder ``name``."""
    match = RUN_FOLDER.fullmatch(name)
    fields = METHOD_FIELDS.get(match["method"]) if match else None
    if fields is None:
        return None
    try:
        spec = ex.spec(task, float(match["lambda_"]), fields["aux_position"],
                       float(match["alpha"]) if match["alpha"] else None, fields["alpha_mode"], fields["aux_init"],
                       int(match["seed"]) if match["seed"] else None, fields["aux_labels"], fields["objective"])
    except ValueError:
        return None
    return spec if ex.layout.run_path(spec).name == name else None


def _method_order(method: str) -> int:
    order = list(METHODS)
    return order.index(method) if method in order else len(order)


def _shown_id(run: "RunRef | IcmSpec", default_alpha: float, show_seed: bool) -> RunId:
    """The ids a run's label names: method and lambda, its alpha when not the profile's, its seed when asked."""
    return RunId(run.method, run.lambda_, alpha=None if run.alpha == default_alpha else run.alpha,
                 seed=run.seed if show_seed else None)


def discover_runs(ex, task: str) -> dict[str, RunRef]:
    """Run key -> run, for every finished codec of ``task`` (see the module doc), in the order of the methods table,
    then lambda, alpha and seed. Seeds are named in the labels when the task has runs of more than one seed or of a
    seed other than the profile's."""
    layout = ex.layout
    runs: dict[str, RunRef] = {}
    if layout.start_codec_path.is_file():
        runs[START] = RunRef(START, run_label(RunId(START), naming="short"), layout.start_codec_path, START)
    folder = layout.task_runs_dir(task)
    specs = [spec_of_folder(ex, task, p.name) for p in sorted(folder.iterdir())] if folder.is_dir() else []
    specs = [s for s in specs if s is not None and layout.codec_path(s).is_file()]
    specs.sort(key=lambda s: (_method_order(s.method), s.lambda_, s.alpha, s.seed))
    seeds = {s.seed for s in specs}
    show_seed = len(seeds) > 1 or seeds - {ex.seed} != set()
    default_alpha = float(ex.task_cfg(task)["alpha"])
    for spec in specs:
        key = layout.run_path(spec).name
        runs[key] = RunRef(key, run_label(_shown_id(spec, default_alpha, show_seed), naming="short"),
                           layout.codec_path(spec), spec.method, spec.lambda_, spec.alpha, spec.seed)
    qf = ex.task_cfg(task).get("roi_qf")
    if qf:
        for run in [r for r in runs.values() if r.method == "baseline"]:
            label = run_label(_shown_id(run, default_alpha, show_seed), name=f"ROI (QF {float(qf):g})")
            runs[ROI_PREFIX + run.key] = dataclasses.replace(run, key=ROI_PREFIX + run.key, label=label,
                                                             method="roi", roi_qf=float(qf))
    return runs


def _make_it(ex, *notebooks: str) -> str:
    """The notebooks that make something, and the command that runs them on this profile."""
    command = f".venv/bin/python papermill_runs/run.py --profile {ex.profile} --only {' '.join(notebooks)}"
    target = {"demo": "make demo", "smoke": "make smoke"}.get(ex.profile)
    which = f"notebook{'s' if len(notebooks) > 1 else ''} {', '.join(notebooks)}"
    return f"{which}: `{command}`" + (f" (or `{target}`)" if target else "")


def recognizer_available(ex, task: str) -> bool:
    """A pretrained backend (built from its weights) or the suite's trained recognizer on disk."""
    return ex.cfg["recognizers"][task].get("train") is None or ex.layout.recognizer_path(task).is_file()


def missing_inputs(ex, task: str, runs: dict[str, RunRef] | None = None) -> list[Missing]:
    """What the explorer of ``task`` needs and does not find (empty: everything is there)."""
    out = []
    try:
        ex.dataset("test", task)
    except (FileNotFoundError, ValueError, OSError) as exc:
        out.append(Missing("test images", str(exc).split("\n")[0], _make_it(ex, "01")))
    layout = ex.layout
    if not layout.start_codec_path.is_file():
        out.append(Missing("start codec", f"{layout.start_codec_path} not found", _make_it(ex, "01")))
    if not recognizer_available(ex, task):
        out.append(Missing(f"{task} recognizer", f"{layout.recognizer_path(task)} not found (the maps work without it; "
                           "the recognizer's output is not shown)", _make_it(ex, "01")))
    runs = discover_runs(ex, task) if runs is None else runs
    if not any(r.method != START for r in runs.values()):
        out.append(Missing(f"fine-tuned codecs of {task}", f"no finished run under {layout.task_runs_dir(task)}",
                           _make_it(ex, "02", "03") + "; ROI: 04, aux-dec / aux-task: 05, adaptive alpha: 08, "
                           "seeds and controls: 11"))
    return out


RUNS_TABLE_COLUMNS = ["run key", "shown as", "method", "lambda", "alpha", "seed", "codec"]


def runs_table(runs: dict[str, RunRef], root: Path | None = None) -> list[list[Any]]:
    """Rows of :data:`RUNS_TABLE_COLUMNS` for ``runs`` (codec paths relative to ``root`` when given)."""
    def where(path: Path) -> str:
        return str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:g}"

    return [[r.key, r.label, r.method, num(r.lambda_), num(r.alpha), r.seed, where(r.path)
             + ("" if r.roi_qf is None else f" (ROI scaling, QF {r.roi_qf:g})")] for r in runs.values()]


def class_names(dataset, task: str) -> dict[int, str]:
    """Class id -> name of a test split (COCO-format categories, or a ``class_names`` list); {} when unknown."""
    names = getattr(dataset, "class_names", None)
    if names is not None:
        return dict(enumerate(names))
    coco = getattr(dataset, "coco", None)
    if coco is None:
        return {}
    out = {int(c["id"]): str(c["name"]) for c in coco.loadCats(coco.getCatIds())}
    return {0: "background", **out} if task == "segmentation" else out


@dataclass(frozen=True)
class ViewState:
    """One view of the comparer. ``run_a`` / ``run_b``: run keys of :func:`discover_runs`; ``image``: index in the
    test split; ``region``: the zoom (x0, x1, y0, y1) in pixels, columns x0..x1-1 and rows y0..y1-1 (None: the whole
    image); ``cursor``: the pixel (x, y) whose bits per pixel are read out (None: none)."""

    task: str
    run_a: str
    run_b: str
    image: int = 0
    include_hyper: bool = False
    opacity: float = 0.7
    outlines: bool = True
    region: tuple[int, int, int, int] | None = None
    cursor: tuple[int, int] | None = None

    def replace(self, **changes: Any) -> "ViewState":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown view settings {sorted(unknown)}; valid: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def checked(self, height: int, width: int) -> "ViewState":
        """The state with its region and cursor inside an image of ``height`` x ``width`` (a region that is not a
        non-empty part of it becomes the whole image, a cursor outside it none)."""
        region = self.region
        if region is not None:
            x0, x1, y0, y1 = (int(v) for v in region)
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
            region = (x0, x1, y0, y1) if x0 < x1 and y0 < y1 else None
        cursor = self.cursor
        if cursor is not None and not (0 <= int(cursor[0]) < width and 0 <= int(cursor[1]) < height):
            cursor = None
        return self.replace(region=region, cursor=None if cursor is None else (int(cursor[0]), int(cursor[1])))


def _cached(store: OrderedDict, key: Any, compute: Callable[[], Any]) -> Any:
    """``store[key]``, computed once; the least recently used entries go beyond ``CACHE_SIZE``."""
    if key in store:
        store.move_to_end(key)
        return store[key]
    store[key] = value = compute()
    while len(store) > CACHE_SIZE:
        store.popitem(last=False)
    return value


def _overlay_image(image: np.ndarray) -> np.ndarray:
    """The image under a difference map: grey, so that the red / blue of the difference stay readable."""
    return np.repeat(image.mean(axis=2, keepdims=True), 3, axis=2)


class BitMapExplorer:
    """Runs, images, cached maps and recognizer outputs of one ``Experiment`` (see the module doc).

    ``codec_loader(path) -> codec`` defaults to ``codec.load_codec``; each checkpoint is loaded once.
    ``max_images``: the images offered (default: the profile's ``evaluation.max_images``; None there = the whole
    test split). ``codec_passes`` / ``recognizer_passes`` count the forward passes."""

    def __init__(self, ex, tasks: list[str] | None = None, max_images: int | None = None,
                 codec_loader: Callable[[Path], Any] | None = None):
        self.ex = ex
        self.tasks = ex.tasks("all") if tasks is None else list(tasks)
        self.max_images = ex.max_images() if max_images is None else int(max_images)
        self._load = codec_loader or load_codec
        self._runs: dict[str, dict[str, RunRef]] = {}
        self._codecs: dict[str, Any] = {}
        self._recognizers: dict[str, Any] = {}
        self._maps: OrderedDict = OrderedDict()
        self._predictions: OrderedDict = OrderedDict()
        self._items: OrderedDict = OrderedDict()
        self.codec_passes = self.codec_loads = self.recognizer_passes = 0

    # ------------------------------------------------------------------ what exists
    def runs(self, task: str) -> dict[str, RunRef]:
        """Run key -> run of :func:`discover_runs` (read once per task; :meth:`refresh` reads the disk again)."""
        if task not in self._runs:
            self._runs[task] = discover_runs(self.ex, task)
        return self._runs[task]

    def refresh(self) -> None:
        self._runs.clear()

    def missing(self, task: str) -> list[Missing]:
        return missing_inputs(self.ex, task, self.runs(task))

    def ready_tasks(self) -> list[str]:
        """The tasks with test images and at least one finished codec: what the comparer can show."""
        def has_images(task: str) -> bool:
            try:
                return self.n_images(task) > 0
            except (FileNotFoundError, ValueError, OSError):
                return False

        return [t for t in self.tasks if self.runs(t) and has_images(t)]

    def default_pair(self, task: str) -> tuple[str, str]:
        """w/o aux and the profile's primary aux-enc arm at the task's ablation lambda when both exist, else the
        first and the last run."""
        keys = list(self.runs(task))
        if not keys:
            raise ValueError(f"no finished codec of {task} in {self.ex.run_dir}")
        lam = self.ex.task_cfg(task).get("ablation_lambda") or self.ex.task_cfg(task)["lambdas"][0]
        specs = (self.ex.spec(task, lam, None), self.ex.spec(task, lam, "enc", aux_init=self.ex.aux_inits(task)[0]))
        a, b = (self.ex.layout.run_path(s).name for s in specs)
        return (a if a in keys else keys[0], b if b in keys else keys[-1])

    def dataset(self, task: str):
        return self.ex.dataset("test", task)

    def n_images(self, task: str) -> int:
        n = len(self.dataset(task))
        return n if self.max_images is None else min(n, self.max_images)

    def image_id(self, task: str, index: int) -> Any:
        ids = getattr(self.dataset(task), "ids", None)
        return ids[int(index)] if ids is not None else int(index)

    def find_image(self, task: str, query: str) -> int | None:
        """The index of the first offered image whose id is ``query`` ("#N": the N-th image), else whose file name
        contains it; None when none does."""
        query = str(query).strip()
        n = self.n_images(task)
        if query.startswith("#") and query[1:].isdigit():
            return int(query[1:]) if int(query[1:]) < n else None
        ids = list(getattr(self.dataset(task), "ids", range(n)))[:n]
        hits = [i for i, v in enumerate(ids) if str(v) == query]
        coco = getattr(self.dataset(task), "coco", None)
        if not hits and query and coco is not None:
            hits = [i for i, v in enumerate(ids) if query in str(coco.imgs[v].get("file_name", ""))]
        return hits[0] if hits else None

    def item(self, task: str, index: int) -> dict[str, Any]:
        key = ("shared" if self.ex.shared_data else task, int(index))
        return _cached(self._items, key, lambda: self.dataset(task)[int(index)])

    # ------------------------------------------------------------------ maps and recognizer outputs (cached)
    def codec(self, run: RunRef):
        path = str(run.path)
        if path not in self._codecs:
            self._codecs[path] = self._load(run.path).to(self.ex.device).eval()
            self.codec_loads += 1
        return self._codecs[path]

    def bit_maps(self, task: str, run: RunRef, index: int) -> BitMaps:
        """y and z maps and the decoded image of test image ``index`` under ``run``; computed once."""
        def compute() -> BitMaps:
            item = self.item(task, index)
            self.codec_passes += 1
            return compute_bit_maps(self.codec(run), item["image"], roi=item.get("roi"), roi_qf=run.roi_qf)

        return _cached(self._maps, (run.cache_key, task, int(index)), compute)

    def recognizer(self, task: str):
        """The task's frozen recognizer, or None when it is not on disk (nothing is trained here)."""
        if task not in self._recognizers:
            self._recognizers[task] = self.ex.recognizer(task) if recognizer_available(self.ex, task) else None
        return self._recognizers[task]

    def prediction(self, task: str, run: RunRef | None, index: int) -> dict[str, Any] | None:
        """The recognizer's output on the decoded image of ``run`` (None: on the original image): ``boxes`` /
        ``labels`` / ``scores`` above the recognizer's score threshold (detection) or a ``label_map``
        (segmentation); None without a recognizer."""
        rec = self.recognizer(task)
        if rec is None:
            return None

        def compute() -> dict[str, Any]:
            image = self.item(task, index)["image"] if run is None else torch.from_numpy(
                self.bit_maps(task, run, index).decoded).permute(2, 0, 1)
            self.recognizer_passes += 1
            with torch.no_grad():
                out = rec.predict(image[None].float().to(self.ex.device))
            return _prediction_record(task, out, tuple(image.shape[-2:]), getattr(rec, "score_threshold", 0.5))

        return _cached(self._predictions, (None if run is None else run.cache_key, task, int(index)), compute)

    # ------------------------------------------------------------------ views
    def default_state(self, task: str | None = None) -> ViewState:
        task = task or self.tasks[0]
        a, b = self.default_pair(task)
        h, w = self.item(task, 0)["image"].shape[-2:]
        return ViewState(task, a, b, cursor=(w // 2, h // 2))

    def view(self, state: ViewState) -> dict[str, Any]:
        """The numbers and arrays of one view (see :func:`draw_view`); ``state`` is checked against the image."""
        runs = self.runs(state.task)
        missing = [r for r in (state.run_a, state.run_b) if r not in runs]
        if missing:
            raise ValueError(f"no run {missing} of {state.task} in {self.ex.run_dir}; available: {list(runs)}")
        item = self.item(state.task, state.image)
        state = state.checked(*item["image"].shape[-2:])
        pair = [runs[state.run_a], runs[state.run_b]]
        bms = [self.bit_maps(state.task, r, state.image) for r in pair]
        maps = [b.map(state.include_hyper) for b in bms]
        diff = maps[1] - maps[0]
        mask = None if item.get("roi") is None else np.asarray(item["roi"]).astype(bool)
        has_mask = mask is not None and bool(mask.any())
        region = state.region or (0, maps[0].shape[1], 0, maps[0].shape[0])
        panels = [_panel_numbers(run, b, m, mask if has_mask else None, region, state)
                  for run, b, m in zip(pair, bms, maps)]
        preds = [self.prediction(state.task, r, state.image) for r in pair]
        original = self.prediction(state.task, None, state.image)
        for p, pred in zip(panels, preds):
            p["recognizer"] = _prediction_summary(state.task, pred, original)
        return {
            "state": dataclasses.asdict(state), "image_id": item.get("image_id"), "runs": [r.label for r in pair],
            "image_array": item["image"].permute(1, 2, 0).cpu().numpy().clip(0, 1), "maps": maps, "diff": diff,
            "decoded": [b.decoded for b in bms], "predictions": preds, "original_prediction": original,
            "mask": mask, "boxes": _gt_boxes(item), "class_names": class_names(self.dataset(state.task), state.task),
            "scale": BitMapScale.of(maps, diff), "panels": panels, "region": list(region),
            "diff_mean_bpp": float(diff.mean()), "diff_region_bpp": region_split(diff, None, region)["bpp"],
            "diff_at_cursor": None if state.cursor is None else float(diff[state.cursor[1], state.cursor[0]]),
        }

    def render(self, state: ViewState, dpi: int = 90) -> tuple[bytes, dict[str, Any]]:
        """PNG bytes of the view's figure and its numbers (:func:`view_numbers`)."""
        view = self.view(state)
        buf = io.BytesIO()
        with theme():  # the suite's figure theme, for this figure only
            draw_view(view).savefig(buf, format="png", dpi=dpi)
        return buf.getvalue(), view_numbers(view)

    def save(self, state: ViewState, name: str | None = None, figures_dir: str | Path | None = None
             ) -> dict[str, Path]:
        """"Save this view": ``<figures>/<profile>/<name>.{png,pdf,json}`` through ``figures.save_figure`` (the JSON
        holds the view's numbers and state). ``name`` defaults to ``bit_map_view_<task>_<A>_vs_<B>_image<id>``."""
        view = self.view(state)
        st = view["state"]
        name = name or re.sub(r"[^A-Za-z0-9_.-]", "_",
                              f"bit_map_view_{st['task']}_{st['run_a']}_vs_{st['run_b']}_image{view['image_id']}")
        with theme():
            fig = draw_view(view)
        return save_figure(fig, name, view_numbers(view), self.ex, figures_dir=figures_dir)


def _panel_numbers(run: RunRef, bm: BitMaps, values: np.ndarray, mask: np.ndarray | None,
                   region: tuple[int, int, int, int], state: ViewState) -> dict[str, Any]:
    """One run's numbers: bpp (the part shown, and y + z), share of bits inside the objects, the zoom region's bits
    and their share inside the objects, the value under the cursor."""
    split = roi_split(values, mask) if mask is not None else None
    reg = region_split(values, mask, region)
    return {
        "run": run.label, "key": run.key, "bpp": bm.bpp(state.include_hyper), "bpp_total": bm.bpp(True),
        "inside": split["inside"] if split else None, "mask_area": split["area"] if split else None,
        "region_bits": reg["bits"], "region_bpp": reg["bpp"], "region_share": reg["share_of_image"],
        "region_inside": reg["inside"], "region_mask_area": reg["area"],
        "at_cursor": None if state.cursor is None else float(values[state.cursor[1], state.cursor[0]]),
    }


def _gt_boxes(item: dict[str, Any]) -> list[list[float]]:
    boxes = item.get("boxes")
    return [] if boxes is None else [[float(v) for v in b] for b in torch.as_tensor(boxes).reshape(-1, 4).tolist()]


def _prediction_record(task: str, out: Any, size: tuple[int, int], threshold: float) -> dict[str, Any]:
    """A recognizer's output on one image as plain arrays: detections above ``threshold``, or the label map at the
    image's ``size``."""
    if task == "detection":
        det = out[0]
        keep = det["scores"] >= threshold
        return {"boxes": det["boxes"][keep].float().cpu().numpy(), "labels": det["labels"][keep].cpu().numpy(),
                "scores": det["scores"][keep].float().cpu().numpy()}
    logits = out.float()
    if tuple(logits.shape[-2:]) != size:
        logits = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return {"label_map": logits.argmax(1)[0].cpu().numpy()}


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of [x0, y0, x1, y1] boxes (torchvision's, the detector's own definition)."""
    return box_iou(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).numpy()


def _prediction_summary(task: str, pred: dict[str, Any] | None, original: dict[str, Any] | None) -> str | None:
    """One line on the recognizer's output on a decoded image, against its output on the original image."""
    if pred is None:
        return None
    if task == "detection":
        n, ref = len(pred["boxes"]), original["boxes"]
        boxes = f"{n} box{'' if n == 1 else 'es'}"
        if n == 0 or len(ref) == 0:
            return f"{boxes} (the original: {len(ref)})"
        iou = _box_iou(pred["boxes"], ref)
        same = pred["labels"][:, None] == original["labels"][None, :]
        matched = int(((iou >= 0.5) & same).any(axis=0).sum())
        return f"{boxes}; {matched} of the original's {len(ref)} found (IoU ≥ 0.5, same class)"
    agree = float((pred["label_map"] == original["label_map"]).mean())
    return f"{agree:.1%} of the pixels labelled as on the original"


def view_numbers(view: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of a view: state, runs, per-run numbers, colour scale, region and cursor readouts."""
    keep = ("state", "image_id", "runs", "panels", "region", "diff_mean_bpp", "diff_region_bpp", "diff_at_cursor")
    return {**{k: view[k] for k in keep}, **view["scale"].as_dict(),
            "units": "bits per pixel (bpp) of the estimated rate; shares are fractions of the bits"}


# ---------------------------------------------------------------------------------------------------- drawing
def draw_view(view: dict[str, Any]) -> Figure:
    """Top row: run A | run B (maps over the image on one colour scale) | B - A (zero-centred, red = more bits in
    B); bottom row: the recognizer's output on A's and B's decoded images and on the original. Outlines of the
    objects (mask contour, ground-truth boxes) on every panel when ``outlines``; the zoom region and the cursor
    on every panel."""
    st, scale = view["state"], view["scale"]
    fig = Figure(figsize=(11, 7.4), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True, sharey=True)
    img = view["image_array"]
    for ax, values, p in zip(axes[0, :2], view["maps"], view["panels"]):
        ax.imshow(img, interpolation="nearest")
        im = scale.draw_map(ax, values, alpha=st["opacity"])
        ax.set_title(f"{p['run']}: {p['bpp']:.4f} bpp", fontsize=10)
        ax.set_xlabel(scale.bpp_label(values), fontsize=8)
    scale.colorbar(fig, im, list(axes[0, :2]))
    axes[0, 2].imshow(_overlay_image(img), interpolation="nearest")
    im = scale.draw_diff(axes[0, 2], view["diff"], alpha=st["opacity"])
    axes[0, 2].set_title(f"B − A: {view['diff_mean_bpp']:+.4f} bpp", fontsize=10)
    axes[0, 2].set_xlabel(scale.bpp_label(view["diff"], signed=True), fontsize=8)
    scale.colorbar(fig, im, axes[0, 2], label="Δ bits/pixel (red: more in B)")
    panels = zip(axes[1], [*view["decoded"], img], [*view["predictions"], view["original_prediction"]],
                 [f"A decoded: {view['runs'][0]}", f"B decoded: {view['runs'][1]}", "original"])
    for ax, image, pred, title in panels:
        ax.imshow(image, interpolation="nearest")
        _draw_prediction(ax, pred, view["class_names"])
        ax.set_title(title + ("" if pred is not None else " (no recognizer)"), fontsize=9)
    _legend_of_classes(fig, axes[1], view)
    for ax in axes.flat:
        _decorate(ax, view)
    what = "y + z (hyper-latent)" if st["include_hyper"] else "y (latent)"
    fig.suptitle(f"{st['task']}, image {view['image_id']} (#{st['image']}): bits of {what}; bottom: the "
                 "recognizer's output", fontsize=10)
    return fig


def _decorate(ax, view: dict[str, Any]) -> None:
    """Outlines, cursor and zoom of one panel."""
    st = view["state"]
    if st["outlines"]:
        if view["mask"] is not None and view["mask"].any():
            ax.contour(view["mask"].astype(float), levels=[0.5], colors="white", linewidths=1.0)
        for x0, y0, x1, y1 in view["boxes"]:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow",
                                   linestyle="--", linewidth=1.0))
    if st["cursor"] is not None:
        ax.plot([st["cursor"][0]], [st["cursor"][1]], marker="+", color="magenta", markersize=12, mew=1.5)
    x0, x1, y0, y1 = view["region"]
    ax.set_xlim(x0 - 0.5, x1 - 0.5)
    ax.set_ylim(y1 - 0.5, y0 - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_prediction(ax, pred: dict[str, Any] | None, names: dict[int, str]) -> None:
    if pred is None:
        return
    if "label_map" in pred:
        labels = np.ma.masked_equal(pred["label_map"], 0) % 20  # background (0) stays the image
        ax.imshow(labels, cmap=LABEL_CMAP, vmin=0, vmax=19, alpha=0.55, interpolation="nearest")
        return
    for (x0, y0, x1, y1), lab, score in zip(pred["boxes"], pred["labels"], pred["scores"]):
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.2))
        ax.text(x0, y0, f"{names.get(int(lab), int(lab))} {score:.2f}", color="white", fontsize=7, va="bottom",
                bbox={"facecolor": "red", "alpha": 0.6, "pad": 1, "linewidth": 0}, clip_on=True)


def _legend_of_classes(fig: Figure, axes, view: dict[str, Any]) -> None:
    """Segmentation: the classes present in the label maps, named, below the bottom row (never over the data)."""
    maps = [p["label_map"] for p in [*view["predictions"], view["original_prediction"]] if p and "label_map" in p]
    classes = sorted({int(c) for m in maps for c in np.unique(m)} - {0})
    if not classes:
        return
    cmap = colormaps[LABEL_CMAP]
    handles = [Patch(color=cmap((c % 20) / 19), alpha=0.55, label=view["class_names"].get(c, str(c)))
               for c in classes[:20]]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=8,
               title="recognizer's classes", title_fontsize=8)
