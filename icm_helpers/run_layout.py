"""Where every file of one run directory lives (``runs/<profile>/`` by default): :class:`RunLayout`.

    data/                               the generated world (or prepared dataset) in COCO layout
    models/recognizer_<task>.pt         a frozen recognizer (resumable state: train_state_recognizer_<task>.pt)
    models/codec_start.pt               the codec start point (resumable state: train_state_codec_start.pt)
    icm/<task>/<run>/                   one ICM run: train_state.pt, codec.pt, codec_budget<fraction>.pt,
                                        history.json, timing.json, curve.json
    aux_warm/<task>/<branch>/branch.pt  a branch pre-trained alone (aux_init "warm"), beside its history.json,
                                        timing.json and train_state.pt
    results/<task>/<name>.json          one evaluation record

A run folder is ``<method>_lambda<lambda>`` with ``_alpha<alpha>`` when alpha is not the task's profile alpha and
``_seed<seed>`` when the training seed is not the profile's seed (:data:`RUN_FOLDER` reads one back). A branch folder
is ``<position>[_<labels>]_seed<seed>[_<name>]``: the labels unless "pseudo" (e.g. "shuffled", the control branch),
and the variant name ``tasks.<task>.aux_warm_start.name`` when the profile sets one. A record's file name is its name
with dots written as "p" (``lambda1.6`` -> ``lambda1p6``).

Nothing here reads or writes a file: the layout only names paths.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .config import safe_name
from .registry import check_task

if TYPE_CHECKING:  # annotations only: the layout needs no torch
    from .training.objective import IcmSpec

#: The folder name of an ICM run (``RunLayout.run_path``): method, lambda, then the optional alpha and seed suffixes.
RUN_FOLDER = re.compile(
    r"(?P<method>[a-z_]+?)_lambda(?P<lambda_>[^_]+)(?:_alpha(?P<alpha>[^_]+))?(?:_seed(?P<seed>\d+))?")


class RunLayout:
    """The paths of the run directory ``run_dir`` of a profile whose seed is ``seed`` and whose ``tasks`` block (the
    profile's ``tasks``: each task's ``alpha`` is its default alpha) is read when a path is asked for, so that a
    profile edited after the layout was made names its runs as the edited profile says."""

    def __init__(self, run_dir: str | Path, seed: int, tasks: Mapping[str, Mapping[str, Any]]):
        self.run_dir = Path(run_dir)
        self.seed = int(seed)
        self.tasks = tasks

    # ------------------------------------------------------------------ data and start models
    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def models_dir(self) -> Path:
        return self.run_dir / "models"

    def recognizer_path(self, task: str) -> Path:
        return self.models_dir / f"recognizer_{check_task(task)}.pt"

    def recognizer_train_state(self, task: str) -> Path:
        """The resumable state of a recognizer's training (``task`` as given: not checked)."""
        return self.models_dir / f"train_state_recognizer_{task}.pt"

    @property
    def start_codec_path(self) -> Path:
        """The codec start point (notebook 01)."""
        return self.models_dir / "codec_start.pt"

    @property
    def start_codec_train_state(self) -> Path:
        return self.models_dir / "train_state_codec_start.pt"

    # ------------------------------------------------------------------ ICM runs
    @property
    def icm_root(self) -> Path:
        """The folder of every task's ICM runs (``icm/<task>/<run>/``)."""
        return self.run_dir / "icm"

    def task_runs_dir(self, task: str) -> Path:
        """The folder of a task's ICM runs, one sub-folder per run (:meth:`run_path`)."""
        return self.icm_root / check_task(task)

    def seed_suffix(self, seed: int) -> str:
        """``""`` for the profile's seed, else ``"_seed<seed>"`` (run folders and ROI record names)."""
        return "" if seed == self.seed else f"_seed{seed}"

    def run_path(self, spec: IcmSpec) -> Path:
        """The folder of the ICM run of ``spec`` (see the module doc for its name)."""
        suffix = "" if spec.alpha == self.tasks[check_task(spec.task)]["alpha"] else f"_alpha{spec.alpha:g}"
        suffix += self.seed_suffix(spec.seed)
        return self.task_runs_dir(spec.task) / (spec.run_name + suffix)

    def codec_path(self, spec: IcmSpec) -> Path:
        """The final codec of an ICM run (written when the run is finished)."""
        return self.run_path(spec) / "codec.pt"

    def snapshot_path(self, spec: IcmSpec, fraction: float) -> Path:
        """The codec of ``spec`` saved after ``fraction`` of its training steps (``budget_fractions``)."""
        return self.run_path(spec) / f"codec_budget{fraction:g}.pt"

    def history_path(self, spec: IcmSpec) -> Path:
        return self.run_path(spec) / "history.json"

    # ------------------------------------------------------------------ pre-trained auxiliary branches
    @property
    def aux_warm_root(self) -> Path:
        """The folder of every task's pre-trained branches (``aux_warm/<task>/<branch>/``)."""
        return self.run_dir / "aux_warm"

    @staticmethod
    def warm_branch_name(position: str, seed: int, labels: str = "pseudo", variant: Any = None) -> str:
        """The folder name of a pre-trained branch: ``<position>[_<labels>]_seed<seed>[_<variant>]`` (labels named
        unless "pseudo"; ``variant``: ``aux_warm_start.name``, none when empty)."""
        return (f"{position}{'' if labels == 'pseudo' else '_' + labels}_seed{seed}"
                f"{'_' + safe_name(str(variant), 'aux_warm_start.name') if variant else ''}")

    def warm_branch_path(self, task: str, position: str, seed: int, labels: str = "pseudo",
                         variant: Any = None) -> Path:
        """The state dict file of the ``position`` branch of ``task`` pre-trained with ``seed`` and ``labels``
        (``task`` as given: not checked)."""
        return self.aux_warm_root / task / self.warm_branch_name(position, seed, labels, variant) / "branch.pt"

    # ------------------------------------------------------------------ evaluation records
    @property
    def results_root(self) -> Path:
        """The folder of every task's evaluation records (``results/<task>/<name>.json``)."""
        return self.run_dir / "results"

    def results_dir(self, task: str) -> Path:
        return self.results_root / check_task(task)

    def result_path(self, task: str, name: str) -> Path:
        """The record file of ``name``: dots written as "p", the name checked to be a safe file name."""
        return self.results_dir(task) / f"{safe_name(name.replace('.', 'p'), 'result name')}.json"

    def run_result_name(self, spec: IcmSpec, budget: float | None = None) -> str:
        """The record name of an ICM run: its folder name, plus ``_budget<fraction>`` for a budget snapshot."""
        name = self.run_path(spec).name
        return name if budget is None else name + f"_budget{budget:g}"

    def transfer_result_name(self, spec: IcmSpec, trained_for: str) -> str:
        """The record name of the codec of ``spec`` (trained for ``trained_for``) evaluated by another task."""
        return f"{self.run_path(spec).name}_from_{trained_for}"

    def roi_result_name(self, method: str, qf: float, lambda_: float, seed: int) -> str:
        """The record name of the ROI baseline on the w/o-aux codec of ``lambda_`` and training ``seed``."""
        return f"{method}_qf{qf:g}_lambda{lambda_:g}" + self.seed_suffix(seed)

    @staticmethod
    def anchor_result_name(codec: str, quality: int) -> str:
        """The record name of a conventional codec at one quality (or QP)."""
        return f"{codec}_q{quality}"
