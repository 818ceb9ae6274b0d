"""The protocols' selection rules (docs/protocol.md R1-R6, docs/protocol_v2.md R3v2 / R2v2) as pure functions, pinned
on fixed inputs and on the logged outcomes (docs/protocol_outcomes/), the table of stages, the paper's numbers read
from paper.yaml, the warm-start timing on the real job, and the profiles holding what their logged selection decided."""
from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from icm_helpers.config import REPO_ROOT, load_profile
from icm_helpers.experiment import Experiment
from icm_helpers.io import read_json
from papermill_runs import selection
from papermill_runs.selection import StageContext, StageTable


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "papermill_runs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sel, sel2 = _script("select_settings"), _script("select_settings_v2")
OUTCOMES = REPO_ROOT / "docs" / "protocol_outcomes"


def test_r2_prefers_a_multiple_of_four_epochs():
    seconds = {10 * e: 100.0 + 10 * e for e in range(1, 41)}  # 10 s per epoch of 10 steps
    assert sel.choose_steps(seconds, time_budget_seconds=175.0) == 40  # 4 epochs fit (140 s), 7 would (170 s), 8 not
    assert sel.choose_steps(seconds, time_budget_seconds=185.0) == 80


def test_r2_falls_back_to_whole_epochs_then_to_one_epoch():
    seconds = {10 * e: 100.0 + 10 * e for e in range(1, 41)}
    assert sel.choose_steps(seconds, 135.0) == 30  # no multiple of 4 fits: the largest number that does
    assert sel.choose_steps(seconds, 50.0) == 10  # nothing fits: one epoch, reported as an overrun by stage r2


def _rows(metrics, bpps, lambdas=(0.025, 0.1, 0.4, 1.6, 6.4)):
    return [{"lambda": lam, "val_metric": m, "val_bpp_estimated": b} for lam, m, b in zip(lambdas, metrics, bpps)]


def test_r4_takes_the_widest_monotone_window():
    rows = _rows([0.1, 0.2, 0.15, 0.3, 0.4], [0.1, 0.2, 0.3, 0.6, 1.2])
    windows, chosen = sel.choose_window(rows, 3, [0.4, 0.8, 1.6, 3.2])
    assert [w["monotone"] for w in windows] == [False, False, True]
    assert chosen["lambdas"] == [0.4, 1.6, 6.4]  # the only monotone window, although [0.025..0.4] spans 3x too


def test_r4_without_a_monotone_window_takes_the_widest_span():
    rows = _rows([0.5, 0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4, 1.6])
    _, chosen = sel.choose_window(rows, 3, [0.4, 0.8, 1.6, 3.2])
    assert chosen["lambdas"] == [0.4, 1.6, 6.4]  # span 1.6/0.3 = 5.3 beats 3.0 and 2.0


def test_r6_stops_at_the_first_epoch_improving_less_than_five_percent():
    assert sel.warm_epochs([1.0, 0.8, 0.7, 0.68, 0.5]) == 4  # 0.7 -> 0.68 is 2.9%
    assert sel.warm_epochs([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]) == 8  # always improving: the cap


@pytest.mark.parametrize("profile", ["demo", "study"])
def test_profile_holds_what_its_logged_selection_decided(profile):
    """profiles/<profile>.yaml must carry the settings its logged selection decided: the demo's
    docs/protocol_outcomes/demo_v2.json (protocol v2 section 9, R2d), the study's study_v2.json (R3v2 / R2v2)."""
    if profile == "study":
        path = REPO_ROOT / "docs" / "protocol_outcomes" / "study_v2.json"
        settings = json.loads(path.read_text())["r2v2"]["profile_settings"]
    else:
        path = REPO_ROOT / "docs" / "protocol_outcomes" / "demo_v2.json"
        settings = json.loads(path.read_text())["profile_settings"]
    assert settings, f"{path} has no profile_settings: run the selection for {profile}"
    cfg = load_profile(profile)
    for key, want in settings.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == pytest.approx(want), key
    assert cfg["data"]["counts"]["test"] >= cfg["evaluation"]["max_images"]


@pytest.mark.parametrize("steps, fractions", [(10, [0.3, 0.5]), (20, [0.25, 0.5]), (40, [0.25, 0.5]),
                                              (30, [8 / 30, 0.5]), (3, [1 / 3, 2 / 3]), (2, [0.5]), (1, [])])
def test_budget_fractions_are_the_whole_steps_nearest_a_quarter_and_a_half(steps, fractions):
    """Deviation 5: snapshots after whole steps; 10 steps -> after 3 and 5 (2.5 rounds up), never step 0 or the end."""
    got = sel.budget_fractions(steps)
    assert got == pytest.approx(fractions, abs=1e-12)
    assert all(abs(f * steps - round(f * steps)) < 1e-9 for f in got)


def test_budget_factor_defaults_to_the_protocols_budget_of_the_profile(monkeypatch, capsys, tmp_path):
    """The README's ``select_settings.py --profile demo --stage all`` needs no --budget-factor: the protocol's time
    budget of the profile is the default; a profile without one is told to give it."""
    path = tmp_path / "outcome.json"
    path.write_text(json.dumps({"stages": {s: {} for s in sel.STAGES.names()}}))
    monkeypatch.setattr(sel, "outcome_path", lambda profile: path)
    monkeypatch.setattr(sel, "settings_overrides", lambda ctx: {})
    assert sel.main(["--profile", "demo"]) == 0 and json.loads(path.read_text())["budget"]["factor"] == 1.45
    assert sel.main(["--profile", "study", "--stage", "r1"]) == 0
    assert json.loads(path.read_text())["budget"]["factor"] == 8.5
    with pytest.raises(SystemExit):
        sel.main(["--profile", "mine"])
    assert "--budget-factor is needed for profile 'mine'" in capsys.readouterr().err


def test_stages_are_a_table_dispatched_by_name(capsys):
    """Each script's stages are registered in a table, in the order ``--stage all`` runs them (docs/protocol.md:
    R6 before R5); a name is registered once; an unknown name is refused with the valid ones; ``--stage`` offers the
    table's names."""
    assert sel.STAGES.names() == ("r1", "costs", "fixed", "r2", "r3", "r4", "r6", "r5")
    assert sel2.STAGES.names() == ("r3v2", "costs", "r2v2")
    table = StageTable()
    table.register("a")(lambda ctx: {"got": ctx})
    assert table.run("a", "ctx") == {"got": "ctx"}
    with pytest.raises(ValueError, match="stage 'a' is registered twice"):
        table.register("a")(lambda ctx: None)
    with pytest.raises(ValueError, match="unknown stage 'b'; valid stages: a"):
        table.run("b", None)
    with pytest.raises(SystemExit):
        sel.main(["--profile", "demo", "--stage", "r7"])
    assert "'r1', 'costs', 'fixed', 'r2', 'r3', 'r4', 'r6', 'r5', 'all'" in capsys.readouterr().err


def test_the_papers_numbers_are_read_from_paper_yaml(monkeypatch):
    """Sec. 4.1: detection lr 1e-4, segmentation 5e-5; the lambdas of its sweeps and Sec. 4.2's ablation lambdas
    (1.6 as notebook 05 explains, 2). Both scripts take them from paper.yaml: an edited paper.yaml changes R3's,
    R3v2's and R4's candidates."""
    assert selection.paper_task_settings("detection") == {"lr": 1e-4, "lambdas": [0.4, 0.8, 1.6, 3.2],
                                                          "ablation_lambda": 1.6}
    assert selection.paper_task_settings("segmentation") == {"lr": 5e-5, "lambdas": [1, 2, 4, 8], "ablation_lambda": 2}
    real = selection.load_profile

    def edited(name, overrides=None):
        cfg = real(name, overrides)
        if name == "paper":
            cfg["tasks"]["detection"]["train"]["lr"] = 2e-4
            cfg["tasks"]["detection"]["lambdas"] = [0.5, 1, 2, 4]
        return cfg

    monkeypatch.setattr(selection, "load_profile", edited)
    assert sel.lr_candidates("detection") == pytest.approx([2e-4, 6e-4, 2e-3])
    assert sel.lambda_ladder("detection") == pytest.approx([0.03125, 0.125, 0.5, 2, 8])
    assert sel2.lr_candidates("detection") == pytest.approx([2e-5, 6.67e-5, 2e-4])


def test_the_candidates_are_the_protocols():
    """R3: the paper's rate x {1, 3, 10} (the run dirs are named by ``lr:g``, R4 reuses R3's); R4: the paper's
    smallest lambda x 4^k, k = -2..2; R3v2: the paper's rate x {1/10, 1/3, 1} to 3 significant digits."""
    assert [f"{lr:g}" for lr in sel.lr_candidates("detection")] == ["0.0001", "0.0003", "0.001"]
    assert [f"{lr:g}" for lr in sel.lr_candidates("segmentation")] == ["5e-05", "0.00015", "0.0005"]
    assert sel.lambda_ladder("detection") == pytest.approx([0.025, 0.1, 0.4, 1.6, 6.4], rel=1e-15)
    assert sel.lambda_ladder("segmentation") == [0.0625, 0.25, 1, 4, 16]
    assert sel2.lr_candidates("detection") == [1e-05, 3.33e-05, 1e-04]
    assert sel2.lr_candidates("segmentation") == [5e-06, 1.67e-05, 5e-05]


def test_r1_converged_iff_the_last_five_epochs_changed_by_less_than_one_percent():
    assert sel.convergence([9.0, 3.0, 1.008, 1.0, 1.004, 1.002, 1.006]) == {
        "change_over_last_5_epochs": pytest.approx(0.008), "converged": True}
    assert sel.convergence([9.0, 3.0, 1.01, 1.0, 1.004, 1.002, 1.006])["converged"] is False  # 1.0%: not below


def test_r3_takes_the_lowest_loss_and_within_one_percent_the_smaller_rate():
    rows = [{"lr": 1e-4, "val_main": 1.31}, {"lr": 3e-4, "val_main": 1.30}, {"lr": 1e-3, "val_main": 1.40}]
    assert sel.choose_lr(rows) == 1e-4  # 1.31 is within 1% of 1.30
    rows[0]["val_main"] = 1.32
    assert sel.choose_lr(rows) == 3e-4


def test_r5_takes_the_largest_split_that_fits_else_48():
    seconds = {n: 100.0 + n for n in sel.TEST_IMAGES}
    assert list(seconds) == [48 + 16 * k for k in range(14)]
    assert sel.choose_test_images(seconds, 200.0) == 96
    assert sel.choose_test_images(seconds, 10.0) == 48  # nothing fits: the smallest, the overrun shown by its table


class _CostModelProfile:
    """What the cost model reads of an Experiment, fixed here so that only the model is pinned."""
    cfg = {"ablation": {"positions": [None, "enc", "dec", "task"]}}
    _tasks = {"detection": {"lambdas": [0.1, 0.4, 1.6], "budget_fractions": [0.3, 0.5], "roi_qf": 1.4,
                            "aux_inits": ["warm", "cold"]},
              "segmentation": {"lambdas": [0.25, 1, 4, 16], "roi_qf": None, "aux_inits": ["warm"]}}

    def tasks(self):
        return list(self._tasks)

    def task_cfg(self, task):
        return self._tasks[task]

    def train_seeds(self):
        return [0, 1]

    def aux_inits(self, task):
        return self._tasks[task]["aux_inits"]

    def anchor_names(self):
        return ["jpeg"]  # Pillow's: 7 qualities


def test_the_cost_model_is_unchanged():
    """R2 / R5's estimate of a profile's seconds (``profile_seconds``) on fixed inputs: a change of the model fails."""
    costs = {"step": {"detection/baseline": 0.6, "detection/aux_enc": 0.9, "segmentation/baseline": 0.5,
                      "segmentation/aux_enc": 0.7},
             "warm_step": {"detection": 0.45, "segmentation": 0.3}, "eval_image": {"detection": 0.09,
                                                                                  "segmentation": 0.08},
             "bitmap_image": {"detection": 0.03, "segmentation": 0.035},
             "anchor_image": {"detection": 0.017, "segmentation": 0.015}}
    got = [sel.profile_seconds(_CostModelProfile(), costs, steps, warm, n, fixed, transfer)
           for steps, warm, n, fixed, transfer in [(10, 8, 48, 90.0, False), (40, 2, 64, 0.0, True),
                                                    (30, 0, 16, 12.5, False)]]
    assert got == pytest.approx([939.872, 1978.096, 1045.124], rel=1e-12)


@pytest.mark.parametrize("profile, L", [("demo", 3), ("study", 4)])
def test_the_rules_decide_what_the_logged_selection_decided(profile, L):
    """The logged outcomes of protocol v1 read back: every rule, applied to the measurements logged, gives the
    decision logged (R1-R6), and the candidates are the ones that were run."""
    st = json.loads((OUTCOMES / f"{profile}.json").read_text())["stages"]
    assert sel.convergence(st["r1"]["val_loss"]) == {k: st["r1"][k] for k in ("change_over_last_5_epochs", "converged")}
    by_steps = {int(k): v for k, v in st["r2"]["estimated_seconds_by_steps"].items()}
    assert sel.choose_steps(by_steps, st["r2"]["budget_seconds"]) == st["r2"]["steps"]
    for task in selection.profile_tasks(profile):
        assert [r["lr"] for r in st["r3"][task]["candidates"]] == sel.lr_candidates(task)
        assert sel.choose_lr(st["r3"][task]["candidates"]) == st["r3"][task]["lr"]
        ladder = st["r4"][task]["ladder"]
        assert [r["lambda"] for r in ladder] == sel.lambda_ladder(task)
        windows, chosen = sel.choose_window(ladder, L, selection.paper_task_settings(task)["lambdas"])
        assert windows == st["r4"][task]["windows"] and chosen["lambdas"] == st["r4"][task]["lambdas"]
        assert sel.warm_epochs(st["r6"][task]["val_aux_by_epoch"]) == st["r6"][task]["epochs"]
    by_images = {int(k): v for k, v in st["r5"]["estimated_seconds_by_test_images"].items()}
    assert sel.choose_test_images(by_images, st["r5"]["budget_seconds"]) == st["r5"]["test_images"]


def test_the_logged_demo_outcome_gives_its_profile_settings():
    """``settings_overrides`` reads the logged demo outcome back into the settings it logged."""
    path = OUTCOMES / "demo.json"
    outcome = json.loads(path.read_text())
    ctx = StageContext("demo", argparse.Namespace(), outcome, path, selection.profile_tasks("demo"), 1.45, 230.0)
    assert ctx.time_budget_seconds == pytest.approx(outcome["stages"]["r2"]["budget_seconds"])
    assert sel.settings_overrides(ctx) == outcome["profile_settings"]


def test_the_v2_rules_decide_what_the_logged_selection_decided(tmp_path, monkeypatch):
    """study_v2.json reads back: R3v2 on its rows gives its rate, and stage r2v2 (``fund_parts`` within 15 x its
    smoke run) gives the logged plan; a logged plan is not redone."""
    logged = json.loads((OUTCOMES / "study_v2.json").read_text())
    for task, r3 in logged["r3v2"].items():
        assert [r["lr"] for r in r3["rows"]] == sel2.lr_candidates(task)
        assert sel2.choose_lr(r3["rows"]) == r3["lr"]
    path = tmp_path / "study_v2.json"
    path.write_text(json.dumps({k: v for k, v in logged.items() if k != "r2v2"}))
    monkeypatch.setattr(sel2, "OUTCOME", path)
    assert sel2.main(["--stage", "r2v2", "--smoke-seconds", str(logged["smoke_seconds"])]) == 0
    assert json.loads(path.read_text())["r2v2"] == logged["r2v2"]
    before = path.read_text()
    assert sel2.main(["--stage", "r2v2", "--smoke-seconds", "1"]) == 0 and path.read_text() == before


@pytest.mark.parametrize("seconds, a, d, modelled", [
    (6000, (600, None), {"funded": False, "needs": 3190.0, "left": 26.0}, 5974.0),
    (15000, (1000, 200), {"funded": False, "needs": 3190.0, "left": 376.4}, 14623.6),
    (25000, (1000, 300), {"funded": True, "curve_steps": 600, "bd_steps": None, "bd_funded": False}, 22313.6),
    (40000, (1000, 1000), {"funded": True, "curve_steps": 1000, "bd_steps": 100, "bd_funded": True}, 37923.2)])
def test_the_r2v2_arithmetic_is_unchanged(seconds, a, d, modelled):
    """R2v2's funding on fixed costs: (a)'s curve and BD-rate steps, (d)'s funding and the modelled seconds."""
    cost = {"wo_aux": 0.6, "aux_enc": 0.9, "mse": 0.3, "branch": 0.35, "validation": 3.0}
    plan = sel2.fund_parts({"costs": {"detection": cost, "segmentation": cost}}, seconds)
    assert (plan["a"]["curve_steps"], plan["a"]["bd_steps"]) == a and plan["b"]["seconds"] == pytest.approx(324.0)
    assert plan["d"] == pytest.approx({"task": "segmentation", **d}) and "overrun" not in plan
    assert plan["modelled_seconds"] == pytest.approx(modelled, rel=1e-12)


def test_steps_are_timed_from_two_lengths_of_one_job():
    """What both runs do once (the first step, a validation pass) cancels in the difference."""
    short, long = {"loop_seconds": 3.5, "steps": 1}, {"loop_seconds": 11.5, "steps": 21}
    assert sel.step_seconds_between(short, long) == pytest.approx(0.4)


def _tiny_selection_experiments(monkeypatch) -> dict:
    """``sel.experiment`` on a tiny world (12 / 4 / 4 images, 1-epoch recognizer and codec); returns its overrides,
    which a test may change (e.g. the split sizes) before its next call."""
    tiny = {"data.counts": {"train": 12, "val": 4, "test": 4}, "recognizers.detection.train.epochs": 1,
            "codec.train.epochs": 1}

    def tiny_experiment(profile, overrides=None, log=None, name="main", root=None):
        ex = Experiment(profile, run_dir=root / name, log=None, overrides={**tiny, **(overrides or {})})
        ex.prepare_data()
        return ex

    monkeypatch.setattr(sel, "experiment", tiny_experiment)
    return tiny


def test_the_warm_step_is_timed_on_the_real_pre_training_job(tmp_path, monkeypatch):
    """Stage costs times a warm-start step on ``Experiment.warm_aux_branch`` itself (here the smoke profile's block on
    a tiny world, 1 epoch of 1 and of 3 steps instead of 1 and 21), side by side, read from their timing.json."""
    monkeypatch.setattr(sel, "WARM_TIMING_STEPS", (1, 3))
    tiny = _tiny_selection_experiments(monkeypatch)
    seconds = sel.warm_step_seconds("smoke", "detection", tmp_path)
    runs = sorted((tmp_path / "timing" / "aux_warm" / "detection").iterdir())
    assert [p.name for p in runs] == ["enc_seed0_timing1", "enc_seed0_timing3"]
    short, long = (read_json(p / "timing.json") for p in runs)
    assert (short["steps"], long["steps"]) == (1, 3)  # no order of the seconds: they depend on the load
    assert seconds == pytest.approx((long["loop_seconds"] - short["loop_seconds"]) / 2)
    tiny["data.counts"] = {"train": 8, "val": 4, "test": 4}  # 2 batches of 4: an epoch cannot hold 3 steps
    with pytest.raises(ValueError, match="2 batches of 4, fewer than the 3 steps"):
        sel.warm_step_seconds("smoke", "detection", tmp_path / "small")


def test_the_icm_step_is_timed_on_the_real_training_job(tmp_path, monkeypatch):
    """Stage costs times an ICM step on ``Experiment.train`` itself (the smoke profile on a tiny world, 1 epoch of 1
    and of 3 steps), w/o aux and with a branch, read from the runs' timing.json."""
    monkeypatch.setattr(sel, "ICM_TIMING_STEPS", (1, 3))
    tiny = _tiny_selection_experiments(monkeypatch)
    for position in (None, "enc"):
        seconds = sel.icm_step_seconds("smoke", "detection", position, tmp_path)
        short, long = (read_json(p) for p in sorted(tmp_path.glob("icm_timing*/icm/detection/*/timing.json"))
                       if (position is None) == ("baseline" in p.parent.name))
        assert (short["steps"], long["steps"]) == (1, 3)  # no order of the seconds: they depend on the load
        assert seconds == pytest.approx((long["loop_seconds"] - short["loop_seconds"]) / 2)
    tiny["data.counts"] = {"train": 8, "val": 4, "test": 4}  # 2 batches of 4: an epoch cannot hold 3 steps
    with pytest.raises(ValueError, match="2 batches of 4, fewer than the 3 steps"):
        sel.icm_step_seconds("smoke", "detection", None, tmp_path / "small")


def test_r2d_takes_the_most_steps_that_fit_else_twenty():
    """Protocol v2 section 9: S from {60, 50, 40, 30, 20}, the largest whose modelled seconds fit; none fits -> 20;
    the warm-up is max(10, S / 10)."""
    from papermill_runs import select_settings_demo_v2 as d2

    table = {60: 400.0, 50: 350.0, 40: 300.0, 30: 250.0, 20: 200.0}
    assert d2.choose_steps(table, 300.0) == 40
    assert d2.choose_steps(table, 299.9) == 30
    assert d2.choose_steps(table, 1000.0) == 60
    assert d2.choose_steps(table, 100.0) == 20
    assert [d2.warmup_steps(s) for s in (20, 60, 100, 300)] == [10, 10, 10, 30]
    over = d2.step_overrides(["detection"], 30)
    assert over == {"tasks.detection.train.epochs": 1, "tasks.detection.train.steps_per_epoch": 30,
                    "tasks.detection.train.warmup_steps": 10}


def test_the_logged_demo_v2_outcome_gives_its_profile_settings():
    """The logged R2d decision follows from its logged table and budget (a golden test of the rule on its own log)."""
    from papermill_runs import select_settings_demo_v2 as d2

    outcome = json.loads((OUTCOMES / "demo_v2.json").read_text())
    r2d = outcome["stages"]["r2d"]
    table = {int(k): v for k, v in r2d["estimated_seconds_by_steps"].items()}
    assert d2.choose_steps(table, r2d["budget_seconds"]) == r2d["steps"]
    assert r2d["budget_seconds"] == pytest.approx(outcome["budget"]["factor"] * outcome["budget"]["smoke_seconds"])
    assert outcome["profile_settings"] == d2.step_overrides(["detection", "segmentation"], r2d["steps"])


def test_costs_without_warm_starts_time_no_pre_training(tmp_path, monkeypatch):
    """A profile whose branch is shipped (the demo under protocol v2) measures its costs with ``warm_starts=False``:
    every warm-start cost is 0 and no pre-training job runs; the ICM steps are still timed on the real job."""
    import argparse

    from papermill_runs.selection import StageContext

    monkeypatch.setattr(sel, "ICM_TIMING_STEPS", (1, 2))
    tiny = _tiny_selection_experiments(monkeypatch)
    tiny["data.counts"] = {"train": 12, "val": 4, "test": 16}  # the costs stage evaluates 16 test images
    monkeypatch.setattr(sel, "warm_step_seconds", lambda *a: pytest.fail("a warm-start step was timed"))
    ctx = StageContext(profile="smoke", args=argparse.Namespace(), outcome={"stages": {}},
                       outcome_path=tmp_path / "outcome.json", tasks=["detection"], budget_factor=1.0,
                       smoke_seconds=1.0)
    out = sel.measure_costs(ctx, root=tmp_path, warm_starts=False)
    assert out["warm_step"] == {"detection": 0.0} and "not timed" in out["warm_step_job"]
    assert set(out["step"]) == {"detection/baseline", "detection/aux_enc"}
