"""Interactive comparison of bit-allocation maps (ipywidgets; JupyterLab via ``make lab``, notebook 06).

Two layers, so that the logic is testable without a browser:

- :class:`BitMapExplorer` (no widgets): which runs exist for a task and lambda, the test images, the bit maps
  (cached per (run, image): one codec forward pass gives the y AND z maps, so toggling ``include_hyper``, the
  opacity or switching back to a run/image seen before never runs a codec again), and :meth:`~BitMapExplorer.render`
  -> PNG bytes + the numbers shown. ``codec_passes`` counts the codec forward passes.
- :class:`BitMapComparer`: the widget (dropdowns for task, lambda, image, run A and run B; an opacity slider for
  the map over the image; a checkbox for the hyper-latent's bits) around an explorer. Its :meth:`~BitMapComparer.update`
  sets controls programmatically and redraws once (what a user's clicks do).

The picture: run A's map over the image | run B's map over the image (one colour scale for both) | B - A
(diverging red/blue centred at zero: red = more bits in B). The table under it gives each run's bpp
(estimated, of the map shown and of y + z) and its share of bits inside the object masks.

Usage in a notebook::

    from icm_helpers.widgets import BitMapComparer
    BitMapComparer.from_experiment(ex).widget     # ex = icm_helpers.experiment.Experiment(profile)
"""
from __future__ import annotations

import contextlib
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from matplotlib.figure import Figure

from .bitmaps import BitMaps, compute_bit_maps, roi_split
from .codec import load_codec
from .methods import METHODS, short_name
from .plots import theme

__all__ = ["RunRef", "BitMapExplorer", "BitMapComparer"]

START = "start"  # the start codec's method id


@dataclass(frozen=True)
class RunRef:
    """One codec to map: its checkpoint and, for the ROI baseline, the QF of the latent scaling."""

    label: str
    path: Path
    roi_qf: float | None = None

    @property
    def key(self) -> tuple[str, float | None]:
        return (str(self.path), self.roi_qf)


class BitMapExplorer:
    """Runs, images and cached bit maps of one :class:`~icm_helpers.experiment.Experiment` (see module doc).

    ``codec_loader(path) -> codec`` defaults to :func:`icm_helpers.codec.load_codec`; each checkpoint is loaded
    once. ``max_images`` caps the image list (default 50). Nothing is trained: only finished runs are offered."""

    def __init__(self, ex, tasks: list[str] | None = None, alpha: float | None = None, max_images: int | None = 50,
                 codec_loader: Callable[[Path], Any] | None = None):
        self.ex = ex
        self.tasks = ex.tasks("all") if tasks is None else list(tasks)
        self.alpha = alpha
        self.max_images = max_images
        self._load = codec_loader or load_codec
        self._codecs: dict[str, Any] = {}
        self._maps: dict[tuple, BitMaps] = {}
        self._items: dict[tuple, dict[str, Any]] = {}
        self.codec_passes = 0
        self.codec_loads = 0

    # ------------------------------------------------------------------ what exists
    def lambdas(self, task: str) -> list[float]:
        """The profile's lambdas (and the ablation lambda) for which at least one ICM run of ``task`` exists
        (all of them when none exists: then only the start codec is offered)."""
        tc = self.ex.task_cfg(task)
        lams = sorted(
            {float(v) for v in tc["lambdas"]}
            | ({float(tc["ablation_lambda"])} if tc.get("ablation_lambda") is not None else set())
        )
        trained = [lam for lam in lams if any(run != START for run in self.runs(task, lam))]
        return trained or lams

    def _has_start(self) -> bool:
        return (self.ex.models_dir / "codec_start.pt").is_file()

    def runs(self, task: str, lambda_: float) -> dict[str, RunRef]:
        """Method id -> run for the finished codecs of ``task`` at ``lambda_`` (``icm_helpers.methods``): the start
        codec, every ICM run of the table (w/o aux, aux-enc cold / warm, aux-dec, aux-task, adaptive alpha) and ROI
        (the w/o-aux codec with the ROI latent scaling, when the profile sets a QF)."""
        runs: dict[str, RunRef] = {}
        if self._has_start():
            runs[START] = RunRef(short_name(START), self.ex.models_dir / "codec_start.pt")
        for m in METHODS.values():
            if m.kind != "icm":
                continue
            spec = self.ex.spec(task, lambda_, m.aux_position, self.alpha, m.alpha_mode, m.aux_init,
                                aux_labels=m.aux_labels, objective=m.objective)
            path = self.ex.run_path(spec) / "codec.pt"
            if path.is_file():
                runs[m.id] = RunRef(m.short, path)
        qf = self.ex.task_cfg(task).get("roi_qf")
        if qf and "baseline" in runs:
            runs["roi"] = RunRef(f"ROI (QF {float(qf):g})", runs["baseline"].path, float(qf))
        return runs

    def dataset(self, task: str):
        return self.ex.dataset("test", task)

    def _data_key(self, task: str) -> str:
        return "shared" if getattr(self.ex, "shared_data", False) else task

    def n_images(self, task: str) -> int:
        n = len(self.dataset(task))
        return n if self.max_images is None else min(n, int(self.max_images))

    def image_options(self, task: str) -> list[tuple[str, int]]:
        ids = getattr(self.dataset(task), "ids", None)
        return [(f"#{i}" + (f" (id {ids[i]})" if ids is not None else ""), i) for i in range(self.n_images(task))]

    def item(self, task: str, index: int) -> dict[str, Any]:
        key = (self._data_key(task), int(index))
        if key not in self._items:
            self._items[key] = self.dataset(task)[int(index)]
        return self._items[key]

    # ------------------------------------------------------------------ maps (cached)
    def codec(self, run: RunRef):
        path = str(run.path)
        if path not in self._codecs:
            self._codecs[path] = self._load(run.path).to(self.ex.device).eval()
            self.codec_loads += 1
        return self._codecs[path]

    def bit_maps(self, task: str, run: RunRef, index: int) -> BitMaps:
        """y and z maps of test image ``index`` under ``run``; computed once per (run, image)."""
        key = (run.key, self._data_key(task), int(index))
        if key not in self._maps:
            item = self.item(task, index)
            self._maps[key] = compute_bit_maps(self.codec(run), item["image"], roi=item.get("roi"), roi_qf=run.roi_qf)
            self.codec_passes += 1
        return self._maps[key]

    def view(
        self, task: str, lambda_: float, image: int, run_a: str, run_b: str, include_hyper: bool = False
    ) -> dict[str, Any]:
        """The numbers of one view: image, both maps, B - A, per-run bpp and inside-mask shares, colour limits."""
        runs = self.runs(task, lambda_)
        missing = [r for r in (run_a, run_b) if r not in runs]
        if missing:
            raise ValueError(f"no run {missing} for {task} at lambda={lambda_:g}; available: {list(runs)}")
        item = self.item(task, image)
        bms = [self.bit_maps(task, runs[r], image) for r in (run_a, run_b)]
        maps = [b.map(include_hyper) for b in bms]
        diff = maps[1] - maps[0]
        vmax = max(float(m.max()) for m in maps)
        lim = float(np.abs(diff).max()) or 1.0
        roi = item.get("roi")
        panels = []
        for name, b, m in zip((runs[run_a].label, runs[run_b].label), bms, maps):
            split = roi_split(m, np.asarray(roi)) if roi is not None and np.asarray(roi).any() else None
            panels.append(
                {
                    "run": name,
                    "bpp": b.bpp(include_hyper),
                    "bpp_total": b.bpp(True),
                    "inside": split["inside"] if split else None,
                    "mask_area": split["area"] if split else None,
                }
            )
        return {
            "task": task,
            "lambda_": float(lambda_),
            "image": int(image),
            "image_id": item.get("image_id"),
            "include_hyper": bool(include_hyper),
            "image_array": item["image"].permute(1, 2, 0).cpu().numpy().clip(0, 1),
            "maps": maps,
            "diff": diff,
            "clim": [0.0, vmax if vmax > 0 else 1.0],
            "diff_clim": [-lim, lim],
            "panels": panels,
            "diff_mean_bpp": float(diff.mean()),
        }

    # ------------------------------------------------------------------ drawing
    @staticmethod
    def figure(view: dict[str, Any], opacity: float = 0.7) -> Figure:
        """run A | run B (maps over the image, one colour scale) | B - A (red = more bits in B, centred at 0)."""
        a, b = view["panels"]
        fig = Figure(figsize=(11, 3.7), layout="constrained")
        axes = fig.subplots(1, 3)
        img = view["image_array"]
        for ax, m, p in zip(axes[:2], view["maps"], view["panels"]):
            ax.imshow(img, interpolation="nearest")
            im = ax.imshow(
                m,
                cmap="viridis",
                vmin=view["clim"][0],
                vmax=view["clim"][1],
                alpha=float(opacity),
                interpolation="nearest",
            )
            ax.set_title(f"{p['run']}: {p['bpp']:.4f} bpp", fontsize=10)
        fig.colorbar(im, ax=list(axes[:2]), label="bits/pixel", shrink=0.85)
        axes[2].imshow(img.mean(axis=2), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        im = axes[2].imshow(view["diff"], cmap="RdBu_r", vmin=view["diff_clim"][0], vmax=view["diff_clim"][1],
                            alpha=float(opacity), interpolation="nearest")
        axes[2].set_title(f"{b['run']} − {a['run']}: {view['diff_mean_bpp']:+.4f} bpp", fontsize=10)
        fig.colorbar(im, ax=axes[2], label="Δ bits/pixel (red: more in B)", shrink=0.85)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        what = "y + z (hyper-latent)" if view["include_hyper"] else "y (latent)"
        fig.suptitle(f"{view['task']}, λ={view['lambda_']:g}, image {view['image_id']}: bits of {what}", fontsize=10)
        return fig

    def render(self, task: str, lambda_: float, image: int, run_a: str, run_b: str, include_hyper: bool = False,
               opacity: float = 0.7) -> tuple[bytes, dict[str, Any]]:
        """PNG bytes of the view's figure and its numbers (without arrays)."""
        view = self.view(task, lambda_, image, run_a, run_b, include_hyper)
        buf = io.BytesIO()
        with theme():  # the suite's figure theme, for this figure only
            self.figure(view, opacity).savefig(buf, format="png", dpi=90)
        info = {k: v for k, v in view.items() if k not in ("image_array", "maps", "diff")}
        return buf.getvalue(), info


def _fmt(v: float | None, f: str = "{:.3f}") -> str:
    return "n/a" if v is None else f.format(v)


def info_html(info: dict[str, Any]) -> str:
    """The numbers under the picture: per-run bpp and share of bits inside the object masks."""
    td = "style='padding:2px 12px;text-align:right'"
    rows = "".join(
        f"<tr><td style='padding:2px 12px'>{'AB'[i]}: {html.escape(p['run'])}</td>"
        f"<td class='icm-bpp' {td}>{p['bpp']:.4f}</td>"
        f"<td {td}>{p['bpp_total']:.4f}</td><td {td}>{_fmt(p['inside'])}</td><td {td}>{_fmt(p['mask_area'])}</td></tr>"
        for i, p in enumerate(info["panels"])
    )
    part = "y + z" if info["include_hyper"] else "y"
    th = "style='padding:2px 12px'"
    return (
        f"<table class='icm-bitmap-table' style='border-collapse:collapse'><tr><th {th}>run</th>"
        f"<th {th}>bpp ({part}, shown)</th><th {th}>bpp (y + z)</th><th {th}>share of bits inside objects</th>"
        f"<th {th}>object area</th></tr>{rows}</table>"
        f"<div>image {info['image_id']}: B − A = {info['diff_mean_bpp']:+.4f} bpp</div>"
    )


class BitMapComparer:
    """The widget (see module doc). ``widget`` is the box to display; ``update(**state)`` changes controls.

    State keys: ``task``, ``lambda_``, ``image`` (index in the test split), ``run_a``, ``run_b`` (method ids from
    :meth:`BitMapExplorer.runs`, e.g. "baseline", "aux_enc"), ``opacity`` (0..1, the map over the image),
    ``include_hyper``."""

    def __init__(
        self,
        explorer: BitMapExplorer,
        task: str | None = None,
        lambda_: float | None = None,
        image: int = 0,
        run_a: str | None = "baseline",
        run_b: str | None = "aux_enc",
        opacity: float = 0.7,
        include_hyper: bool = False,
    ):
        import ipywidgets as W  # optional dependency: the notebooks extra (pip install -e '.[notebooks]')

        self.explorer = explorer
        self.renders = 0
        self.last_error: str | None = None
        self.last_info: dict[str, Any] | None = None
        self._quiet = False
        style = {"description_width": "60px"}
        self.task_w = W.Dropdown(options=explorer.tasks, description="task", style=style)
        self.lambda_w = W.Dropdown(description="λ", style=style)
        self.image_w = W.Dropdown(description="image", style=style)
        self.run_a_w = W.Dropdown(description="run A", style=style)
        self.run_b_w = W.Dropdown(description="run B", style=style)
        self.opacity_w = W.FloatSlider(
            value=float(opacity), min=0.0, max=1.0, step=0.05, description="opacity", style=style
        )
        self.hyper_w = W.Checkbox(value=bool(include_hyper), description="include hyper-latent z", indent=False)
        self.picture = W.Image(format="png")
        self.info = W.HTML()
        self.status = W.HTML()
        for w, cls in (
            (self.task_w, "icm-bitmap-task"),
            (self.lambda_w, "icm-bitmap-lambda"),
            (self.image_w, "icm-bitmap-image"),
            (self.run_a_w, "icm-bitmap-run-a"),
            (self.run_b_w, "icm-bitmap-run-b"),
            (self.opacity_w, "icm-bitmap-opacity"),
            (self.hyper_w, "icm-bitmap-hyper"),
            (self.picture, "icm-bitmap-png"),
            (self.info, "icm-bitmap-info"),
            (self.status, "icm-bitmap-status"),
        ):
            w.add_class(cls)
        self.widget = W.VBox([W.HBox([self.task_w, self.lambda_w, self.image_w]), W.HBox([self.run_a_w, self.run_b_w]),
                              W.HBox([self.opacity_w, self.hyper_w]), self.picture, self.info, self.status])
        self.widget.add_class("icm-bitmap-comparer")
        with self._batch():
            self.task_w.value = task or explorer.tasks[0]
            self._sync_task(lambda_, image, run_a, run_b)
        self.task_w.observe(self._on_task, names="value")
        self.lambda_w.observe(self._on_lambda, names="value")
        for w in (self.image_w, self.run_a_w, self.run_b_w, self.opacity_w, self.hyper_w):
            w.observe(self._on_view, names="value")
        self.redraw()

    @classmethod
    def from_experiment(
        cls, ex, tasks: list[str] | None = None, alpha: float | None = None, max_images: int | None = 50, **state
    ) -> "BitMapComparer":
        return cls(BitMapExplorer(ex, tasks, alpha=alpha, max_images=max_images), **state)

    def _ipython_display_(self):  # pragma: no cover - notebook display
        from IPython.display import display  # optional dependency: the notebooks extra (pip install -e '.[notebooks]')

        display(self.widget)

    # ------------------------------------------------------------------ state
    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        quiet, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = quiet

    def state(self) -> dict[str, Any]:
        return {
            "task": self.task_w.value,
            "lambda_": self.lambda_w.value,
            "image": self.image_w.value,
            "run_a": self.run_a_w.value,
            "run_b": self.run_b_w.value,
            "opacity": self.opacity_w.value,
            "include_hyper": self.hyper_w.value,
        }

    def _sync_task(self, lambda_=None, image=None, run_a=None, run_b=None) -> None:
        ex = self.explorer
        task = self.task_w.value
        lams = ex.lambdas(task)
        want = lambda_ if lambda_ is not None else self.lambda_w.value
        if want is None or float(want) not in lams:
            abl = ex.ex.task_cfg(task).get("ablation_lambda")
            want = float(abl) if abl is not None and float(abl) in lams else lams[0]
        self.lambda_w.options = [(f"{v:g}", v) for v in lams]
        self.lambda_w.value = float(want)
        opts = ex.image_options(task)
        self.image_w.options = opts
        idx = image if image is not None else self.image_w.value
        self.image_w.value = idx if idx is not None and 0 <= int(idx) < len(opts) else 0
        self._sync_runs(run_a, run_b)

    def _sync_runs(self, run_a=None, run_b=None) -> None:
        runs = self.explorer.runs(self.task_w.value, self.lambda_w.value)
        if not runs:
            raise ValueError(
                f"no finished codec for {self.task_w.value} at lambda={self.lambda_w.value:g} "
                f"in {self.explorer.ex.run_dir}"
            )
        ids = list(runs)
        a = run_a if run_a is not None else self.run_a_w.value
        b = run_b if run_b is not None else self.run_b_w.value
        self.run_a_w.options = [(r.label, i) for i, r in runs.items()]  # shown: the short name; value: the method id
        self.run_b_w.options = [(r.label, i) for i, r in runs.items()]
        self.run_a_w.value = a if a in ids else ids[0]
        self.run_b_w.value = b if b in ids else ids[-1]

    def update(self, **state) -> bytes:
        """Set any of the state keys (task first, then lambda, then the rest), redraw once, return the PNG."""
        unknown = set(state) - {"task", "lambda_", "image", "run_a", "run_b", "opacity", "include_hyper"}
        if unknown:
            raise ValueError(f"unknown state keys {sorted(unknown)}")
        with self._batch():
            if "task" in state:
                self.task_w.value = state["task"]
                self._sync_task(state.get("lambda_"), state.get("image"), state.get("run_a"), state.get("run_b"))
            elif "lambda_" in state:
                self.lambda_w.value = float(state["lambda_"])
                self._sync_runs(state.get("run_a"), state.get("run_b"))
            for key, w in (
                ("image", self.image_w),
                ("run_a", self.run_a_w),
                ("run_b", self.run_b_w),
                ("opacity", self.opacity_w),
                ("include_hyper", self.hyper_w),
            ):
                if key in state:
                    w.value = state[key]
        self.redraw()
        return self.picture.value

    # ------------------------------------------------------------------ events
    def _on_task(self, _change) -> None:
        if self._quiet:
            return
        with self._batch():
            self._sync_task()
        self.redraw()

    def _on_lambda(self, _change) -> None:
        if self._quiet:
            return
        with self._batch():
            self._sync_runs()
        self.redraw()

    def _on_view(self, _change) -> None:
        if not self._quiet:
            self.redraw()

    def redraw(self) -> None:
        """Render the current state into the picture and the table (errors go to the status line)."""
        try:
            png, info = self.explorer.render(**self.state())
        except Exception as exc:  # shown in the widget: a callback's traceback would be lost in the browser log
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.status.value = f"<span style='color:#b00'>{html.escape(self.last_error)}</span>"
            return
        self.last_error = None
        self.status.value = ""
        self.last_info = info
        self.picture.value = png
        self.info.value = info_html(info)
        self.renders += 1
