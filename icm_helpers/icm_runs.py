"""ICM training runs on disk: what a run's folder must hold, when a stored run may be reused, and the run itself.

An ICM run (``Experiment.train``) lives in ``icm/<task>/<run>/`` (``RunLayout.run_path``): ``train_state.pt``
(resumable), ``codec.pt`` (final; its ``extra["job"]`` is everything the weights depend on: the spec, the training
settings and, for a pre-trained branch, its pre-training block), ``history.json``, ``timing.json``, ``curve.json``
(validation after given steps) and the codec snapshots after given steps (``snapshot_steps``). A finished run is
reused only while its stored job equals the one the profile asks for now (:func:`check_finished`); otherwise it is
refused with what differs, never silently reused or overwritten.

Every function that needs the profile, its models or datasets takes the ``Experiment``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from . import codec as codec_lib
from . import distributed as dist_lib
from .io import atomic_write_json
from .training import IcmSpec, TrainConfig, train_icm


def snapshot_steps(task: str, fractions: Iterable[float], steps: Iterable[int], total: int) -> dict[float, int]:
    """{fraction: step} of a run of ``total`` steps: the profile's ``tasks.<task>.budget_fractions`` (dose-response;
    fraction x total must be a whole step) and ``snapshot_steps`` (steps named directly, protocol v2: the codec after
    100 steps for the gradient cosines; their fractions are step / total). A step at or past the run's end has no
    snapshot (e.g. a profile shortened with --set): the final codec is that one."""
    steps = [int(n) for n in steps]
    bad = [n for n in steps if n <= 0]
    if bad:
        raise ValueError(f"tasks.{task}.snapshot_steps {bad}: a snapshot is taken after a step >= 1")
    out = {n / total: n for n in steps if n < total}
    for f in fractions:
        s = float(f) * total
        if not (0 < f < 1) or abs(s - round(s)) > 1e-9:
            raise ValueError(
                f"tasks.{task}.budget_fractions: {f} x {total} steps is not a whole step in (0, {total}); "
                f"use fractions that are multiples of 1/{total}"
            )
        out[float(f)] = int(round(s))
    return out


def check_finished(final: Path, job: dict[str, Any], snapshots: dict[int, Path]) -> None:
    """A finished run (``final`` exists) may be reused only if it was trained with ``job`` and holds every snapshot
    asked for; else an error naming what differs and the fix."""
    extra = codec_lib.load_state(final)["extra"]
    meta_extra = {k: v for k, v in job.items() if k not in ("spec", "train")}
    stored = extra.get("job", {"spec": extra.get("spec"), "train": job["train"], **meta_extra})  # older: spec only
    if stored != job:
        changed = sorted(k for k in {*stored, *job} if stored.get(k) != job.get(k))
        raise FileExistsError(
            f"{final} was trained with other {', '.join(changed)} ({ {k: stored.get(k) for k in changed} }) "
            f"than the profile asks now ({ {k: job.get(k) for k in changed} }); pass force=True "
            "(notebooks: rerun with --force) to retrain it, or use another run dir"
        )
    missing = [p.name for p in snapshots.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"{final.parent} has no budget snapshots {missing} (the profile's budget_fractions were added after "
            "it was trained); retrain it with force=True"
        )


def train_run(ex, spec: IcmSpec, force: bool = False) -> Path:
    """Train the ICM run ``spec`` of ``ex`` (resumes if interrupted; reuses a finished one that ``check_finished``
    accepts; ``force`` deletes its files first). Returns the final codec's path. See ``Experiment.train``."""
    out, final = ex.run_path(spec), ex.codec_path(spec)
    spec_dict = spec.as_dict()  # without alpha_mode when "fixed": the paper's stored runs stay valid
    snapshots = {n: ex.snapshot_path(spec, f) for f, n in ex.budget_steps(spec.task).items()}
    tc = ex.task_cfg(spec.task)
    cfg = TrainConfig.from_dict(tc["train"])
    meta_extra: dict[str, Any] = ({"aux_warm_start": TrainConfig.without_speed_knobs(tc["aux_warm_start"])}
                                  if spec.aux_init == "warm" else {})
    total = ex.total_steps(spec.task)
    val_steps = [int(n) for n in tc.get("validate_at_steps") or [] if int(n) <= total]
    job = {"spec": spec_dict, "train": cfg.job_meta(), **meta_extra}  # everything the trained weights depend on
    # under torchrun every rank must take the same decision: rank 0's view of the files decides
    if dist_lib.broadcast_object(final.exists() and not force):
        check_finished(final, job, snapshots)
        return final
    if force and dist_lib.is_main():
        for f in ("train_state.pt", "codec.pt", *(p.name for p in snapshots.values())):
            (out / f).unlink(missing_ok=True)
    dist_lib.barrier()
    codec, recognizer = ex.start_codec(), ex.recognizer(spec.task)
    aux = ex.build_branch(spec.task, spec.aux_position, spec.seed, codec, recognizer)
    if spec.aux_init == "warm":
        aux.load_state_dict(ex.warm_aux_branch(spec.task, spec.aux_position, spec.seed, spec.aux_labels))
    ex.log(f"ICM training {spec.task}/{out.name}")
    epoch_validation = bool(ex.cfg.get("validate_every_epoch"))
    res = train_icm(spec, codec, recognizer, aux, ex.dataset("train", spec.task), cfg, out / "train_state.pt",
                    val_set=ex.dataset("val", spec.task) if val_steps or epoch_validation else None, log=ex.log,
                    device=ex.device, snapshots=snapshots, meta_extra=meta_extra, val_steps=val_steps or None,
                    curve_path=out / "curve.json", epoch_validation=epoch_validation)
    if dist_lib.is_main():  # one writer (torchrun: rank 0); the others wait until the files are there
        atomic_write_json(out / "history.json", res.history)
        atomic_write_json(out / "timing.json", {
            "loop_seconds": res.seconds, "resumed_from_epoch": res.resumed_from_epoch, "steps": total,
            "validation_seconds": res.hook_seconds.get("validation", 0.0),
            "snapshot_seconds": res.hook_seconds.get("snapshots", 0.0),
            "validation_before_training_seconds": res.hook_seconds.get("validation_before_training", 0.0)})
        codec_lib.save_codec(final, codec, extra={"spec": spec_dict, "job": job, "history": res.history})
    dist_lib.barrier()
    return final
