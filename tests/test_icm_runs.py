"""ICM runs on disk (``icm_helpers.icm_runs``): the snapshot steps a profile asks for, and when a finished run may be
reused."""
from __future__ import annotations

import pytest

from icm_helpers.codec import build_codec, save_codec
from icm_helpers.icm_runs import check_finished, snapshot_steps


def test_snapshot_steps_from_fractions_and_named_steps():
    assert snapshot_steps("detection", [0.25, 0.5], [], 8) == {0.25: 2, 0.5: 4}
    # named steps: their fraction is step / total; at or past the end the final codec is the snapshot
    assert snapshot_steps("detection", [], [3, 8, 10], 8) == {3 / 8: 3}
    assert snapshot_steps("detection", [0.5], [2], 8) == {0.25: 2, 0.5: 4}


@pytest.mark.parametrize("fractions, steps, match", [
    ([0.3], [], r"budget_fractions: 0.3 x 8 steps is not a whole step .* multiples of 1/8"),
    ([1.0], [], r"not a whole step in \(0, 8\)"),
    ([0.0], [], r"not a whole step in \(0, 8\)"),
    ([], [0, 4], r"snapshot_steps \[0\]: a snapshot is taken after a step >= 1"),
])
def test_snapshot_steps_refuse_what_is_no_step(fractions, steps, match):
    with pytest.raises(ValueError, match=match):
        snapshot_steps("detection", fractions, steps, 8)


@pytest.fixture(scope="module")
def tiny_codec():
    return build_codec(N=16)


def test_a_finished_run_is_reused_only_with_its_job_and_snapshots(tmp_path, tiny_codec):
    job = {"spec": {"task": "detection", "lambda_": 1.6}, "train": {"epochs": 2, "lr": 1e-4}}
    final = tmp_path / "codec.pt"
    save_codec(final, tiny_codec, extra={"spec": job["spec"], "job": job})
    check_finished(final, job, {})  # the same job, no snapshots asked: reused

    with pytest.raises(FileExistsError, match=r"trained with other train .*'lr': 0.0001.*'lr': 0.001.*force=True"):
        check_finished(final, {**job, "train": {"epochs": 2, "lr": 1e-3}}, {})
    with pytest.raises(FileExistsError, match="aux_warm_start"):
        check_finished(final, {**job, "aux_warm_start": {"epochs": 1}}, {})

    snapshot = tmp_path / "codec_budget0.5.pt"
    with pytest.raises(FileNotFoundError, match=r"no budget snapshots \['codec_budget0.5.pt'\].*force=True"):
        check_finished(final, job, {4: snapshot})
    save_codec(snapshot, tiny_codec)
    check_finished(final, job, {4: snapshot})


def test_a_run_stored_before_jobs_were_recorded_is_judged_by_its_spec(tmp_path, tiny_codec):
    """Older files hold only the spec: the training settings asked now are assumed, the spec must match."""
    job = {"spec": {"task": "detection", "lambda_": 1.6}, "train": {"epochs": 2}}
    final = tmp_path / "codec.pt"
    save_codec(final, tiny_codec, extra={"spec": job["spec"]})
    check_finished(final, job, {})
    with pytest.raises(FileExistsError, match="spec"):
        check_finished(final, {**job, "spec": {"task": "detection", "lambda_": 0.4}}, {})
