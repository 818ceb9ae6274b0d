"""Protocol v2's machinery (docs/protocol_v2.md): paired random numbers (V7), the control branch's labels, the MSE
positive control, the warm-up schedule (V2), the plateau rule (R6v2), log-spaced validation that does not perturb
training, and the statistics of the curves and cosines."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import AUX_DET_CFG, DET_CFG, StopAfterEpoch
from scipy import stats

from icm_helpers.aux_branches import build_aux_branch, own_random_stream, seed_random_stream, shuffle_labels
from icm_helpers.codec import build_codec
from icm_helpers.experiment import Experiment
from icm_helpers.mechanism import (CURVE_ARMS, curve_specs, flat_cosine, gradient_cosines, paired_differences,
                                   summarise_cosines, t_interval)
from icm_helpers.methods import METHODS, icm_method_id
from icm_helpers.recognizers import build_recognizer
from icm_helpers.training import IcmSpec, TrainConfig, icm_terms, poly_lr_lambda, train_icm
from icm_helpers.training.stopping import plateau


def _det_models(seed_branch: bool = True):
    torch.manual_seed(0)
    rec = build_recognizer("detection", "suite", 3, **DET_CFG).freeze()
    torch.manual_seed(1)
    codec = build_codec(N=16)
    aux = build_aux_branch("detection", "enc", 16, 3, **AUX_DET_CFG)
    if seed_branch:
        seed_random_stream(aux, 0)
    return rec, codec, aux


def _two_steps_state(x, with_branch: bool, seed_branch: bool = True):
    """The global RNG state after two forward passes of Eq. 4 (no branch) or Eq. 5 (branch), same seed."""
    rec, codec, aux = _det_models(seed_branch)
    codec.train()
    spec = IcmSpec("detection", 1.6, "enc" if with_branch else None, 0.5)
    torch.manual_seed(5)
    terms = [icm_terms(spec, codec, rec, aux if with_branch else None, x) for _ in range(2)]
    return torch.get_rng_state(), [(float(t["rate"].detach()), float(t["task"].detach())) for t in terms]


def test_the_branch_draws_from_its_own_stream_so_the_arms_share_the_codec_and_recognizer_draws(train_set):
    x = torch.stack([train_set[i]["image"] for i in range(4)])
    state_plain, terms_plain = _two_steps_state(x, with_branch=False)
    state_aux, terms_aux = _two_steps_state(x, with_branch=True)
    assert torch.equal(state_plain, state_aux)
    # the second step's codec noise and recognizer sampling are the same draws: its rate and task loss are equal
    assert terms_plain == terms_aux
    # negative control: a branch on the global stream (no stream of its own) shifts the draws of the next step
    state_global, terms_global = _two_steps_state(x, with_branch=True, seed_branch=False)
    assert not torch.equal(state_plain, state_global)
    assert terms_global[1] != terms_plain[1]


def test_own_random_stream_advances_the_branch_state_and_restores_the_global_one():
    branch = torch.nn.Linear(2, 2)
    seed_random_stream(branch, 3)
    before_branch = branch.rng_state.clone()
    torch.manual_seed(0)
    global_before = torch.get_rng_state()
    with own_random_stream(branch):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), global_before)
    assert not torch.equal(branch.rng_state, before_branch)
    with own_random_stream(branch):
        b = torch.rand(3)
    gen = torch.Generator().manual_seed(3 + 7_919)
    assert torch.equal(torch.cat([a, b]), torch.rand(6, generator=gen))


def test_shuffled_labels_give_each_image_the_next_images_labels():
    seg = torch.arange(3).view(3, 1, 1).expand(3, 2, 2)
    assert shuffle_labels(seg)[:, 0, 0].tolist() == [1, 2, 0]
    det = [{"i": 0}, {"i": 1}, {"i": 2}]
    assert [d["i"] for d in shuffle_labels(det)] == [1, 2, 0]
    with pytest.raises(ValueError, match=">= 2"):
        shuffle_labels(seg[:1])


def test_control_and_mse_arms_have_their_own_method_ids_and_keep_the_papers_run_identity():
    control = IcmSpec("detection", 1.6, "enc", aux_init="warm", aux_labels="shuffled")
    mse = IcmSpec("detection", 0.0483, None, objective="mse")
    assert control.method == "aux_enc_warm_shuffled" and control.method in METHODS
    assert mse.method == "mse_finetune" and METHODS[mse.method].objective == "mse"
    assert icm_method_id(None) == "baseline"
    # the defaults stay out of the stored identity: runs trained before these fields existed keep their meta
    assert "aux_labels" not in IcmSpec("detection", 1.6, "enc").as_dict()
    assert "objective" not in IcmSpec("detection", 1.6, None).as_dict()
    with pytest.raises(ValueError, match="no auxiliary branch|takes no auxiliary"):
        IcmSpec("detection", 0.05, "enc", objective="mse")
    with pytest.raises(ValueError, match="no branch"):
        IcmSpec("detection", 1.6, None, aux_labels="shuffled")


def test_the_mse_objective_is_eq2_on_the_padded_image(train_set):
    torch.manual_seed(1)
    codec = build_codec(N=16).eval()
    x = torch.stack([train_set[i]["image"] for i in range(2)])
    terms = icm_terms(IcmSpec("detection", 0.05, None, objective="mse"), codec, None, None, x)
    assert set(terms) == {"loss", "main", "rate", "mse"}
    assert torch.allclose(terms["loss"], terms["rate"] + 0.05 * 255 ** 2 * terms["mse"])  # Eq. 2, float32 sums


def test_warmup_rises_linearly_then_the_schedule_is_unchanged():
    f = poly_lr_lambda(100, 0.5, 0.9, warmup_steps=10)
    plain = poly_lr_lambda(100, 0.5, 0.9)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)], abs=1e-12)
    assert [f(s) for s in range(10, 100)] == [plain(s) for s in range(10, 100)]
    assert f(99) < 0.05  # it decays within the run (V2)
    assert "warmup_steps" not in TrainConfig().job_meta()  # the default keeps earlier jobs' identity
    assert TrainConfig(warmup_steps=10).job_meta()["warmup_steps"] == 10
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)


def test_plateau_stops_when_a_window_brings_no_one_percent_gain_and_not_on_one_noisy_round():
    h = lambda *v: [{"val_aux": x} for x in v]  # noqa: E731
    stop = plateau("val_aux", rel=0.01, patience=2)
    assert not stop(h(10, 9, 8))
    assert not stop(h(10, 9, 8.95))  # one flat round: the window of 2 still holds a gain (9 < 10)
    assert stop(h(10, 9, 8.95, 8.99))  # best of the last two (8.95) is within 1% of the best before (9)
    assert not stop(h(10, 9, 9.5, 8.5))  # a gain inside the window: not a plateau
    # the registered study's branch: 1.280, 1.354, 1.279 -- a noisy round, then back: with a window of 4 and at
    # least 8 rounds this is no plateau (it stopped the first version of the rule after 3 rounds)
    windowed = plateau("val_aux", rel=0.01, patience=4, min_epochs=8)
    assert plateau("val_aux", rel=0.01, patience=2)(h(1.28, 1.354, 1.2785))
    assert not windowed(h(1.28, 1.354, 1.2785))
    assert not windowed(h(1.28, 1.354, 1.2785, 1.2, 1.15, 1.1, 1.05, 1.0))  # still improving at the minimum
    assert windowed(h(1.28, 1.2, 1.1, 1.0, 1.001, 0.999, 1.002, 0.995))  # 4 rounds within 1% of 1.0
    assert plateau("val_aux", max_epochs=3)(h(10, 9, 8))
    with pytest.raises(KeyError, match="val_aux"):
        stop([{"val_aux": 1.0}, {"loss": 2.0}, {"val_aux": 1.0}])
    with pytest.raises(ValueError, match="min_epochs"):
        plateau(min_epochs=-1)


def test_plateau_with_decays_divides_the_rate_at_each_plateau_then_stops_and_each_phase_starts_afresh():
    """R6v2b (deviation 7): the first ``decays`` plateaus divide the rate by 10; each phase is judged as a new run (its
    own min_epochs, its window against the phase's earlier rounds only); the next plateau stops."""
    h = lambda *v: [{"val_aux": x} for x in v]  # noqa: E731
    rule = plateau("val_aux", rel=0.01, patience=2, min_epochs=3, decays=2, decay_factor=0.1)
    first = [10, 9, 9.0, 9.0]  # plateau after round 4 (best of the last 2 = 9, not 1% below 9)
    assert rule.plateaus(h(*first)) == [4] and not rule(h(*first))
    assert rule.lr_scale(h(*first[:3])) == 1.0 and rule.lr_scale(h(*first)) == pytest.approx(0.1)
    # the new phase needs its own 3 rounds: [8, 8, 8] is flat already, but with only the phase's rounds compared
    # (never the window of the phase before), the second plateau comes after round 7, not round 5
    second = first + [8, 8, 8]
    assert rule.plateaus(h(*second[:6])) == [4]
    assert rule.plateaus(h(*second)) == [4, 7] and rule.lr_scale(h(*second)) == pytest.approx(0.01)
    assert not rule(h(*second))
    third = second + [7, 7, 7]
    assert rule.plateaus(h(*third)) == [4, 7, 10] and rule(h(*third))  # the plateau after the last decay stops
    assert rule.lr_scale(h(*third)) == pytest.approx(0.01)  # never more than `decays` divisions
    # decays=0 is R6v2's rule exactly: the first plateau stops
    assert plateau("val_aux", rel=0.01, patience=2, min_epochs=3)(h(*first))
    assert plateau("val_aux", rel=0.01, patience=2, min_epochs=3).lr_scale(h(*first)) == 1.0
    # a gain inside a later phase postpones its plateau
    assert rule.plateaus(h(*first, 8, 7, 6, 5)) == [4]
    with pytest.raises(ValueError, match="decay_factor"):
        plateau(decays=1, decay_factor=1.5)


def test_fit_applies_lr_scale_from_the_history_and_a_resumed_run_gets_the_same_rates_and_weights(tmp_path):
    """An ``LrScale`` callback sets each epoch's rate from the history; a run killed after any epoch and resumed
    follows the same rates and ends with the same weights (bit-identical: same arithmetic, same RNG states)."""
    from icm_helpers.training import LrScale
    from icm_helpers.training.loop import fit

    def run(ckpt, stop_after=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        seen = []

        def loader(epoch):
            g = torch.Generator().manual_seed(epoch)
            for _ in range(2):
                yield torch.randn(3, 4, generator=g)

        def step_fn(x, step):
            seen.append(opt.param_groups[0]["lr"])
            loss = model(x + 0.01 * torch.randn_like(x)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {"loss": loss.detach()}

        res = fit(modules={"m": model}, optimizers={"main": opt}, step_fn=step_fn, loader_fn=loader, epochs=4,
                  steps_per_epoch=2, lr_lambda=lambda s: 1.0, checkpoint_path=ckpt, meta={"job": "tiny"}, log=None,
                  callbacks=[LrScale(lambda hist: 0.1 ** (len(hist) // 2)),
                             *([StopAfterEpoch(stop_after)] if stop_after else [])])
        return model, res, seen

    model, res, seen = run(tmp_path / "a" / "state.pt")
    # epochs 1-2 at 1e-2, epochs 3-4 at 1e-3: every step of an epoch, its first one included
    assert seen == pytest.approx([1e-2] * 4 + [1e-3] * 4)
    assert [h["lr"] for h in res.history] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    ckpt = tmp_path / "b" / "state.pt"
    run(ckpt, stop_after=2)  # killed right at the change of rate: the checkpoint's optimizer still holds 1e-2
    resumed, _, seen_b = run(ckpt)
    assert seen_b == pytest.approx([1e-3] * 4)
    for p, q in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)


def test_validation_at_steps_records_a_curve_and_does_not_change_the_training(train_set, tmp_path):
    cfg = TrainConfig(epochs=2, steps_per_epoch=2, batch_size=4, lr=1e-3, crop_size=None, warmup_steps=2)
    val = [train_set[i] for i in range(4)]
    runs = {}
    for name, steps in (("plain", None), ("curve", [0, 1, 3])):
        rec, codec, aux = _det_models()
        spec = IcmSpec("detection", 1.6, "enc", 0.5)
        train_icm(spec, codec, rec, aux, train_set, cfg, tmp_path / name / "state.pt", val_set=val if steps else None,
                  log=None, val_steps=steps, curve_path=tmp_path / name / "curve.json")
        runs[name] = {k: v.clone() for k, v in {**codec.state_dict(), **aux.state_dict()}.items()}
    assert runs["plain"].keys() == runs["curve"].keys()
    # CompressAI's MaskedConv2d zeroes its masked-out weights in place at each forward and Adam moves them again:
    # after the last step a validation forward has zeroed them in one run only; the conv never uses them
    mask = codec.context_prediction.mask
    for run in runs.values():
        run["context_prediction.weight"] = run["context_prediction.weight"] * mask
    assert all(torch.equal(runs["plain"][k], runs["curve"][k]) for k in runs["plain"])
    import json
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [p["step"] for p in curve] == [0, 1, 3]
    assert all(math.isfinite(p["val_main"]) for p in curve)
    assert curve[0]["val_main"] != curve[-1]["val_main"]


def test_t_interval_matches_scipy_and_one_value_has_no_interval():
    v = [0.1, -0.3, 0.25, 0.05]
    got = t_interval(v)
    lo, hi = stats.t.interval(0.95, 3, loc=np.mean(v), scale=stats.sem(v))
    assert got["low"] == pytest.approx(lo, rel=1e-12) and got["high"] == pytest.approx(hi, rel=1e-12)
    assert math.isnan(t_interval([1.0])["low"])


def test_paired_differences_pair_runs_of_the_same_seed():
    curves = {"baseline": {0: [(0, 1.0), (10, 0.9)], 1: [(0, 1.0), (10, 0.8)]},
              "aux_enc_warm": {0: [(0, 1.0), (10, 0.85)], 1: [(0, 1.0), (10, 0.78)], 2: [(0, 1.0), (10, 0.1)]}}
    rows = {(r["pair"], r["step"]): r for r in paired_differences(curves)}
    r = rows[("aux-enc - w/o aux", 10)]  # arms keyed by method id, named by their labels
    assert r["arms"] == ["aux_enc_warm", "baseline"]
    assert r["seeds"] == [0, 1] and r["values"] == pytest.approx([-0.05, -0.02])
    assert rows[("aux-enc - w/o aux", 0)]["values"] == [0.0, 0.0]


def test_flat_cosine_counts_unreached_parameters_as_zero():
    a = [torch.tensor([1.0, 0.0]), None]
    b = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
    cos, na, nb = flat_cosine(a, b)
    assert cos == pytest.approx(1 / math.sqrt(2)) and na == 1.0 and nb == pytest.approx(math.sqrt(2))


def test_gradient_cosines_share_the_main_gradient_across_branches(train_set):
    rec, codec, aux = _det_models()
    _, _, other = _det_models()
    spec = IcmSpec("detection", 1.6, "enc", 0.5)
    shuffled = IcmSpec("detection", 1.6, "enc", 0.5, aux_labels="shuffled")
    x = torch.stack([train_set[i]["image"] for i in range(4)])
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    rows = gradient_cosines(codec, rec, {"a": (aux, spec), "b": (other, shuffled)}, [x, x.flip(0)])
    assert len(rows) == 4 and all(-1 <= r["cos"] <= 1 for r in rows)
    for i in (0, 1):  # same batch: the same codec noise and recognizer sampling, so the same main gradient
        a, b = (r for r in rows if r["batch"] == i)
        assert a["norm_main"] == b["norm_main"]
    # nothing was updated (CompressAI's MaskedConv2d zeroes its masked weights in place at its first forward)
    changed = [k for k, v in codec.state_dict().items() if not torch.equal(before[k], v)]
    assert changed in ([], ["context_prediction.weight"]), changed
    assert torch.equal(before["context_prediction.weight"] * codec.context_prediction.mask,
                       codec.context_prediction.weight)


def _select_v2():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "papermill_runs" / "select_settings_v2.py"
    spec = importlib.util.spec_from_file_location("select_settings_v2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_r3v2_takes_the_lowest_loss_and_within_one_percent_the_larger_rate():
    sel2 = _select_v2()

    rows = [{"lr": 1e-5, "val_main": 1.30}, {"lr": 3.3e-5, "val_main": 1.31}, {"lr": 1e-4, "val_main": 1.40}]
    assert sel2.choose_lr(rows) == 3.3e-5  # 1.31 is within 1% of 1.30
    rows[1]["val_main"] = 1.32
    assert sel2.choose_lr(rows) == 1e-5


def test_r2v2_funds_the_parts_in_order_and_never_cuts_the_detection_curves_below_300_steps():
    sel2 = _select_v2()

    cost = {"wo_aux": 0.6, "aux_enc": 0.9, "mse": 0.3, "branch": 0.35, "validation": 3.0}
    outcome = {"costs": {"detection": cost, "segmentation": cost}}
    tight = sel2.fund_parts(outcome, 1000.0)  # less than the curves need
    assert tight["a"]["curve_steps"] == 300 and tight["overrun"] and tight["a"]["bd_funded"] is False
    assert tight["d"]["funded"] is False
    roomy = sel2.fund_parts(outcome, 1e6)
    assert roomy["a"]["curve_steps"] == 1000 and roomy["a"]["bd_steps"] == 1000 and roomy["d"]["funded"]
    middle = sel2.fund_parts(outcome, 5000.0)
    assert middle["a"]["curve_steps"] in (300, 600) and not middle["d"]["funded"]
    assert sel2.fund_parts({"costs": {"detection": cost}}, 1e6)["d"]["funded"] is False  # seg costs not measured


def test_pairs_with_fewer_than_three_seeds_get_no_interval():
    curves = {"baseline": {0: [(0, 1.0), (10, 0.9)], 1: [(0, 1.0), (10, 0.8)]},
              "aux_enc_warm_shuffled": {0: [(0, 1.0), (10, 0.95)], 1: [(0, 1.0), (10, 0.7)]}}
    rows = [r for r in paired_differences(curves) if r["step"] == 10]
    assert rows and all(math.isnan(r["low"]) and math.isnan(r["high"]) for r in rows)
    assert rows[0]["values"] == pytest.approx([0.05, -0.1])


def test_curve_arms_are_keyed_by_method_id_in_the_profile(tmp_path):
    """The curves' arms are method ids (their runs' ``method``); a profile keying ``curve_seeds`` or ``curve_arms``
    by an arm's display label is refused with the id to write instead."""
    ex = Experiment("smoke", run_dir=tmp_path, log=None)
    specs = curve_specs(ex, "detection")
    assert [arm for arm, _ in specs] == [a.method for a in CURVE_ARMS] == [
        "baseline", "aux_enc_warm", "aux_enc_warm_shuffled"]
    assert all(spec.method == arm for arm, spec in specs)
    tc = ex.cfg["tasks"]["detection"]
    tc["curve_seeds"] = {"baseline": [0, 3]}  # the other arms: the profile's train_seeds
    assert [(arm, spec.seed) for arm, spec in curve_specs(ex, "detection")] == [
        ("baseline", 0), ("baseline", 3), ("aux_enc_warm", 0), ("aux_enc_warm_shuffled", 0)]
    tc["curve_seeds"] = {"w/o aux": [0], "aux_enc_warm": [0], "control": [0]}
    with pytest.raises(ValueError, match=r"curve_seeds: arms are keyed by method id \('w/o aux' -> 'baseline'; "
                                         r"'control' -> 'aux_enc_warm_shuffled'\)"):
        curve_specs(ex, "detection")
    tc["curve_seeds"] = {}
    tc["curve_arms"] = ["aux-enc"]
    with pytest.raises(ValueError, match=r"curve_arms: .*'aux-enc' -> 'aux_enc_warm'"):
        curve_specs(ex, "detection")
    tc["curve_arms"] = ["aux_dec"]
    with pytest.raises(ValueError, match="'aux_dec' is no arm"):
        curve_specs(ex, "detection")
    tc["curve_arms"] = ["aux_enc_warm_shuffled"]
    assert [arm for arm, _ in curve_specs(ex, "detection")] == ["aux_enc_warm_shuffled"]


def test_cosine_summary_pairs_branches_by_method_id_and_keeps_their_labels():
    rows = [{"codec": "start", "seed": None, "batch": b, "branch": label, "method": method, "cos": c + 0.1 * b}
            for b in range(3) for label, method, c in (("competent", "aux_enc_warm", 0.3), ("random", "aux_enc", 0.0),
                                                       ("control", "aux_enc_warm_shuffled", 0.1))]
    summary = summarise_cosines(rows)
    assert [(r["branch"], r["methods"]) for r in summary] == [
        ("competent", ["aux_enc_warm"]), ("random", ["aux_enc"]), ("control", ["aux_enc_warm_shuffled"]),
        ("competent - control", ["aux_enc_warm", "aux_enc_warm_shuffled"])]
    assert summary[-1]["mean"] == pytest.approx(0.2) and summary[-1]["n"] == 3
