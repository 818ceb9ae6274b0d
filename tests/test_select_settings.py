"""The protocol's selection rules (docs/protocol.md R2, R4, R6) as pure functions, and the demo profile holding what
its logged outcome decided."""
from __future__ import annotations

import importlib.util
import json

import pytest

from icm_helpers.config import REPO_ROOT, load_profile

_spec = importlib.util.spec_from_file_location("select_settings", REPO_ROOT / "papermill_runs" / "select_settings.py")
sel = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sel)


def test_r2_prefers_a_multiple_of_four_epochs():
    seconds = {10 * e: 100.0 + 10 * e for e in range(1, 41)}  # 10 s per epoch of 10 steps
    assert sel.choose_steps(seconds, budget=175.0) == 40  # 4 epochs fit (140 s); 7 would (170 s) but 8 does not
    assert sel.choose_steps(seconds, budget=185.0) == 80


def test_r2_falls_back_to_whole_epochs_then_to_one_epoch():
    seconds = {10 * e: 100.0 + 10 * e for e in range(1, 41)}
    assert sel.choose_steps(seconds, budget=135.0) == 30  # no multiple of 4 fits: the largest number that does
    assert sel.choose_steps(seconds, budget=50.0) == 10  # nothing fits: one epoch, reported as an overrun by stage r2


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
    docs/protocol_outcomes/demo.json (protocol v1, R2-R6), the study's study_v2.json (protocol v2, R3v2 / R2v2)."""
    if profile == "study":
        path = REPO_ROOT / "docs" / "protocol_outcomes" / "study_v2.json"
        settings = json.loads(path.read_text())["r2v2"]["profile_settings"]
    else:
        path = REPO_ROOT / "docs" / "protocol_outcomes" / f"{profile}.json"
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


def test_budget_factor_defaults_to_the_protocols_budget_of_the_profile(monkeypatch, capsys):
    """The README's ``select_settings.py --profile demo --stage all`` needs no --budget-factor: the protocol's budget
    of the profile is the default; a profile without one is told to give it."""
    seen = {}
    monkeypatch.setattr(sel, "load_outcome", lambda profile: {"stages": {s: {} for s in sel.STAGES}})
    monkeypatch.setattr(sel, "save_outcome", lambda profile, outcome: seen.update(outcome))
    monkeypatch.setattr(sel, "settings_overrides", lambda profile, outcome: {})
    assert sel.main(["--profile", "demo"]) == 0 and seen["budget"]["factor"] == 1.45
    assert sel.main(["--profile", "study", "--stage", "r1"]) == 0 and seen["budget"]["factor"] == 8.5
    with pytest.raises(SystemExit):
        sel.main(["--profile", "mine"])
    assert "--budget-factor is needed for profile 'mine'" in capsys.readouterr().err
