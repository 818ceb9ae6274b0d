"""The demo profile (the main job): the paper's grid, a world where the question is meaningful, and the Makefile
wiring."""

from __future__ import annotations

import re

import numpy as np
import torch

from icm_helpers.config import REPO_ROOT, load_profile
from icm_helpers.data import WorldSpec, render_image
from icm_helpers.recognizers import build_recognizer

CFG = load_profile("demo")


def test_demo_runs_the_papers_method_on_the_protocols_grid():
    det, seg = CFG["tasks"]["detection"], CFG["tasks"]["segmentation"]
    # docs/protocol_v2.md section 9 (V4): the paper's smallest lambda, its Sec. 4.2 lambda, its largest
    assert det["lambdas"] == [0.4, 1.6, 3.2] and seg["lambdas"] == [1, 2, 8]
    # section 9: the study's R6v2 pre-training (so the shipped branch serves both), V2's recipe, R3v2's rates
    study = load_profile("study")
    for task, tc in (("detection", det), ("segmentation", seg)):
        assert tc["aux_warm_start"] == study["tasks"][task]["aux_warm_start"], task
        assert tc["aux_inits"] == ["warm"]
        train = tc["train"]
        assert train["epochs"] == 1 and train["warmup_steps"] == max(10, round(train["steps_per_epoch"] / 10))
        assert train["poly_start_frac"] == 0.5 and train.get("poly_step", "iteration") != "epoch"
        assert train["lr"] == study["tasks"][task]["train"]["lr"] and train["cache_labels"] is True
    assert det["alpha"] == seg["alpha"] == 0.5  # Eq. 5
    assert det["add_mse"] is False and seg["add_mse"] is True  # Eq. 5 / Eq. 6
    assert det["roi_qf"] is None and seg["roi_qf"] is None  # docs/protocol.md sec. 5: ROI runs in the study
    assert load_profile("paper")["tasks"]["detection"]["roi_qf"] == 1.4  # Ahonen et al.'s QF
    assert CFG["ablation"]["positions"] == []  # docs/protocol.md sec. 5: the ablation runs in the study
    assert load_profile("paper")["ablation"]["positions"] == [None, "enc", "dec", "task"]  # Sec. 4.2
    # protocol v2 (V1): ROI, anchors and the position ablation left the study; its lambdas are the paper's (V4)
    assert study["tasks"]["detection"]["roi_qf"] is None and study["ablation"]["positions"] == []
    assert study["tasks"]["detection"]["lambdas"] == [0.4, 1.6, 3.2]
    assert study["tasks"]["segmentation"]["lambdas"] == [1, 2, 8]
    assert study["train_seeds"] == [0, 1, 2, 3] and study["evaluation"]["max_images"] >= 96  # V9, section 4
    assert det["ablation_lambda"] in det["lambdas"] and seg["ablation_lambda"] in seg["lambdas"]  # enc/none reused
    assert CFG["evaluation"]["bitstream"] is True
    assert CFG["evaluation"]["bootstrap"] == {"samples": 1000, "confidence": 0.95, "interval": "bca"}  # V8
    assert CFG["data"]["counts"]["test"] >= 48  # enough test images for a bootstrap over images


def test_demo_recognizers_are_deep():
    """Tens of layers between the decoded image and the task loss: the task gradient reaching the codec is weak."""
    for task in ("detection", "segmentation"):
        rec = build_recognizer(task, "suite", CFG["data"]["world"]["n_classes"], **CFG["recognizers"][task]["model"])
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in rec.modules())
        backbone = sum(isinstance(m, torch.nn.Conv2d) for m in rec.model.backbone.modules())
        assert backbone >= 20 and convs >= 30, (task, backbone, convs)


def test_demo_world_background_is_costly_and_objects_small():
    spec = WorldSpec(**CFG["data"]["world"], seed=0)
    rng = np.random.default_rng(0)
    fg, grad_bg = [], []
    for _ in range(16):
        img, instances, semantic = render_image(spec, rng)
        fg.append((semantic > 0).mean())
        g = np.abs(np.diff(img, axis=1)).mean(-1)  # horizontal gradient, (H, W-1)
        grad_bg.append(g[semantic[:, 1:] == 0].mean())
    assert 0.03 < np.mean(fg) < 0.3  # objects are a minority of the pixels: background bits are mostly wasted
    assert np.mean(grad_bg) > 0.05  # textured background: coding it costs bits


def test_make_demo_runs_the_demo_profile():
    text = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^DEMO_PROFILE \?= demo$", text, re.M)
    assert (REPO_ROOT / "papermill_runs" / "params" / "demo.yaml").is_file()
