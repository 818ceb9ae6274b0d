"""Segmentation backends of the paper profile: our DeepLabV3+ R101-D8 port and the MMSeg adapter.

The key test (``test_port_matches_mmseg``) builds MMSeg's own model from its Pascal-Context-59 config with random
weights (BN statistics randomised too), saves it with mmengine's ``save_checkpoint`` with numpy objects in ``meta``
(as MMSeg checkpoints have), loads that file into our port with the weights_only loader and compares the logits.
R101 on CPU is slow, so the inputs are small (128x128 at most)."""
from __future__ import annotations

import builtins
import time

import numpy as np
import pytest
import torch

from icm_helpers.backends import build_backend
from icm_helpers.backends.deeplabv3plus import (MEAN, OFFICIAL_URL, STD, DeepLabV3PlusR101, build_deeplabv3plus,
                                                extract_state_dict, load_checkpoint_file, load_state_dict_strict)

# (key, shape) spot checks in MMSeg's naming
SPOT_KEYS = {
    "backbone.stem.0.weight": (32, 3, 3, 3),
    "backbone.stem.3.weight": (32, 32, 3, 3),
    "backbone.stem.6.weight": (64, 32, 3, 3),
    "backbone.stem.7.running_var": (64,),
    "backbone.layer1.0.conv1.weight": (64, 64, 1, 1),
    "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "backbone.layer2.0.conv2.weight": (128, 128, 3, 3),
    "backbone.layer3.22.conv3.weight": (1024, 256, 1, 1),
    "backbone.layer3.22.bn3.num_batches_tracked": (),
    "backbone.layer4.2.bn3.weight": (2048,),
    "backbone.layer4.0.downsample.1.running_mean": (2048,),
    "decode_head.conv_seg.weight": (59, 512, 1, 1),
    "decode_head.conv_seg.bias": (59,),
    "decode_head.image_pool.1.conv.weight": (512, 2048, 1, 1),
    "decode_head.image_pool.1.bn.weight": (512,),
    "decode_head.aspp_modules.0.conv.weight": (512, 2048, 1, 1),
    "decode_head.aspp_modules.3.depthwise_conv.conv.weight": (2048, 1, 3, 3),
    "decode_head.aspp_modules.3.pointwise_conv.bn.running_var": (512,),
    "decode_head.bottleneck.conv.weight": (512, 2560, 3, 3),
    "decode_head.c1_bottleneck.conv.weight": (48, 256, 1, 1),
    "decode_head.sep_bottleneck.0.depthwise_conv.conv.weight": (560, 1, 3, 3),
    "decode_head.sep_bottleneck.1.pointwise_conv.conv.weight": (512, 512, 1, 1),
    "auxiliary_head.convs.0.conv.weight": (256, 1024, 3, 3),
    "auxiliary_head.convs.0.bn.running_mean": (256,),
    "auxiliary_head.conv_seg.weight": (59, 256, 1, 1),
}
N_KEYS = 730  # MMSeg's EncoderDecoder state dict for this config (data_preprocessor buffers are non-persistent)
STAGES = {"conv2": 256, "conv3": 512, "conv4": 1024, "conv5": 2048}


@pytest.fixture(scope="module")
def port() -> DeepLabV3PlusR101:
    torch.manual_seed(0)
    return build_deeplabv3plus(pretrained=False)


# ----------------------------------------------------------------------------------------------------------------
# structure of our port
# ----------------------------------------------------------------------------------------------------------------
def test_port_state_dict_naming(port):
    sd = port.state_dict()
    assert len(sd) == N_KEYS
    for key, shape in SPOT_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not any(k in sd for k in ("mean", "std")), "normalisation buffers must not be in the state dict"
    assert not any(".bias" in k for k in sd if ".conv." in k or k.endswith("conv1.bias")), "convs before BN: no bias"


def test_port_geometry(port):
    b = port.backbone
    assert [len(getattr(b, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert b.layer2[0].conv2.stride == (2, 2) and b.layer3[0].conv2.stride == (1, 1)
    assert b.layer4[0].conv2.stride == (1, 1) and b.layer1[0].conv2.stride == (1, 1)
    # contract_dilation: first block of a dilated stage uses half the dilation
    assert b.layer3[0].conv2.dilation == (1, 1) and b.layer3[1].conv2.dilation == (2, 2)
    assert b.layer4[0].conv2.dilation == (2, 2) and b.layer4[2].conv2.dilation == (4, 4)
    assert b.layer4[2].conv2.padding == (4, 4)
    d = port.decode_head
    assert [m.depthwise_conv.conv.dilation[0] for m in list(d.aspp_modules)[1:]] == [12, 24, 36]
    assert d.aspp_modules[0].conv.kernel_size == (1, 1)
    assert port.num_outputs == 59 and port.stage_channels() == STAGES
    assert {k: v for k, v in port.stage_modules().items()} == {
        "conv2": b.layer1, "conv3": b.layer2, "conv4": b.layer3, "conv5": b.layer4}


@pytest.mark.parametrize("hw", [(64, 64), (128, 96)])
def test_port_output_shape_and_stages(port, hw):
    x = torch.rand(1, 3, *hw)
    feats = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o))
             for n, m in port.stage_modules().items()]
    try:
        with torch.no_grad():
            y = port(x)
    finally:
        for h in hooks:
            h.remove()
    assert y.shape == (1, 59, *hw)
    assert torch.isfinite(y).all()
    strides = {"conv2": 4, "conv3": 8, "conv4": 8, "conv5": 8}  # output stride 8 (dilated layer3/layer4)
    for name, f in feats.items():
        assert f.shape == (1, STAGES[name], hw[0] // strides[name], hw[1] // strides[name]), name


def test_port_gradients_reach_images(port):
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    port(x).logsumexp(1).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    port.zero_grad(set_to_none=True)


def test_port_normalisation_is_rgb_0_255():
    m = DeepLabV3PlusR101()
    x = torch.zeros(1, 3, 1, 1)
    x[0, :, 0, 0] = torch.tensor(MEAN) / 255.0
    assert torch.allclose(m.normalize(x), torch.zeros(1, 3, 1, 1), atol=1e-5)
    x[0, :, 0, 0] = (torch.tensor(MEAN) + torch.tensor(STD)) / 255.0
    assert torch.allclose(m.normalize(x), torch.ones(1, 3, 1, 1), atol=1e-5)


def test_build_backend_dispatch(monkeypatch):
    """The (task, backend) table routes the profile's settings to the builder, and names the valid pairs."""
    import icm_helpers.backends as backends

    calls = {}
    assert backends.BUILDERS["segmentation", "deeplabv3plus"] is build_deeplabv3plus
    monkeypatch.setitem(backends.BUILDERS, ("segmentation", "deeplabv3plus"), lambda **kw: calls.setdefault("kw", kw))
    build_backend("segmentation", "deeplabv3plus", pretrained=False)
    assert calls["kw"] == {"pretrained": False}
    with pytest.raises(ValueError, match="valid: .*segmentation/deeplabv3plus"):
        build_backend("segmentation", "no_such_backend")


# ----------------------------------------------------------------------------------------------------------------
# checkpoint loading: weights_only, strictness, offline resolution
# ----------------------------------------------------------------------------------------------------------------
EVIL_CALLS: list[str] = []


def _evil_side_effect():  # what an unrestricted unpickler would call
    EVIL_CALLS.append("called")
    return {}


class Evil:
    def __reduce__(self):
        return (_evil_side_effect, ())


class Custom:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("payload", [Evil, Custom])
def test_loader_refuses_non_allowlisted_globals(tmp_path, payload):
    path = tmp_path / "bad.pth"
    torch.save({"meta": {"thing": payload()}, "state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(RuntimeError, match="weights_only"):
        load_checkpoint_file(path)
    assert EVIL_CALLS == []


def test_loader_accepts_numpy_meta(tmp_path):
    path = tmp_path / "ok.pth"
    meta = {"seed": np.int64(3), "lr": np.float64(0.01), "palette": np.array([[1, 2, 3]], np.uint8),
            "f32": np.zeros(2, np.float32), "flag": np.bool_(True), "classes": ("a", "b")}
    torch.save({"meta": meta, "state_dict": {"module.w": torch.ones(2)}}, path)
    ck = load_checkpoint_file(path)
    assert ck["meta"]["seed"] == 3 and ck["meta"]["palette"].dtype == np.uint8
    assert list(extract_state_dict(ck)) == ["w"]  # DataParallel prefix stripped
    assert list(extract_state_dict({"a": torch.zeros(1)})) == ["a"]  # raw state dict


def test_strict_loading_names_keys(tmp_path, port):
    path = tmp_path / "other_arch.pth"
    torch.save({"meta": {"seed": np.int64(0)}, "state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(RuntimeError) as e:
        build_deeplabv3plus(weights=str(path))
    msg = str(e.value)
    assert "missing keys" in msg and "backbone.stem.0.weight" in msg
    assert "unexpected keys" in msg and "conv1.weight" in msg
    # another number of classes: shape mismatch named
    sd = {k: v.clone() for k, v in port.state_dict().items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(21, 512, 1, 1)
    with pytest.raises(RuntimeError, match=r"decode_head\.conv_seg\.weight: checkpoint \(21, 512, 1, 1\)"):
        load_state_dict_strict(DeepLabV3PlusR101(), sd)


@pytest.mark.parametrize("weights", [None, "official"])
def test_official_weights_offline(tmp_path, monkeypatch, weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as e:
        build_deeplabv3plus(weights=weights, download=False)
    msg = str(e.value)
    assert OFFICIAL_URL in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert OFFICIAL_URL.startswith("https://download.openmmlab.com/mmsegmentation/v0.5/deeplabv3plus/")
    assert "pascal_context_59" in OFFICIAL_URL and "r101-d8" in OFFICIAL_URL and "80k" in OFFICIAL_URL


# ----------------------------------------------------------------------------------------------------------------
# MMSeg itself (skipped when mmsegmentation / mmcv is not importable)
# ----------------------------------------------------------------------------------------------------------------
def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """Random BN affine parameters and running statistics, so that a wrong BN mapping shows in the logits (MMSeg's
    init zeroes every bn3 weight, which would hide the residual branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
                m.num_batches_tracked.fill_(1000)
        for head in (model.decode_head, model.auxiliary_head):  # logits of order 1-10, not 0.1
            head.conv_seg.weight.normal_(0.0, 0.5, generator=g)
            head.conv_seg.bias.normal_(0.0, 0.5, generator=g)


@pytest.fixture(scope="module")
def mmseg_case(tmp_path_factory):
    """(MMSeg EncoderDecoder with random weights in eval mode, path of its checkpoint saved by mmengine)."""
    try:
        import mmseg.models  # noqa: F401
        from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu

        from icm_helpers.backends.mmseg_seg import build_mmseg_model
    except Exception as e:  # noqa: BLE001 -- any import failure (no package, mmcv without ops) means: skip
        pytest.skip(f"mmsegmentation/mmcv not importable ({type(e).__name__}: {e}); see "
                    "icm_helpers.backends.mmseg_seg.INSTALL")
    torch.manual_seed(0)  # PyTorch's default (random) init of every layer; MMSeg's init_weights is slow on CPU
    model = build_mmseg_model(init_weights=False)
    _randomize_bn(model, seed=1)
    model.eval()
    path = tmp_path_factory.mktemp("mmseg") / "deeplabv3plus_random.pth"
    meta = {"seed": np.int64(0), "mmseg_version": "1.2.2", "iter": 80000, "lr": np.float64(1e-4),
            "dataset_meta": {"classes": tuple(f"c{i}" for i in range(59)),
                             "palette": np.arange(59 * 3, dtype=np.uint8).reshape(59, 3)}}
    save_checkpoint({"meta": meta, "state_dict": weights_to_cpu(get_state_dict(model))}, str(path))
    return model, path


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x * 255.0 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _metas(x: torch.Tensor) -> list[dict]:
    hw = tuple(int(s) for s in x.shape[2:])
    return [dict(img_shape=hw, pad_shape=hw, ori_shape=hw) for _ in range(x.shape[0])]


@pytest.fixture(scope="module")
def ported(mmseg_case) -> DeepLabV3PlusR101:
    """Our port loaded from the MMSeg checkpoint FILE (weights_only loader + strict load)."""
    return build_deeplabv3plus(weights=str(mmseg_case[1]))


@pytest.mark.paper_backend
def test_port_matches_mmseg(mmseg_case, ported):
    mm, path = mmseg_case
    t0 = time.perf_counter()
    assert {k: tuple(v.shape) for k, v in mm.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ported.state_dict().items()}, "state-dict keys/shapes differ"
    ours = ported
    assert not ours.training
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = mm.encode_decode(_normalise(x), _metas(x))
        got = ours(x)
    diff = (got - ref).abs().max().item()
    print(f"\n[deeplabv3plus vs MMSeg] logits {tuple(got.shape)}, max |logit| {ref.abs().max().item():.3g}, "
          f"max abs difference {diff:.3g} ({time.perf_counter() - t0:.1f} s)")
    assert got.shape == ref.shape == (1, 59, 128, 128)
    assert ref.std() > 1e-3, "degenerate logits would hide differences"
    assert diff < 1e-4


@pytest.mark.paper_backend
def test_port_slide_inference_matches_mmseg(mmseg_case, ported):
    """The config's slide mode (crop/stride reduced to 64/32 here to keep it fast) against MMSeg's inference()."""
    from mmengine.config import ConfigDict

    mm, _ = mmseg_case
    ours = build_deeplabv3plus(pretrained=False, inference="slide")
    ours.load_state_dict(ported.state_dict())
    ours.slide_crop, ours.slide_stride = (64, 64), (32, 32)
    old = mm.test_cfg
    mm.test_cfg = ConfigDict(mode="slide", crop_size=(64, 64), stride=(32, 32))
    try:  # 96x64 input: two overlapping 64x64 crops (rows 0-63 and 32-95)
        x = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = mm.inference(_normalise(x), _metas(x))
            got = ours(x)
    finally:
        mm.test_cfg = old
    diff = (got - ref).abs().max().item()
    print(f"\n[deeplabv3plus slide vs MMSeg slide] max abs difference {diff:.3g}")
    assert got.shape == (1, 59, 96, 64) and diff < 1e-4


@pytest.mark.paper_backend
def test_mmseg_adapter_contract(mmseg_case):
    from icm_helpers.backends.mmseg_seg import MMSegSegmenter

    mm, path = mmseg_case
    seg = build_backend("segmentation", "mmseg", weights=str(path))  # builds MMSeg's model, loads our way
    assert isinstance(seg, MMSegSegmenter) and not seg.training
    assert seg.num_outputs == 59 and seg.stage_channels() == STAGES
    stages = seg.stage_modules()
    assert list(stages) == ["conv2", "conv3", "conv4", "conv5"]
    assert stages["conv5"] is seg.model.backbone.layer4 and stages["conv2"] is seg.model.backbone.layer1
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = seg(x)
        ref = mm.encode_decode(_normalise(x), _metas(x))
    assert y.shape == (1, 59, 64, 64)
    assert (y - ref).abs().max().item() < 1e-4  # same weights as the fixture's model, via the checkpoint file


def test_mmseg_adapter_missing_package(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in ("mmseg", "mmengine", "mmcv"):
            raise ImportError(f"No module named {name!r} (test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from icm_helpers.backends.mmseg_seg import build_mmseg_segmenter

    with pytest.raises(ImportError) as e:
        build_mmseg_segmenter(pretrained=False)
    msg = str(e.value)
    assert "'mmseg'" in msg and "'mmsegmentation'" in msg
    assert "pip install" in msg and "mmsegmentation==1.2.2" in msg and "mmcv" in msg and "2.1.0" in msg
