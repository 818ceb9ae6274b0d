"""Adaptive auxiliary weighting (beyond the paper): gradient similarity (Du et al.) and the decay schedule."""
import math

import pytest
import torch

from icm_helpers.adaptive_alpha import (ALPHA_MODES, check_alpha_mode, decay_weight, gradient_cosine,
                                        gradient_similarity_grads, similarity_weight, surrogate_loss, training_loss)
from icm_helpers.aux_branches import build_aux_branch
from icm_helpers.codec import build_codec
from icm_helpers.data import collate
from icm_helpers.recognizers import build_recognizer
from icm_helpers.training import IcmSpec, TrainConfig, icm_terms, train_icm

from conftest import AUX_DET_CFG, DET_CFG

AUX_SEG_CFG = dict(width=0.125, aspp_dilations=(1, 2, 3, 4))


def _linear_losses(g_main, g_aux):
    """Two losses on one shared parameter p with known gradients: d main/dp = g_main, d aux/dp = g_aux."""
    p = torch.nn.Parameter(torch.zeros(len(g_main)))
    return p, (p * torch.tensor(g_main)).sum(), (p * torch.tensor(g_aux)).sum()


@pytest.mark.parametrize("g_main, g_aux, cos, weighted, unweighted", [
    ([1.0, 2.0, -1.0], [2.0, 4.0, -2.0], 1.0, 1.0, 1.0),      # agree (same direction, other scale)
    ([1.0, 2.0, -1.0], [-1.0, -2.0, 1.0], -1.0, 0.0, 0.0),    # disagree: the aux gradient is dropped
    ([1.0, 0.0, 0.0], [0.0, 3.0, 0.0], 0.0, 0.0, 1.0),        # orthogonal: weighted 0, gate open (cos >= 0)
    ([3.0, 4.0, 0.0], [1.0, 0.0, 0.0], 0.6, 0.6, 1.0),        # partial agreement
    ([3.0, 4.0, 0.0], [-1.0, 0.0, 0.0], -0.6, 0.0, 0.0),
])
def test_similarity_weight_on_known_gradients(g_main, g_aux, cos, weighted, unweighted):
    p, main, aux = _linear_losses(g_main, g_aux)
    res = gradient_similarity_grads([p], main, aux)
    assert res.cos.item() == pytest.approx(cos, abs=1e-6)
    assert res.weight.item() == pytest.approx(weighted, abs=1e-6)
    assert not res.weight.requires_grad and res.weight.dim() == 0
    assert similarity_weight(res.cos, "unweighted").item() == unweighted
    expected = torch.tensor(g_main) + weighted * torch.tensor(g_aux)  # Du et al.: G_main + max(0, cos) G_aux
    assert torch.allclose(res.grads[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="valid"):
        similarity_weight(res.cos, "soft")


def test_only_shared_parameters_enter_the_cosine():
    """shared s (gradients agree), main-only m and aux-only q (large, opposing): over all parameters the cosine
    would be about -1; over the shared one it is 1. m gets G_main only, q its full G_aux."""
    s = torch.nn.Parameter(torch.zeros(2))
    m = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    unused = torch.nn.Parameter(torch.zeros(2))
    main = (s * torch.tensor([1.0, 0.0])).sum() + (m * torch.tensor([100.0, 0.0])).sum()
    aux = (s * torch.tensor([2.0, 0.0])).sum() + (q * torch.tensor([-50.0, 7.0])).sum()
    res = gradient_similarity_grads([s, m, q, unused], main, aux)
    assert res.shared == [0]
    assert res.cos.item() == pytest.approx(1.0) and res.weight.item() == pytest.approx(1.0)
    assert torch.equal(res.grads[0], torch.tensor([3.0, 0.0]))
    assert torch.equal(res.grads[1], torch.tensor([100.0, 0.0]))
    assert torch.equal(res.grads[2], torch.tensor([-50.0, 7.0]))
    assert res.grads[3] is None
    # the surrogate's backward writes exactly these gradients
    surrogate_loss([s, m, q, unused], res.grads).backward()
    assert torch.equal(s.grad, res.grads[0]) and torch.equal(q.grad, res.grads[2]) and unused.grad is None
    # no shared parameter: cos 0, the aux gradient does not touch the shared set (there is none)
    cos, shared = gradient_cosine([torch.ones(2), None], [None, torch.ones(2)])
    assert shared == [] and cos.item() == 0.0


def _batch(world, n=2):
    from icm_helpers.data import IcmDataset

    ds = IcmDataset(world / "train")
    return collate([ds[i] for i in range(n)])["image"]


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_gradsim_on_the_codec_uses_encoder_gradients(task, world):
    """aux-enc: the shared parameters are exactly the encoder g_a; the cosine equals the cosine of the main-loss and
    aux-term gradients on g_a computed separately; decoder / entropy nets get the main gradient, the branch its aux
    one."""
    torch.manual_seed(0)
    if task == "detection":
        rec = build_recognizer("detection", "suite", 3, **DET_CFG).freeze()
        aux = build_aux_branch("detection", "enc", 16, 3, **AUX_DET_CFG)
    else:
        rec = build_recognizer("segmentation", "suite", 3, width=8, head_channels=16, low_channels=8).freeze()
        aux = build_aux_branch("segmentation", "enc", 16, 3, **AUX_SEG_CFG)
    codec = build_codec(N=16).train()
    spec = IcmSpec(task, 1.0, "enc", 0.5, add_mse=task == "segmentation", alpha_mode="gradient_similarity")
    named = [(f"codec.{n}", p) for n, p in codec.named_parameters() if not n.endswith(".quantiles")]
    named += [(f"aux.{n}", p) for n, p in aux.named_parameters()]
    names, params = [n for n, _ in named], [p for _, p in named]
    x = _batch(world)
    torch.manual_seed(3)
    terms = icm_terms(spec, codec, rec, aux, x)
    weighted_aux = spec.lambda_ * spec.alpha * terms["aux"]
    enc = [p for n, p in named if n.startswith("codec.g_a.")]
    g_aux = torch.autograd.grad(weighted_aux, enc, retain_graph=True)
    g_main = torch.autograd.grad(terms["main"], enc, retain_graph=True)
    expected = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g_main]),
                                                     torch.cat([g.flatten() for g in g_aux]), dim=0)
    full_main = torch.autograd.grad(terms["main"], params, retain_graph=True, allow_unused=True)
    full_aux = torch.autograd.grad(weighted_aux, params, retain_graph=True, allow_unused=True)
    res = gradient_similarity_grads(params, terms["main"], weighted_aux)
    shared = {names[i] for i in res.shared}
    assert shared == {n for n in names if n.startswith("codec.g_a.")}, "shared = the encoder, nothing else"
    assert res.cos.item() == pytest.approx(expected.item(), abs=1e-5)
    assert res.weight.item() == pytest.approx(max(0.0, expected.item()), abs=1e-5)
    for i, n in enumerate(names):
        if n.startswith("codec.g_a."):
            assert torch.allclose(res.grads[i], full_main[i] + res.weight * full_aux[i], atol=1e-6)
        elif n.startswith("codec."):
            assert full_aux[i] is None and (res.grads[i] is None or torch.equal(res.grads[i], full_main[i])), n
        else:  # the branch: its full auxiliary gradient (Du et al.'s task-specific parameters)
            assert full_main[i] is None and (res.grads[i] is None or torch.equal(res.grads[i], full_aux[i])), n


def test_decay_schedule_start_and_end():
    assert decay_weight(0, 10) == 1.0
    assert decay_weight(9, 10) == 0.0
    assert decay_weight(3, 7) == pytest.approx(0.5)
    assert decay_weight(0, 1) == 1.0
    ws = [decay_weight(t, 6) for t in range(6)]
    assert ws == sorted(ws, reverse=True)
    with pytest.raises(ValueError):
        decay_weight(0, 0)
    # the loss at a step: main + w * lambda * alpha * aux
    spec = IcmSpec("detection", 2.0, "enc", 0.5, alpha_mode="decay")
    terms = {"loss": torch.tensor(9.0), "main": torch.tensor(1.0), "aux": torch.tensor(4.0)}
    loss, logs = training_loss(spec, terms, 3, 7, [])
    assert loss.item() == pytest.approx(1.0 + 0.5 * 2.0 * 0.5 * 4.0)
    assert logs["aux_weight"].item() == 0.5 and logs["loss"] is loss


def test_fixed_mode_is_the_paper_unchanged(tmp_path):
    from icm_helpers.experiment import Experiment

    spec = IcmSpec("detection", 0.4, "enc", 0.5)
    assert spec.alpha_mode == "fixed" and spec.run_name == "aux_enc_lambda0.4" and spec.method == "aux_enc"
    assert spec.as_dict() == {
        "task": "detection",
        "lambda_": 0.4,
        "aux_position": "enc",
        "alpha": 0.5,
        "add_mse": False,
        "seed": 0,
    }
    assert spec == IcmSpec("detection", 0.4, "enc", 0.5, alpha_mode="fixed")
    terms = {"loss": torch.tensor(2.0), "main": torch.tensor(1.0), "aux": torch.tensor(4.0)}
    loss, logs = training_loss(spec, terms, 0, 10, [])
    assert loss is terms["loss"] and logs is terms
    ex = Experiment("smoke", run_dir=tmp_path, log=None)
    for pos, name in ((None, "baseline_lambda0.4"), ("enc", "aux_enc_lambda0.4")):
        s = ex.spec("detection", 0.4, pos)
        assert s.alpha_mode == "fixed" and ex.run_path(s) == tmp_path / "icm" / "detection" / name
    gs = ex.spec("detection", 0.4, "enc", alpha_mode="gradient_similarity")
    assert ex.run_path(gs).name == "aux_enc_gradsim_lambda0.4" and gs.method == "aux_enc_gradsim"
    assert gs.as_dict()["alpha_mode"] == "gradient_similarity"
    assert ex.run_path(ex.spec("segmentation", 2, "enc", alpha_mode="decay")).name == "aux_enc_decay_lambda2"
    assert ex.spec("detection", 0.4, None, alpha_mode="decay").alpha_mode == "fixed"  # one baseline for every mode
    assert set(ALPHA_MODES) == {"fixed", "gradient_similarity", "decay"}


def test_bad_alpha_mode_is_a_clear_error(tmp_path):
    from icm_helpers.experiment import Experiment

    for make in (
        lambda: IcmSpec("detection", 0.4, "enc", alpha_mode="adaptive"),
        lambda: Experiment("smoke", run_dir=tmp_path, log=None).spec("detection", 0.4, "enc", alpha_mode="adaptive"),
        lambda: check_alpha_mode("gradsim"),
    ):
        with pytest.raises(ValueError) as e:
            make()
        msg = str(e.value)
        assert "unknown alpha_mode" in msg and "'fixed', 'gradient_similarity', 'decay'" in msg and "Fix:" in msg
    with pytest.raises(ValueError, match="aux_position=None has none"):
        IcmSpec("detection", 0.4, None, alpha_mode="gradient_similarity")


@pytest.mark.parametrize("mode", ["fixed", "decay", "gradient_similarity"])
def test_train_icm_step_with_each_mode_logs_the_weight(mode, tmp_path, train_set):
    cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-3, crop_size=64, steps_per_epoch=1, poly_start_frac=0.5)
    torch.manual_seed(0)
    rec = build_recognizer("detection", "suite", 3, **DET_CFG).freeze()
    torch.manual_seed(1)
    codec = build_codec(N=16)
    aux = build_aux_branch("detection", "enc", 16, 3, **AUX_DET_CFG)
    before = {n: p.detach().clone() for n, p in codec.named_parameters()}
    spec = IcmSpec("detection", 1.6, "enc", 0.5, alpha_mode=mode)
    res = train_icm(spec, codec, rec, aux, train_set, cfg, tmp_path / "state.pt", log=None)
    h = res.history
    assert len(h) == 2 and all(math.isfinite(r["train_loss"]) for r in h)
    assert any(not torch.equal(before[n], p) for n, p in codec.named_parameters() if n.startswith("g_a."))
    if mode == "fixed":
        assert "train_aux_weight" not in h[0]
    elif mode == "decay":  # two steps in all: weight 1 then 0
        assert [r["train_aux_weight"] for r in h] == [1.0, 0.0]
        assert h[1]["train_loss"] == pytest.approx(h[1]["train_main"])
    else:
        for r in h:
            assert -1.0 <= r["train_aux_cos"] <= 1.0 and r["train_aux_weight"] == pytest.approx(
                max(0.0, r["train_aux_cos"])
            )
            w_term = 1.6 * 0.5 * r["train_aux_weight"] * r["train_aux"]
            assert r["train_loss"] == pytest.approx(r["train_main"] + w_term, rel=1e-5)
