"""The training jobs of a profile's grid, one per (task, lambda, arm, seed), for a cluster scheduler.

The jobs are the models the paper's training notebooks train, with the same ``Experiment`` calls and so the same
files: 02 (w/o aux, Eq. 4; the MSE positive control where the profile has ``mse_lambdas``), 03 (aux-enc, Eq. 5/6,
once per ``aux_inits``) and 05 (the branch-position ablation of Sec. 4.2 at ``ablation_lambda``). A job trains one
model into the run directory the notebooks read; the notebooks then find it finished and reuse it
(``Experiment.train``), and a job stopped part-way resumes from its last complete epoch when it runs again.

Jobs come in stages, each needing the one before: 0 = the prerequisites every model reads (data, the frozen
recognizers, the start codec), 1 = the auxiliary branches pre-trained alone (``aux_init: warm``; one per task,
position and seed, shared by every lambda), 2 = the ICM models. ``papermill_runs/launch_grid.py`` submits them
through submitit (Slurm, or its local executor on one server).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

from . import distributed as dist_lib
from .config import safe_name
from .experiment import Experiment
from .training import IcmSpec

#: the notebooks whose models the grid trains (02: w/o aux and MSE control, 03: aux-enc, 05: the ablation)
TRAINING_NOTEBOOKS = ("02", "03", "05")
STAGES = {0: "prerequisites", 1: "warm branches", 2: "ICM models"}


@dataclass(frozen=True)
class GridJob:
    """One schedulable unit: ``kind`` "prepare" (stage 0), "warm_branch" (stage 1) or "icm" (stage 2)."""

    kind: str
    name: str  # unique within the grid; the scheduler's job name and log label
    task: str | None = None
    spec: IcmSpec | None = None
    position: str | None = None  # warm branch: its position and seed
    seed: int | None = None

    @property
    def stage(self) -> int:
        return {"prepare": 0, "warm_branch": 1, "icm": 2}[self.kind]


def _notebook_specs(exp: Experiment, task: str, notebook: str, lambdas: Iterable[float] | None,
                    alpha: float | None) -> list[IcmSpec]:
    """The specs a notebook trains for ``task``, as its cells call ``run_grid`` / ``run_ablation``."""
    tc = exp.task_cfg(task)
    lams = list(tc["lambdas"] if lambdas is None else lambdas)
    seeds = exp.train_seeds()
    if notebook == "02":
        baseline = [exp.spec(task, lam, None, alpha, seed=s) for s in seeds for lam in lams]
        mse = [exp.spec(task, lam, None, seed=s, objective="mse") for s in seeds for lam in tc.get("mse_lambdas") or []]
        return baseline + mse
    if notebook == "03":
        return [exp.spec(task, lam, "enc", alpha, aux_init=init, seed=s)
                for init in exp.aux_inits(task) for s in seeds for lam in lams]
    if notebook == "05":
        positions = exp.cfg["ablation"]["positions"] or []
        lam = float(tc["ablation_lambda"])
        return [exp.spec(task, lam, pos, alpha, seed=s) for s in seeds for pos in positions]
    raise ValueError(f"notebook {notebook!r} trains no grid models; the grid covers {', '.join(TRAINING_NOTEBOOKS)}")


def grid_specs(exp: Experiment, task: str = "all", notebooks: Iterable[str] = TRAINING_NOTEBOOKS,
               lambdas: Iterable[float] | None = None, alpha: float | None = None) -> list[IcmSpec]:
    """Every ICM model ``notebooks`` train for ``task`` ("all": the profile's tasks), each once (the ablation's w/o
    aux and aux-enc at a lambda of the sweep are the sweep's models: the same run directory)."""
    specs: dict[str, IcmSpec] = {}
    for t in exp.tasks(task):
        for nb in notebooks:
            for spec in _notebook_specs(exp, t, nb, lambdas, alpha):
                specs.setdefault(str(exp.layout.run_path(spec)), spec)
    return list(specs.values())


def _warm_seed(exp: Experiment, spec: IcmSpec) -> int:
    """The seed the branch of ``spec`` is pre-trained with (``aux_warm_start.seed`` shares one across seeds)."""
    return int((exp.task_cfg(spec.task).get("aux_warm_start") or {}).get("seed", spec.seed))


def grid_jobs(exp: Experiment, task: str = "all", notebooks: Iterable[str] = TRAINING_NOTEBOOKS,
              lambdas: Iterable[float] | None = None, alpha: float | None = None) -> list[GridJob]:
    """The jobs of the grid in stage order: one "prepare", one "warm_branch" per pre-trained branch, one "icm" per
    model (``grid_specs``)."""
    specs = grid_specs(exp, task, notebooks, lambdas, alpha)
    jobs = [GridJob("prepare", "prepare")]
    warm = sorted({(s.task, s.aux_position, _warm_seed(exp, s)) for s in specs if s.aux_init == "warm"})
    jobs += [GridJob("warm_branch", f"{t}/warm_{pos}_seed{seed}", task=t, position=pos, seed=seed)
             for t, pos, seed in warm]
    jobs += [GridJob("icm", f"{s.task}/{exp.layout.run_path(s).name}", task=s.task, spec=s) for s in specs]
    return jobs


def prerequisites_done(exp: Experiment, tasks: Iterable[str]) -> bool:
    """The files stage 0 writes: the start codec and each task's recognizer (a backend that needs none has none).
    The data is checked by the jobs themselves (``prepare_data`` is cheap when done)."""
    needed = [exp.layout.start_codec_path]
    needed += [exp.layout.recognizer_path(t) for t in tasks
               if exp.cfg["recognizers"][t].get("backend", "suite") == "suite"]
    return all(p.exists() for p in needed)


def job_done(exp: Experiment, job: GridJob, tasks: Iterable[str]) -> bool:
    """Whether ``job``'s result is already in the run directory (a scheduler then skips it)."""
    if job.kind == "prepare":
        return prerequisites_done(exp, tasks)
    if job.kind == "warm_branch":
        # Experiment.warm_branch_path: the layout's path, refused when the file was pre-trained with other settings
        return exp.warm_branch_path(job.task, job.position, job.seed).exists()
    return exp.layout.codec_path(job.spec).exists()


def run_job(exp: Experiment, job: GridJob, tasks: Iterable[str], evaluate: bool = False) -> dict[str, Any]:
    """Do ``job`` (reusing whatever is finished): the prerequisites of ``tasks``; one pre-trained branch; or one ICM
    model, then with ``evaluate`` its evaluation record (``Experiment.evaluate_run``, as notebooks 02/03 make it)."""
    if job.kind == "prepare":
        exp.prepare_data()
        for t in tasks:
            exp.recognizer(t)
        exp.start_codec()
        return {"job": job.name, "done": prerequisites_done(exp, tasks)}
    if job.kind == "warm_branch":
        exp.warm_aux_branch(job.task, job.position, job.seed)
        return {"job": job.name, "done": job_done(exp, job, tasks)}
    final = exp.train(job.spec)
    out = {"job": job.name, "codec": str(final), "done": final.exists()}
    if evaluate:
        record = exp.evaluate_run(job.spec)
        out.update({k: record.get(k) for k in ("metric_name", "metric", "bpp_bitstream", "bpp_estimated")})
    return out


@dataclass
class GridJobCall:
    """What one scheduled job runs: builds the notebooks' ``Experiment`` (``params``: the notebook parameters
    ``profile``, ``device``, ``seed``, ``overrides``; ``run_dir`` resolved by the launcher, so every node writes
    where the notebooks read) and runs ``job``. Picklable. Given several tasks per job (one per GPU), it joins them
    with PyTorch's distributed training as torchrun would (``icm_helpers.distributed``); ``checkpoint`` makes
    submitit requeue it after a timeout or preemption, and the training resumes from its last complete epoch."""

    params: dict[str, Any]
    run_dir: str
    job: GridJob
    tasks: tuple[str, ...]
    evaluate: bool = False

    def experiment(self, device: str) -> Experiment:
        p = self.params
        return Experiment(p["profile"], run_dir=self.run_dir, device=device, seed=p.get("seed"),
                          overrides=p.get("overrides"))

    def __call__(self) -> dict[str, Any]:
        if submitit_tasks() > 1:
            import submitit  # optional dependency: only a job that submitit started has several tasks

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        info = dist_lib.init_from_env(device=self.params.get("device", "cpu"))  # one process: nothing to join
        try:
            return run_job(self.experiment(info["device"]), self.job, self.tasks, self.evaluate)
        finally:
            dist_lib.shutdown()

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit  # optional dependency: submitit calls this on timeout / preemption

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submitit_tasks() -> int:
    """How many processes (tasks) the submitit job this runs in has; 1 outside submitit."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 1
    import submitit  # optional dependency: SUBMITIT_EXECUTOR is set only inside a submitit job

    return submitit.JobEnvironment().num_tasks


def job_label(job: GridJob) -> str:
    """A name for the scheduler (Slurm ``--job-name``) made of safe characters."""
    return safe_name("icm_" + job.name.replace("/", "_").replace(".", "p"), "job name")
