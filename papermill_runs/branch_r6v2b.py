#!/usr/bin/env python3
"""Protocol v2, deviation 7 (R6v2b): pre-train the study's aux-enc branch longer, dividing its rate by 10 at each
plateau (at most twice, cap 2000 steps), pre-train the control branch as many rounds at the same rates, and apply
R6v2's competence test (competent < 0.8 x control, validation loss on the true pseudo-labels).

    .venv/bin/python papermill_runs/branch_r6v2b.py [--task detection] [--run-dir runs/study]

Only the branch alone is trained (on the start codec's latents); no arm is compared. The branches live beside R6v2's
in ``<run dir>/aux_warm/<task>/`` (folders ``*_r6v2b``); rounds 1-19 replay R6v2 from the same seed, and the log
says whether they equal R6v2's stored history. The outcome goes to ``docs/protocol_outcomes/study_v2_r6v2b.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's icm_helpers, not an installed copy

from icm_helpers.io import atomic_write_json, read_json  # noqa: E402

OUTCOME = ROOT / "docs" / "protocol_outcomes" / "study_v2_r6v2b.json"
CAP_STEPS = 2000  # deviation 7


def r6v2b_block(r6v2: dict[str, Any]) -> dict[str, Any]:
    """R6v2's pre-training block with deviation 7's changes: a 2000-step cap, two decays by 10 at plateaus, the rate
    constant between them (R6v2's polynomial tail began at half its 40-round cap and was never reached)."""
    rounds = CAP_STEPS // int(r6v2["steps_per_epoch"])
    return {**r6v2, "epochs": rounds, "poly_power": 0.0, "name": "r6v2b",
            "plateau": {**r6v2["plateau"], "decays": 2, "decay_factor": 0.1}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="detection", choices=("detection", "segmentation"))
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "study"), help="the study's runs (default runs/study)")
    args = ap.parse_args(argv)

    from icm_helpers.experiment import Experiment
    from icm_helpers.mechanism import branch_competence

    base = Experiment("study", run_dir=args.run_dir)
    r6v2 = dict(base.task_cfg(args.task)["aux_warm_start"])
    block = r6v2b_block(r6v2)
    ex = Experiment("study", run_dir=args.run_dir, overrides={f"tasks.{args.task}.aux_warm_start": block})
    ex.prepare_data()
    result = branch_competence(ex, args.task)
    seconds = sum(result[arm]["seconds"] or 0.0 for arm in ("competent", "control"))  # the pre-trainings' loops
    # the replayed rounds against R6v2's stored pre-training (the same seed and settings up to its stop)
    stored = base.warm_branch_path(args.task, "enc", int(r6v2.get("seed", 0)))
    shown = stored.parent / "history.json"
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    replay: dict[str, Any] = {"r6v2_history": str(shown), "available": stored.exists()}
    if stored.exists():
        old = read_json(stored.parent / "history.json")
        new = result["competent"]["val_curve"][: len(old)]
        replay.update(rounds=len(old), equal=new == [float(h["val_aux"]) for h in old],
                      max_abs_difference=max(abs(a - float(h["val_aux"])) for a, h in zip(new, old)))
    outcome = {"rule": "protocol v2 deviation 7 (R6v2b)", "task": args.task, "block": block, "seconds": seconds,
               "replay_of_r6v2": replay, **result}
    OUTCOME.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(OUTCOME, outcome)
    print(f"R6v2b {args.task}: competent {result['competent']['val_loss']:.4f} ({result['competent']['rounds']} rounds)"
          f", control {result['control']['val_loss']:.4f}; ratio {result['ratio']:.3f} -> "
          f"{'PASSES' if result['passes'] else 'FAILS'} (< {result['threshold']}); replay of R6v2: {replay}; "
          f"{seconds:.0f} s; {OUTCOME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
