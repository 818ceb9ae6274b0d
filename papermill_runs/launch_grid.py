#!/usr/bin/env python3
"""Train a profile's grid as one scheduled job per (task, lambda, arm, seed), through submitit.

    .venv/bin/python papermill_runs/launch_grid.py --profile paper --list
    .venv/bin/python papermill_runs/launch_grid.py --profile paper --executor slurm --partition gpu --timeout-min 1440
    .venv/bin/python papermill_runs/launch_grid.py --profile paper --executor local --parallel 8

The jobs (``icm_helpers.grid``) are the models notebooks 02, 03 and 05 train, written to the run directory they read
(``runs/<profile>``, or ``$ICM_RUNS_DIR/<profile>``): afterwards ``papermill_runs/run.py --profile paper`` finds them
trained and goes on to evaluate. ``--set`` / ``--param`` are run.py's, so both see the same settings. Stages run in
order: the prerequisites (data, recognizers, start codec), the pre-trained branches of ``aux_init: warm``, then the
models; what is finished already is skipped.

- ``--executor slurm``: every job is its own Slurm job (submitit's executor); a stage waits for the one before with
  ``--dependency=afterok``, so the launcher can exit after submitting (``--wait`` waits and reports). A job that
  reaches its time limit or is preempted is requeued and resumes from its last complete epoch.
- ``--executor local``: submitit's local executor on this machine, ``--parallel`` jobs at a time, each on its own
  GPU(s) (``CUDA_VISIBLE_DEVICES``); the launcher waits for all of them.
- ``--gpus-per-job G``: one model on G GPUs (G processes joined by PyTorch's distributed training, as torchrun
  would start them; ``papermill_runs/train_ddp.py`` is the same run by hand under torchrun).

Job logs: ``<run dir>/grid_logs/``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:  # started as a script, sys.path[0] is papermill_runs/ itself
    sys.path.insert(0, REPO_ROOT)

POLL_S = 2.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="profile name or YAML file (as run.py)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted profile setting for every job (as run.py --set; repeatable)")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="notebook parameter (as run.py --param), e.g. device=cuda; repeatable")
    p.add_argument("--task", default="all", help="detection, segmentation or all (default)")
    p.add_argument("--notebooks", nargs="+", default=None, metavar="NB",
                   help="whose models to train: 02 03 05 (default: those of the profile's notebooks list)")
    p.add_argument("--list", action="store_true", help="print the jobs and whether each is done; submit nothing")
    p.add_argument("--evaluate", action="store_true", help="each model job also writes its evaluation record")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--gpus-per-job", type=int, default=None, help="default: 1 on a CUDA device, 0 on the CPU")
    p.add_argument("--parallel", type=int, default=None, help="local: jobs at a time (default: GPUs // gpus-per-job)")
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="a job's time limit; then it is requeued")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem-gb", type=float, default=None)
    p.add_argument("--partition", default=None, help="slurm: the partition")
    p.add_argument("--slurm-arg", dest="slurm_args", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: any other sbatch option, e.g. account=myproj or qos=high (repeatable)")
    p.add_argument("--wait", action="store_true", help="slurm: wait for every job and report")
    return p.parse_args(argv)


def notebook_params(args: argparse.Namespace) -> dict:
    """The parameters run.py would inject into the notebooks (profile, device, seed, overrides)."""
    from papermill_runs.runner.common import DEFAULT_PARAMS_DIR
    from papermill_runs.runner.params import build_params

    return build_params(args.profile, DEFAULT_PARAMS_DIR, args.params, args.sets)


def training_notebooks(cfg: dict, chosen: list[str] | None) -> list[str]:
    from icm_helpers.grid import TRAINING_NOTEBOOKS

    if chosen:
        return chosen
    listed = cfg.get("notebooks")
    return [nb for nb in TRAINING_NOTEBOOKS if listed is None or nb in [str(n) for n in listed]]


def plan(args: argparse.Namespace):
    """(experiment, params, tasks, jobs, which are done) of the command line."""
    from icm_helpers.experiment import Experiment
    from icm_helpers.grid import grid_jobs, job_done

    params = notebook_params(args)
    exp = Experiment(params["profile"], run_dir=params.get("run_dir"), device="cpu", seed=params.get("seed"),
                     overrides=params.get("overrides"), log=None)
    tasks = exp.tasks(args.task)
    jobs = grid_jobs(exp, args.task, training_notebooks(exp.cfg, args.notebooks))
    done = {job.name: job_done(exp, job, tasks) for job in jobs}
    return exp, params, tasks, jobs, done


def print_plan(exp, jobs, done) -> None:
    from icm_helpers.grid import STAGES

    print(f"run dir: {exp.run_dir}")
    for job in jobs:
        print(f"  stage {job.stage} ({STAGES[job.stage]:<13}) {'done   ' if done[job.name] else 'to run '} {job.name}")
    print(f"{sum(not d for d in done.values())} of {len(jobs)} jobs to run")


def gpus_per_job(args: argparse.Namespace, params: dict) -> int:
    if args.gpus_per_job is not None:
        return args.gpus_per_job
    return 1 if str(params.get("device", "cpu")).startswith("cuda") else 0


def slurm_options(args: argparse.Namespace) -> dict[str, str]:
    bad = [item for item in args.slurm_args if "=" not in item]
    if bad:
        raise ValueError(f"--slurm-arg expects KEY=VALUE, got {bad}")
    return dict(item.split("=", 1) for item in args.slurm_args)


def make_executor(args: argparse.Namespace, folder: Path):
    """submitit's LocalExecutor (it takes the GPU ids of each job), or its Slurm executor through AutoExecutor."""
    import submitit

    if args.executor == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=args.timeout_min)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    common = {"timeout_min": args.timeout_min, "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb,
              "slurm_partition": args.partition}
    executor.update_parameters(**{k: v for k, v in common.items() if v is not None})
    return executor


def resources(executor, job, gpus: int, device_ids: list[int] | None = None) -> None:
    """One task per GPU for a model job; the prerequisites and warm branches run as one process on one GPU.
    ``device_ids``: the local executor's GPUs for this job."""
    from icm_helpers.grid import job_label

    n = gpus if job.kind == "icm" else min(gpus, 1)
    if device_ids is None:
        executor.update_parameters(name=job_label(job), gpus_per_node=n, tasks_per_node=max(n, 1))
    else:
        executor.update_parameters(gpus_per_node=n, tasks_per_node=max(n, 1), visible_gpus=tuple(device_ids[:n]))


def submit_slurm(args, executor, calls, gpus: int) -> list:
    """Every job now; the jobs of a stage start after those of the stage before succeeded (``afterok``)."""
    options, submitted, before = slurm_options(args), [], []
    for stage in sorted({c.job.stage for c in calls}):
        this = []
        for call in (c for c in calls if c.job.stage == stage):
            resources(executor, call.job, gpus)
            dependency = {"dependency": "afterok:" + ":".join(j.job_id for j in before)} if before else {}
            executor.update_parameters(slurm_additional_parameters={**options, **dependency})
            job = executor.submit(call)
            print(f"submitted {job.job_id}: {call.job.name}", flush=True)
            this.append(job)
            submitted.append((call, job))
        before = this or before
    return submitted


def device_groups(parallel: int, gpus: int) -> list[list[int]]:
    """The GPU ids of each local slot: slot i gets GPUs i*gpus .. (i+1)*gpus - 1 (none on the CPU)."""
    return [list(range(i * gpus, (i + 1) * gpus)) for i in range(parallel)]


def default_parallel(gpus: int) -> int:
    import torch

    return max(1, torch.cuda.device_count() // gpus) if gpus else 1


def run_local(executor, calls, gpus: int, parallel: int) -> list:
    """submitit's local executor starts a job at once: at most ``parallel`` are submitted at a time, a stage after
    the one before has finished."""
    finished = []
    for stage in sorted({c.job.stage for c in calls}):
        results = run_local_stage(executor, [c for c in calls if c.job.stage == stage], gpus, parallel)
        finished += results
        if any(error for _, _, error in results):
            break
    return finished


def run_local_stage(executor, calls, gpus: int, parallel: int) -> list:
    free, waiting, running, results = device_groups(parallel, gpus), list(calls), {}, []
    try:
        while waiting or running:
            while waiting and free:
                call, ids = waiting.pop(0), free.pop(0)
                resources(executor, call.job, gpus, ids)
                job = executor.submit(call)
                print(f"started {call.job.name} (log {job.paths.stdout})", flush=True)
                running[job] = (call, ids)
            time.sleep(POLL_S)
            for job in [j for j in running if j.done()]:
                call, ids = running.pop(job)
                free.append(ids)
                results.append(collect(call, job))
    finally:  # Ctrl-C or an error here: local jobs would outlive the launcher; a rerun resumes them
        for job in running:
            job.cancel()
    return results


def collect(call, job) -> tuple:
    try:
        result = job.result()
        print(f"finished {call.job.name}", flush=True)
        return call, result, None
    except Exception as exc:  # the job's own error; reported with its log, the other jobs go on
        print(f"FAILED {call.job.name}: {str(exc).strip().splitlines()[-1]} (log {job.paths.stderr})", flush=True)
        return call, None, exc


def main(argv=None) -> int:
    args = parse_args(argv)
    from icm_helpers.grid import GridJobCall
    from papermill_runs.runner.common import RunnerError

    try:
        slurm_options(args)
        exp, params, tasks, jobs, done = plan(args)
    except (RunnerError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_plan(exp, jobs, done)
    if args.list:
        return 0
    calls = [GridJobCall(params, str(exp.run_dir), job, tuple(tasks), args.evaluate)
             for job in jobs if not done[job.name]]
    if not calls:
        return 0
    gpus = gpus_per_job(args, params)
    try:
        executor = make_executor(args, exp.run_dir / "grid_logs")
    except ModuleNotFoundError as exc:
        print(f"error: {exc.name} is not installed: pip install -e '.[cluster]' (submitit)", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # submitit finds no srun: not on a Slurm node
        print(f"error: {exc} (run the launcher where sbatch and srun are, or use --executor local)", file=sys.stderr)
        return 2
    if args.executor == "slurm":
        submitted = submit_slurm(args, executor, calls, gpus)
        if not args.wait:
            return 0
        results = [collect(call, job) for call, job in submitted]
    else:
        results = run_local(executor, calls, gpus, args.parallel or default_parallel(gpus))
    failed = [call.job.name for call, _, error in results if error is not None]
    print(f"{len(results) - len(failed)} jobs finished, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed or len(results) < len(calls) else 0


if __name__ == "__main__":
    sys.exit(main())
