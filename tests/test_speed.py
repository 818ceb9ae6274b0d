"""Issue 7 (speed): the speed knobs change how fast, not what (CPU checks; the GPU numbers come from bench.py)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from icm_helpers.codec import build_codec, codec_forward, compile_codec, mixed_forward
from icm_helpers.data import collate
from icm_helpers.losses import rate_bpp
from icm_helpers.training import EpochLoader, NonFiniteLossError, TrainConfig, epoch_loader, fit

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------- the loader
def _legacy_random_crop(batch, crop, generator):  # epoch_loader's crop before issue 7, verbatim
    h, w = batch["image"].shape[-2:]
    if crop >= h and crop >= w:
        return batch
    if crop > h or crop > w:
        raise ValueError("crop larger than the images")
    top = int(torch.randint(0, h - crop + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - crop + 1, (1,), generator=generator))
    out = dict(batch)
    for key in ("image", "roi", "semantic"):
        if key in batch:
            out[key] = batch[key][..., top: top + crop, left: left + crop]
    if "boxes" not in batch:
        return out
    boxes, labels = [], []
    for b, lab in zip(batch["boxes"], batch["labels"]):
        b = (b - torch.tensor([left, top, left, top], dtype=b.dtype)).clamp(0, crop)
        keep = ((b[:, 2] - b[:, 0]) >= 2) & ((b[:, 3] - b[:, 1]) >= 2)
        boxes.append(b[keep])
        labels.append(lab[keep])
    out["boxes"], out["labels"] = boxes, labels
    return out


def _legacy_crop_item(item, crop, generator):
    h, w = item["image"].shape[-2:]
    ph, pw = max(0, crop - h), max(0, crop - w)
    out = dict(item)
    if ph or pw:
        out["image"] = F.pad(item["image"], (0, pw, 0, ph))
        out["roi"] = F.pad(item["roi"], (0, pw, 0, ph))
        out["semantic"] = F.pad(item["semantic"], (0, pw, 0, ph), value=255)
    batch = _legacy_random_crop({**{k: v[None] for k, v in out.items() if k in ("image", "roi", "semantic")},
                                 "boxes": [item["boxes"]], "labels": [item["labels"]]}, crop, generator)
    for key in ("image", "roi", "semantic"):
        out[key] = batch[key][0]
    out["boxes"], out["labels"] = batch["boxes"][0], batch["labels"][0]
    return out


def _legacy_epoch_loader(dataset, batch_size, seed, epoch, crop_size):
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(dataset), generator=g).tolist()
    n = len(order) // batch_size * batch_size
    for i in range(0, n, batch_size):
        items = [dataset[j] for j in order[i: i + batch_size]]
        if crop_size and len({tuple(it["image"].shape[-2:]) for it in items}) > 1:
            yield collate([_legacy_crop_item(it, crop_size, g) for it in items])
        else:
            batch = collate(items)
            yield _legacy_random_crop(batch, crop_size, g) if crop_size else batch


class _Items(torch.utils.data.Dataset):
    """Items with boxes, ROI and label maps; ``sizes`` cycles (mixed sizes: COCO-like)."""

    def __init__(self, n, sizes, seed=0, with_size=True):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            xy = torch.rand(3, 2, generator=g) * torch.tensor([w, h]) * 0.7
            boxes = torch.cat([xy, xy + 4 + torch.rand(3, 2, generator=g) * 30], 1)
            self.items.append(
                {
                    "image": torch.rand(3, h, w, generator=g),
                    "image_id": i,
                    "boxes": boxes,
                    "labels": torch.randint(1, 4, (3,), generator=g),
                    "roi": torch.rand(h, w, generator=g) > 0.5,
                    "semantic": torch.randint(0, 4, (h, w), generator=g),
                }
            )
        if with_size:
            self.image_size = lambda j: tuple(self.items[j]["image"].shape[-2:])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, j):
        return self.items[j]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], list) and a[k] and isinstance(a[k][0], torch.Tensor):
            assert len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])), k
        else:
            assert a[k] == b[k], k


def _join(parts):
    """Rank slices of one global batch back into the global batch."""
    out = {}
    for k in parts[0]:
        if isinstance(parts[0][k], torch.Tensor):
            out[k] = torch.cat([p[k] for p in parts])
        else:
            out[k] = [x for p in parts for x in p[k]]
    return out


@pytest.mark.parametrize(
    "sizes", [[(96, 80)], [(96, 80), (64, 64), (70, 100), (50, 120)]], ids=["same_size", "mixed_sizes"]
)
def test_loader_is_the_legacy_loader_for_any_workers_and_ranks(sizes):
    """Order and crops are a function of (seed, epoch) only: identical to the pre-issue-7 epoch_loader, with 0 or 2
    DataLoader workers, and 2 ranks' slices of each global batch put together are the single-process batch."""
    ds = _Items(12, sizes)
    for epoch in (0, 3):
        legacy = list(_legacy_epoch_loader(ds, 4, 7, epoch, 64))
        assert len(legacy) == 3
        streamed = list(epoch_loader(ds, 4, 7, epoch, 64))
        planned = list(
            EpochLoader(_Items(12, sizes, with_size=False), 4, 7, 64, num_workers=1)(epoch)
        )  # sizes by loading
        workers = EpochLoader(ds, 4, 7, 64, num_workers=2, persistent_workers=True)
        with_workers = list(workers(epoch))
        with_workers_again = list(workers(epoch))  # persistent workers, next call
        ranks = [list(EpochLoader(ds, 4, 7, 64, rank=r, world_size=2)(epoch)) for r in range(2)]
        ranks_workers = [list(EpochLoader(ds, 4, 7, 64, rank=r, world_size=2, num_workers=1)(epoch)) for r in range(2)]
        for k, ref in enumerate(legacy):
            for got in (streamed[k], planned[k], with_workers[k], with_workers_again[k]):
                _same(ref, got)
            _same(ref, _join([ranks[0][k], ranks[1][k]]))
            _same(ref, _join([ranks_workers[0][k], ranks_workers[1][k]]))
            assert ranks[0][k]["image"].shape[0] == 2
    with pytest.raises(ValueError, match="divisible by the number of ranks"):
        EpochLoader(ds, 3, 0, 64, world_size=2)
    limited = list(EpochLoader(ds, 4, 7, 64, max_batches=2, num_workers=1)(0))
    assert len(limited) == 2


# ------------------------------------------------------------------------------------------------- mixed precision
def test_autocast_keeps_likelihoods_and_rate_fp32():
    torch.manual_seed(0)
    codec = build_codec(N=16)
    x = torch.rand(2, 3, 64, 64)
    for train in (True, False):
        codec.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = codec_forward(codec, x)
            rate = rate_bpp(out["likelihoods"], 64 * 64)
        assert out["likelihoods"]["y"].dtype == out["likelihoods"]["z"].dtype == torch.float32
        assert rate.dtype == torch.float32 and math.isfinite(float(rate))
        assert out["enc"].dtype == torch.float32  # y_hat: quantised in fp32
        assert out["dec"].dtype == torch.bfloat16  # g_s did run in bf16 ...
        assert out["x_hat"].dtype == torch.float32  # ... and hands back fp32
    codec.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = codec_forward(codec, x)
        loss = rate_bpp(out["likelihoods"], 64 * 64) + F.mse_loss(out["x_hat"], x)
    loss.backward()
    assert codec.g_a[0].conv1.weight.grad is not None and torch.isfinite(codec.g_a[0].conv1.weight.grad).all()
    assert codec.entropy_parameters[0].weight.grad.dtype == torch.float32


def test_amp_off_forward_is_compressai_forward_bit_for_bit():
    """The step-by-step forward (used with amp / compile) computes exactly CompressAI's forward without autocast;
    without autocast codec_forward IS CompressAI's forward."""
    torch.manual_seed(0)
    codec = build_codec(N=16)
    x = torch.rand(2, 3, 64, 64)
    for train in (True, False):
        codec.train(train)
        torch.manual_seed(1)
        a = codec_forward(codec, x)
        torch.manual_seed(1)
        b = mixed_forward(codec, x)
        torch.manual_seed(1)
        c = codec(x)
        for k in ("x_hat", "enc", "dec"):
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(a["x_hat"], c["x_hat"])
        for k in ("y", "z"):
            assert torch.equal(a["likelihoods"][k], b["likelihoods"][k]) and torch.equal(
                a["likelihoods"][k], c["likelihoods"][k]
            )


def test_compiled_codec_forward_matches_eager():
    torch.manual_seed(0)
    codec = build_codec(N=16).eval()
    x = torch.rand(1, 3, 64, 64)
    ref = codec_forward(codec, x)
    compile_codec(codec, backend="eager")  # dynamo tracing without a C++ toolchain; inductor on a GPU
    got = codec_forward(codec, x)
    for k in ("x_hat", "enc", "dec"):
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    assert set(codec.state_dict()) == set(build_codec(N=16).state_dict())  # checkpoints unchanged


def test_train_icm_with_amp_and_channels_last(tmp_path, train_set):
    """bf16 autocast + channels_last + a worker through the real train_icm: finite logs, fp32 weights, and the
    checkpoint meta is the job's (speed knobs are not part of it: a run can resume with other knobs)."""
    from conftest import tiny_icm_job

    from icm_helpers.codec import load_state

    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, crop_size=64, steps_per_epoch=2, amp="bf16", channels_last=True,
                      num_workers=1)
    codec, aux, res, _ = tiny_icm_job(tmp_path / "state.pt", train_set, cfg)
    # channels_last is for CUDA only: on the CPU the modules stay contiguous (PyTorch 2.14.1's oneDNN weight gradient
    # of 1x1 stride-2 convolutions in channels_last corrupts the heap; precision.channels_last_applies)
    assert all(p.is_contiguous() for p in codec.parameters())
    assert all(math.isfinite(v) for k, v in res.history[0].items() if k.startswith("train_"))
    assert all(p.dtype == torch.float32 for p in codec.parameters())
    meta = load_state(tmp_path / "state.pt")["meta"]
    assert "amp" not in meta and "num_workers" not in meta and meta["batch_size"] == 4
    with pytest.raises(ValueError, match="amp must be"):
        TrainConfig(amp="fp8")


# ------------------------------------------------------------------------------------------------- no per-step sync
def test_step_logs_are_read_only_at_log_points_and_epoch_end(tmp_path, monkeypatch):
    """Tensor logs are accumulated on the device; a NaN at step 1 is found at the end of the epoch, reported with its
    epoch and step, and nothing is written for that epoch."""
    from icm_helpers import training

    checks = []
    real_check = training._StepLogs.check
    monkeypatch.setattr(
        training._StepLogs, "check", lambda self, *a: (checks.append(len(self.last)), real_check(self, *a))[1]
    )
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def run(bad_step, log_every, path):
        def step_fn(batch, step):
            loss = model(batch).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return {"loss": loss.detach() * (float("nan") if step == bad_step else 1.0), "other": torch.tensor(1.0)}

        return fit(
            modules={"m": model},
            optimizers={"main": opt},
            step_fn=step_fn,
            loader_fn=lambda e: iter([torch.ones(3, 2)] * 4),
            epochs=2,
            steps_per_epoch=4,
            lr_lambda=lambda s: 1.0,
            checkpoint_path=path,
            meta={"job": "t"},
            log=None,
            log_every=log_every,
        )

    res = run(None, 0, tmp_path / "a.pt")
    assert len(checks) == 2  # once per epoch, not per step
    assert res.history[0]["train_other"] == 1.0
    checks.clear()
    run(None, 2, tmp_path / "b.pt")
    assert len(checks) == 2 * (2 + 1)  # every log_every=2 steps + the epoch end
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at epoch 1, step 5\b"):
        run(5, 0, tmp_path / "c.pt")
    from icm_helpers.codec import load_state

    assert load_state(tmp_path / "c.pt")["epoch"] == 1  # epoch 2's checkpoint was never written


# ------------------------------------------------------------------------------------------------- the benchmark
def test_bench_runs_tiny_on_cpu_and_optimized_path_equals_naive_loop(tmp_path):
    """bench.py at a tiny size on CPU writes its JSON with both modes; with amp off, the suite's train_icm path (with
    a DataLoader worker) computes exactly the naive loop's losses (same seeds, same batches, same RNG stream)."""
    sys.path.insert(0, str(ROOT / "papermill_runs"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--N", "32", "--batch-size", "2", "--crop", "64", "--steps", "2", "--warmup", "1",
            "--recognizer", "suite", "--eval-images", "2", "--amp", "none", "--num-workers", "1", "--out", str(out)]
    result = bench.main(args)
    stored = json.loads(out.read_text())
    assert set(stored["train"]) >= {"naive", "optimized", "speedup"}
    for mode in ("naive", "optimized"):
        assert stored["train"][mode]["images_per_s"] > 0 and len(stored["train"][mode]["losses"]) == 3
    assert stored["train"]["naive"]["losses"] == stored["train"]["optimized"]["losses"]
    assert {"likelihood_fp32_images_per_s", "bitstream_fp32_images_per_s"} <= set(stored["eval"])
    assert stored["pseudo_labels"]["seconds_per_batch"] > 0
    assert result["config"]["N"] == 32


def test_bf16_on_a_cpu_without_fast_kernels_warns(monkeypatch):
    """amp="bf16" on a CPU whose oneDNN has no fast bf16 kernels warns with the fix, in training (``with_autocast``)
    and in evaluation (``EvalOptions``); on a GPU, with fast kernels or without amp it stays silent (the check itself
    is oneDNN's: stubbed here, so the test is the same on any CPU)."""
    import warnings

    from icm_helpers import precision
    from icm_helpers.evaluation import EvalOptions

    for slow, amp, device, warns in ((True, "bf16", "cpu", True), (False, "bf16", "cpu", False),
                                     (True, None, "cpu", False), (True, "bf16", "cuda", False)):
        monkeypatch.setattr(precision, "slow_cpu_bf16", lambda slow=slow: slow)
        for make in (lambda: precision.with_autocast(lambda: None, amp, device),
                     lambda: EvalOptions(amp=amp, device=device)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                make()
            messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            assert bool(messages) == warns, (slow, amp, device, messages)
            assert not warns or "set amp: null for CPU runs" in messages[0]
