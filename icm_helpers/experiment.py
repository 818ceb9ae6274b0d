"""The experiment of one profile: where everything lives on disk, and the idempotent steps the notebooks call.

Layout under the run directory (``runs/<profile>/`` by default; every path: ``run_layout.RunLayout``):

    data/                         generated world (or prepared dataset) in COCO layout
    models/recognizer_<task>.pt   frozen recognizers (suite backend: trained by notebook 01)
    models/codec_start.pt         codec start point (Eq. 2, MSE)
    icm/<task>/<run>/             ICM training: train_state.pt (resumable), codec.pt (final), history.json
    aux_warm/<task>/<branch>/     auxiliary branches pre-trained alone (aux_init "warm")
    results/<task>/<name>.json    one evaluation record per method and lambda (``result_store.ResultStore``)

Every step is idempotent: finished artefacts are reused (never silently overwritten; ``force=True`` redoes them),
interrupted trainings resume from their last complete epoch. The steps orchestrate; the work is done elsewhere:
ICM training runs in ``icm_runs``, branch pre-training in ``branch_pretraining``, evaluation records reused while
their ``eval_key`` holds in ``eval_cache``, the records themselves in ``result_store``, BD-rate tables in
``bootstrap.bd_rate_table``.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from . import anchors
from . import branch_pretraining
from . import icm_runs
from . import codec as codec_lib
from .adaptive_alpha import check_alpha_mode
from .assets import install_matching
from . import bootstrap
from .config import check_device, load_profile, resolve_data_path, resolve_run_dir, safe_name
from .datasources import DATA_SOURCES
from .eval_cache import evaluate_cached, evaluate_checkpoint
from .io import read_json
from .methods import short_name, transfer_method_id
from .provenance import result_provenance
from .recognizers import build_recognizer, load_recognizer, save_recognizer
from .registry import RESAMPLERS, check_task
from .result_store import ResultStore
from .roi import check_roi
from .run_layout import RunLayout
from .training import (
    IcmSpec,
    TrainConfig,
    train_recognizer,
    train_start_codec,
    validation_terms,
)


class Experiment:
    def __init__(
        self,
        profile: str = "smoke",
        run_dir: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        device: str = "cpu",
        seed: int | None = None,
        log=print,
        use_assets: bool | set[str] = True,
    ):
        self.cfg = load_profile(profile, overrides)
        self.profile = safe_name(self.cfg["name"], "profile name")
        self.seed = int(self.cfg.get("seed", 0) if seed is None else seed)
        self.device = self._check_device(device)
        self.run_dir = resolve_run_dir(self.profile, run_dir)
        self.log = log or (lambda *_: None)
        # every path of the run directory; the profile's tasks block is read when a path is asked for
        self.layout = RunLayout(self.run_dir, self.seed, self.cfg["tasks"])
        # the evaluation records; its log line goes to whatever self.log is when a record is checked
        self.results = ResultStore(self.layout, lambda *a: self.log(*a))
        self._datasets: dict[str, Any] = {}
        self.source = DATA_SOURCES[self.cfg["data"]["source"]](self.cfg["data"], self.seed, self.data_dir)
        self._pretrained: dict[str, Any] = {}
        # shipped recognizers / start codec (icm_helpers.assets) when their provenance matches: True, False, or the
        # names
        # that may be installed (e.g. all but the one being regenerated)
        self.use_assets = use_assets
        if self.cfg.get("threads"):
            torch.set_num_threads(int(self.cfg["threads"]))

    def run_provenance(self, **timing: Any) -> dict[str, Any]:
        """Where a result of this experiment comes from (``icm_helpers.provenance``): git commit and dirty flag, package
        versions, device and threads, the profile's name and the hash of its resolved settings, the seed; ``timing``:
        ``seconds`` / ``started`` / ``ended`` of the result."""
        return result_provenance(self.cfg, profile_name=self.profile, seed=self.seed, device=self.device, **timing)

    @staticmethod
    def _check_device(device: str) -> str:
        return check_device(device)

    # ------------------------------------------------------------------ paths (run_layout.RunLayout)
    @property
    def data_dir(self) -> Path:
        return self.layout.data_dir

    @property
    def models_dir(self) -> Path:
        return self.layout.models_dir

    def tasks(self, task: str = "all") -> list[str]:
        """``"all"`` -> every task of the profile; else the one named task (validated)."""
        return list(self.cfg["tasks"]) if task == "all" else [check_task(task)]

    def max_images(self) -> int | None:
        """THE image count of every evaluation-like step (evaluation records, bit-map tables, the widget's image list):
        the profile's ``evaluation.max_images``, i.e. the first N test images (None = the whole test split)."""
        n = (self.cfg.get("evaluation") or {}).get("max_images")
        return None if n is None else int(n)

    def task_cfg(self, task: str) -> dict[str, Any]:
        return self.cfg["tasks"][check_task(task)]

    def num_classes(self, task: str | None = None) -> int:
        """Foreground classes of ``task`` in the profile's data source."""
        return self.source.num_classes(task)

    def spec(self, task: str, lambda_: float, aux_position: str | None, alpha: float | None = None,
             alpha_mode: str | None = None, aux_init: str | None = None, seed: int | None = None,
             aux_labels: str = "pseudo", objective: str = "task") -> IcmSpec:
        """``alpha_mode``: None = the task's ``alpha_mode`` in the profile (default "fixed", the paper). The w/o-aux
        baseline has no auxiliary term, so it is always "fixed" and "cold" (one baseline serves every mode).
        ``aux_init``: "cold" (default, the paper) or "warm" (``aux_warm_start``). ``seed``: the training seed (default:
        the profile's seed; ``train_seeds`` lists a profile's seeds; the world never depends on it). ``aux_labels``:
        "shuffled" = the control branch; ``objective``: "mse" = the positive control (Eq. 2, ``lambda_`` = Eq. 2's
        lambda; protocol v2)."""
        tc = self.task_cfg(task)
        mode = tc.get("alpha_mode", "fixed") if alpha_mode is None else alpha_mode
        check_alpha_mode(mode)
        return IcmSpec(
            task=task,
            lambda_=float(lambda_),
            aux_position=aux_position,
            alpha=float(tc["alpha"] if alpha is None else alpha),
            add_mse=bool(tc.get("add_mse", False)),
            seed=self.seed if seed is None else int(seed),
            alpha_mode="fixed" if aux_position is None else mode,
            aux_init="cold" if aux_position is None or aux_init is None else aux_init,
            aux_labels=aux_labels,
            objective=objective,
        )

    def train_seeds(self) -> list[int]:
        """The training seeds of every ICM model (``train_seeds`` in the profile; default: the profile's seed alone).
        Each seed changes the branch's initialisation, the data order and the quantisation noise, never the world."""
        return [int(s) for s in self.cfg.get("train_seeds", [self.seed])]

    def aux_inits(self, task: str) -> list[str]:
        """How the aux-enc arm's branch starts, per the profile (``tasks.<task>.aux_inits``; default ["cold"])."""
        return list(self.task_cfg(task).get("aux_inits", ["cold"]))

    def task_runs_dir(self, task: str) -> Path:
        """The folder of a task's ICM runs, one sub-folder per run (:meth:`run_path`)."""
        return self.layout.task_runs_dir(task)

    def run_path(self, spec: IcmSpec) -> Path:
        """The folder of the ICM run of ``spec`` (``RunLayout.run_path``)."""
        return self.layout.run_path(spec)

    def codec_path(self, spec: IcmSpec) -> Path:
        """The final codec of an ICM run (written by :meth:`train` when the run is finished)."""
        return self.layout.codec_path(spec)

    @property
    def start_codec_path(self) -> Path:
        """The codec start point (notebook 01)."""
        return self.layout.start_codec_path

    def result_path(self, task: str, name: str) -> Path:
        return self.layout.result_path(task, name)

    # ------------------------------------------------------------------ data
    @property
    def shared_data(self) -> bool:
        """True when both tasks use the same images (the generated world); False for COCO / Pascal-Context."""
        return self.source.shared

    def prepare_data(self, force: bool = False, download: bool = False) -> dict[str, Any]:
        """Generate (the world) or verify (real datasets) every split of every task (``datasources``)."""
        return self.source.prepare(self.tasks(), force=force, download=download)

    def dataset(self, split: str, task: str | None = None):
        """The ``split`` ("train", "val" = per-epoch validation, "test" = evaluation) of ``task``'s dataset (the
        generated world serves both tasks; COCO 2017 and Pascal-Context-59 need ``task``); built once."""
        key = split if self.shared_data else f"{check_task(task) if task else ''}/{split}"
        if key not in self._datasets:
            self._datasets[key] = self.source.dataset(split, task)
        return self._datasets[key]

    def sample_datasets(self) -> dict[str, Any]:
        """Figure name -> test split to show in notebook 01 (one for the shared world, one per task otherwise)."""
        if self.shared_data:
            return {"data_samples": self.dataset("test")}
        return {f"data_samples_{t}": self.dataset("test", t) for t in self.tasks()}

    # ------------------------------------------------------------------ provenance of trained start models
    def provenance(self, kind: str, task: str | None = None) -> dict[str, Any]:
        """Everything a trained recognizer (``kind="recognizer"``), start codec (``kind="codec"``) or pre-trained
        aux-enc branch (``kind="branch"``) depends on. A shipped file (icm_helpers.assets) is used only when its
        recorded provenance equals this."""
        dc = self.cfg["data"]
        # what the training sees: the world and its TRAIN split (val/test sizes do not change these models)
        base = {
            "data": {
                "source": dc["source"],
                "world": dc.get("world"),
                "train_images": (dc.get("counts") or {}).get("train"),
            },
            "seed": self.seed,
        }
        if kind == "recognizer":
            rc = self.cfg["recognizers"][check_task(task)]
            return {
                **base,
                "task": task,
                "num_classes": self.num_classes(task),
                "backend": rc["backend"],
                "model": rc.get("model", {}),
                "train": rc.get("train"),
            }
        if kind == "codec":
            return {**base, "codec": self.cfg["codec"]}
        if kind == "branch":  # R6v2's pre-trained aux branch: it also sees the validation split (the plateau rule)
            return {**base, "task": task, "val_images": (dc.get("counts") or {}).get("val"),
                    "recognizer": self.provenance("recognizer", task), "codec": self.provenance("codec"),
                    "aux": self.task_cfg(task).get("aux", {}),
                    "warm_start": branch_pretraining.warm_config(self, task)}
        raise ValueError(f"unknown provenance kind {kind!r}; valid: recognizer, codec, branch")

    # ------------------------------------------------------------------ recognizers
    def recognizer_path(self, task: str) -> Path:
        return self.layout.recognizer_path(task)

    def recognizer(self, task: str, force: bool = False):
        """The frozen recognizer of ``task``. Pretrained backends (profile ``train: null``, the paper profile) are
        built with their weights; the suite backend is trained on ground truth first if missing."""
        rc = self.cfg["recognizers"][task]
        if rc.get("train") is None:
            if task not in self._pretrained:
                self._pretrained[task] = (
                    build_recognizer(task, rc["backend"], self.num_classes(task), **rc.get("model", {}))
                    .freeze()
                    .to(self.device)
                )
            return self._pretrained[task]
        path = self.recognizer_path(task)
        if not path.exists() and not force:
            install_matching(self.cfg, f"recognizer_{task}", self.provenance("recognizer", task), path,
                             self.use_assets, self.log)
        if path.exists() and not force:
            return load_recognizer(path, expect_task=task).to(self.device)
        torch.manual_seed(self.seed)
        rec = build_recognizer(task, rc["backend"], self.num_classes(task), **rc.get("model", {})).to(self.device)
        t0 = time.time()
        self.log(f"training the {task} recognizer ({rc['backend']})")
        res = train_recognizer(
            rec,
            self.dataset("train", task),
            TrainConfig.from_dict(rc["train"]),
            self.layout.recognizer_train_state(task),
            seed=self.seed,
            log=self.log,
            device=self.device,
        )
        save_recognizer(path, rec.freeze(), extra={"history": res.history, "seconds": time.time() - t0})
        return rec

    def evaluate_reference(self, task: str, force: bool = False) -> dict[str, Any]:
        """Task metric of the recognizer on the ORIGINAL (uncompressed) test images: the upper bound."""
        return evaluate_cached(self, task, "reference", None, {"method": "reference"}, force,
                               codec_factory=lambda: None, codec_key=None)

    # ------------------------------------------------------------------ codec start point
    def start_codec(self, force: bool = False):
        path = self.start_codec_path
        if not path.exists() and not force:
            install_matching(self.cfg, "codec_start", self.provenance("codec"), path, self.use_assets, self.log)
        if path.exists() and not force:
            return codec_lib.load_codec(path).to(self.device)
        cc = self.cfg["codec"]
        if cc.get("weights") or cc.get("pretrained"):  # the paper: CompressAI's pretrained cheng2020-attn (Sec. 4.1)
            weights = str(resolve_data_path(cc["weights"])) if cc.get("weights") else None
            model = codec_lib.build_codec(
                pretrained=True, quality=cc["quality"], weights=weights, download=bool(cc.get("download", False))
            )
            source = weights or f"compressai cheng2020-attn mse q{cc['quality']}"
            codec_lib.save_codec(path, model, extra={"source": source})
            return model.to(self.device)
        torch.manual_seed(self.seed)
        model = codec_lib.build_codec(N=int(cc["N"])).to(self.device)
        t0 = time.time()
        self.log(f"training the codec start point (Eq. 2, MSE, lambda={cc['lambda_mse']})")
        res = train_start_codec(
            model,
            self.dataset("train"),
            TrainConfig.from_dict(cc["train"]),
            float(cc["lambda_mse"]),
            self.layout.start_codec_train_state,
            seed=self.seed,
            log=self.log,
            device=self.device,
            val_set=self.dataset("val") if self.shared_data else None,
        )
        codec_lib.save_codec(path, model, extra={"history": res.history, "seconds": time.time() - t0})
        return model

    def evaluate_start(self, task: str, force: bool = False) -> dict[str, Any]:
        return evaluate_cached(self, task, "start", None, {"method": "start"}, force,
                               codec_factory=self.start_codec, codec_key=self.start_codec_path)

    # ------------------------------------------------------------------ what ICM training shares between runs
    def warm_aux_branch(self, task: str, position: str, seed: int, labels: str = "pseudo") -> dict[str, Any]:
        """The ``position`` branch pre-trained alone for training seed ``seed`` (``labels="shuffled"``: the control
        branch), trained once under ``aux_warm/`` (``branch_pretraining.warm_aux_branch``)."""
        return branch_pretraining.warm_aux_branch(self, task, position, seed, labels)

    def warm_branch_path(self, task: str, position: str, seed: int, labels: str = "pseudo") -> Path:
        """Where ``warm_aux_branch`` stores the branch of ``position`` pre-trained with ``seed`` (it may not exist)."""
        return branch_pretraining.branch_path(self, task, position, seed, labels)

    def build_branch(self, task: str, position: str | None, seed: int, codec, recognizer):
        """The auxiliary branch of ``position``, initialised from ``seed`` (``branch_pretraining.build_branch``)."""
        return branch_pretraining.build_branch(self, task, position, seed, codec, recognizer)

    def budget_steps(self, task: str) -> dict[float, int]:
        """{fraction: step} after which every run of ``task`` saves its codec: the profile's
        ``tasks.<task>.budget_fractions`` and ``snapshot_steps`` (``icm_runs.snapshot_steps``)."""
        tc = self.task_cfg(task)
        fractions, steps = tc.get("budget_fractions") or [], tc.get("snapshot_steps") or []
        if not fractions and not steps:
            return {}
        return icm_runs.snapshot_steps(task, fractions, steps, self.total_steps(task))

    def total_steps(self, task: str) -> int:
        """Training steps of every ICM run of ``task`` (epochs x steps per epoch)."""
        cfg = TrainConfig.from_dict(self.task_cfg(task)["train"])
        return cfg.epochs * cfg.steps(len(self.dataset("train", task)))

    def snapshot_path(self, spec: IcmSpec, fraction: float) -> Path:
        return self.layout.snapshot_path(spec, fraction)

    # ------------------------------------------------------------------ ICM training
    def train(self, spec: IcmSpec, force: bool = False) -> Path:
        """Train one ICM model (resumes if interrupted; reuses a finished one trained with the same job, refuses one
        trained otherwise). Returns the final codec path (``icm_runs.train_run``).

        With the profile's ``validate_every_epoch`` the validation loss terms (Eq. 4 main loss among them) are
        recorded per epoch, which the branch-position ablation plots (Figs. 8-9); with ``tasks.<task>.
        validate_at_steps`` instead after those numbers of steps (``curve.json``; protocol v2's learning curves).
        ``timing.json``: the seconds of the training loop and of those validations."""
        return icm_runs.train_run(self, spec, force)

    def loss_balance(self, task: str, lambdas: Iterable[float]) -> list[dict[str, Any]]:
        """Validation terms of the START codec under Eq. 4/6 at each lambda: how much of the main loss the task
        term carries (used by notebook 05 to choose the ablation lambda; the paper's 0.016 vs its 0.4..3.2 sweep)."""

        codec, rec = self.start_codec(), self.recognizer(task)
        codec.eval()
        rows = []
        for lam in lambdas:
            spec = self.spec(task, lam, None)
            t = validation_terms(spec, codec, rec, None, self.dataset("val", task), 8, self.seed, self.device)
            weighted = t["main"] - t["rate"]  # lambda * (E (+ MSE))
            rows.append(
                {
                    "lambda_": float(lam),
                    "rate_bpp": t["rate"],
                    "task_loss": t["task"],
                    "lambda_x_distortion": weighted,
                    "task_share_of_main": weighted / t["main"],
                }
            )
        return rows


    def run_ablation(
        self,
        task: str,
        positions: Iterable[str | None] | None = None,
        lambda_: float | None = None,
        alpha: float | None = None,
        evaluate_test: bool = True,
        seeds: Iterable[int] | None = None,
    ) -> dict[str, Any]:
        """The branch-position ablation of Sec. 4.2 for one task: train (or reuse) one model per position (and
        training seed; default: the profile's ``train_seeds``) at the profile's ``ablation_lambda``; return the
        validation MAIN loss per epoch of each (Figs. 8-9), the final validation terms and, with ``evaluate_test``,
        the test-set bpp and task metric of each model. Curves start at epoch 0 = the start codec (the same value for
        every position); with several seeds a curve is named "<position> (seed <s>)"."""

        positions = list(self.cfg["ablation"]["positions"] if positions is None else positions)
        seeds = self.train_seeds() if seeds is None else list(seeds)
        lam = float(self.task_cfg(task)["ablation_lambda"] if lambda_ is None else lambda_)
        # epoch 0: the start codec, common to every position (the main loss has no aux term)
        start = self.start_codec().eval()
        epoch0 = validation_terms(
            self.spec(task, lam, None),
            start,
            self.recognizer(task),
            None,
            self.dataset("val", task),
            8,
            self.seed,
            self.device,
        )["main"]
        curves, rows = {}, []
        for seed in seeds:
            for pos in positions:
                spec = self.spec(task, lam, pos, alpha, seed=seed)
                self.train(spec)
                hist = self.history(spec)
                if "val_main" not in hist[0]:
                    raise ValueError(
                        f"{self.run_path(spec)} has no validation history: set validate_every_epoch: true in the "
                        "profile and retrain (force=True)"
                    )
                label = short_name(spec.method) + ("" if len(seeds) == 1 else f" (seed {seed})")
                curves[label] = [epoch0] + [h["val_main"] for h in hist]
                row = {
                    "position": label,
                    "seed": seed,
                    "val_main": hist[-1]["val_main"],
                    "val_rate": hist[-1]["val_rate"],
                    "val_task": hist[-1]["val_task"],
                }
                if evaluate_test:
                    rec = self.evaluate_run(spec)
                    row.update(
                        bpp_bitstream=rec["bpp_bitstream"], bpp_estimated=rec["bpp_estimated"], metric=rec["metric"]
                    )
                rows.append(row)
        return {"task": task, "lambda_": lam, "curves": curves, "rows": rows}

    def history(self, spec: IcmSpec) -> list[dict[str, Any]]:
        return read_json(self.layout.history_path(spec))

    # ------------------------------------------------------------------ evaluation (eval_cache)
    def evaluate_run(self, spec: IcmSpec, force: bool = False, budget: float | None = None) -> dict[str, Any]:
        """Evaluate the trained model of ``spec`` (trained first if needed); ``budget``: the snapshot saved after that
        fraction of its training (``budget_fractions``) instead of the final model."""
        final = self.train(spec)
        path = final if budget is None else self.snapshot_path(spec, budget)
        fields = {
            "method": spec.method,
            "aux_position": spec.aux_position,
            "alpha": spec.alpha,
            "add_mse": spec.add_mse,
            "seed": spec.seed,
            "codec_path": str(path.relative_to(self.run_dir)),
        }
        fields.update(spec.later_fields())
        name = self.layout.run_result_name(spec, budget)
        if budget is not None:
            fields["budget"] = float(budget)
        # budget snapshots: real bitstreams only if the profile asks (evaluation.budget_bitstream), else estimated bpp
        bitstream = None if budget is None else bool(self.cfg.get("evaluation", {}).get("budget_bitstream", True))
        return evaluate_checkpoint(self, spec.task, name, spec.lambda_, fields, path, force, bitstream=bitstream)

    def run_grid(self, task: str, aux_positions: Iterable[str | None], lambdas: Iterable[float] | None = None,
                 alpha: float | None = None, alpha_mode: str | None = None, aux_init: str | None = None,
                 seeds: Iterable[int] | None = None, aux_labels: str = "pseudo",
                 objective: str = "task") -> list[dict[str, Any]]:
        """Train (or reuse) and evaluate every (position, lambda, seed) of the grid; returns the result records.
        ``alpha_mode``: None = the profile's (default "fixed"); see ``icm_helpers.adaptive_alpha``. ``aux_init``: "cold"
        (default) or "warm". ``seeds``: None = the profile's ``train_seeds``. ``aux_labels`` / ``objective``: the
        control branch / the MSE positive control (``spec``)."""
        lambdas = self.task_cfg(task)["lambdas"] if lambdas is None else lambdas
        records = []
        for seed in (self.train_seeds() if seeds is None else seeds):
            for pos in aux_positions:
                for lam in lambdas:
                    spec = self.spec(task, lam, pos, alpha, alpha_mode, aux_init, seed, aux_labels, objective)
                    records.append(self.evaluate_run(spec))
        return records

    def evaluate_budgets(
        self,
        task: str,
        methods: Iterable[tuple[str | None, str]] = ((None, "cold"), ("enc", "cold")),
        lambdas: Iterable[float] | None = None,
        seeds: Iterable[int] | None = None,
    ) -> list[dict[str, Any]]:
        """Evaluate the budget snapshots (``budget_fractions``) of every (position, aux_init) x lambda x seed."""
        lambdas = self.task_cfg(task)["lambdas"] if lambdas is None else lambdas
        records = []
        for seed in (self.train_seeds() if seeds is None else seeds):
            for pos, init in methods:
                for lam in lambdas:
                    for fraction in self.budget_steps(task):
                        records.append(
                            self.evaluate_run(self.spec(task, lam, pos, aux_init=init, seed=seed), budget=fraction)
                        )
        return records

    def anchor_names(self) -> list[str]:
        """The conventional codecs of the profile (``anchors.codecs``; default JPEG and WebP, plus BPG and VTM where
        their binaries are installed)."""
        return list((self.cfg.get("anchors") or {}).get("codecs", ["jpeg", "webp", "bpg", "vtm"]))

    def anchor_qualities(self, name: str) -> list[int]:
        """The rate points of the conventional codec ``name``: the profile's ``anchors.qualities.<name>``, else the
        codec's default sweep."""
        profile = (self.cfg.get("anchors") or {}).get("qualities") or {}
        return [int(q) for q in profile.get(name, anchors.default_qualities(name))]

    def evaluate_anchors(
        self, task: str, names: Iterable[str] | None = None, qualities: dict[str, Iterable[int]] | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Conventional-codec anchors (``icm_helpers.anchors``) through the one evaluation path: each quality of each
        codec is a rate point (record ``method`` = the codec's name, ``lambda_`` = its quality or QP, ``anchor`` = its
        ``describe()``: versions and command lines). Returns the records and {codec: why it was skipped} for codecs that
        cannot run here (e.g. ``bpgenc`` not on PATH)."""

        qualities = qualities or {}
        records, skipped = [], {}
        for name in (self.anchor_names() if names is None else names):
            try:
                codecs = [anchors.build_anchor(name, int(q)) for q in qualities.get(name, self.anchor_qualities(name))]
            except anchors.AnchorUnavailable as exc:
                skipped[name] = str(exc)
                continue
            for codec in codecs:
                fields = {"method": name, "anchor": codec.describe()}
                records.append(evaluate_cached(self, task, self.layout.anchor_result_name(name, codec.quality),
                                               float(codec.quality), fields, False,
                                               codec_factory=lambda codec=codec: codec,
                                               codec_key={"anchor": codec.describe()}))
        return records, skipped

    def evaluate_transfer(
        self,
        trained_for: str,
        evaluated_by: str,
        position: str | None = None,
        aux_init: str = "cold",
        lambdas: Iterable[float] | None = None,
        seeds: Iterable[int] | None = None,
    ) -> list[dict[str, Any]]:
        """Cross-task transfer: the codecs fine-tuned for ``trained_for`` (w/o aux, or aux at ``position``) evaluated by
        the ``evaluated_by`` recognizer on the test split. Needs one image set labelled for both tasks (the generated
        world). The records are stored under ``evaluated_by`` as method
        ``methods.transfer_method_id(method, trained_for)`` (``"<method>_from_<trained_for>"``)."""
        if not self.shared_data:
            raise ValueError("cross-task transfer needs one image set with both tasks' labels (the generated world); "
                             f"data source {self.cfg['data']['source']!r} has one dataset per task")
        check_task(evaluated_by)
        records = []
        for seed in (self.train_seeds() if seeds is None else seeds):
            for lam in (self.task_cfg(trained_for)["lambdas"] if lambdas is None else lambdas):
                spec = self.spec(trained_for, lam, position, aux_init=aux_init, seed=seed)
                final = self.train(spec)
                fields = {
                    "method": transfer_method_id(spec.method, trained_for),
                    "trained_for": trained_for,
                    "aux_position": position,
                    "seed": spec.seed,
                    "codec_path": str(final.relative_to(self.run_dir)),
                }
                if spec.aux_init != "cold":
                    fields["aux_init"] = spec.aux_init
                name = self.layout.transfer_result_name(spec, trained_for)
                records.append(evaluate_checkpoint(self, evaluated_by, name, spec.lambda_, fields, final))
        return records

    def evaluate_roi(self, task: str, lambdas: Iterable[float] | None = None, qf: float | None = None,
                     decoder: str | None = None, seeds: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """ROI baseline (Ahonen et al.): the w/o-aux models with latents outside the GT mask divided by QF.

        ``decoder``: "as_is" (method ``roi``: mask not signalled) or "rescale" (method ``roi_rescale``: the decoder
        multiplies back by QF, the signalled mask counts in the rate); None = the first of the profile's
        ``roi_decoders``. ``seeds``: the training seeds of the w/o-aux models (None: the profile's ``train_seeds``);
        each record carries its seed, so BD-rates vs w/o aux pair ROI and w/o aux of the same seed."""

        tc = self.task_cfg(task)
        qf = tc.get("roi_qf") if qf is None else qf
        if not qf:
            raise ValueError(f"no ROI for {task}: the profile sets roi_qf=null (segmentation has no ROI, Sec. 4.1)")
        decoder = (tc.get("roi_decoders") or ["as_is"])[0] if decoder is None else decoder
        check_roi(qf, decoder)
        method = "roi" if decoder == "as_is" else f"roi_{decoder}"
        records = []
        for seed, lam in itertools.product(self.train_seeds() if seeds is None else seeds,
                                           tc["lambdas"] if lambdas is None else lambdas):
            spec = self.spec(task, lam, None, seed=seed)
            final = self.train(spec)
            fields = {"method": method, "aux_position": None, "qf": qf, "roi_decoder": decoder, "seed": seed,
                      "codec_path": str(final.relative_to(self.run_dir))}
            records.append(evaluate_checkpoint(self, task, self.layout.roi_result_name(method, qf, lam, seed),
                                               float(lam), fields, final, roi_qf=qf, roi_decoder=decoder))
        return records

    def full_records(
        self, task: str, method: str, seed: int | None = None, budget: float | None = None
    ) -> list[dict[str, Any]]:
        """Stored records (with per-image lists) of one method of ``task`` for one training ``seed`` (None: the
        profile's seed) and training ``budget`` fraction (None: the final models), sorted by lambda
        (``ResultStore.full_records``; which seed a record without a ``seed`` field belongs to:
        ``result_store.record_seed``)."""
        return self.results.full_records(task, method, seed, budget)

    def bd_rate_table(
        self,
        task: str,
        anchor: str = "baseline",
        tests: Iterable[str] = ("aux_enc",),
        method: str = "pchip",
        bpp_keys: tuple[str, ...] = ("bpp_bitstream", "bpp_estimated"),
        samples: int | None = None,
        confidence: float | None = None,
        seeds: Iterable[int] | None = None,
        budget: float | None = None,
    ) -> list[dict[str, Any]]:
        """``bootstrap.bd_rate_table`` of the stored records: BD-rate of each ``tests`` method vs ``anchor`` with 95%
        paired-bootstrap CIs over the test images (resamples, confidence and interval from the profile's
        ``evaluation.bootstrap``; the bootstrap's random seed: the profile's seed), for the models of each training
        seed (``seeds``; default: the profile's ``train_seeds``) and, with several seeds, pooled. ``budget``: the
        budget snapshots of that fraction instead of the final models. One row per (method, seed) and a ``seed:
        "pooled"`` row per method with 2+ seeds."""
        bc = self.cfg.get("evaluation", {}).get("bootstrap", {}) or {}
        samples = int(samples or bc.get("samples", 1000))
        confidence = float(confidence or bc.get("confidence", 0.95))
        seeds = self.train_seeds() if seeds is None else [int(s) for s in seeds]
        tests = list(tests)
        test = self.dataset("test", task) if RESAMPLERS[task].needs_dataset else None
        records = self.results.records_by_seed(task, [anchor, *tests], seeds, budget)
        return bootstrap.bd_rate_table(records, task, anchor, tests, method, bpp_keys, samples, confidence, self.seed,
                                       str(bc.get("interval", "bca")), dataset=test, budget=budget)

    def result_paths(self, task: str, budgets: bool = False) -> list[Path]:
        """The stored evaluation records of ``task`` (JSON files, with their per-image lists); the budget snapshots'
        only with ``budgets=True``."""
        return self.results.paths(task, budgets)

    def records(self, task: str | None = None, budgets: bool = False) -> list[dict[str, Any]]:
        """Every stored evaluation record (optionally of one task), without per-image lists; the budget snapshots'
        records (dose-response) only with ``budgets=True``."""
        return self.results.records(task, budgets)
