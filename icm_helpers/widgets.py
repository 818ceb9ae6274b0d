"""The bit-map comparer: ipywidgets around ``icm_helpers.explorer.BitMapExplorer`` (notebook 12; JupyterLab via
``make lab`` or ``make explore``).

Controls: the task; the image (a slider over the test split's images and a search box: an image id, ``#index``
or part of a file name); run A and run B (every finished run of the task: start codec, each method, lambda and
seed, ROI); the opacity of the maps over the image; the hyper-latent's bits; outlines of the objects (mask
contours, ground-truth boxes); the zoom (x and y ranges in pixels); the cursor (a pixel whose bits per pixel are
read out for both runs and their difference); "save this view" (PNG, PDF and JSON through
``figures.save_figure``). The picture is :func:`icm_helpers.explorer.draw_view`; the table under it gives each
run's bpp, share of bits inside the objects, the zoom region's bits and their share inside the objects, the value
under the cursor and the recognizer's output on the decoded image.

All logic is in the explorer (no widgets, unit-tested); :meth:`BitMapComparer.update` sets controls as a user's
clicks do and redraws once.

Usage in a notebook::

    from icm_helpers.widgets import BitMapComparer
    BitMapComparer.from_experiment(ex).widget     # ex = icm_helpers.experiment.Experiment(profile)
"""
from __future__ import annotations

import contextlib
import html
from pathlib import Path
from typing import Any, Iterator

from .explorer import BitMapExplorer, ViewState

__all__ = ["BitMapComparer", "info_html"]


def _fmt(v: float | None, f: str = "{:.3f}") -> str:
    return "n/a" if v is None else f.format(v)


INFO_COLUMNS = [  # (header, panel key, format, css class)
    ("bpp (shown)", "bpp", "{:.4f}", "icm-bpp"),
    ("bpp (y + z)", "bpp_total", "{:.4f}", ""),
    ("share inside objects", "inside", "{:.3f}", ""),
    ("zoom: bits", "region_bits", "{:.1f}", "icm-region-bits"),
    ("zoom: bpp", "region_bpp", "{:.4f}", ""),
    ("zoom: share of all bits", "region_share", "{:.3f}", ""),
    ("zoom: share inside objects", "region_inside", "{:.3f}", "icm-region-inside"),
    ("bpp at cursor", "at_cursor", "{:.4f}", "icm-cursor"),
]


def info_html(info: dict[str, Any]) -> str:
    """The numbers under the picture (``explorer.view_numbers``): one row per run, then B - A."""
    cell = "style='padding:2px 8px;text-align:right;white-space:nowrap'"
    head = "".join(f"<th style='padding:2px 8px'>{html.escape(h)}</th>" for h, *_ in INFO_COLUMNS)
    rows = ""
    for i, p in enumerate(info["panels"]):
        tds = "".join(f"<td class='{cls}' {cell}>{_fmt(p[key], fmt)}</td>" for _, key, fmt, cls in INFO_COLUMNS)
        rec = html.escape(p["recognizer"] or "no recognizer")
        rows += (f"<tr><td style='padding:2px 8px;white-space:nowrap'>{'AB'[i]}: {html.escape(p['run'])}</td>{tds}"
                 f"<td class='icm-recognizer' style='padding:2px 8px'>{rec}</td></tr>")
    st = info["state"]
    x0, x1, y0, y1 = info["region"]
    cursor = "no cursor" if st["cursor"] is None else (
        f"at the cursor (x={st['cursor'][0]}, y={st['cursor'][1]}) {_fmt(info['diff_at_cursor'], '{:+.4f}')}")
    return (
        f"<table class='icm-bitmap-table' style='border-collapse:collapse'><tr><th>run</th>{head}"
        f"<th style='padding:2px 8px'>recognizer on the decoded image</th></tr>{rows}</table>"
        f"<div class='icm-bitmap-diff'>image {info['image_id']}: B − A = {info['diff_mean_bpp']:+.4f} bpp; in the "
        f"zoom (x {x0}..{x1 - 1}, y {y0}..{y1 - 1}) {info['diff_region_bpp']:+.4f} bpp; {cursor} bpp</div>"
    )


class BitMapComparer:
    """The widget (see module doc). ``widget`` is the box to display; ``update(**changes)`` changes controls.

    State keys (those of :class:`icm_helpers.explorer.ViewState`): ``task``, ``run_a``, ``run_b`` (run keys, e.g.
    "baseline_lambda1.6", "aux_enc_warm_lambda1.6_seed1", "start", "roi_baseline_lambda1.6"), ``image`` (index in
    the test split), ``include_hyper``, ``opacity`` (0..1), ``outlines``, ``region`` ((x0, x1, y0, y1) or None),
    ``cursor`` ((x, y)). ``figures_dir``: where "save this view" writes (default: the suite's figures root)."""

    def __init__(self, explorer: BitMapExplorer, figures_dir: str | Path | None = None, **state: Any):
        import ipywidgets as W  # optional dependency: the notebooks extra (pip install -e '.[notebooks]')

        self.explorer = explorer
        self.figures_dir = figures_dir
        self.renders = 0
        self.last_error: str | None = None
        self.last_info: dict[str, Any] | None = None
        self.last_saved: dict[str, Path] | None = None
        self._quiet = False
        self._task: str | None = None  # the task whose runs and images the controls offer
        self._build(W)
        first = explorer.default_state(state.get("task"))
        with self._batch():
            self._set_task(first.task)
            self._apply(first.replace(**{k: v for k, v in state.items() if k != "task"}))
        for w in self._view_controls:
            w.observe(self._on_view, names="value")
        self.task_w.observe(self._on_task, names="value")
        self.image_w.observe(self._on_image, names="value")
        self.search_w.observe(self._on_search, names="value")
        self.save_w.on_click(lambda _b: self.save())
        self.redraw()

    def _build(self, W) -> None:
        style = {"description_width": "70px"}
        wide = W.Layout(width="420px")
        self.task_w = W.Dropdown(options=self.explorer.tasks, description="task", style=style)
        self.image_w = W.IntSlider(min=0, max=0, description="image #", continuous_update=False, style=style,
                                   layout=wide)
        self.search_w = W.Text(placeholder="image id, #index or file name", description="find", style=style,
                               continuous_update=False)
        self.run_a_w = W.Dropdown(description="run A", style=style, layout=wide)
        self.run_b_w = W.Dropdown(description="run B", style=style, layout=wide)
        self.opacity_w = W.FloatSlider(min=0.0, max=1.0, step=0.05, description="opacity", style=style)
        self.hyper_w = W.Checkbox(description="include hyper-latent z", indent=False)
        self.outlines_w = W.Checkbox(description="outline objects (masks, boxes)", indent=False)
        self.zoom_x_w = W.IntRangeSlider(min=0, max=1, description="zoom x", continuous_update=False, style=style,
                                         layout=wide)
        self.zoom_y_w = W.IntRangeSlider(min=0, max=1, description="zoom y", continuous_update=False, style=style,
                                         layout=wide)
        self.cursor_x_w = W.IntSlider(min=0, max=0, description="cursor x", continuous_update=False, style=style)
        self.cursor_y_w = W.IntSlider(min=0, max=0, description="cursor y", continuous_update=False, style=style)
        self.save_w = W.Button(description="save this view", icon="save")
        self.picture, self.info, self.status = W.Image(format="png"), W.HTML(), W.HTML()
        named = {"task": self.task_w, "image": self.image_w, "search": self.search_w, "run-a": self.run_a_w,
                 "run-b": self.run_b_w, "opacity": self.opacity_w, "hyper": self.hyper_w, "outlines": self.outlines_w,
                 "zoom-x": self.zoom_x_w, "zoom-y": self.zoom_y_w, "cursor-x": self.cursor_x_w,
                 "cursor-y": self.cursor_y_w, "save": self.save_w, "png": self.picture, "info": self.info,
                 "status": self.status}
        for name, w in named.items():
            w.add_class(f"icm-bitmap-{name}")
        self._view_controls = [self.run_a_w, self.run_b_w, self.opacity_w, self.hyper_w, self.outlines_w,
                               self.zoom_x_w, self.zoom_y_w, self.cursor_x_w, self.cursor_y_w]
        self.widget = W.VBox([
            W.HBox([self.task_w, self.image_w, self.search_w]), W.HBox([self.run_a_w, self.run_b_w]),
            W.HBox([self.opacity_w, self.hyper_w, self.outlines_w]), W.HBox([self.zoom_x_w, self.zoom_y_w]),
            W.HBox([self.cursor_x_w, self.cursor_y_w, self.save_w]), self.picture, self.info, self.status])
        self.widget.add_class("icm-bitmap-comparer")

    @classmethod
    def from_experiment(cls, ex, tasks: list[str] | None = None, max_images: int | None = None,
                        figures_dir: str | Path | None = None, **state: Any) -> "BitMapComparer":
        return cls(BitMapExplorer(ex, tasks, max_images=max_images), figures_dir=figures_dir, **state)

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

    def state(self) -> ViewState:
        """The view the controls show (a zoom over the whole image is no zoom)."""
        x, y = self.zoom_x_w.value, self.zoom_y_w.value
        full = (x[0], x[1], y[0], y[1]) == (0, self.zoom_x_w.max, 0, self.zoom_y_w.max)
        return ViewState(self.task_w.value, self.run_a_w.value, self.run_b_w.value, int(self.image_w.value),
                         bool(self.hyper_w.value), float(self.opacity_w.value), bool(self.outlines_w.value),
                         None if full else (x[0], x[1], y[0], y[1]), (self.cursor_x_w.value, self.cursor_y_w.value))

    def _set_task(self, task: str) -> None:
        """The task's runs and images; runs A and B kept when the task has them."""
        ex = self.explorer
        self._task = self.task_w.value = task
        options = [(r.label, key) for key, r in ex.runs(task).items()]  # shown: the label; value: the run key
        keep = (self.run_a_w.value, self.run_b_w.value)
        defaults = ex.default_pair(task)
        self.run_a_w.options, self.run_b_w.options = options, options
        keys = [k for _, k in options]
        self.run_a_w.value, self.run_b_w.value = (k if k in keys else d for k, d in zip(keep, defaults))
        self.image_w.max = max(0, ex.n_images(task) - 1)

    def _fit_image(self) -> None:
        """Zoom and cursor ranges of the current image's size (reset to the whole image and its centre when the
        size changes)."""
        h, w = self.explorer.item(self.task_w.value, self.image_w.value)["image"].shape[-2:]
        if (self.zoom_x_w.max, self.zoom_y_w.max) == (w, h):
            return
        for rng, size in ((self.zoom_x_w, w), (self.zoom_y_w, h)):
            rng.max = max(rng.max, size)
            rng.value = (0, size)
            rng.max = size
        for cur, size in ((self.cursor_x_w, w), (self.cursor_y_w, h)):
            cur.max = max(cur.max, size - 1)
            cur.value = size // 2
            cur.max = size - 1

    def _apply(self, state: ViewState) -> None:
        """Set every control to ``state`` (task, then image, then the rest)."""
        if state.task != self._task:
            self._set_task(state.task)
        self.image_w.value = state.image
        self._fit_image()
        h, w = self.zoom_y_w.max, self.zoom_x_w.max
        state = state.checked(h, w)
        self.run_a_w.value, self.run_b_w.value = state.run_a, state.run_b
        self.opacity_w.value, self.hyper_w.value = state.opacity, state.include_hyper
        self.outlines_w.value = state.outlines
        x0, x1, y0, y1 = state.region or (0, w, 0, h)
        self.zoom_x_w.value, self.zoom_y_w.value = (x0, x1), (y0, y1)
        if state.cursor is not None:
            self.cursor_x_w.value, self.cursor_y_w.value = state.cursor

    def update(self, **changes: Any) -> bytes:
        """Set any of the state keys, redraw once, return the PNG."""
        state = self.state()
        if "task" in changes and changes["task"] != self._task:
            with self._batch():
                self._set_task(changes["task"])
            state = self.state().replace(image=min(state.image, self.image_w.max))
        with self._batch():
            self._apply(state.replace(**changes))
        self.redraw()
        return self.picture.value

    # ------------------------------------------------------------------ events
    def _on_task(self, change) -> None:
        if not self._quiet:
            self.update(task=change["new"])

    def _on_image(self, _change) -> None:
        if self._quiet:
            return
        with self._batch():
            self._fit_image()
        self.redraw()

    def _on_view(self, _change) -> None:
        if not self._quiet:
            self.redraw()

    def _on_search(self, change) -> None:
        if self._quiet or not str(change["new"]).strip():
            return
        index = self.explorer.find_image(self.task_w.value, change["new"])
        if index is None:
            self.status.value = f"<span style='color:#b00'>no image matches {html.escape(str(change['new']))}</span>"
            return
        self.update(image=index)

    def save(self) -> dict[str, Path] | None:
        """Save the current view (PNG, PDF, JSON) through ``figures.save_figure``; the paths go to the status line."""
        try:
            self.last_saved = self.explorer.save(self.state(), figures_dir=self.figures_dir)
        except Exception as exc:  # shown in the widget: a button callback's traceback would be lost in the browser
            self._error(exc)
            return None
        self.status.value = ("<span class='icm-saved'>saved " + ", ".join(html.escape(str(p))
                                                                         for p in self.last_saved.values()) + "</span>")
        return self.last_saved

    def _error(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.status.value = f"<span style='color:#b00'>{html.escape(self.last_error)}</span>"

    def redraw(self) -> None:
        """Render the current state into the picture and the table (errors go to the status line)."""
        try:
            png, info = self.explorer.render(self.state())
        except Exception as exc:  # shown in the widget: a callback's traceback would be lost in the browser log
            self._error(exc)
            return
        self.last_error = None
        self.status.value = ""
        self.last_info = info
        self.picture.value = png
        self.info.value = info_html(info)
        self.renders += 1
