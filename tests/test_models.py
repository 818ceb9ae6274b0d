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


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_aux_enc_gradient_reaches_encoder_only(codec, task, detector, segmenter, world):
    """Eq. 5: the aux-enc loss must reach g_a and never the decoder g_s."""
    from icm_helpers.data import IcmDataset

    ds = IcmDataset(world / "train")
    x = collate([ds[0], ds[1]])["image"]
    rec = detector if task == "detection" else segmenter
    labels = rec.pseudo_labels(x)
    cfg = AUX_DET_CFG if task == "detection" else dict(width=0.125, aspp_dilations=(1, 2, 3, 4))
    aux = build_aux_branch(task, "enc", N, 3, **cfg)
    out = codec_forward(codec, x)
    aux.loss(out["enc"], labels, (64, 64)).backward()
    g = grads(codec)
    assert any(v for k, v in g.items() if k.startswith("g_a.")), "aux loss must reach the encoder"
    assert not any(v for k, v in g.items() if k.startswith("g_s.")), "aux-enc loss must not reach the decoder"
    # y_hat = y + noise does not depend on the hyperprior/context networks: no aux gradient there either
    assert not any(v for k, v in g.items() if k.startswith(("h_s.", "context_prediction.", "entropy_parameters.")))
    assert any(v for k, v in grads(aux).items()), "the branch itself is trained"


def test_aux_dec_gradient_also_reaches_decoder_but_not_final_layer(codec, segmenter, world):
    from icm_helpers.data import IcmDataset

    x = collate([IcmDataset(world / "train")[i] for i in range(2)])["image"]
    aux = build_aux_branch("segmentation", "dec", N, 3, width=0.125, aspp_dilations=(1, 2, 3, 4))
    out = codec_forward(codec, x)
    aux.loss(out["dec"], segmenter.pseudo_labels(x), (64, 64)).backward()
    g = grads(codec)
    last = f"g_s.{len(codec.g_s) - 1}."
    assert any(v for k, v in g.items() if k.startswith("g_s.") and not k.startswith(last))
    assert not any(v for k, v in g.items() if k.startswith(last))
    assert any(v for k, v in g.items() if k.startswith("g_a."))


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
    assert check_aux_position("none") is None
    with pytest.raises(ValueError, match="unknown backend"):
        build_recognizer("detection", "yolo")
    with pytest.raises(ValueError, match="unknown task"):
        build_recognizer("captioning")


def test_aux_branch_structure_follows_table1():
    aux = build_aux_branch("detection", "enc", 192, 80, width=1.0)
    stages = aux.backbone.stages
    widths = [stages[f"conv{i}"][0].conv3[0].out_channels for i in (2, 3, 4, 5)]
    assert widths == [128, 256, 256, 512]
    assert stages["conv2"][0].conv2[0].groups == 32  # C = 32
    assert len(aux.backbone.stem) == 3  # RB up2, RB, RB up2


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
