"""Detection backends of the paper profile (icm_helpers.backends.torchvision_det / detectron2_det).

Everything runs offline with random weights. The detectron2 tests skip when the package is absent; the safe
.pkl loader and the COCO category-id mapping need no detectron2 and always run.
"""
from __future__ import annotations

import builtins
import importlib.util
import math
import pickle
import sys
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch

from icm_helpers.backends import build_backend, resolve_weights
from icm_helpers.backends import detectron2_det as d2det
from icm_helpers.backends import torchvision_det as tvdet

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
skip_without_detectron2 = pytest.mark.skipif(not HAS_DETECTRON2, reason="detectron2 is not installed (optional paper "
                                             "backend; install: " + d2det.INSTALL_HINT + ")")


def needs_detectron2(test):
    """A detectron2 test: skips without the package (a failure with ICM_REQUIRE_PAPER_BACKENDS=1, conftest.py)."""
    return pytest.mark.paper_backend(skip_without_detectron2(test))
D2_URL = ("https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x/139173657/"
          "model_final_68b088.pkl")


def _freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _loss_mode(model: torch.nn.Module) -> None:
    """As recognizers.DetectionRecognizer._loss_mode: train mode, BatchNorm statistics frozen."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _check_detections(dets, n_images: int, h: int, w: int) -> None:
    assert isinstance(dets, list) and len(dets) == n_images
    for det in dets:
        assert set(det) == {"boxes", "labels", "scores"}
        n = len(det["scores"])
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,)
        assert det["labels"].dtype == torch.int64 and det["boxes"].dtype.is_floating_point
        if n:
            assert float(det["boxes"][:, [0, 2]].min()) >= 0 and float(det["boxes"][:, [0, 2]].max()) <= w
            assert float(det["boxes"][:, [1, 3]].min()) >= 0 and float(det["boxes"][:, [1, 3]].max()) <= h
            assert bool((det["boxes"][:, 2:] >= det["boxes"][:, :2]).all())


def _targets(device="cpu"):
    return [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 100.0], [30.0, 5.0, 120.0, 60.0]], device=device),
             "labels": torch.tensor([1, 90], device=device)}]


EMPTY = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]


# ---------------------------------------------------------------------------------------------- torchvision
@pytest.fixture(scope="module")
def tv_r50():
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_backend("detection", "torchvision", arch="resnet50_fpn_v2", pretrained=False)
    print(f"\n[timing] torchvision R50-FPN-v2 build: {time.perf_counter() - t0:.2f}s")
    _freeze(model)
    return model


def test_torchvision_eval_contract(tv_r50):
    tv_r50.eval()
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with torch.no_grad():
        dets, losses = tv_r50(x)
    print(f"\n[timing] torchvision R50-FPN-v2 eval 1x3x128x128: {time.perf_counter() - t0:.2f}s")
    assert losses == {}
    _check_detections(dets, 1, 128, 128)
    assert len(dets[0]["scores"]) > 0  # random weights still give (low-score) boxes at score_thresh 0.05
    assert int(dets[0]["labels"].min()) >= 1 and int(dets[0]["labels"].max()) <= 90  # COCO category ids
    assert tv_r50.num_outputs == 91


def test_torchvision_train_losses_and_input_gradients(tv_r50):
    _loss_mode(tv_r50)
    try:
        x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        t0 = time.perf_counter()
        dets, losses = tv_r50(x, _targets())
        loss = sum(losses.values())
        loss.backward()
        print(f"\n[timing] torchvision R50-FPN-v2 train step 1x3x128x128: {time.perf_counter() - t0:.2f}s")
    finally:
        tv_r50.eval()
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in tv_r50.parameters())


def test_torchvision_empty_targets_finite(tv_r50):
    _loss_mode(tv_r50)
    try:
        x = torch.rand(1, 3, 96, 96).requires_grad_(True)
        _, losses = tv_r50(x, EMPTY)
        loss = sum(losses.values())
        loss.backward()
    finally:
        tv_r50.eval()
    assert math.isfinite(float(loss.detach())) and float(losses["loss_box_reg"].detach()) == 0.0
    assert torch.isfinite(x.grad).all()


def test_torchvision_train_needs_targets(tv_r50):
    tv_r50.train()
    try:
        with pytest.raises(ValueError, match="targets"):
            tv_r50(torch.rand(1, 3, 64, 64))
    finally:
        tv_r50.eval()


def test_torchvision_no_resize_and_stages(tv_r50):
    tv_r50.eval()
    stages = tv_r50.stage_modules()
    assert list(stages) == ["conv2", "conv3", "conv4", "conv5"]
    assert (
        stages["conv2"] is tv_r50.detector.backbone.body.layer1
        and stages["conv5"] is tv_r50.detector.backbone.body.layer4
    )
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape))) for n, m in stages.items()
    ]
    try:
        with torch.no_grad():
            tv_r50(torch.rand(1, 3, 128, 192))
    finally:
        for h in hooks:
            h.remove()
    assert shapes["conv2"] == (1, 256, 32, 48)  # stride 4 of the given size: no internal resize to 800 px
    assert shapes["conv5"] == (1, 2048, 4, 6)
    assert (
        {n: s[1] for n, s in shapes.items()}
        == tv_r50.stage_channels()
        == {"conv2": 256, "conv3": 512, "conv4": 1024, "conv5": 2048}
    )


def test_torchvision_matches_torchvision_forward(tv_r50):
    """Our wrapper (no transform) == torchvision's own FasterRCNN.forward with a transform that is the identity at
    this size (min_size/max_size = the image size, multiple of 32 so its batch padding adds nothing)."""
    tv_r50.eval()
    x = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(3))
    tv = tv_r50.detector
    old = (tv.transform.min_size, tv.transform.max_size)
    tv.transform.min_size, tv.transform.max_size = (128,), 192
    try:
        with torch.no_grad():
            ours, _ = tv_r50(x)
            ref = tv(list(x))
    finally:
        tv.transform.min_size, tv.transform.max_size = old
    for a, b in zip(ours, ref):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=1e-4)
        assert torch.equal(a["labels"], b["labels"])


def test_torchvision_local_checkpoint_roundtrip(tv_r50, tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(tv_r50.detector.state_dict(), path)
    other = tvdet.build_torchvision_detector("resnet50_fpn_v2", weights=str(path))
    for (k, a), (_, b) in zip(tv_r50.detector.state_dict().items(), other.detector.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="random weights"):
        tvdet.build_torchvision_detector("resnet50_fpn_v2", weights=str(path), pretrained=False)


def test_torchvision_official_weights_offline_error(tmp_path, monkeypatch):
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_V2_Weights

    url = FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url
    assert tvdet.official_weights_url() == url and url.endswith("fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty hub cache
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights("official", url)
    assert url in str(err.value) and str(tmp_path / "checkpoints") in str(err.value)
    with pytest.raises(FileNotFoundError, match="dd69338a"):
        tvdet.build_torchvision_detector("resnet50_fpn_v2")  # pretrained default, download=False
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_torchvision_resnext101_builds_and_has_no_coco_weights():
    for weights in (None, "official"):
        with pytest.raises(ValueError, match="no COCO detection weights"):
            tvdet.build_torchvision_detector("resnext101_32x8d_fpn", weights=weights)
    with pytest.raises(ValueError, match="unknown torchvision detector arch"):
        tvdet.build_torchvision_detector("resnet18")
    model = tvdet.build_torchvision_detector("resnext101_32x8d_fpn", pretrained=False)
    body = model.detector.backbone.body
    assert body.layer1[0].conv2.groups == 32 and body.layer4[-1].conv3.out_channels == 2048
    assert sum(1 for _ in body.layer3.children()) == 23  # ResNeXt-101: 3-4-23-3 blocks
    _freeze(model)
    with torch.no_grad():
        dets, _ = model(torch.rand(1, 3, 64, 64))
    _check_detections(dets, 1, 64, 64)


# ---------------------------------------------------------------------------------------------- detectron2 helpers
def test_coco_category_mapping_roundtrip():
    ids = torch.tensor(d2det.COCO_CATEGORY_IDS)
    assert len(ids) == 80 and ids.unique().numel() == 80 and int(ids.min()) == 1 and int(ids.max()) == 90
    assert not set(d2det.COCO_CATEGORY_IDS) & {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    contiguous = d2det.category_ids_to_contiguous(ids)
    assert torch.equal(contiguous, torch.arange(80))
    assert torch.equal(d2det.contiguous_to_category_ids(contiguous), ids)
    assert d2det.contiguous_to_category_ids(torch.tensor([0, 11, 79])).tolist() == [1, 13, 90]
    for bad in (0, 12, 91, -1):
        with pytest.raises(ValueError, match="not COCO category ids"):
            d2det.category_ids_to_contiguous(torch.tensor([1, bad]))


def _modelzoo_pickle(path, state, protocol):
    data = {"model": OrderedDict((k, v.numpy()) for k, v in state.items()), "__author__": "test",
            "matching_heuristics": False}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_pkl_loader_reads_numpy_checkpoints(tmp_path, protocol):
    state = {"a.weight": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.int64)}
    path = tmp_path / "ckpt.pkl"
    _modelzoo_pickle(path, state, protocol)
    data = d2det.load_numpy_pickle(path)
    assert data["__author__"] == "test"
    for k, v in state.items():
        np.testing.assert_array_equal(data["model"][k], v.numpy())
    # a Detectron1 / Caffe2 style file gets detectron2's interpretation
    with open(tmp_path / "c2.pkl", "wb") as f:
        pickle.dump(
            {"blobs": {"conv1_w": np.ones(3, np.float32), "conv1_w_momentum": np.ones(3)}}, f, protocol=protocol
        )
    c2 = d2det._checkpoint_dict_from_pkl(d2det.load_numpy_pickle(tmp_path / "c2.pkl"))
    assert list(c2["model"]) == ["conv1_w"] and c2["matching_heuristics"] is True


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_safe_pkl_loader_refuses_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "__author__": _Exploit(marker)}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="exec"):
        d2det.load_numpy_pickle(path)
    assert not marker.exists()
    with open(path, "wb") as f:  # object arrays could hide arbitrary payloads: refused too
        pickle.dump({"model": {"w": np.array([{"x": 1}], dtype=object)}}, f)
    with pytest.raises(pickle.UnpicklingError, match="object arrays"):
        d2det.load_numpy_pickle(path)
    with open(path, "wb") as f:
        pickle.dump([np.zeros(2)], f)
    with pytest.raises(pickle.UnpicklingError, match="expected a dict"):
        d2det.load_numpy_pickle(path)


def test_detectron2_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # makes "import detectron2" raise ImportError
    for build in (lambda: d2det.build_detectron2_detector(pretrained=False),
                  lambda: build_backend("detection", "detectron2", pretrained=False)):
        with pytest.raises(ImportError) as err:
            build()
        msg = str(err.value)
        assert "'detectron2'" in msg and "pip install 'git+https://github.com/facebookresearch/detectron2.git'" in msg
        assert "C++ compiler" in msg


# ---------------------------------------------------------------------------------------------- detectron2 models
@pytest.fixture(scope="module")
def d2_x101():
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = d2det.build_detectron2_detector(pretrained=False, score_thresh=0.0)
    print(f"\n[timing] detectron2 X101-FPN build: {time.perf_counter() - t0:.2f}s")
    _freeze(model)
    return model


@needs_detectron2
def test_detectron2_official_url():
    from detectron2 import model_zoo

    assert model_zoo.get_checkpoint_url(d2det.DEFAULT_CONFIG) == D2_URL == d2det.official_checkpoint_url()


@needs_detectron2
def test_detectron2_offline_error_names_url(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        d2det.build_detectron2_detector()
    assert D2_URL in str(err.value)


@needs_detectron2
def test_detectron2_eval_contract(d2_x101):
    d2_x101.eval()
    assert d2_x101.input_format == "BGR" and d2_x101.num_outputs == 80
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(4))
    # RGB [0, 1] -> BGR 0-255 (detectron2 normalises with PIXEL_MEAN/STD itself)
    torch.testing.assert_close(d2_x101.to_model_input(x[0]), x[0].flip(0) * 255)
    t0 = time.perf_counter()
    with torch.no_grad():
        dets, losses = d2_x101(x)
    print(f"\n[timing] detectron2 X101-FPN eval 2x3x128x160: {time.perf_counter() - t0:.2f}s")
    assert losses == {}
    _check_detections(dets, 2, 128, 160)
    labels = torch.cat([d["labels"] for d in dets])
    assert len(labels) > 0 and set(labels.tolist()) <= set(d2det.COCO_CATEGORY_IDS)
    # same as calling detectron2 directly with BGR 0-255 inputs and no output rescaling
    with torch.no_grad():
        raw = d2_x101.model([{"image": x[0].flip(0) * 255, "height": 128, "width": 160}])[0]["instances"]
    torch.testing.assert_close(dets[0]["boxes"], raw.pred_boxes.tensor)
    assert torch.equal(dets[0]["labels"], d2det.contiguous_to_category_ids(raw.pred_classes))


@needs_detectron2
def test_detectron2_stages_no_resize(d2_x101):
    d2_x101.eval()
    stages = d2_x101.stage_modules()
    assert list(stages) == ["conv2", "conv3", "conv4", "conv5"]
    assert stages["conv2"] is d2_x101.model.backbone.bottom_up.res2
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape))) for n, m in stages.items()
    ]
    try:
        with torch.no_grad():
            d2_x101(torch.rand(1, 3, 128, 192))
    finally:
        for h in hooks:
            h.remove()
    assert shapes["conv2"] == (1, 256, 32, 48) and shapes["conv5"] == (1, 2048, 4, 6)
    assert {n: s[1] for n, s in shapes.items()} == d2_x101.stage_channels()


@needs_detectron2
def test_detectron2_train_loss_and_gradients(d2_x101):
    from detectron2.utils.events import EventStorage

    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    _loss_mode(d2_x101)
    try:
        t0 = time.perf_counter()
        with EventStorage(0):  # an outer storage is reused
            _, losses = d2_x101(
                x, [{"boxes": torch.tensor([[10.0, 20.0, 160.0, 190.0]]), "labels": torch.tensor([90])}]
            )
        loss = sum(losses.values())
        loss.backward()
        print(
            f"\n[timing] detectron2 X101-FPN train step (forward+backward) 1x3x256x256: {time.perf_counter() - t0:.2f}s"
        )
        y = torch.rand(1, 3, 128, 128).requires_grad_(True)
        _, empty = d2_x101(y, EMPTY)  # no outer storage: the wrapper opens one
        sum(empty.values()).backward()
    finally:
        d2_x101.eval()
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in d2_x101.parameters())
    assert all(torch.isfinite(v) for v in empty.values()) and float(empty["loss_box_reg"].detach()) == 0.0
    assert y.grad is not None and torch.isfinite(y.grad).all()
    with pytest.raises(ValueError, match="not COCO category ids"):
        d2_x101.train()
        try:
            d2_x101(
                torch.rand(1, 3, 64, 64),
                [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([12])}],
            )
        finally:
            d2_x101.eval()


@needs_detectron2
def test_detectron2_safe_checkpoint_loading(tmp_path):
    """A model-zoo style .pkl (numpy arrays) and a .pth state dict load through the safe checkpointer."""
    config = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
    torch.manual_seed(1)
    src = d2det.build_detectron2_detector(config, pretrained=False)
    state = {k: v for k, v in src.model.state_dict().items() if k not in ("pixel_mean", "pixel_std")}
    _modelzoo_pickle(tmp_path / "model_final.pkl", state, protocol=4)
    torch.save({"model": state}, tmp_path / "model_final.pth")
    for name in ("model_final.pkl", "model_final.pth"):
        torch.manual_seed(2)
        dst = d2det.build_detectron2_detector(config, weights=str(tmp_path / name))
        for k, v in state.items():
            assert torch.equal(dst.model.state_dict()[k], v), (name, k)
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "__author__": _Exploit(tmp_path / "marker")}, f)
    with pytest.raises(pickle.UnpicklingError):
        d2det.build_detectron2_detector(config, weights=str(tmp_path / "bad.pkl"))
    assert not (tmp_path / "marker").exists()
    with pytest.raises(ValueError, match="does not fit"):  # an R50 checkpoint is not an X101 one
        d2det.build_detectron2_detector(d2det.DEFAULT_CONFIG, weights=str(tmp_path / "model_final.pth"))
