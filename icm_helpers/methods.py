"""THE table of methods: every curve, row and run the suite reports, by the id its records carry (``method``).

One entry = id, what it is (an ICM run: the auxiliary branch's position, the alpha mode and how the branch starts;
or the start codec, the uncompressed reference, the ROI baseline, a conventional anchor), its short name (tables,
ablation, widget), its legend label and plot style. Plots, bit maps, widgets, reports and notebooks read it here;
``IcmSpec.method`` takes an ICM run's id from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
