"""Codec, recognizers, auxiliary branches and losses: shapes and -- above all -- where gradients flow."""
import pytest
import torch

from icm_helpers.aux_branches import build_aux_branch, check_aux_position
from icm_helpers.codec import build_codec, codec_forward, load_codec, save_codec
from icm_helpers.data import collate
from icm_helpers.losses import check_lambda_alpha, icm_loss
from icm_helpers.recognizers import build_recognizer, load_recognizer, save_recognizer

from conftest import AUX_DET_CFG, DET_CFG

N = 16


def grads(module):
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in module.named_parameters()}


@pytest.fixture
def codec():
    torch.manual_seed(0)
    return build_codec(N=N).train()


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return build_recognizer("detection", "suite", 3, **DET_CFG).freeze()


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return build_recognizer("segmentation", "suite", 3, width=8, head_channels=16, low_channels=8).freeze()


def test_codec_forward_shapes_and_features(codec):
    x = torch.rand(2, 3, 64, 64)
    out = codec_forward(codec, x)
    assert out["x_hat"].shape == x.shape
    assert out["enc"].shape == (2, N, 4, 4)  # y_hat: 1/16 resolution
    assert out["dec"].shape == (2, N, 32, 32)  # input of the decoder's final (x2 sub-pixel) layer
    assert set(out["likelihoods"]) == {"y", "z"}


AUX_SEG_CFG = dict(width=0.125, aspp_dilations=(1, 2, 3, 4))


def _codec_groups(codec, g):
    last = f"g_s.{len(codec.g_s) - 1}."
    return {
        "encoder": any(v for k, v in g.items() if k.startswith("g_a.")),
        "decoder_early": any(v for k, v in g.items() if k.startswith("g_s.") and not k.startswith(last)),
        "decoder_final": any(v for k, v in g.items() if k.startswith(last)),
        # y_hat = y + noise does not depend on the hyperprior/context/entropy-parameter networks (CompressAI's
        # quantization proxy), so no auxiliary gradient reaches them at any position; they learn through R
        "entropy_nets": any(
            v for k, v in g.items() if k.startswith(("h_a.", "h_s.", "context_prediction.", "entropy_parameters."))
        ),
    }


# Sec. 4.2: where each position's auxiliary loss may act
EXPECTED_FLOW = {
    "enc": {"encoder": True, "decoder_early": False, "decoder_final": False, "entropy_nets": False},
    "dec": {"encoder": True, "decoder_early": True, "decoder_final": False, "entropy_nets": False},
    "task": {"encoder": True, "decoder_early": True, "decoder_final": True, "entropy_nets": False},
}


@pytest.mark.parametrize("position", ["enc", "dec", "task"])
@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_aux_gradient_flow_per_position(codec, task, position, detector, segmenter, world):
    """Backpropagate ONLY the auxiliary term of icm_terms (the training code path) and check which codec parts
    receive gradient: enc -> encoder only; dec -> encoder + decoder except its final layer; task -> whole codec.
    The frozen recognizer never receives gradient."""
    from icm_helpers.data import IcmDataset
    from icm_helpers.training import IcmSpec, icm_terms

    ds = IcmDataset(world / "train")
    x = collate([ds[0], ds[1]])["image"]
    rec = detector if task == "detection" else segmenter
    cfg = AUX_DET_CFG if task == "detection" else AUX_SEG_CFG
    aux = build_aux_branch(task, position, N, 3, recognizer=rec, **cfg)
    spec = IcmSpec(task, 1.0, position, 0.5, add_mse=task == "segmentation")
    terms = icm_terms(spec, codec, rec, aux, x)
    assert torch.isfinite(terms["aux"]) and terms["aux"] > 0
    terms["aux"].backward()
    assert _codec_groups(codec, grads(codec)) == EXPECTED_FLOW[position]
    assert any(grads(aux).values()), "the branch itself is trained"
    assert all(p.grad is None for p in rec.parameters()), "the recognizer is frozen"


def test_aux_task_branch_structure(detector, segmenter):
    """aux-task: detection = Table 1 after conv1 (no RB stem) on the recognizer's conv2 output; segmentation =
    head only on conv3 (low-level conv2), or MMSeg's FCNHead."""
    det = build_aux_branch("detection", "task", N, 3, recognizer=detector, **AUX_DET_CFG)
    assert isinstance(det.backbone.stem, torch.nn.Identity) and det.inputs == ("conv2",)
    first = det.backbone.stages["conv2"][0]
    assert first.conv1[0].in_channels == detector.feature_channels()["conv2"]
    seg = build_aux_branch("segmentation", "task", N, 3, recognizer=segmenter, **AUX_SEG_CFG)
    assert seg.inputs == ("conv2", "conv3") and not hasattr(seg, "backbone")
    assert seg.head.aspp[0][0].in_channels == segmenter.feature_channels()["conv3"]
    fcn = build_aux_branch("segmentation", "task", N, 3, recognizer=segmenter, task_head="fcn", width=0.125)
    assert fcn.head.conv[0].in_channels == segmenter.feature_channels()["conv3"]
    with pytest.raises(ValueError, match="pass recognizer"):
        build_aux_branch("detection", "task", N, 3, **AUX_DET_CFG)
    with pytest.raises(ValueError, match="not a backbone stage"):
        build_aux_branch("detection", "task", N, 3, recognizer=detector, task_layer="conv9", **AUX_DET_CFG)
    with pytest.raises(ValueError, match="unknown task_head"):
        build_aux_branch("segmentation", "task", N, 3, recognizer=segmenter, task_head="psp", width=0.125)


def test_capture_features_records_stage_outputs_and_cleans_up(segmenter):
    x = torch.rand(1, 3, 64, 64)
    with segmenter.capture_features(["conv2", "conv3"]) as feats:
        segmenter.predict(x)
    assert feats["conv2"].shape[-1] == 16 and feats["conv3"].shape[-1] == 8  # strides 4 and 8 (D8)
    assert all(not s._forward_hooks for s in segmenter.stage_modules().values())
    with pytest.raises(ValueError, match="unknown backbone stage"):
        with segmenter.capture_features(["res4"]):
            pass


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_task_loss_on_pseudo_labels_reaches_encoder_not_recognizer(codec, task, detector, segmenter, world):
    from icm_helpers.data import IcmDataset

    x = collate([IcmDataset(world / "train")[i] for i in range(2)])["image"]
    rec = detector if task == "detection" else segmenter
    labels = rec.pseudo_labels(x)  # on the ORIGINAL image
    out = codec_forward(codec, x)
    loss = rec.task_loss(out["x_hat"], labels)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(v for k, v in grads(codec).items() if k.startswith("g_a."))
    assert all(p.grad is None for p in rec.parameters()), "the recognizer is frozen"


def test_frozen_recognizer_keeps_batchnorm_statistics(detector):
    before = {k: v.clone() for k, v in detector.model.state_dict().items() if "running_mean" in k}
    x = torch.rand(2, 3, 64, 64)
    detector.task_loss(x, detector.pseudo_labels(x))
    after = {k: v for k, v in detector.model.state_dict().items() if "running_mean" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not detector.training


def test_detection_loss_finite_without_pseudo_labels(detector):
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    loss = detector.task_loss(x, empty)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_icm_loss_equations():
    r, e, a, m = torch.tensor(0.5), torch.tensor(2.0), torch.tensor(4.0), torch.tensor(0.1)
    assert icm_loss(r, e, 0.4)["loss"].item() == pytest.approx(0.5 + 0.4 * 2.0)  # Eq. 4
    t = icm_loss(r, e, 0.4, a, 0.5)
    assert t["loss"].item() == pytest.approx(0.5 + 0.4 * (2.0 + 0.5 * 4.0))  # Eq. 5
    assert t["main"].item() == pytest.approx(0.5 + 0.4 * 2.0)
    assert icm_loss(r, e, 2.0, a, 0.5, m)["loss"].item() == pytest.approx(0.5 + 2.0 * (2.0 + 2.0 + 0.1))  # Eq. 6


@pytest.mark.parametrize("lam,alpha", [(0, 0.5), (-1, 0.5), (1, -0.1), (float("nan"), 0.5)])
def test_bad_lambda_alpha_rejected(lam, alpha):
    with pytest.raises(ValueError):
        check_lambda_alpha(lam, alpha)


def test_bad_position_and_backend_rejected():
    with pytest.raises(ValueError, match="unknown aux_position"):
        check_aux_position("middle")
    assert check_aux_position("task") == "task"
    assert check_aux_position("none") is None
    with pytest.raises(ValueError, match="unknown backend"):
        build_recognizer("detection", "yolo")
    with pytest.raises(ValueError, match="unknown task"):
        build_recognizer("captioning")


def _stage_table(aux, block):
    """(stage, [conv kernel, width, groups] of its single block, count, stride) rows, printed like Tables 1-2."""
    rows = []
    for name, stage in aux.backbone.stages.items():
        convs = [
            m
            for m in stage[0].modules()
            if isinstance(m, torch.nn.Conv2d) and m not in (stage[0].skip or torch.nn.Sequential()).modules()
        ]
        rows.append(
            (
                name,
                [(c.kernel_size[0], c.out_channels, c.groups) for c in convs],
                len(stage),
                stage[0].conv1[0].stride[0] if block == "basic" else stage[0].conv2[0].stride[0],
            )
        )
    return rows


def _stem_table(aux):
    from compressai.layers import ResidualBlock, ResidualBlockUpsample, ResidualBlockWithStride

    kinds = {ResidualBlockUpsample: "RB up2", ResidualBlockWithStride: "RB down2", ResidualBlock: "RB"}
    return [
        (kinds[type(m)], m.conv1.out_channels if hasattr(m, "conv1") else m.subpel_conv[0].out_channels // 4)
        for m in aux.backbone.stem
    ]


def test_aux_branch_structure_follows_tables_1_2_3(capsys):
    """The paper profile's branches (width 1.0) layer by layer against Table 1 (detection), Table 2 (segmentation)
    and Table 3 (aux-dec conv1); printed for the reader of the CI log."""
    from compressai.layers import ResidualBlockUpsample

    det = build_aux_branch("detection", "enc", 192, 90, width=1.0)
    seg = build_aux_branch("segmentation", "enc", 192, 59, width=1.0)
    dec = build_aux_branch("detection", "dec", 192, 90, width=1.0)
    for name, aux, block in (
        ("Table 1 (detection, aux-enc)", det, "resnext"),
        ("Table 2 (segmentation, aux-enc)", seg, "basic"),
        ("Table 3 (aux-dec)", dec, "resnext"),
    ):
        print(name, "conv1:", _stem_table(aux))
        for row in _stage_table(aux, block):
            print("   ", row)
    # conv1: RB 128 up2, RB 128, RB 128 up2 (Tables 1, 2); RB 128 down2, RB 128, RB 128 (Table 3)
    assert _stem_table(det) == _stem_table(seg) == [("RB up2", 128), ("RB", 128), ("RB up2", 128)]
    assert _stem_table(dec) == [("RB down2", 128), ("RB", 128), ("RB", 128)]
    assert all(isinstance(m, ResidualBlockUpsample) for m in (det.backbone.stem[0], det.backbone.stem[2]))
    # Table 1: [1x1,w / 3x3,w,C=32 / 1x1,w] x1 with w = 128, 256, 256, 512
    assert [r[1] for r in _stage_table(det, "resnext")] == [
        [(1, w, 1), (3, w, 32), (1, w, 1)] for w in (128, 256, 256, 512)
    ]
    assert [r[2] for r in _stage_table(det, "resnext")] == [1, 1, 1, 1]
    # Table 2: [3x3,w / 3x3,w] x1 with w = 128, 256, 256, 512
    assert [r[1] for r in _stage_table(seg, "basic")] == [[(3, w, 1), (3, w, 1)] for w in (128, 256, 256, 512)]
    # heads: Faster R-CNN with FPN 256 and a 1024-d box head; DeepLabV3+ head with 512 channels, 48 low-level
    assert (
        det.heads.fpn.layer_blocks[0][0].out_channels == 256 and det.heads.roi_heads.box_head.fc6.out_features == 1024
    )
    assert seg.head.bottleneck[0].out_channels == 512 and seg.head.c1[0].out_channels == 48
    assert "Table 1" in capsys.readouterr().out


def test_codec_checkpoint_roundtrip_and_wrong_N(tmp_path, codec):
    save_codec(tmp_path / "c.pt", codec)
    loaded = load_codec(tmp_path / "c.pt")
    assert torch.equal(loaded.g_a[0].conv1.weight, codec.g_a[0].conv1.weight)
    other = build_codec(N=24)
    from icm_helpers.codec import load_codec_state, load_state

    with pytest.raises(ValueError, match="N=24"):
        load_codec_state(other, load_state(tmp_path / "c.pt")["state_dict"])
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated"):
        load_codec(tmp_path / "trunc.pt")


def test_recognizer_checkpoint_roundtrip(tmp_path, detector):
    save_recognizer(tmp_path / "r.pt", detector)
    again = load_recognizer(tmp_path / "r.pt", expect_task="detection")
    x = torch.rand(1, 3, 64, 64)
    a, b = detector.predict(x)[0], again.predict(x)[0]
    assert torch.allclose(a["scores"], b["scores"])
    with pytest.raises(ValueError, match="expected segmentation"):
        load_recognizer(tmp_path / "r.pt", expect_task="segmentation")
