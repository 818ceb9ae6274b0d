"""The grid launcher (``papermill_runs/launch_grid.py``, ``icm_helpers.grid``): its jobs are the models the notebooks
train, and after a run on submitit's local executor the notebooks' ``Experiment`` finds them trained."""
from __future__ import annotations

import pytest
import torch

from icm_helpers import experiment as experiment_mod
from icm_helpers import icm_runs
from icm_helpers.experiment import Experiment
from icm_helpers.grid import GridJob, GridJobCall, grid_jobs, grid_specs

submitit = pytest.importorskip("submitit")  # the `dev` extra installs it

# the smoke profile cut to one detection lambda, 1 training step per model and a few images (CPU, seconds per job)
TINY = {
    "threads": 1, "validate_every_epoch": False,
    "data.counts": {"train": 8, "val": 2, "test": 2},
    "codec.train.epochs": 1, "recognizers.detection.train.epochs": 1,
    "tasks.detection.lambdas": [1.6], "tasks.detection.train.epochs": 1, "tasks.detection.train.steps_per_epoch": 1,
    "tasks.detection.validate_at_steps": [],
}


def _notebook_run_paths(ex: Experiment, monkeypatch) -> set[str]:
    """The run directories notebooks 02, 03 and 05 train, from their own calls, with training replaced by a record."""
    seen = set()

    def record(spec, **_):
        seen.add(str(ex.run_path(spec)))
        return {"bpp_bitstream": 0.0, "bpp_estimated": 0.0, "metric": 0.0}

    monkeypatch.setattr(ex, "evaluate_run", record)
    monkeypatch.setattr(ex, "train", record)
    monkeypatch.setattr(ex, "start_codec", lambda: torch.nn.Identity())
    monkeypatch.setattr(ex, "recognizer", lambda task: None)
    monkeypatch.setattr(ex, "dataset", lambda split, task=None: None)
    monkeypatch.setattr(ex, "history", lambda spec: [{"val_main": 1.0, "val_rate": 1.0, "val_task": 1.0}])
    monkeypatch.setattr(experiment_mod, "validation_terms", lambda *a, **k: {"main": 1.0})
    for t in ex.tasks("all"):
        ex.run_grid(t, [None], None)  # notebook 02
        ex.run_grid(t, [None], ex.task_cfg(t).get("mse_lambdas") or [], objective="mse")
        for init in ex.aux_inits(t):  # notebook 03
            ex.run_grid(t, ["enc"], None, None, aux_init=init)
        if ex.cfg["ablation"]["positions"]:  # notebook 05
            ex.run_ablation(t, ex.cfg["ablation"]["positions"], None, None)
    return seen


@pytest.mark.parametrize("profile", ["smoke", "study", "paper"])
def test_grid_is_what_the_notebooks_train(profile, tmp_path, monkeypatch):
    ex = Experiment(profile, run_dir=tmp_path, log=None)
    grid = {str(ex.run_path(s)) for s in grid_specs(ex)}
    assert grid == _notebook_run_paths(ex, monkeypatch)
    jobs = grid_jobs(ex)
    assert [j.stage for j in jobs] == sorted(j.stage for j in jobs) and jobs[0].kind == "prepare"
    warm = {(s.task, s.aux_position) for s in grid_specs(ex) if s.aux_init == "warm"}
    assert {(j.task, j.position) for j in jobs if j.kind == "warm_branch"} == warm
    assert len({j.name for j in jobs}) == len(jobs)


def test_paper_grid_counts(tmp_path):
    """Sec. 4.1-4.2: 4 lambdas x {w/o aux, aux-enc} per task, plus aux-dec and aux-task at the ablation lambda."""
    ex = Experiment("paper", run_dir=tmp_path, log=None)
    specs = grid_specs(ex)
    for task, lam in (("detection", 1.6), ("segmentation", 2.0)):
        mine = [s for s in specs if s.task == task]
        assert len(mine) == 10
        assert {s.aux_position for s in mine if s.lambda_ != lam} == {None, "enc"}
        assert {s.aux_position for s in mine if s.lambda_ == lam} == {None, "enc", "dec", "task"}


def test_job_is_requeued_as_itself():
    call = GridJobCall({"profile": "smoke"}, "/tmp/x", GridJob("prepare", "prepare"), ("detection",))
    delayed = call.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is call


def test_local_executor_trains_the_grid_and_notebooks_reuse_it(tmp_path, monkeypatch, capsys):
    from papermill_runs import launch_grid

    monkeypatch.setenv("ICM_RUNS_DIR", str(tmp_path / "runs"))
    sets = [f"{k}={v}" for k, v in TINY.items()]
    argv = ["--profile", "smoke", "--task", "detection", "--notebooks", "02", "03", "--executor", "local",
            "--parallel", "1", *[a for s in sets for a in ("--set", s)]]
    monkeypatch.setattr(launch_grid, "POLL_S", 0.2)
    assert launch_grid.main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "3 jobs finished, 0 failed" in out
    assert launch_grid.main([*argv, "--list"]) == 0
    assert "0 of 3 jobs to run" in capsys.readouterr().out

    ex = Experiment("smoke", overrides={k: v for k, v in TINY.items()}, log=None)  # as the notebooks build it
    assert ex.run_dir == (tmp_path / "runs" / "smoke").resolve()

    def no_training(*args, **kwargs):
        raise AssertionError("a model the grid trained was trained again")

    monkeypatch.setattr(icm_runs, "train_icm", no_training)
    specs = grid_specs(ex, "detection", ("02", "03"))
    assert {s.aux_position for s in specs} == {None, "enc"}
    for spec in specs:
        assert ex.train(spec) == ex.run_path(spec) / "codec.pt"


def test_slurm_jobs_chain_stages_with_afterok(tmp_path, monkeypatch, capsys):
    """Without a cluster: a stand-in ``sbatch`` records the batch files submitit writes and answers as Slurm."""
    from papermill_runs import launch_grid

    bin_dir, seen = tmp_path / "bin", tmp_path / "sbatch_files"
    bin_dir.mkdir()
    seen.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nn=$(($(ls {seen} | wc -l) + 101))\ncp "$1" {seen}/$n.sh\n'
                                    'echo "Submitted batch job $n"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; the batch files call it
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("ICM_RUNS_DIR", str(tmp_path / "runs"))
    argv = ["--profile", "study", "--task", "detection", "--notebooks", "03", "--executor", "slurm",
            "--set", "tasks.detection.lambdas=[1.6]", "--set", "train_seeds=[0]", "--param", "device=cuda",
            "--gpus-per-job", "2", "--partition", "gpu", "--slurm-arg", "account=proj", "--timeout-min", "600"]
    assert launch_grid.main(argv) == 0
    out = capsys.readouterr().out
    assert "submitted 101: prepare" in out and "submitted 102: detection/warm_enc_seed0" in out
    assert "submitted 103: detection/aux_enc_warm_lambda1.6" in out
    prepare, warm, model = ((seen / f"{n}.sh").read_text() for n in (101, 102, 103))
    assert "--dependency" not in prepare
    assert "#SBATCH --dependency=afterok:101" in warm and "#SBATCH --dependency=afterok:102" in model
    for text in (prepare, warm, model):
        assert "#SBATCH --partition=gpu" in text and "#SBATCH --account=proj" in text and "#SBATCH --time=600" in text
    assert "#SBATCH --gpus-per-node=1" in prepare and "#SBATCH --ntasks-per-node=1" in prepare
    assert "#SBATCH --gpus-per-node=2" in model and "#SBATCH --ntasks-per-node=2" in model  # one task per GPU
    assert "#SBATCH --job-name=icm_detection_aux_enc_warm_lambda1p6" in model
    call = submitit.helpers.DelayedSubmission.load(tmp_path / "runs" / "study" / "grid_logs" / "103_submitted.pkl")
    assert call.function.run_dir == str((tmp_path / "runs" / "study").resolve())
    assert call.function.job.spec.aux_init == "warm" and call.function.params["device"] == "cuda"
