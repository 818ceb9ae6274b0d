"""The suite's code with ``device="cuda"``, checked on a CPU-only machine by the virtual CUDA harness
(``tests/virtual_cuda.py``): every aten op of these forward passes runs on CPU values but is device-checked as the
real CUDA kernel checks it, so a tensor created without ``device=``, a ``.numpy()`` of a CUDA tensor or a CPU
tensor meeting a CUDA one fails here as it would on a GPU.

The first block proves the harness itself: it raises on planted device bugs and accepts what CUDA accepts (without
these, the tests of the suite's code could pass vacuously). Forward passes only, under ``torch.no_grad()`` (the
harness's limitation; see its docstring). Training batches are 64x64 and 70x100 (padded to 128x128 for the codec,
as every image that meets the codec; ``codec.pad_to_multiple``); ``evaluate`` and ``compute_bit_maps`` run on 72x72
and 70x100 images.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from conftest import AUX_DET_CFG, DET_CFG
from virtual_cuda import VirtualCudaDeviceError, is_virtual_cuda, virtual_cuda

CUDA = torch.device("cuda", 0)
# CompressAI's compress/decompress warn on every CUDA call that their autoregressive range coding is serial host
# code (slow on a GPU, not wrong): expected here
pytestmark = pytest.mark.filterwarnings("ignore:Inference on GPU is not recommended:UserWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast and does not spin-wait on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the harness itself
class _CpuConstantInForward(nn.Module):
    """A module with the classic bug: a tensor created without ``device=`` inside forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[-1]) + x


def _cuda_vec() -> torch.Tensor:
    return torch.arange(3.0).to("cuda")


PLANTED_BUGS = {
    "cuda + cpu": lambda x: x + torch.ones(3),
    "cpu + cuda in a module": lambda x: _CpuConstantInForward()(x),
    "in-place into a cpu accumulator": lambda x: torch.tensor(0.0).add_(x.sum()),
    "cpu tensor indexed by a cuda index": lambda x: torch.ones(3)[torch.tensor([0, 1], device="cuda")],
    "advanced-index assignment of cpu values": lambda x: x.__setitem__(torch.tensor([0, 1]), torch.ones(2)),
    "stack of a cuda and a cpu scalar": lambda x: torch.stack([x.sum(), torch.tensor(1.0)]),
    "cat": lambda x: torch.cat([x, torch.ones(2)]),
    "conv with a cpu weight": lambda x: F.conv1d(x[None, None], torch.ones(1, 1, 2)),
    "module not moved to cuda": lambda x: nn.Linear(3, 2)(x),
    "cpu generator for a cuda tensor": lambda x: torch.randperm(3, generator=torch.Generator(), device="cuda"),
    "torchvision nms with cpu scores": lambda x: torchvision.ops.nms(
        torch.tensor([[0.0, 0.0, 2.0, 2.0]], device="cuda"), torch.ones(1), 0.5),
    "masked_fill with a cpu mask": lambda x: x.masked_fill(torch.tensor([True, False, True]), 0.0),
    "clamp with a cpu 0-dim bound": lambda x: x.clamp(min=torch.tensor(0.5)),
}


@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_harness_raises_on_a_planted_device_bug(bug):
    with virtual_cuda(), torch.no_grad():
        x = _cuda_vec()
        with pytest.raises(VirtualCudaDeviceError):
            PLANTED_BUGS[bug](x)


def test_harness_numpy_of_a_cuda_tensor_fails_as_on_a_gpu():
    with virtual_cuda():
        x = _cuda_vec()
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            x.numpy()
        with pytest.raises(TypeError, match="can't convert cuda:0"):
            np.asarray(x * 2)
        assert x.cpu().numpy().tolist() == [0.0, 1.0, 2.0]


def _sum_of_ones_on_cuda(_) -> float:
    return float(torch.ones(2, device="cuda").sum())


def test_harness_fork_after_cuda_use_fails_as_on_a_gpu():
    import multiprocessing as mp

    with virtual_cuda():
        with mp.get_context("fork").Pool(1) as pool:  # CUDA not used yet: the child may initialise it
            assert pool.map(_sum_of_ones_on_cuda, [0]) == [2.0]
        _cuda_vec()
        with mp.get_context("fork").Pool(1) as pool:
            with pytest.raises(RuntimeError, match="Cannot re-initialize CUDA in forked subprocess"):
                pool.map(_sum_of_ones_on_cuda, [0])


def _setitem(x, index, value):
    x[index] = value
    return x


CORRECT_PATTERNS = {  # each is accepted by eager CUDA PyTorch (see the rules cited in virtual_cuda._check_devices)
    "factory on x.device": lambda x: torch.zeros(3, device=x.device) + x,
    "python scalar": lambda x: x + 1,
    "cpu 0-dim tensor": lambda x: x * torch.tensor(2.0),
    "where with cpu scalars": lambda x: torch.where(x > 0, torch.tensor(1.0), torch.tensor(0.0)),
    "cpu long index": lambda x: x[torch.tensor([0, 1])],
    "cpu bool mask": lambda x: x[torch.tensor([True, False, True])],
    "index_put with cpu index and cpu scalar": lambda x: _setitem(x.clone(), torch.tensor([0, 2]), torch.tensor(5.0)),
    "slice assignment of a cpu tensor (copy_)": lambda x: _setitem(x.clone(), slice(0, 2), torch.ones(2)),
    "copy_ from cpu": lambda x: x.clone().copy_(torch.ones(3)),
    "fill_ with a cpu scalar tensor": lambda x: x.clone().fill_(torch.tensor(7.0)),
    "torch.tensor on cuda": lambda x: torch.tensor([1.0, 2.0, 3.0], device="cuda") + x,
    "new_zeros / zeros_like": lambda x: x.new_zeros(3) + torch.zeros_like(x),
    "type_as a cuda tensor": lambda x: torch.Tensor([1.0, 2.0, 3.0]).type_as(x) + x,
}


@pytest.mark.parametrize("pattern", sorted(CORRECT_PATTERNS))
def test_harness_accepts_what_cuda_accepts(pattern):
    with virtual_cuda(), torch.no_grad():
        out = CORRECT_PATTERNS[pattern](_cuda_vec())
        assert is_virtual_cuda(out) and out.device == CUDA


def test_harness_host_values_and_restore():
    before = {"available": torch.cuda.is_available(), "swap": torch.__future__.get_swap_module_params_on_conversion(),
              "lift": torch._C._only_lift_cpu_tensors(), "cudnn": torch.backends.cudnn.enabled}
    with pytest.raises(ZeroDivisionError):
        with virtual_cuda() as stats:
            assert torch.cuda.is_available() and torch.cuda.device_count() == 1
            x = _cuda_vec()
            assert x.is_cuda and x.tolist() == [0.0, 1.0, 2.0] and float(x.sum()) == 3.0 and x[1].item() == 1.0
            host = x.to("cpu")
            assert type(host) is torch.Tensor and host.device.type == "cpu"
            assert stats["cuda_ops"] > 0
            1 / 0
    after = {"available": torch.cuda.is_available(), "swap": torch.__future__.get_swap_module_params_on_conversion(),
             "lift": torch._C._only_lift_cpu_tensors(), "cudnn": torch.backends.cudnn.enabled}
    assert after == before


def test_harness_module_to_cuda_keeps_parameters_and_values():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    w = m[0].weight
    with virtual_cuda(), torch.no_grad():
        m.to("cuda")
        assert m[0].weight is w and w.device == CUDA and isinstance(w, nn.Parameter)
        assert is_virtual_cuda(m[1].running_mean)
        y = m(x.to("cuda"))
        assert is_virtual_cuda(y) and torch.equal(y.cpu(), ref)
        with pytest.raises(VirtualCudaDeviceError):
            m(x)  # the input was not moved
        m.to("cpu")
    assert m[0].weight is w and type(w.data) is torch.Tensor and w.device.type == "cpu"


def test_harness_autocast_cuda_applies_the_cuda_cast_policy():
    """The virtual tensors carry autocast's CUDA dispatch key: autocast("cuda") casts their convs to bf16 (and
    autocast("cpu") does not touch them), as on a GPU."""
    conv = nn.Conv2d(3, 4, 3)
    with virtual_cuda(), torch.no_grad():
        conv.to("cuda")
        x = torch.rand(1, 3, 8, 8, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16
            with torch.autocast("cuda", enabled=False):
                assert conv(x).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(x).dtype == torch.float32


# ------------------------------------------------------------------------------------------ the suite's code
def _suite_models(task: str, position: str | None):
    from icm_helpers.aux_branches import build_aux_branch
    from icm_helpers.codec import build_codec
    from icm_helpers.recognizers import build_recognizer

    torch.manual_seed(0)
    rec = build_recognizer(task, "suite", 3, **(DET_CFG if task == "detection" else {"width": 8})).freeze()
    codec = build_codec(N=16)
    aux_cfg = AUX_DET_CFG if task == "detection" else {"width": 0.125}
    aux = build_aux_branch(task, position, 16, 3, recognizer=rec, **aux_cfg)
    return codec, rec, aux


def _to_cuda(*modules):
    for m in modules:
        if m is not None:
            m.to("cuda")


def _assert_terms_on_cuda(terms, position):
    assert set(terms) >= {"loss", "main", "rate", "task"} and ("aux" in terms) == (position is not None)
    for v in terms.values():
        assert is_virtual_cuda(v) and v.dim() == 0 and torch.isfinite(v.cpu())


@pytest.mark.parametrize("size", [(64, 64), (70, 100)], ids=["64x64", "70x100_padded"])
@pytest.mark.parametrize("position", [None, "enc", "dec", "task"])
@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_icm_terms_on_cuda(task, position, size):
    from icm_helpers.training import IcmSpec, icm_terms

    codec, rec, aux = _suite_models(task, position)
    with virtual_cuda() as stats, torch.no_grad():
        _to_cuda(codec, rec, aux)
        x = torch.rand(2, 3, *size, device="cuda")
        spec = IcmSpec(task, 1.0, position, 0.5, add_mse=task == "segmentation")
        _assert_terms_on_cuda(icm_terms(spec, codec.train(), rec, aux, x), position)
        assert stats["cuda_ops"] > 500


def test_icm_terms_on_virtual_cuda_equal_the_cpu_terms():
    """The harness computes the same numbers as the CPU run (same ops, same random draws): it runs the code, it
    does not just trace it."""
    from icm_helpers.training import IcmSpec, icm_terms

    codec, rec, aux = _suite_models("detection", "enc")
    x = torch.rand(2, 3, 64, 64)
    spec = IcmSpec("detection", 1.0, "enc", 0.5)
    with torch.no_grad():
        torch.manual_seed(1)
        ref = icm_terms(spec, codec.train(), rec, aux, x)
    with virtual_cuda(), torch.no_grad():
        _to_cuda(codec, rec, aux)
        torch.manual_seed(1)
        terms = icm_terms(spec, codec.train(), rec, aux, x.to("cuda"))
        assert {k: float(v) for k, v in terms.items()} == {k: float(v) for k, v in ref.items()}


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_icm_terms_with_paper_backends_on_cuda(task):
    """The pip-only paper backends (random weights) with the aux-task branch, which hooks their backbone stages."""
    from icm_helpers.aux_branches import build_aux_branch
    from icm_helpers.codec import build_codec
    from icm_helpers.recognizers import build_recognizer
    from icm_helpers.training import IcmSpec, icm_terms

    torch.manual_seed(0)
    if task == "detection":
        rec = build_recognizer(task, "torchvision", 90, pretrained=False, score_threshold=0.0).freeze()
        aux = build_aux_branch(task, "task", 16, 90, recognizer=rec, width=0.125, rpn_post_nms=(50, 50),
                               box_batch_per_image=32)
    else:
        rec = build_recognizer(task, "deeplabv3plus", 59, pretrained=False).freeze()
        aux = build_aux_branch(task, "task", 16, rec.num_outputs, recognizer=rec, width=0.125)
    codec = build_codec(N=16)
    with virtual_cuda(), torch.no_grad():
        _to_cuda(codec, rec, aux)
        x = torch.rand(1 if task == "detection" else 2, 3, 64, 64, device="cuda")  # the aux head's 1x1 BN needs 2
        terms = icm_terms(IcmSpec(task, 1.0, "task", 0.5, add_mse=task == "segmentation"), codec.train(), rec, aux, x)
        _assert_terms_on_cuda(terms, "task")


@pytest.mark.parametrize("position", [None, "enc", "dec", "task"])
@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_icm_terms_under_cuda_autocast_with_the_speed_knobs(task, position):
    """TrainConfig(amp="bf16", channels_last=True) as train_icm applies it: apply_speed_knobs (fp32 detection heads,
    channels_last modules) + with_autocast on "cuda"; g_a really runs in bf16 and the rate stays fp32."""
    from icm_helpers.training import IcmSpec, TrainConfig, apply_speed_knobs, icm_terms, with_autocast

    codec, rec, aux = _suite_models(task, position)
    cfg = TrainConfig(amp="bf16", channels_last=True)
    dtypes = []
    codec.g_a.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with virtual_cuda(), torch.no_grad():
        _to_cuda(codec, rec, aux)
        apply_speed_knobs(cfg, "cuda", codec, aux, rec, compile_recognizer=position != "task")
        x = torch.rand(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
        spec = IcmSpec(task, 1.0, position, 0.5)
        terms = with_autocast(lambda: icm_terms(spec, codec.train(), rec, aux, x), cfg.amp, "cuda")()
        _assert_terms_on_cuda(terms, position)
        assert terms["rate"].dtype == torch.float32 and dtypes == [torch.bfloat16]


def test_validation_terms_and_epoch_loader_on_cuda(world, train_set):
    from icm_helpers.data import IcmDataset
    from icm_helpers.training import EpochLoader, IcmSpec, validation_terms

    codec, rec, aux = _suite_models("detection", "enc")
    with virtual_cuda(), torch.no_grad():
        _to_cuda(codec, rec, aux)
        terms = validation_terms(IcmSpec("detection", 1.0, "enc", 0.5), codec, rec, aux, IcmDataset(world / "val"),
                                 batch_size=2, device="cuda")
        assert set(terms) == {"loss", "main", "rate", "task", "aux"} and all(np.isfinite(list(terms.values())))
        for workers in (0, 1):  # a DataLoader worker is forked after CUDA was used: it must not touch CUDA
            loader = EpochLoader(train_set, 2, seed=0, crop_size=64, device="cuda", channels_last=True,
                                 num_workers=workers, persistent_workers=False)
            batch = next(iter(loader(0)))
            assert is_virtual_cuda(batch["image"]) and batch["image"].is_contiguous(memory_format=torch.channels_last)
            assert all(is_virtual_cuda(b) for b in [*batch["boxes"], *batch["labels"], batch["roi"], batch["semantic"]])


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_recognizer_supervised_loss_on_cuda(train_set, task):
    """The forward of notebook 01's recognizer training step on a CUDA batch (ground-truth boxes / label maps)."""
    from icm_helpers.recognizers import build_recognizer
    from icm_helpers.training import EpochLoader

    torch.manual_seed(0)
    rec = build_recognizer(task, "suite", 3, **(DET_CFG if task == "detection" else {"width": 8}))
    with virtual_cuda(), torch.no_grad():
        rec.to("cuda").train()
        batch = next(iter(EpochLoader(train_set, 2, seed=0, crop_size=64, device="cuda")(0)))
        loss = rec.supervised_loss(batch)
        assert is_virtual_cuda(loss) and torch.isfinite(loss.cpu())


def test_adaptive_alpha_on_cuda():
    """alpha_mode "decay" (forward only) and the gradient-similarity arithmetic on CUDA gradients (the
    autograd.grad calls themselves need a backward pass, which the harness does not simulate)."""
    from icm_helpers.adaptive_alpha import gradient_cosine, similarity_weight, surrogate_loss, training_loss
    from icm_helpers.training import IcmSpec

    with virtual_cuda(), torch.no_grad():
        terms = {k: torch.tensor(v, device="cuda") for k, v in {"loss": 3.0, "main": 2.0, "aux": 1.0}.items()}
        loss, logs = training_loss(IcmSpec("detection", 1.0, "enc", 0.5, alpha_mode="decay"), terms, 1, 3, [])
        assert is_virtual_cuda(loss) and is_virtual_cuda(logs["aux_weight"]) and float(loss) == 2.25
        g_main = [torch.ones(3, device="cuda"), None, torch.ones(2, device="cuda")]
        g_aux = [-torch.ones(3, device="cuda"), torch.ones(1, device="cuda"), None]
        cos, shared = gradient_cosine(g_main, g_aux)
        assert shared == [0] and float(cos) == -1.0 and float(similarity_weight(cos)) == 0.0
        assert gradient_cosine([None], [torch.ones(1, device="cuda")])[0].device == CUDA
        params = [torch.ones(3, device="cuda"), torch.ones(1, device="cuda")]
        assert float(surrogate_loss(params, [g_main[0], g_aux[1]])) == 4.0


def test_step_logs_keep_device_tensors_and_sync_once():
    """fit's per-step bookkeeping with 0-dim CUDA logs (what a GPU training step returns), incl. a non-finite one."""
    from icm_helpers.training import NonFiniteLossError, _StepLogs

    with virtual_cuda(), torch.no_grad():
        logs = _StepLogs()
        for step in range(3):
            loss = torch.tensor(float(step), device="cuda")
            logs.add({"loss": loss, "rate": loss * 2, "lr_float": 0.5}, step, 0, "ckpt.pt")
        logs.check(0, "ckpt.pt")
        assert logs.means(3) == {"loss": 1.0, "rate": 2.0, "lr_float": 0.5}
        logs.add({"loss": torch.tensor(float("nan"), device="cuda"), "rate": torch.zeros((), device="cuda"),
                  "lr_float": 0.5}, 3, 0, "ckpt.pt")
        with pytest.raises(NonFiniteLossError, match="step 3"):
            logs.check(0, "ckpt.pt")


def _eval_models(task: str):
    from icm_helpers.codec import build_codec, update_entropy_tables
    from icm_helpers.recognizers import build_recognizer

    torch.manual_seed(0)
    rec = build_recognizer(task, "suite", 3, **(DET_CFG if task == "detection" else {"width": 8})).freeze()
    codec = build_codec(N=16).eval()
    update_entropy_tables(codec)
    return codec, rec


EVAL_CASES = {
    "detection-estimated": ("detection", {"bitstream": False}),
    "detection-bitstream": ("detection", {"bitstream": True}),
    "detection-roi-as_is": ("detection", {"bitstream": True, "roi_qf": 1.4, "roi_decoder": "as_is"}),
    "detection-roi-rescale": ("detection", {"bitstream": True, "roi_qf": 1.4, "roi_decoder": "rescale"}),
    "detection-bitstream-bf16": ("detection", {"bitstream": True, "amp": "bf16"}),
    "detection-uncompressed": ("detection", {"uncompressed": True}),
    "segmentation-estimated": ("segmentation", {"bitstream": False}),
    "segmentation-bitstream-bf16": ("segmentation", {"bitstream": True, "amp": "bf16"}),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_evaluate_on_cuda(world, case):
    from icm_helpers.data import IcmDataset
    from icm_helpers.evaluation import evaluate

    task, kwargs = EVAL_CASES[case][0], dict(EVAL_CASES[case][1])
    codec, rec = _eval_models(task)
    if kwargs.pop("uncompressed", False):
        codec = None
    with virtual_cuda() as stats:
        _to_cuda(codec, rec)
        res = evaluate(codec, rec, IcmDataset(world / "test"), max_images=1, device="cuda", **kwargs)
        assert stats["cuda_ops"] > 100
    assert res["num_images"] == 1 and 0.0 <= res["metric"] <= 1.0
    if codec is not None:
        assert res["bpp_estimated"] > 0 and np.isfinite(res["psnr"])
        assert (res["bpp_bitstream"] is not None) == kwargs["bitstream"]


def test_evaluate_refuses_forked_workers_on_cuda(world):
    """Forked evaluation workers cannot use CUDA ("Cannot re-initialize CUDA in forked subprocess"): refused."""
    from icm_helpers.data import IcmDataset
    from icm_helpers.evaluation import evaluate

    codec, rec = _eval_models("detection")
    with virtual_cuda():
        _to_cuda(codec, rec)
        with pytest.raises(ValueError, match="workers"):
            evaluate(codec, rec, IcmDataset(world / "test"), max_images=2, device="cuda", bitstream=False, workers=2)


def test_evaluate_bitstream_on_cuda_equals_cpu(world):
    """CompressAI's range coder is CPU code fed with ``.tolist()``; the suite hands it CUDA tensors (compress /
    decompress of a CUDA codec). The decoded images, rates and metric equal the CPU evaluation's: the host round
    trips (tolist, torch.tensor(..., device=), type_as) put every decoded symbol back on the device."""
    from icm_helpers.data import IcmDataset
    from icm_helpers.evaluation import evaluate

    codec, rec = _eval_models("detection")
    test = IcmDataset(world / "test")
    kwargs = {"bitstream": True, "roi_qf": 1.4, "roi_decoder": "rescale", "max_images": 2}
    ref = evaluate(codec, rec, test, **kwargs)
    with virtual_cuda():
        _to_cuda(codec, rec)
        res = evaluate(codec, rec, test, device="cuda", **kwargs)
    keys = ("bpp_estimated", "bpp_bitstream", "bpp_side_info", "roi_latent_fraction", "psnr", "metric")
    assert {k: res[k] for k in keys} == {k: ref[k] for k in keys}


def test_grouped_bitstream_on_cuda_equals_one_image_at_a_time_on_cpu(world):
    """``batch_images`` on a GPU: the group's latents go through one wavefront pass on the device (index tensors,
    matmuls, CDF indexes there; symbols through the host rANS coder); the records equal the CPU's one at a time."""
    from icm_helpers.data import IcmDataset
    from icm_helpers.evaluation import evaluate, without_timing

    codec, rec = _eval_models("detection")
    test = IcmDataset(world / "test")
    ref = evaluate(codec, rec, test, bitstream=True)
    with virtual_cuda() as stats:
        _to_cuda(codec, rec)
        res = evaluate(codec, rec, test, device="cuda", bitstream=True, batch_images=3)
        assert stats["cuda_ops"] > 100
    assert without_timing(res["per_image"]) == without_timing(ref["per_image"])
    assert res["metrics"] == ref["metrics"]


def test_evaluate_and_bit_maps_on_cuda_with_padding(tmp_path_factory):
    """Images whose size is not a multiple of 64 (padded inside evaluate / compute_bit_maps, cropped back)."""
    from icm_helpers.bitmaps import bit_map_rows, compute_bit_maps, roi_fraction_table
    from icm_helpers.data import IcmDataset, WorldSpec, generate_world
    from icm_helpers.evaluation import evaluate

    root = tmp_path_factory.mktemp("world72")
    generate_world(root, WorldSpec(image_size=72, n_classes=3, seed=0), {"test": 2})
    test = IcmDataset(root / "test")
    codec, rec = _eval_models("segmentation")
    with virtual_cuda():
        _to_cuda(codec, rec)
        res = evaluate(codec, rec, test, max_images=1, device="cuda", bitstream=True)
        assert res["bpp_bitstream"] > 0 and np.isfinite(res["psnr"])
        image = torch.rand(3, 70, 100)
        roi = torch.zeros(70, 100, dtype=torch.bool)
        roi[10:40, 20:60] = True
        for kw in ({}, {"roi": roi, "roi_qf": 1.4, "roi_decoder": "rescale"}):
            bm = compute_bit_maps(codec, image, **kw)
            assert bm.y.shape == (70, 100) and isinstance(bm.y, np.ndarray) and bm.bpp() > 0
        rows = bit_map_rows([codec, codec], [test[0]])
        assert rows[0]["maps"][0].shape == (72, 72) and isinstance(rows[0]["image"], np.ndarray)
        table = roi_fraction_table([{"label": "start", "lambda_": None, "codec": codec},
                                    {"label": "roi", "lambda_": None, "codec": codec, "roi_qf": 1.4,
                                     "paired_with": "start"}], test, device="cuda")
        assert [r[0] for r in table["rows"]] == ["start", "roi"] and table["summary"][1]["delta_inside"]["n"] == 2


def test_the_gpu_benchmark_runs_on_cuda(tmp_path, monkeypatch):
    """``benchmarks.eval_coder --device cuda`` (the prepared GPU check): the codec and images on the device, every
    arm (old sequence, coder, groups) gives the same records there."""
    from benchmarks.eval_coder import main

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    try:
        with virtual_cuda() as stats:
            report = main(["--device", "cuda", "--threads", str(threads), "--config", "64x64:16", "--images", "3",
                           "--batch", "2", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "b.json")])
            assert stats["cuda_ops"] > 100
    finally:
        torch.set_num_threads(threads)
    assert report["configs"][0]["all_identical"] and report["conditions"]["device"].startswith("cuda")


def test_the_coder_benchmark_runs_on_cuda(tmp_path, monkeypatch):
    """``benchmarks.coder --device cuda`` (the prepared GPU check of CompressAI's coder vs ours): the codec and images
    on the device; both coders decode the same image and the batched strings equal the single ones there."""
    from benchmarks.coder import main

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    try:
        with virtual_cuda() as stats:
            report = main(["--device", "cuda", "--threads", str(threads), "--config", "64x64:16", "--images", "2",
                           "--data", str(tmp_path / "none"), "--out", str(tmp_path / "b.json")])
            assert stats["cuda_ops"] > 100
    finally:
        torch.set_num_threads(threads)
    result = report["configs"][0]
    assert report["conditions"]["device"].startswith("cuda") and result["wavefront_batch"]["same_strings_as_single"]
    # the two coders sum the context's means in different orders (float noise: ~3e-6 here, on CPU); one symbol that
    # rounds the other way moves a latent by 1, i.e. decoded pixels by ~0.05 (seen on the H200 with TF32), so 1e-3
    # lies between the two
    assert result["summary"]["max_abs_diff_decoded"] < 1e-3
