"""THE table of methods: every curve, row and run the suite reports, by the id its records carry (``method``).

One entry = id, what it is (an ICM run: the auxiliary branch's position, the alpha mode and how the branch starts;
or the start codec, the uncompressed reference, the ROI baseline, a conventional anchor), its short name (tables,
ablation, widget), its legend label and plot style. Plots, bit maps, widgets, reports and notebooks read it here;
``IcmSpec.method`` takes an ICM run's id from it.

Code names and colours a run by its ids, never by a display string: :class:`RunId` carries them (method id, lambda,
the task a transferred codec was trained for, alpha, seed), :func:`run_label` is the one function that turns them
into the label a user reads, and :func:`method_color` gives a method's colour from the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .adaptive_alpha import mode_suffix


@dataclass(frozen=True)
class Method:
    id: str
    short: str  # e.g. "w/o aux", "aux-enc": ablation labels, the widget's run names
    label: str  # the legend label of plots
    color: str
    marker: str
    kind: str = "icm"  # icm | start | reference | roi | anchor
    aux_position: str | None = None  # icm: None (w/o aux), "enc", "dec", "task"
    alpha_mode: str = "fixed"  # icm: Eq. 5's fixed alpha, or an adaptive mode (adaptive_alpha.py)
    aux_init: str = "cold"  # icm: the branch starts random ("cold", the paper) or pre-trained ("warm")
    aux_labels: str = "pseudo"  # icm: the branch learns its image's pseudo-labels, or another's ("shuffled": control)
    objective: str = "task"  # icm: fine-tuned for the task (Eq. 4-6) or for MSE (Eq. 2: the positive control)
    linestyle: str = "-"
    markersize: float | None = None

    def style(self) -> dict[str, Any]:
        """matplotlib keyword arguments of its curve."""
        out = {"label": self.label, "color": self.color, "marker": self.marker, "linestyle": self.linestyle}
        return out if self.markersize is None else {**out, "markersize": self.markersize}


METHODS: dict[str, Method] = {m.id: m for m in (
    Method("reference", "uncompressed", "uncompressed (reference)", "gray", "D", kind="reference"),
    Method("start", "start codec", "start codec", "black", "*", kind="start", markersize=11),
    Method("baseline", "w/o aux", "baseline (w/o aux)", "tab:blue", "o"),
    Method("aux_enc", "aux-enc", "w/ aux loss", "tab:red", "s", aux_position="enc"),
    Method("aux_enc_warm", "aux-enc (warm)", "w/ aux loss, warm-started branch", "tab:cyan", "p", aux_position="enc",
           aux_init="warm"),
    # protocol v2: the control branch (shuffled labels) and the positive control (MSE fine-tuning)
    Method("aux_enc_warm_shuffled", "control branch", "w/ aux loss, branch on shuffled labels", "tab:gray", "d",
           aux_position="enc", aux_init="warm", aux_labels="shuffled"),
    Method("mse_finetune", "MSE fine-tune", "fine-tuned for MSE (Eq. 2)", "goldenrod", "v", objective="mse",
           linestyle="--"),
    Method("roi", "ROI", "ROI (decoder as is)", "tab:green", "^", kind="roi"),
    Method("roi_rescale", "ROI (rescale)", "ROI (decoder rescales, mask signalled)", "tab:olive", "v", kind="roi"),
    Method("aux_dec", "aux-dec", "aux-dec", "tab:purple", "D", aux_position="dec"),
    Method("aux_task", "aux-task", "aux-task", "tab:orange", "P", aux_position="task"),
    # beyond the paper: adaptive auxiliary weight (icm_helpers/adaptive_alpha.py, notebook 08)
    Method("aux_enc_gradsim", "aux-enc (grad. sim.)", "w/ aux, gradient-similarity alpha", "tab:brown", "X",
           aux_position="enc", alpha_mode="gradient_similarity"),
    Method("aux_enc_decay", "aux-enc (decay)", "w/ aux, decaying alpha", "tab:pink", "h", aux_position="enc",
           alpha_mode="decay"),
    # conventional anchors (icm_helpers/anchors.py, notebook 04)
    Method("jpeg", "JPEG", "JPEG (Pillow, 4:2:0)", "dimgray", "x", kind="anchor", linestyle=":"),
    Method("webp", "WebP", "WebP (Pillow, 4:2:0)", "darkgray", "+", kind="anchor", linestyle=":"),
    Method("bpg", "BPG", "BPG", "sienna", "1", kind="anchor", linestyle=":"),
    Method("vtm", "VTM", "VTM (intra)", "black", "2", kind="anchor", linestyle=":"),
)}


def icm_method_id(aux_position: str | None, alpha_mode: str = "fixed", aux_init: str = "cold",
                  aux_labels: str = "pseudo", objective: str = "task") -> str:
    """The id of an ICM run: the table's entry for (position, alpha mode, start, branch labels, objective), else the
    composed name ``aux_<position>[_gradsim|_decay][_warm][_shuffled]`` (the same rule the table's ids follow)."""
    key = (aux_position, alpha_mode, aux_init, aux_labels, objective)
    for m in METHODS.values():
        if m.kind == "icm" and (m.aux_position, m.alpha_mode, m.aux_init, m.aux_labels, m.objective) == key:
            return m.id
    if aux_position is None:
        raise ValueError("the w/o-aux baseline has no auxiliary branch: its alpha mode is 'fixed' and its start 'cold'")
    return (f"aux_{aux_position}{mode_suffix(alpha_mode)}{'_warm' if aux_init == 'warm' else ''}"
            f"{'_shuffled' if aux_labels == 'shuffled' else ''}")


def short_name(method_id: str) -> str:
    """The short name of ``method_id`` (the id itself when the table has no entry)."""
    return METHODS[method_id].short if method_id in METHODS else method_id


def arm_name(method_id: str) -> str:
    """The arm an ICM run belongs to in the with / without comparisons (bit maps, notebook 06): "w/o aux" for a
    task-fine-tuned run without a branch, "w/ aux" for one with a branch (whatever its position, start or alpha);
    anything else by its short name ("start codec")."""
    m = METHODS.get(method_id)
    if m is not None and m.kind == "icm" and m.objective == "task":
        return "w/ aux" if m.aux_position is not None else "w/o aux"
    if m is None and method_id.startswith("aux_"):  # a composed ICM id (icm_method_id) outside the table
        return "w/ aux"
    return short_name(method_id)


def method_color(method_id: str | None) -> str | None:
    """The colour of ``method_id`` in the table (None for an id the table does not list)."""
    return METHODS[method_id].color if method_id in METHODS else None


def transfer_method_id(method_id: str, trained_for: str) -> str:
    """The id records carry for a codec of ``method_id`` fine-tuned for task ``trained_for`` and evaluated by another
    task's recognizer (notebook 10, ``Experiment.evaluate_transfer``)."""
    return f"{method_id}_from_{trained_for}"


#: How :func:`run_label` names a method: its id, short name, arm ("w/o aux" / "w/ aux") or legend label.
NAMINGS: dict[str, Callable[[str], str]] = {
    "id": lambda method_id: method_id,
    "short": short_name,
    "arm": arm_name,
    "label": lambda method_id: METHODS[method_id].label if method_id in METHODS else method_id,
}


@dataclass(frozen=True)
class RunId:
    """A run, curve or table row by its ids: ``method`` (an id of :data:`METHODS`, or a composed ICM id), the R-D
    weight ``lambda_`` (None: a single point such as the start codec), ``trained_for`` (a codec judged by another
    task's recognizer: the task it was fine-tuned for), ``alpha`` (named only when it is not the profile's) and
    ``seed`` (named only when the runs shown have several)."""

    method: str
    lambda_: float | None = None
    trained_for: str | None = None
    alpha: float | None = None
    seed: int | None = None

    def record_method(self, evaluated_by: str) -> str:
        """The ``method`` of this run's records under task ``evaluated_by``'s recognizer."""
        if self.trained_for is None or self.trained_for == evaluated_by:
            return self.method
        return transfer_method_id(self.method, self.trained_for)


def run_label(run: RunId, naming: str = "arm", name: str | None = None) -> str:
    """THE display label of a run: its method named by ``naming`` (a key of :data:`NAMINGS`; ``name`` replaces it,
    e.g. "ROI (QF 8)" for the ROI reading of a w/o-aux run), then " (<trained for>)", " λ=<lambda>", " α=<alpha>" and
    " seed <seed>" for the ids it has: "w/o aux λ=0.4", "baseline (detection)", "aux-enc λ=1.6 α=0.3 seed 1".
    Nothing parses a label back: code keeps the :class:`RunId`."""
    text = NAMINGS[naming](run.method) if name is None else name
    if run.trained_for is not None:
        text += f" ({run.trained_for})"
    if run.lambda_ is not None:
        text += f" λ={float(run.lambda_):g}"
    if run.alpha is not None:
        text += f" α={float(run.alpha):g}"
    if run.seed is not None:
        text += f" seed {run.seed}"
    return text
